"""Reserve data: sample data in the real TVQA / SiQ2 formats, prep into records, streaming them."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from trainers.reserve import prep, sample_data
from trainers.reserve.config import AUDIOSPAN, END, LTOVPOOL, MASK, PADDING, START, resolve
from trainers.reserve.data import ProcessStream, Records


def tiny_layout(name: str) -> prep.Layout:
    return prep.Layout.of(resolve({"preset": "tiny"}, {"name": name, "data_root": None}))


@pytest.fixture(scope="module")
def tvqa_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tvqa")
    sample_data.generate("tvqa", root, scale=0.25)
    return root


def test_sample_tvqa_is_in_upstreams_format(tvqa_root):
    rows = [
        json.loads(line) for line in (tvqa_root / "tvqa_qa_release/tvqa_train.jsonl").read_text().splitlines()
    ]
    assert rows and set(rows[0]) == {
        "q",
        "a0",
        "a1",
        "a2",
        "a3",
        "a4",
        "answer_idx",
        "qid",
        "vid_name",
        "show_name",
        "ts",
    }
    row = rows[0]
    start, end = (float(x) for x in row["ts"].split("-"))
    assert 0 <= start < end
    frames, audio, subs = prep.media_paths("tvqa", tvqa_root, row)
    assert len(frames) == 18 and frames[0].name == "00001.jpg"  # 6 s at 3 fps
    assert audio.suffix == ".wav" and subs.suffix == ".srt"
    cues = prep.parse_subtitles(subs)
    assert cues and cues[0][0] == pytest.approx(0.2)
    # the answer is in the clip: the correct concept colours the frames
    from PIL import Image

    colour = row[f"a{row['answer_idx']}"].split()[-1]
    rgb = dict((n, c) for n, c, _ in sample_data.CONCEPTS["tvqa"])[colour]
    mean = np.asarray(Image.open(frames[0])).reshape(-1, 3).mean(0)
    assert np.argmax(mean) == np.argmax(rgb)


def test_sample_siq2_is_in_the_forks_format(tmp_path):
    sample_data.generate("siq2", tmp_path, scale=0.1)
    rows = [json.loads(line) for line in (tmp_path / "siq2_qa_release/qa_val.json").read_text().splitlines()]
    assert set(rows[0]) == {"vid_name", "ts", "q", "a0", "a1", "qid", "answer_idx"}
    assert rows[0]["answer_idx"] in (0, 1)
    frames, audio, subs = prep.media_paths("siq2", tmp_path, rows[0])
    assert frames[0].name == f"{rows[0]['vid_name']}_001.jpg"
    assert subs.read_text().startswith("WEBVTT")
    meta = prep.prepare(
        "siq2", tmp_path, str(tmp_path / "rec"), tiny_layout("siq2"), sample_data.QA_FILES["siq2"]
    )
    assert meta["layout"]["num_answers"] == 2 and meta["splits"]["val"]["counts"] == [len(rows)]


def test_prep_writes_upstreams_segment_layout(tvqa_root, tmp_path):
    layout = tiny_layout("tvqa")
    meta = prep.prepare(
        "tvqa", tvqa_root, str(tmp_path), layout, sample_data.QA_FILES["tvqa"], examples_per_shard=4
    )
    lines = (tvqa_root / "tvqa_qa_release/tvqa_train.jsonl").read_text().splitlines()
    assert sum(meta["splits"]["train"]["counts"]) == len(lines)
    assert json.loads((tmp_path / "meta.json").read_text())["vocab"] == meta["vocab"]
    # a deterministic vocabulary with upstream's special ids below the words
    assert (PADDING, START, END, MASK, AUDIOSPAN, LTOVPOOL) == (0, 1, 2, 3, 5, 6)
    again = prep.prepare("tvqa", tvqa_root, str(tmp_path / "again"), layout, sample_data.QA_FILES["tvqa"])
    assert again["vocab"] == meta["vocab"]
    records = Records(str(tmp_path), layout)
    shard = records.shard(meta["splits"]["train"]["shards"][0])
    S, (H, W), C, L = layout.num_segments, layout.frame_hw, layout.num_answers, layout.lang_seq_len
    assert shard["images"].shape == (4, S, H, W, 3) and shard["images"].dtype == np.uint8
    assert shard["audio_clips"].shape == (
        4,
        S,
        layout.num_subsegments,
        layout.spec_frames,
        layout.num_mels + 1,
    )
    assert shard["audio_seqs"].shape == shard["textonly_seqs"].shape == (4, C, L, 2)
    audio, text = shard["audio_seqs"][0, 0], shard["textonly_seqs"][0, 0]
    assert (audio[:, 0] == MASK).sum() == 1 and (text[:, 0] == MASK).sum() == 1
    # one run of AUDIOSPAN tokens per segment (indices from 1), as many as the audio encoder yields
    spans = audio[audio[:, 0] == AUDIOSPAN]
    assert sorted(set(spans[:, 1])) == list(range(1, S + 1))
    assert len(spans) == S * layout.num_subsegments * layout.audio_tokens
    # the subtitles of the text variant name the concept the answer asks for
    vocab = {w: prep.FIRST_WORD + i for i, w in enumerate(meta["vocab"])}
    row = json.loads(lines[0])
    concept = vocab[row[f"a{row['answer_idx']}"].split()[-1]]
    assert concept in text[text[:, 1] > 0, 0] or concept not in " ".join(
        c[2] for c in prep.parse_subtitles(prep.media_paths("tvqa", tvqa_root, row)[2])
    )


def test_a_record_layout_that_does_not_fit_the_model_is_refused(tvqa_root, tmp_path):
    layout = tiny_layout("tvqa")
    prep.prepare("tvqa", tvqa_root, str(tmp_path), layout, sample_data.QA_FILES["tvqa"], splits=["train"])
    other = prep.Layout(**{**layout.to_dict(), "frame_hw": (32, 32), "lang_seq_len": 64})
    with pytest.raises(ValueError, match="another model layout.*frame_hw"):
        Records(str(tmp_path), other)


@pytest.fixture
def broken_root(tmp_path):
    """Sample TVQA with three malformed inputs: a non-JSON line, a question without `ts`, a bad cue."""
    root = tmp_path / "data"
    sample_data.generate("tvqa", root, scale=0.1)
    qa = root / "tvqa_qa_release/tvqa_train.jsonl"
    lines = qa.read_text().splitlines()
    row = json.loads(lines[0])
    del row["ts"]
    lines[1:1] = ["{not json", json.dumps(row)]
    qa.write_text("\n".join(lines) + "\n")
    third = json.loads(lines[3])
    srt = prep.media_paths("tvqa", root, third)[2]
    srt.write_text(srt.read_text().replace("00:00:01,700 --> 00:00:02,900", "00:00:01.7 -> 2.9 -->"))
    bad_questions = sum(
        json.loads(line)["vid_name"] == third["vid_name"] for i, line in enumerate(lines) if i not in (1, 2)
    )
    return root, qa, srt, len(lines), bad_questions


def test_malformed_inputs_are_reported_with_file_and_line_and_skipped(broken_root, tmp_path, caplog, capsys):
    root, qa, srt, num_lines, bad_srt_questions = broken_root
    with caplog.at_level(logging.WARNING, logger="trainers.reserve.prep"):
        meta = prep.prepare(
            "tvqa",
            root,
            str(tmp_path / "out"),
            tiny_layout("tvqa"),
            sample_data.QA_FILES["tvqa"],
            splits=["train"],
        )
    warnings = [r.getMessage() for r in caplog.records]
    assert any(f"{qa}:2: not a JSON object" in w for w in warnings)
    assert any(f"{qa}:3: missing field(s) ['ts']" in w for w in warnings)
    assert any(f"{srt}:6: bad cue timing" in w for w in warnings)
    skipped = 2 + bad_srt_questions
    assert meta["splits"]["train"]["skipped"] == skipped
    assert sum(meta["splits"]["train"]["counts"]) == num_lines - skipped
    assert f"skipped {skipped} bad input(s)" in capsys.readouterr().out


def test_malformed_input_is_fatal_with_on_bad_input_fail(broken_root, tmp_path, capsys):
    root, qa, srt, *_ = broken_root
    # the first question's clip has the broken subtitle cue: preparation stops there
    with pytest.raises(prep.BadInput, match=f"^{srt}:6: bad cue timing"):
        prep.prepare(
            "tvqa",
            root,
            str(tmp_path / "out"),
            tiny_layout("tvqa"),
            sample_data.QA_FILES["tvqa"],
            on_bad_input="fail",
        )
    assert not (tmp_path / "out" / "meta.json").exists()  # no half-prepared records that look complete
    code = prep.main(
        [
            "--dataset",
            "tvqa",
            "--data-root",
            str(root),
            "--out",
            str(tmp_path / "cli"),
            "--preset",
            "tiny",
            "--on-bad-input",
            "fail",
        ]
    )
    assert code == 2 and f"error: {srt}:6: bad cue timing" in capsys.readouterr().err


def test_records_on_gcs_and_each_process_reads_its_own_shards_in_a_resumable_order(tvqa_root, fake_gcs):
    layout = tiny_layout("tvqa")
    url = "gs://vl-test/prep-test/tvqa"
    prep.prepare(
        "tvqa", tvqa_root, url, layout, sample_data.QA_FILES["tvqa"], examples_per_shard=2, splits=["train"]
    )
    records = Records(url, layout)
    streams = [ProcessStream(records, "train", 2, p, 2, seed=7) for p in range(2)]
    owned = [{name for name, _ in s.index} for s in streams]
    assert owned[0] and not owned[0] & owned[1]
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch
    a = streams[0].train_batch(epoch=1, step=2)
    b = ProcessStream(Records(url, layout), "train", 2, 0, 2, seed=7).train_batch(
        epoch=1, step=2
    )  # a restart
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["images"], streams[0].train_batch(epoch=2, step=2)["images"])
    with pytest.raises(ValueError, match="shard"):
        ProcessStream(records, "train", 2, 0, 64, seed=7)
