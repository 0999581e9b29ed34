"""The generated sample datasets: upstream formats, determinism, captions that match the pixels,
and a cache that concurrent jobs share safely."""

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from trainers.core import sample_data as sd
from trainers.core.text import pre_text
from trainers.core.video import read_frames

SCALE = 0.02  # 8 training videos and 2 per evaluation split
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {name: sd.ensure_sample_data(name, cache, scale=SCALE) for name in sd.SAMPLE_DATASETS}


def _load(root: Path, rel: str):
    text = (root / rel).read_text()
    if rel.endswith(".jsonl"):  # custom_qa: one object per line
        return [json.loads(line) for line in text.splitlines()]
    return json.loads(text)


def test_every_listed_file_exists_and_the_root_is_marked_complete(roots):
    for name, root in roots.items():
        assert root == sd.sample_data_root(name, root.parent.parent, SCALE)
        assert sd.is_complete(root)
        for rel in (*sd.dataset_files(name), sd.VOCAB_FILE):
            assert (root / rel).exists(), rel
        assert sd.dataset_for_file(sd.dataset_files(name)[0]) == name
    assert not list(roots["msrvtt"].parent.glob(".*tmp-*"))


def test_msrvtt_retrieval_format(roots):
    root = roots["msrvtt"]
    train = _load(root, "anno/msrvtt_ret_train7k.json")
    test = _load(root, "anno/msrvtt_ret_test1k.json")
    assert all(set(e) == {"video", "caption"} and isinstance(e["caption"], str) for e in train + test)
    sizes = sd.split_sizes("msrvtt", SCALE)
    assert len({e["video"] for e in train}) == sizes["train7k"]
    assert len(train) == 2 * sizes["train7k"]  # several captions per video, one entry each
    assert len(test) == len({e["video"] for e in test}) == sizes["test1k"]
    assert not {e["video"] for e in train} & {e["video"] for e in test}
    for entry in train + test:
        frames, _, vlen = read_frames(root / "videos" / entry["video"], 1, "middle")
        assert vlen == 16 and frames.shape == (1, 64, 64, 3)


def test_didemo_paragraph_format(roots):
    root = roots["didemo"]
    for split in ("train", "val", "test"):
        entries = _load(root, f"anno/didemo_ret_{split}.json")
        assert len(entries) == sd.split_sizes("didemo", SCALE)[split]
        for entry in entries:
            assert set(entry) == {"video", "caption"}
            assert isinstance(entry["caption"], list) and len(entry["caption"]) == 2
            assert all(isinstance(s, str) and s for s in entry["caption"])
            assert (root / "videos" / entry["video"]).is_file()


def test_msrvtt_qa_format(roots):
    root = roots["msrvtt_qa"]
    answer_list = _load(root, "anno/msrvtt_qa_answer_list.json")
    assert isinstance(answer_list, list) and all(isinstance(a, str) for a in answer_list)
    seen_ids = set()
    for split in ("train", "val", "test"):
        entries = _load(root, f"anno/msrvtt_qa_{split}.json")
        assert len({e["video"] for e in entries}) == sd.split_sizes("msrvtt_qa", SCALE)[split]
        for entry in entries:
            assert set(entry) == {"video", "question", "answer", "question_id"}
            assert entry["answer"] in answer_list
            assert entry["question_id"] not in seen_ids
            seen_ids.add(entry["question_id"])


def test_generation_is_deterministic(tmp_path):
    for name in sd.SAMPLE_DATASETS:
        a, b = tmp_path / f"{name}-a", tmp_path / f"{name}-b"
        sd.generate_sample_data(name, a, scale=SCALE)
        sd.generate_sample_data(name, b, scale=SCALE)
        *annos, media = sd.dataset_files(name)
        for rel in annos:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        assert (a / sd.VOCAB_FILE).read_bytes() == (b / sd.VOCAB_FILE).read_bytes()
        files = sorted(str(p.relative_to(a / media)) for p in (a / media).rglob("*") if p.is_file())
        assert files and files == sorted(
            str(p.relative_to(b / media)) for p in (b / media).rglob("*") if p.is_file()
        )
        for rel in files:  # the encoder too is set up to be reproducible
            assert (a / media / rel).read_bytes() == (b / media / rel).read_bytes(), rel


