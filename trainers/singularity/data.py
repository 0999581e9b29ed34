"""Singularity's data: retrieval and QA datasets over upstream annotation files, transforms, loaders.

Annotation files are upstream's (``msrvtt_ret_train7k.json``, ``didemo_ret_test.json``,
``msrvtt_qa_train.json``, ...): a JSON list of dicts whose ``video`` is relative to the media root.
Items carry uint8-decoded, float-normalised frames ``(T, 3, H, W)``; text stays a string until the
collate function tokenizes a whole batch.

Augmentation is upstream's (random resized crop, scale 0.5-1.0, bicubic, then a horizontal flip) in
plain torch ops. The flip is off by default here: the sample datasets' captions say "left" and "right",
which a mirrored frame contradicts. Turn it on (``hflip=True``) for real data, where upstream uses it.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from trainers.core.inputs import DataError, read_json
from trainers.core.sample_data import dataset_for_file
from trainers.core.text import pre_text
from trainers.core.video import VideoReadError, read_frames

logger = logging.getLogger(__name__)

BEIT_MEAN = (0.5, 0.5, 0.5)  # BEiT/ViT checkpoints; DeiT would use ImageNet statistics
BEIT_STD = (0.5, 0.5, 0.5)
TRAIN_TRIES = 3  # a failed video at train time is replaced by a random other item, this many times


# --- files --------------------------------------------------------------------------------------------


def require(path: str | os.PathLike, what: str, anno_file: str | os.PathLike) -> Path:
    """``path`` if it exists, else a one-line FileNotFoundError saying how to get it."""
    path = Path(path)
    if path.exists():
        return path
    anno = Path(anno_file)
    needed = f"{anno.parent.name}/{anno.name}" if path == anno else f"{path.name}/"
    name = dataset_for_file(anno.name)
    generate = (
        f"generate the sample data with `python -m trainers.core.sample_data {name}` or " if name else ""
    )
    raise FileNotFoundError(
        f"{what} not found: {path}; {generate}point data_root= at a directory holding {needed}"
    )


def load_anno(anno_path: str | os.PathLike, media_root: str | os.PathLike) -> tuple[list[dict], Path]:
    """The annotation list and the media root, both checked to exist."""
    anno_path = require(anno_path, "annotation file", anno_path)
    media_root = require(media_root, "video directory", anno_path)
    expected = "a JSON list of objects with a 'video' key (upstream format)"
    anno = read_json(anno_path, expected)
    if not isinstance(anno, list) or not all(isinstance(a, dict) and "video" in a for a in anno):
        raise DataError(f"{anno_path}: expected {expected}")
    return anno, media_root


# --- transforms ---------------------------------------------------------------------------------------


class VideoTransform:
    """uint8 ``(T, H, W, 3)`` frames -> normalised float ``(T, 3, image_res, image_res)``.

    ``train``: one random resized crop (area ``crop_scale`` of the frame, aspect ratio 3/4-4/3) shared
    by all frames, resized bicubically, then a horizontal flip with probability 0.5 when ``hflip``.
    Otherwise a plain resize. Randomness comes from torch's global generator (seeded per worker).
    """

    def __init__(
        self,
        image_res: int,
        train: bool,
        hflip: bool = False,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        mean: Sequence[float] = BEIT_MEAN,
        std: Sequence[float] = BEIT_STD,
    ):
        self.image_res = int(image_res)
        self.train = train
        self.hflip = hflip
        self.crop_scale = crop_scale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        if self.train:
            top, left, h, w = self._crop_box(video.shape[-2], video.shape[-1])
            video = video[..., top : top + h, left : left + w]
        video = video.float()
        if video.shape[-2:] != (self.image_res, self.image_res):
            video = F.interpolate(
                video,
                size=(self.image_res, self.image_res),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            ).clamp_(0, 255)
        if self.train and self.hflip and torch.rand(()) < 0.5:
            video = video.flip(-1)
        return (video - self.mean) / self.std

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop box: 10 tries at a random area and ratio, else the centre."""
        area = height * width
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * torch.empty(()).uniform_(*self.crop_scale).item()
            ratio = math.exp(torch.empty(()).uniform_(*log_ratio).item())
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                return top, left, h, w
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side


