"""Singularity datasets, transforms, collate functions and loaders over the generated sample data."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from trainers.core import sample_data as sd
from trainers.core.text import build_tokenizer, pre_text
from trainers.core.video import VideoReadError
from trainers.singularity.data import (
    QADataset,
    QAEvalCollate,
    QATrainCollate,
    RetrievalEvalDataset,
    RetrievalTrainCollate,
    RetrievalTrainDataset,
    VideoTransform,
    build_loader,
    retrieval_eval_collate,
    tokenize,
)

RES = 32


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {name: sd.ensure_sample_data(name, cache, scale=0.02) for name in sd.SAMPLE_DATASETS}


@pytest.fixture(scope="module")
def tokenizer(roots):
    return build_tokenizer(roots["msrvtt"])


def _msrvtt_train(root, **kw):
    return RetrievalTrainDataset(root / "anno/msrvtt_ret_train7k.json", root / "videos", image_res=RES, **kw)


# --- datasets -----------------------------------------------------------------------------------------


def test_retrieval_train_items(roots):
    ds = _msrvtt_train(roots["msrvtt"])
    raw = json.loads((roots["msrvtt"] / "anno/msrvtt_ret_train7k.json").read_text())
    assert len(ds) == len(raw)
    frames, caption, match_id = ds[3]
    assert frames.dtype == torch.float32 and frames.shape == (1, 3, RES, RES)
    assert -1.0 <= frames.min() and frames.max() <= 1.0  # mean = std = 0.5
    assert caption == pre_text(raw[3]["caption"])
    # captions of the same video share its match id; different videos differ
    ids_by_video = {}
    for (video, _), mid in zip(ds.pairs, [ds[i][2] for i in range(len(ds))], strict=True):
        assert ids_by_video.setdefault(video, mid) == mid
    assert sorted(set(ids_by_video.values())) == list(range(len(ids_by_video)))


def test_retrieval_eval_indexes_videos_and_texts_consistently(roots):
    root = roots["msrvtt"]
    ds = RetrievalEvalDataset(root / "anno/msrvtt_ret_test1k.json", root / "videos", 4, image_res=RES)
    assert len(ds) == len(ds.videos) == len(ds.vid2txt)
    assert len(ds.texts) == len(ds.txt2vid)
    for v, texts in enumerate(ds.vid2txt):
        assert all(ds.txt2vid[t] == v for t in texts)
    assert sorted(t for ts in ds.vid2txt for t in ts) == list(range(len(ds.texts)))
    frames, index = ds[1]
    assert index == 1 and frames.shape == (4, 3, RES, RES)


def test_didemo_paragraphs_become_one_text_joined_with_spaces(roots):
    root = roots["didemo"]
    raw = json.loads((root / "anno/didemo_ret_test.json").read_text())
    ds = RetrievalEvalDataset(
        root / "anno/didemo_ret_test.json", root / "videos", 4, image_res=RES, paragraph=True
    )
    assert ds.texts == [pre_text(" ".join(e["caption"])) for e in raw]
    assert ds.vid2txt == [[i] for i in range(len(raw))]
    train = RetrievalTrainDataset(
        root / "anno/didemo_ret_train.json", root / "videos", image_res=RES, paragraph=True
    )
    assert len(train) == len(json.loads((root / "anno/didemo_ret_train.json").read_text()))


def test_a_missing_annotation_file_or_video_dir_says_how_to_get_it(roots, tmp_path):
    missing = tmp_path / "anno" / "msrvtt_ret_train7k.json"
    with pytest.raises(FileNotFoundError) as err:
        RetrievalTrainDataset(missing, tmp_path / "videos")
    message = str(err.value)
    assert "\n" not in message
    assert str(missing) in message
    assert "python -m trainers.core.sample_data msrvtt" in message
    assert "data_root=" in message and "anno/msrvtt_ret_train7k.json" in message

    with pytest.raises(FileNotFoundError, match=f"video directory not found: {tmp_path / 'videos'}"):
        RetrievalTrainDataset(roots["msrvtt"] / "anno/msrvtt_ret_train7k.json", tmp_path / "videos")


def test_qa_answer_weights_are_answer_frequencies_summing_to_one(roots):
    root = roots["msrvtt_qa"]
    ds = QADataset(root / "anno/msrvtt_qa_train.json", root / "videos", train=True, image_res=RES)
    answers, weights = ds.answers_with_weights(["red", "blue", "red"])
    assert answers == ["red [SEP]", "blue [SEP]"]
    assert weights == pytest.approx([2 / 3, 1 / 3])
    assert ds.answers_with_weights("left") == (["left [SEP]"], [1.0])
    frames, question, answers, weights = ds[0]
    assert frames.shape == (1, 3, RES, RES)
    assert question == pre_text(ds.anno[0]["question"]) and sum(weights) == pytest.approx(1.0)


def test_qa_evaluation_items_and_answer_list(roots):
    root = roots["msrvtt_qa"]
    with pytest.raises(ValueError, match="answer_list"):
        QADataset(root / "anno/msrvtt_qa_test.json", root / "videos", train=False)
    ds = QADataset(
        root / "anno/msrvtt_qa_test.json",
        root / "videos",
        train=False,
        image_res=RES,
        answer_list=root / "anno/msrvtt_qa_answer_list.json",
    )
    assert "red" in ds.answer_list and (ds.num_frames, ds.sample) == (4, "middle")
    frames, question, question_id = ds[2]
    assert frames.shape == (4, 3, RES, RES)
    assert ds.ground_truth[question_id] == [ds.anno[2]["answer"]]


# --- transforms ---------------------------------------------------------------------------------------


def test_train_transform_crops_the_same_box_in_every_frame_and_is_seeded_by_torch():
    frames = np.random.default_rng(0).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    frames[1] = frames[0]
    transform = VideoTransform(RES, train=True)
    torch.manual_seed(0)
    a = transform(frames)
    torch.manual_seed(0)
    b = transform(frames)
    assert a.shape == (3, 3, RES, RES)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], a[1])  # same box for every frame
    torch.manual_seed(1)
    assert not torch.equal(transform(frames), a)


def test_flip_is_off_unless_asked_because_sample_captions_say_left_and_right():
    frames = np.zeros((1, RES, RES, 3), np.uint8)
    frames[..., : RES // 2, :] = 255  # bright left half
    whole = (1.0, 1.0)  # the "crop" is the whole frame, so only a flip changes the picture
    plain = VideoTransform(RES, train=True, crop_scale=whole)
    flipping = VideoTransform(RES, train=True, hflip=True, crop_scale=whole)
    expected = VideoTransform(RES, train=False)(frames)
    torch.manual_seed(0)
    assert all(torch.equal(plain(frames), expected) for _ in range(20))
    outputs = [flipping(frames) for _ in range(20)]
    assert any(torch.equal(o, expected.flip(-1)) for o in outputs)
    assert any(torch.equal(o, expected) for o in outputs)


def test_eval_transform_resizes_and_normalises():
    frames = np.full((2, 64, 48, 3), 255, np.uint8)
    out = VideoTransform(RES, train=False)(frames)
    assert out.shape == (2, 3, RES, RES)
    torch.testing.assert_close(out, torch.ones_like(out))


# --- batching -----------------------------------------------------------------------------------------


def test_collates_tokenize_batches(roots, tokenizer):
    ds = _msrvtt_train(roots["msrvtt"])
    batch = RetrievalTrainCollate(tokenizer, max_txt_l=8)([ds[i] for i in range(4)])
    assert batch["frames"].shape == (4, 1, 3, RES, RES)
    assert batch["text_input_ids"].shape == batch["text_attention_mask"].shape
    assert batch["text_input_ids"].shape[0] == 4 and batch["text_input_ids"].shape[1] <= 8
    assert batch["idx"].dtype == torch.long
    full = tokenize(tokenizer, [ds[0][1]], max_len=64)["input_ids"][0].tolist()
    assert tokenizer.unk_token_id not in full and full[0] == tokenizer.cls_token_id

    root = roots["msrvtt_qa"]
    qa = QADataset(root / "anno/msrvtt_qa_train.json", root / "videos", train=True, image_res=RES)
    batch = QATrainCollate(tokenizer)([qa[i] for i in range(3)])
    assert (
        batch["answer_input_ids"].shape[0]
        == batch["answer_weights"].shape[0]
        == batch["answers_per_question"].sum()
    )
    assert batch["question_input_ids"].shape[0] == 3

    qa_eval = QADataset(
        root / "anno/msrvtt_qa_val.json",
        root / "videos",
        train=False,
        image_res=RES,
        answer_list=root / "anno/msrvtt_qa_answer_list.json",
    )
    batch = QAEvalCollate(tokenizer)([qa_eval[i] for i in range(2)])
    assert batch["question_ids"] == [qa_eval.anno[0]["question_id"], qa_eval.anno[1]["question_id"]]

    ret = RetrievalEvalDataset(
        roots["msrvtt"] / "anno/msrvtt_ret_test1k.json", roots["msrvtt"] / "videos", 2, image_res=RES
    )
    batch = retrieval_eval_collate([ret[0], ret[1]])
    assert batch["frames"].shape == (2, 2, 3, RES, RES) and batch["video_idx"].tolist() == [0, 1]


def _epoch(loader):
    return [(b["idx"].tolist(), b["frames"]) for b in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loaders_are_reproducible_from_the_seed(roots, tokenizer, num_workers):
    ds = _msrvtt_train(roots["msrvtt"])
    collate = RetrievalTrainCollate(tokenizer)

    def run(seed):
        torch.manual_seed(seed)  # in-process loading (num_workers=0) uses the global generators
        np.random.seed(seed)
        return _epoch(build_loader(ds, 4, True, num_workers=num_workers, seed=seed, collate_fn=collate))

    first, again, other = run(0), run(0), run(1)
    assert len(first) == len(ds) // 4
    assert [i for i, _ in first] == [i for i, _ in again]
    for (_, a), (_, b) in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    assert [i for i, _ in first] != [i for i, _ in other] or not all(
        torch.equal(a, b) for (_, a), (_, b) in zip(first, other, strict=True)
    )


def test_distributed_loaders_split_the_data_across_ranks(roots):
    root = roots["msrvtt"]
    train = _msrvtt_train(root)
    seen = []
    for rank in range(2):
        loader = build_loader(
            train, 2, True, seed=0, distributed=(rank, 2), collate_fn=lambda b: [x[2] for x in b]
        )
        seen.append([mid for batch in loader for mid in batch])
    assert len(seen[0]) == len(seen[1]) == len(train) // 2

    ev = RetrievalEvalDataset(root / "anno/msrvtt_ret_test1k.json", root / "videos", 1, image_res=RES)
    scored = []
    for rank in range(3):  # more ranks than the test set divides evenly into: nobody pads
        loader = build_loader(ev, 1, False, distributed=(rank, 3), collate_fn=retrieval_eval_collate)
        scored += [i for batch in loader for i in batch["video_idx"].tolist()]
    assert sorted(scored) == list(range(len(ev)))


def test_train_replaces_a_broken_video_and_eval_fails_on_it(roots, tmp_path, caplog):
    root = tmp_path / "msrvtt"
    shutil.copytree(roots["msrvtt"], root)
    ds = _msrvtt_train(root)
    broken = ds.pairs[0][0]
    (root / "videos" / broken).write_bytes(b"not a video")
    np.random.seed(0)
    with caplog.at_level(logging.WARNING):
        frames, caption, match_id = ds[0]
    assert broken in caplog.text
    video, expected_caption = next(p for p in ds.pairs if ds.match_ids[p[0]] == match_id and p[1] == caption)
    assert video != broken and caption == expected_caption  # the caption belongs to the substitute video

    ev = RetrievalEvalDataset(root / "anno/msrvtt_ret_train7k.json", root / "videos", 1, image_res=RES)
    with pytest.raises(VideoReadError, match=broken):
        ev[ev.videos.index(broken)]


# --- text ---------------------------------------------------------------------------------------------


def test_pre_text_normalises_like_upstream():
    assert (
        pre_text("A <person> walks-in (slowly)!  Then: left/right?")
        == "a person walks in slowly then left right"
    )
    assert pre_text('  The man\'s "dog" ~#*; runs.\n') == "the mans dog runs"
    assert pre_text("one two three four", max_words=2) == "one two"


def test_build_tokenizer_from_a_vocab_file_or_its_directory(roots):
    vocab = roots["msrvtt"] / sd.VOCAB_FILE
    for spec in (vocab, roots["msrvtt"], str(vocab)):
        tok = build_tokenizer(spec)
        assert tok.tokenize("A Red Circle moves LEFT") == ["a", "red", "circle", "moves", "left"]
        assert tok.pad_token_id == 0 and len(tok) == len(vocab.read_text().split())


def test_build_tokenizer_never_downloads_and_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_tokenizer("vlaunch-test/not-a-cached-tokenizer")
    message = str(err.value)
    assert "\n" not in message
    assert "not in the local Hugging Face cache" in message
    assert "huggingface-cli download vlaunch-test/not-a-cached-tokenizer" in message
    with pytest.raises(FileNotFoundError, match="not found"):
        build_tokenizer(str(tmp_path / "nowhere" / "vocab.txt"))