def test_vocab_covers_every_word_and_is_bert_shaped(roots):
    for root in roots.values():
        vocab = (root / sd.VOCAB_FILE).read_text().split("\n")[:-1]
        assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        assert len(vocab) % 8 == 0 and len(set(vocab)) == len(vocab)
        words = set(vocab)
        *annos, media = sd.dataset_files(root.name.split("-")[0])
        for text_file in (root / media).rglob("*.txt"):  # vat: one text file per clip, title before '#'
            assert set(pre_text(text_file.read_text().split("#")[0]).split()) <= words, text_file
        for rel in annos:
            if rel.endswith(".txt"):  # webvid's entity list: "word count" lines
                entities = [line.split()[0] for line in (root / rel).read_text().splitlines()]
                assert entities and set(entities) <= words, rel
                continue
            if rel.endswith(".csv"):  # webvid's captions (its `name` column); vat's are file lists
                rows = list(csv.DictReader((root / rel).open()))
                assert all(set(pre_text(row["name"]).split()) <= words for row in rows if "name" in row), rel
                continue
            for entry in _load(root, rel):
                if not isinstance(entry, dict):  # the answer list
                    texts = [entry]
                elif "question" in entry:
                    texts = [entry["question"], entry["answer"]]
                else:
                    texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
                for text in texts:
                    assert set(pre_text(text).split()) <= words, text


def test_test_captions_name_exactly_one_video(roots):
    """Distinct (size, colour, shape, direction) per test video: chance R@1 is 1/num_test_videos."""
    motions = sd._plan_motions(np.random.default_rng(0), 100, distinct=True)
    assert len(set(motions)) == 100
    test = _load(roots["msrvtt"], "anno/msrvtt_ret_test1k.json")
    assert len({pre_text(e["caption"]) for e in test}) == len(test)


@pytest.mark.parametrize("direction", sorted(sd.DIRECTIONS))
def test_the_rendered_shape_moves_the_way_the_caption_says_and_trails_behind(direction):
    motion = sd.Motion("big", "red", "square", direction)
    frames = sd.render_video(np.random.default_rng(1), [motion], "plain", num_frames=16).astype(int)
    red = np.array(sd.COLOURS["red"])

    def centroid(mask):
        ys, xs = np.nonzero(mask)
        return np.array([xs.mean(), ys.mean()])

    def head(frame):  # full-colour pixels
        return np.abs(frame - red).sum(-1) < 30

    def trail(frame):  # reddish but faded pixels
        return (frame[..., 0] - frame[..., 1:].max(-1) > 30) & ~head(frame)

    step = np.array(sd.DIRECTIONS[direction])
    assert (centroid(head(frames[-1])) - centroid(head(frames[0]))) @ step > 20
    for t in (0, 8, 15):  # in any single frame, the trail lies behind the shape
        assert (centroid(head(frames[t])) - centroid(trail(frames[t]))) @ step > 3