# --- datasets -----------------------------------------------------------------------------------------


class _VideoDataset(Dataset):
    """Shared video loading: frames of item ``index``, replaced by a random other item on failure
    (``num_tries`` > 1, training) or failing loudly (evaluation: every video must be scored)."""

    media_root: Path
    num_frames: int
    sample: str
    transform: VideoTransform
    num_tries: int

    def video_path(self, index: int) -> Path:
        raise NotImplementedError

    def _load_video(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(1, self.num_tries + 1):
            try:
                frames, _, _ = read_frames(self.video_path(index), self.num_frames, self.sample)
            except (VideoReadError, ValueError) as e:
                if attempt == self.num_tries:
                    if self.num_tries == 1:
                        raise
                    raise RuntimeError(
                        f"{self.num_tries} videos in a row failed to load (last: {e}); many corrupt videos?"
                    ) from e
                logger.warning("%s; using a random other item instead", e)
                index = int(np.random.randint(len(self)))
                continue
            return self.transform(frames), index
        raise AssertionError("unreachable")


class RetrievalTrainDataset(_VideoDataset):
    """Caption/video pairs for retrieval training.

    Items are ``(frames, caption, video_index)``: frames float ``(num_frames, 3, image_res, image_res)``,
    the caption after ``pre_text``, and the index of the caption's video among the file's distinct
    videos (the match id: captions of the same video are positives for each other). A ``caption`` that
    is a list is one paragraph joined with spaces when ``paragraph`` (DiDeMo, ActivityNet), else
    several captions of the video.
    """

    def __init__(
        self,
        anno_path: str | os.PathLike,
        media_root: str | os.PathLike,
        num_frames: int = 1,
        sample: str = "rand",
        image_res: int = 224,
        train: bool = True,
        *,
        hflip: bool = False,
        paragraph: bool = False,
    ):
        anno, self.media_root = load_anno(anno_path, media_root)
        self.num_frames, self.sample = num_frames, sample
        self.transform = VideoTransform(image_res, train=train, hflip=hflip)
        self.num_tries = TRAIN_TRIES if train else 1
        self.pairs: list[tuple[str, str]] = []
        self.match_ids: dict[str, int] = {}
        for entry in anno:
            video = entry["video"]
            self.match_ids.setdefault(video, len(self.match_ids))
            for caption in _captions(entry["caption"], paragraph):
                self.pairs.append((video, pre_text(caption)))

    def __len__(self) -> int:
        return len(self.pairs)

    def video_path(self, index: int) -> Path:
        return self.media_root / self.pairs[index][0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        frames, index = self._load_video(index)  # may be another item if this video failed to load
        video, caption = self.pairs[index]
        return frames, caption, self.match_ids[video]


class RetrievalEvalDataset(_VideoDataset):
    """The distinct videos of a retrieval test file, plus all its texts.

    Items are ``(frames, video_index)``. ``texts[t]`` is text ``t`` (after ``pre_text``; a DiDeMo
    paragraph is one text when ``paragraph``), ``txt2vid[t]`` its video, ``vid2txt[v]`` the texts of
    video ``v``. ``videos[v]`` is the video's path relative to the media root.
    """

    def __init__(
        self,
        anno_path: str | os.PathLike,
        media_root: str | os.PathLike,
        num_frames_test: int = 4,
        sample: str = "middle",
        image_res: int = 224,
        *,
        paragraph: bool = False,
    ):
        anno, self.media_root = load_anno(anno_path, media_root)
        self.num_frames, self.sample = num_frames_test, sample
        self.transform = VideoTransform(image_res, train=False)
        self.num_tries = 1
        self.videos: list[str] = []
        self.texts: list[str] = []
        self.txt2vid: list[int] = []
        self.vid2txt: list[list[int]] = []
        video_ids: dict[str, int] = {}
        for entry in anno:
            video = entry["video"]
            if video not in video_ids:
                video_ids[video] = len(self.videos)
                self.videos.append(video)
                self.vid2txt.append([])
            v = video_ids[video]
            for caption in _captions(entry["caption"], paragraph):
                self.vid2txt[v].append(len(self.texts))
                self.txt2vid.append(v)
                self.texts.append(pre_text(caption))

    def __len__(self) -> int:
        return len(self.videos)

    def video_path(self, index: int) -> Path:
        return self.media_root / self.videos[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._load_video(index)


class QADataset(_VideoDataset):
    """Video question answering (MSRVTT-QA format).

    Training items are ``(frames, question, answers, weights)``: each distinct answer with ``eos``
    appended, weighted by its share of the question's answers (upstream: a str answer has weight 1).
    Evaluation items are ``(frames, question, question_id)``; ``answer_list`` (the candidates to rank,
    required for evaluation) and ``ground_truth`` (``question_id`` -> answers) serve the scorer.
    ``num_frames``/``sample`` default to upstream's: 1 random frame for training, 4 middle frames else.
    """

    def __init__(
        self,
        anno_path: str | os.PathLike,
        media_root: str | os.PathLike,
        train: bool,
        num_frames: int | None = None,
        sample: str | None = None,
        image_res: int = 224,
        *,
        answer_list: str | os.PathLike | None = None,
        eos: str = "[SEP]",
        hflip: bool = False,
    ):
        self.anno, self.media_root = load_anno(anno_path, media_root)
        self.train = train
        self.num_frames = num_frames if num_frames is not None else (1 if train else 4)
        self.sample = sample or ("rand" if train else "middle")
        self.transform = VideoTransform(image_res, train=train, hflip=hflip)
        self.num_tries = TRAIN_TRIES if train else 1
        self.eos = eos
        self.questions = [pre_text(a["question"]) for a in self.anno]
        self.ground_truth = {a["question_id"]: _as_list(a["answer"]) for a in self.anno}
        self.answer_list: list[str] | None = None
        if answer_list is not None:
            self.answer_list = read_json(
                require(answer_list, "answer list", answer_list), "a JSON list of answers"
            )
        elif not train:
            raise DataError(
                f"evaluating {anno_path} needs answer_list= (e.g. anno/msrvtt_qa_answer_list.json)"
            )

    def __len__(self) -> int:
        return len(self.anno)

    def video_path(self, index: int) -> Path:
        return self.media_root / self.anno[index]["video"]

    def answers_with_weights(self, raw_answers: str | list[str]) -> tuple[list[str], list[float]]:
        """Distinct answers (with ``eos`` appended) and their frequency among ``raw_answers``."""
        raw = _as_list(raw_answers)
        counts = Counter(raw)
        answers = list(counts)
        return [f"{a} {self.eos}" for a in answers], [counts[a] / len(raw) for a in answers]

    def __getitem__(self, index: int):
        frames, index = self._load_video(index)
        question = self.questions[index]
        if self.train:
            answers, weights = self.answers_with_weights(self.anno[index]["answer"])
            return frames, question, answers, weights
        return frames, question, self.anno[index]["question_id"]


def _captions(caption: str | list[str], paragraph: bool) -> list[str]:
    if isinstance(caption, str):
        return [caption]
    return [" ".join(caption)] if paragraph else list(caption)


def _as_list(answer: str | list[str]) -> list[str]:
    return [answer] if isinstance(answer, str) else list(answer)


# --- batching -----------------------------------------------------------------------------------------


def tokenize(
    tokenizer, texts: Sequence[str], max_len: int, padding: str = "longest"
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``texts``, truncated to ``max_len`` tokens."""
    enc = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class RetrievalTrainCollate:
    """-> ``frames`` (B, T, 3, H, W), ``text_input_ids``/``text_attention_mask`` (B, L), ``idx`` (B,)."""

    def __init__(self, tokenizer, max_txt_l: int = 32, padding: str = "longest"):
        self.tokenizer, self.max_txt_l, self.padding = tokenizer, max_txt_l, padding

    def __call__(self, batch):
        frames, captions, idx = zip(*batch, strict=True)
        text = tokenize(self.tokenizer, captions, self.max_txt_l, self.padding)
        return {
            "frames": torch.stack(frames),
            "text_input_ids": text["input_ids"],
            "text_attention_mask": text["attention_mask"],
            "idx": torch.tensor(idx, dtype=torch.long),
        }


def retrieval_eval_collate(batch):
    """-> ``frames`` (B, T, 3, H, W), ``video_idx`` (B,). Texts are tokenized once, with ``tokenize``."""
    frames, idx = zip(*batch, strict=True)
    return {"frames": torch.stack(frames), "video_idx": torch.tensor(idx, dtype=torch.long)}


class QATrainCollate:
    """-> ``frames``, ``question_input_ids``/``question_attention_mask`` (B, Lq), the answers of all
    questions flattened: ``answer_input_ids``/``answer_attention_mask`` (N, La), ``answer_weights`` (N,),
    and ``answers_per_question`` (B,) saying how many of the N belong to each question."""

    def __init__(self, tokenizer, max_q_len: int = 25, max_a_len: int = 5, padding: str = "longest"):
        self.tokenizer, self.max_q_len, self.max_a_len, self.padding = (
            tokenizer,
            max_q_len,
            max_a_len,
            padding,
        )

    def __call__(self, batch):
        frames, questions, answers, weights = zip(*batch, strict=True)
        q = tokenize(self.tokenizer, questions, self.max_q_len, self.padding)
        a = tokenize(self.tokenizer, [x for xs in answers for x in xs], self.max_a_len, self.padding)
        return {
            "frames": torch.stack(frames),
            "question_input_ids": q["input_ids"],
            "question_attention_mask": q["attention_mask"],
            "answer_input_ids": a["input_ids"],
            "answer_attention_mask": a["attention_mask"],
            "answer_weights": torch.tensor([w for ws in weights for w in ws], dtype=torch.float32),
            "answers_per_question": torch.tensor([len(xs) for xs in answers], dtype=torch.long),
        }


class QAEvalCollate:
    """-> ``frames``, ``question_input_ids``/``question_attention_mask``, ``question_ids`` (a list)."""

    def __init__(self, tokenizer, max_q_len: int = 25, padding: str = "longest"):
        self.tokenizer, self.max_q_len, self.padding = tokenizer, max_q_len, padding

    def __call__(self, batch):
        frames, questions, question_ids = zip(*batch, strict=True)
        q = tokenize(self.tokenizer, questions, self.max_q_len, self.padding)
        return {
            "frames": torch.stack(frames),
            "question_input_ids": q["input_ids"],
            "question_attention_mask": q["attention_mask"],
            "question_ids": list(question_ids),
        }


class ShardSampler(Sampler[int]):
    """Evaluation split across ranks without the padding DistributedSampler adds: rank r gets items
    r, r + world_size, ... so every item is scored exactly once (items carry their index to gather)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a loader worker from its torch seed (which the loader derives from
    its generator and the worker id), so frame sampling and retries are reproducible."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: tuple[int, int] | None = None,
    collate_fn=None,
) -> DataLoader:
    """A DataLoader for ``dataset``.

    ``distributed`` is ``(rank, world_size)``: training then shards with a DistributedSampler (call
    ``set_epoch`` each epoch) and evaluation with a ``ShardSampler``. Training shuffles (from ``seed``)
    and drops the last incomplete batch unless that would leave no batch at all. Worker processes are
    persistent and seeded from ``seed`` and the rank.
    """
    rank, world_size = distributed or (0, 1)
    sampler: Sampler[int]
    if train and distributed:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    elif distributed:
        sampler = ShardSampler(len(dataset), rank, world_size)
    else:
        sampler = SequentialSampler(dataset)
    if num_workers > 0:
        # Tokenizing happens in the workers; the Rust tokenizer's own thread pool does not survive fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=train and len(sampler) >= batch_size,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed + rank),
        persistent_workers=num_workers > 0,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a distributed sampler which epoch it is (a different shuffle each epoch); no-op otherwise."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
