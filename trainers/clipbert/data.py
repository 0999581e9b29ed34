"""ClipBERT's data: annotation readers, sparse clip sampling, frame transforms, batch collation.

Annotation formats, told apart by the file (a JSON list, or jsonl with one object per line):

- msrvtt retrieval: our sample data's / Singularity's JSON list ``{"video", "caption"}`` or upstream's
  jsonl ``{"caption", "clip_name"}`` (read by `trainers.alpro.data.retrieval_pairs`).
- msrvtt_qa: the JSON list ``{"video", "question", "answer", "question_id"}`` with an answer list, or
  upstream's jsonl ``{"question", "answer", "video_id", "answer_type"}`` with ``train_ans2label.json``.
- custom video QA (``conf/dataset/custom_qa.yaml``, what ClipBugBERT does with its own bug-report
  videos): a ``.jsonl`` file per split, one JSON object per line with

  ``video_id``  the video's name without extension: ``<data_root>/<media_dir>/<video_id>.mp4`` (a name
                with an extension is used as is), or instead
  ``video``     a path relative to ``<data_root>/<media_dir>`` (or absolute);
  ``question``  the question (string);
  ``answer``    the answer (string; a list of strings counts its most frequent in-vocabulary one);
  ``answer_type`` optional: a category; accuracy is also reported per category;
  ``question_id`` optional.

  Blank lines are skipped; a line that is not a JSON object or lacks a field fails with the file and
  line number. The answer vocabulary is ``anno.answer_list`` when the dataset names one (a JSON list, or
  an ``{answer: label}`` object), else every answer of the training file, most frequent first.

Frames: `trainers.core.clip_sampling.clipbert_indices` (``num_clips`` clips of ``frames_per_clip``
frames at ``target_fps``; random clip starts in training, evenly spaced clips at test), decoded by
``read_sampled`` (only the chosen frames), from video files or from the LMDB store
(`trainers.clipbert.lmdb_pack`). As upstream, each frame's longer side is resized to ``max_img_size``,
the rest zero-padded (bottom and right) to a square, and pixels normalised by
`trainers.clipbert.model.normalize_frames`. QA items group up to ``max_n_example_per_group`` questions
of one video, which then share its decoded clips (upstream's ``max_n_example_per_group``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from trainers.alpro.data import _label, load_ans2label, qa_items, read_annotations, retrieval_pairs
from trainers.clipbert.config import VisionConfig
from trainers.clipbert.lmdb_pack import LmdbVideoStore
from trainers.core.clip_sampling import clipbert_indices, read_sampled
from trainers.core.inputs import DataError, parse_json_line
from trainers.core.text import pre_text
from trainers.core.video import VideoReadError
from trainers.singularity.data import require

logger = logging.getLogger(__name__)

TRAIN_TRIES = 3  # a failed video at train time is replaced by a random other item, this many times
QA_FIELDS = ("question", "answer")


# --- annotation files ---------------------------------------------------------------------------------


def read_qa_jsonl(path: str | os.PathLike) -> list[dict]:
    """The custom jsonl QA format (see the module docstring) as normalised items: ``video`` (relative to
    the media folder, or absolute), ``question`` (after ``pre_text``), ``answers``, ``question_id``,
    ``answer_type``. A bad line raises ValueError naming the file and line."""
    path = require(path, "annotation file", path)
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            entry = parse_json_line(line, where, 'one object per line, like {"video_id": "v1", "question": "...", '
                                                 '"answer": "..."}')  # fmt: skip
            if not isinstance(entry, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
            missing = [k for k in QA_FIELDS if k not in entry]
            if "video" not in entry and "video_id" not in entry:
                missing.insert(0, "video_id (or video)")
            if missing:
                raise DataError(f"{where}: missing {', '.join(missing)}; each line needs video_id (or video), "
                                 "question and answer")  # fmt: skip
            answer = entry["answer"]
            if not isinstance(entry["question"], str) or not (
                isinstance(answer, str)
                or (isinstance(answer, list) and all(isinstance(a, str) for a in answer))
            ):
                raise DataError(
                    f"{where}: question must be a string and answer a string or a list of strings"
                )
            video = entry.get("video")
            if video is None:
                video = str(entry["video_id"])
                video = video if Path(video).suffix else f"{video}.mp4"
            items.append({
                "video": str(video),
                "question": pre_text(entry["question"]),
                "answers": [answer] if isinstance(answer, str) else list(answer),
                "question_id": entry.get("question_id", len(items)),
                "answer_type": entry.get("answer_type"),
            })  # fmt: skip
    if not items:
        raise DataError(f"{path}: no questions in the file")
    return items


def read_qa(path: str | os.PathLike) -> list[dict]:
    """QA items of a jsonl file (strict, per-line errors) or of a JSON list (upstream/sample formats)."""
    if str(path).endswith(".jsonl"):
        return read_qa_jsonl(path)
    return qa_items(read_annotations(path), path)


def answer_vocabulary(answer_list: str | os.PathLike | None, train_items: Sequence[dict]) -> dict[str, int]:
    """ans2label: from the answer list file when there is one, else the training answers by frequency."""
    if answer_list is not None:
        return load_ans2label(answer_list)
    counts = Counter(a for item in train_items for a in item["answers"])
    ordered = sorted(counts, key=lambda a: (-counts[a], a))
    return {a: i for i, a in enumerate(ordered)}


# --- frames -------------------------------------------------------------------------------------------


class VideoSource:
    """Where the encoded videos come from: files under ``media_root``, or the LMDB store."""

    def __init__(self, media_root: Path, lmdb_path: Path | None = None) -> None:
        self.media_root = media_root
        self.store = LmdbVideoStore(lmdb_path) if lmdb_path is not None else None

    def __call__(self, video: str):
        if self.store is not None:
            return self.store.get(video)
        return self.media_root / video  # an absolute `video` stays itself


class FrameTransform:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, S, S)``: longer side resized to S = max_img_size, the rest
    zero-padded at the bottom/right (upstream's ImageResize + ImagePad), then normalised."""

    def __init__(self, vision: VisionConfig) -> None:
        self.size = vision.max_img_size
        self.mean = torch.tensor(vision.pixel_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(vision.pixel_std).view(1, 3, 1, 1)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        h, w = video.shape[-2:]
        scale = self.size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            video = F.interpolate(video, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        video = F.pad(video, (0, self.size - nw, 0, self.size - nh))  # zeros, before normalising
        return (video - self.mean) / self.std


class ClipFrames(Dataset):
    """Shared clip loading: ``num_clips`` x ``frames_per_clip`` frames as ``(C, T, 3, S, S)``. A failed
    video is replaced by a random other item in training and raises at test (every test item counts)."""

    def __init__(self, source: VideoSource, vision: VisionConfig, *, num_clips: int, frames_per_clip: int,
                 target_fps: float, train: bool) -> None:  # fmt: skip
        self.source, self.train = source, train
        self.num_clips, self.frames_per_clip = num_clips, frames_per_clip
        self.sampler = functools.partial(clipbert_indices, num_clips=num_clips, frames_per_clip=frames_per_clip,
                                         target_fps=target_fps, training=train)  # fmt: skip
        self.transform = FrameTransform(vision)

    def video_of(self, index: int) -> str:
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        tries = TRAIN_TRIES if self.train else 1
        for attempt in range(1, tries + 1):
            try:
                frames, _, _ = read_sampled(self.source(self.video_of(index)), self.sampler)
                frames = self.transform(frames)
                return frames.view(self.num_clips, self.frames_per_clip, *frames.shape[1:]), index
            except (VideoReadError, ValueError, KeyError) as e:
                if attempt == tries:
                    raise
                logger.warning("%s; using a random other item instead", e)
                index = int(np.random.randint(len(self)))
        raise AssertionError("unreachable")


class RetrievalTrainDataset(ClipFrames):
    """Items ``(clips, caption, video_number)``; captions of one video share the number, so they are never
    each other's ITM negatives."""

    def __init__(self, anno_path, source: VideoSource, vision, *, paragraph=False, **clips) -> None:
        super().__init__(source, vision, train=True, **clips)
        self.pairs = retrieval_pairs(read_annotations(anno_path), anno_path, paragraph)
        self.video_numbers: dict[str, int] = {}
        for video, _ in self.pairs:
            self.video_numbers.setdefault(video, len(self.video_numbers))

    def __len__(self) -> int:
        return len(self.pairs)

    def video_of(self, index: int) -> str:
        return self.pairs[index][0]

    def __getitem__(self, index: int):
        frames, index = self.load(index)
        video, caption = self.pairs[index]
        return frames, [caption], [1], self.video_numbers[video]


class RetrievalEvalDataset(ClipFrames):
    """The distinct videos of a test file (items ``(clips, video_index)``) and all its texts: ``texts``,
    ``txt2vid[t]`` (the video of text t), ``vid2txt[v]`` (the texts of video v)."""

    def __init__(self, anno_path, source: VideoSource, vision, *, paragraph=False, **clips) -> None:
        super().__init__(source, vision, train=False, **clips)
        self.videos: list[str] = []
        self.texts: list[str] = []
        self.txt2vid: list[int] = []
        self.vid2txt: list[list[int]] = []
        index: dict[str, int] = {}
        for video, caption in retrieval_pairs(read_annotations(anno_path), anno_path, paragraph):
            if video not in index:
                index[video] = len(self.videos)
                self.videos.append(video)
                self.vid2txt.append([])
            self.vid2txt[index[video]].append(len(self.texts))
            self.txt2vid.append(index[video])
            self.texts.append(caption)

    def __len__(self) -> int:
        return len(self.videos)

    def video_of(self, index: int) -> str:
        return self.videos[index]

    def __getitem__(self, index: int):
        return self.load(index)


class QADataset(ClipFrames):
    """Items ``(clips, questions, labels, video_number)``: up to ``group_size`` questions of one video.

    A label is the answer's class in ``ans2label``, -100 when no answer of the question is in it. Training
    drops such questions (as upstream, which trains on its answer vocabulary only); at test they stay and
    count as wrong. ``groups[i]`` lists the positions in ``items`` of item i's questions.
    """

    def __init__(self, items: list[dict], source: VideoSource, vision, ans2label: dict[str, int], *,
                 train: bool, group_size: int, **clips) -> None:  # fmt: skip
        super().__init__(source, vision, train=train, **clips)
        labels = [_label(item["answers"], ans2label) for item in items]
        if train:
            kept = [i for i, label in enumerate(labels) if label >= 0]
            if len(kept) < len(items):
                logger.info("%d of %d questions have an answer outside the vocabulary; not trained on",
                            len(items) - len(kept), len(items))  # fmt: skip
            items, labels = [items[i] for i in kept], [labels[i] for i in kept]
        if not items:
            raise DataError("no question has an answer in the answer vocabulary")
        self.items, self.labels = items, [label if label >= 0 else -100 for label in labels]
        by_video: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_video.setdefault(item["video"], []).append(i)
        self.groups = [
            qs[s : s + group_size] for qs in by_video.values() for s in range(0, len(qs), group_size)
        ]
        self.video_numbers = {video: n for n, video in enumerate(by_video)}

    def __len__(self) -> int:
        return len(self.groups)

    def video_of(self, index: int) -> str:
        return self.items[self.groups[index][0]]["video"]

    def __getitem__(self, index: int):
        frames, index = self.load(index)
        group = self.groups[index]
        return (frames, [self.items[i]["question"] for i in group], [self.labels[i] for i in group],
                self.video_numbers[self.video_of(index)])  # fmt: skip


# --- batching -----------------------------------------------------------------------------------------


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class GroupCollate:
    """``(clips, texts, labels, video_number)`` items -> ``frames`` (B, C, T, 3, S, S), ``text_input_ids`` /
    ``text_attention_mask`` (N, L) for the N texts of the batch, ``labels`` (N,), ``text_to_video`` (N,)
    (the batch row of each text's video) and ``video_ids`` (B,) (the videos' numbers in the dataset)."""

    def __init__(self, tokenizer, max_len: int) -> None:
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, batch):
        frames, texts, labels, videos = zip(*batch, strict=True)
        text = tokenize(self.tokenizer, [t for group in texts for t in group], self.max_len)
        return {
            "frames": torch.stack(frames),
            "text_input_ids": text["input_ids"],
            "text_attention_mask": text["attention_mask"],
            "labels": torch.tensor([label for group in labels for label in group], dtype=torch.long),
            "text_to_video": torch.tensor(
                [b for b, group in enumerate(texts) for _ in group], dtype=torch.long
            ),
            "video_ids": torch.tensor(videos, dtype=torch.long),
        }


def video_collate(batch):
    """(clips, video_index) items -> ``frames``, ``video_idx``; the texts are tokenized once, apart."""
    frames, idx = zip(*batch, strict=True)
    return {"frames": torch.stack(frames), "video_idx": torch.tensor(idx, dtype=torch.long)}