def test_concurrent_jobs_build_the_dataset_once_and_share_it(tmp_path):
    script = textwrap.dedent(
        """
        import logging, os, sys
        os.umask(0o022)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from trainers.core.sample_data import ensure_sample_data
        print(ensure_sample_data("didemo", sys.argv[1], scale=0.1))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    root = Path(paths.pop())
    assert sd.is_complete(root)
    logs = "".join(err for _, err in results)
    assert logs.count("generating sample dataset didemo") == 1
    assert logs.count("reusing sample dataset didemo") == 1
    assert [p.name for p in root.parent.iterdir() if not p.name.endswith(".lock")] == [root.name]
    assert root.stat().st_mode & 0o055 == 0o055  # readable by other users of a shared cache (umask 022)


def test_an_interrupted_build_is_cleaned_up_and_redone(tmp_path):
    root = sd.sample_data_root("msrvtt", tmp_path, SCALE)
    root.mkdir(parents=True)  # a root without its stamp is unfinished
    (root / "junk").write_text("x")
    stale = root.parent / f".{root.name}.tmp-dead"
    stale.mkdir()
    assert not sd.is_complete(root)
    assert sd.ensure_sample_data("msrvtt", tmp_path, scale=SCALE) == root
    assert sd.is_complete(root) and not (root / "junk").exists() and not stale.exists()


def test_a_cache_the_disk_cannot_hold_fails_in_one_line_and_leaves_nothing(tmp_path):
    # A real write error: past RLIMIT_FSIZE a write fails with EFBIG, as on a full disk with ENOSPC
    # (Python ignores SIGXFSZ). Before, the job ended in PyAV's traceback, with exit code 1.
    script = textwrap.dedent(
        """
        import resource, sys
        from trainers.core.inputs import DataError
        from trainers.core.sample_data import ensure_sample_data
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, resource.RLIM_INFINITY))  # videos: ~20 KB
        try:
            ensure_sample_data("msrvtt", sys.argv[1], scale=0.05)
        except DataError as e:
            print(e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    root = sd.sample_data_root("msrvtt", tmp_path, 0.05)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1, out
    assert out.stdout.startswith(
        f"cannot write the sample dataset msrvtt under {root.parent}: File too large, "
    )
    assert out.stdout.rstrip().endswith(
        "MiB free there; free some space there or set VLAUNCH_DATA_CACHE= to a directory with room"
    )
    assert [p.name for p in root.parent.iterdir()] == [f".{root.name}.lock"]  # no half-written dataset


def test_a_cache_this_user_cannot_write_is_not_told_to_free_space(tmp_path):
    def refused(tmp: Path) -> None:  # as a read-only or foreign cache dir answers
        raise PermissionError(13, "Permission denied", str(tmp / "videos"))

    with pytest.raises(sd.DataError) as caught:
        sd.build_once(tmp_path / "x", refused, lambda p: False, "sample dataset x")
    assert str(caught.value).startswith(
        f"cannot write the sample dataset x under {tmp_path}: Permission denied"
    )
    assert str(caught.value).endswith("; set VLAUNCH_DATA_CACHE= to a directory with room")
    assert [p.name for p in tmp_path.iterdir()] == [".x.lock"]  # nothing half-written


def test_cache_location_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(sd.CACHE_ENV, str(tmp_path))
    assert sd.sample_data_root("didemo") == tmp_path / f"v{sd.FORMAT_VERSION}" / "didemo"
    monkeypatch.delenv(sd.CACHE_ENV)
    assert sd.default_cache_dir() == Path.home() / ".cache" / "vlaunch" / "sample_data"


def test_unknown_dataset_names_list_the_valid_ones(capsys):
    with pytest.raises(ValueError, match="msrvtt, didemo, msrvtt_qa"):
        sd.ensure_sample_data("howto100m")
    with pytest.raises(SystemExit):
        sd.main(["howto100m"])
    assert "choose from msrvtt, didemo, msrvtt_qa" in capsys.readouterr().err


def test_cli_prints_progress_and_reuses_what_exists(tmp_path, capsys):
    assert sd.main(["--out", str(tmp_path), "--scale", "0.02", "msrvtt"]) == 0
    out = capsys.readouterr().out
    assert "msrvtt: 10/10 videos" in out and "msrvtt: done" in out
    assert sd.main(["--out", str(tmp_path), "--scale", "0.02", "msrvtt"]) == 0
    assert "msrvtt: already at" in capsys.readouterr().out
