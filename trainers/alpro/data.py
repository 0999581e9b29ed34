"""ALPRO's data: retrieval and QA datasets, frame sampling and transforms, batch collation.

Annotation formats, told apart by their keys (one file may use either):

- Singularity's / our sample data's JSON lists: retrieval ``{"video", "caption"}`` (a caption may be a
  list: one paragraph when ``paragraph``, else several captions), QA ``{"video", "question",
  "answer", "question_id"}`` with an answer list (a JSON list) as the class vocabulary.
- ALPRO's own jsonl (one object per line; a JSON list of them works too): retrieval ``{"caption",
  "clip_name"}``, QA ``{"question", "answer", "video_id", "answer_type"}`` with ``train_ans2label.json``
  (a JSON object answer -> label) as the vocabulary. ``clip_name``/``video_id`` name
  ``<media>/<id>.mp4``.
- Pretraining corpora (video-caption pairs, read like retrieval data): WebVid's release csv (columns
  ``videoid`` and ``name``, the caption), a csv with ``video_id`` and ``text``, or ALPRO's
  ``webvid2m/txt/{train,val}.pkl`` (a pandas DataFrame with ``video_id`` and ``text``; needs pandas).

Frames: ``trainers.core.clip_sampling.alpro_indices`` (``rand``/``nlvl_rand``/``headtail`` in training,
``uniform`` at test), decoded by ``read_sampled`` (only the chosen frames). Upstream's decord reader
resizes every frame to ``resize_size`` (256) and training takes one random ``image_size`` (224) square
crop shared by all frames; at test frames are resized to ``image_size``. The pixels are then
normalised with the statistics in upstream's ``config_release/*.json`` (``img_pixel_mean/std``, CLIP's):
ALPRO's TimeSformer was pre-trained on inputs normalised so (the Kinetics TimeSformer's own 0.45/0.225
would shift every released checkpoint's inputs).

QA is classification: ``ans2label`` maps each answer of the vocabulary to its class. Training items
whose answer is outside it are dropped (as upstream, which trains on the top answers only); at test
they stay and count as wrong.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from trainers.core.clip_sampling import alpro_indices, read_sampled
from trainers.core.inputs import DataError, not_json, parse_json_line, read_json
from trainers.core.text import pre_text
from trainers.core.video import VideoReadError
from trainers.singularity.data import require

logger = logging.getLogger(__name__)

PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # upstream config_release/*.json img_pixel_mean
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_TRIES = 3  # a failed video at train time is replaced by a random other item, this many times


# --- annotation files ---------------------------------------------------------------------------------


def read_annotations(path: str | os.PathLike) -> list[dict]:
    """The entries of a JSON list or a jsonl file, or the video-caption pairs of a pretraining csv / pkl
    as ``{"clip_name", "caption"}`` entries (checked to exist)."""
    path = require(path, "annotation file", path)
    if path.suffix == ".csv":
        return _read_caption_csv(path)
    if path.suffix == ".pkl":
        return _read_caption_pickle(path)
    expected = "a JSON list of objects, or jsonl (one object per line)"
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):  # one JSON list, cut short or mistyped: say where
            raise not_json(f"{path}:{e.lineno}", e, expected) from None
        entries = [
            parse_json_line(line, f"{path}:{number}", expected)
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    if isinstance(entries, dict):  # a jsonl file of a single line
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{path}: expected a JSON list or jsonl of objects")
    return entries


# (video id column, caption column) of the pretraining formats: WebVid's release, ALPRO's DataFrame.
_CAPTION_COLUMNS = (("videoid", "name"), ("video_id", "text"))


def _caption_columns(columns, path) -> tuple[str, str]:
    for pair in _CAPTION_COLUMNS:
        if set(pair) <= set(columns):
            return pair
    raise DataError(f"{path}: columns {sorted(columns)}; expected WebVid's videoid+name or video_id+text")


def _read_caption_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        video_col, text_col = _caption_columns(reader.fieldnames or [], path)
        entries = []
        for row in reader:
            video, caption = row.get(video_col), row.get(text_col)
            if not video or caption is None:
                raise DataError(f"{path}:{reader.line_num}: a row without {video_col} or {text_col}")
            entries.append({"clip_name": video, "caption": caption})
    return entries


def _read_caption_pickle(path: Path) -> list[dict]:
    try:
        import pandas as pd
    except ImportError:
        raise DataError(
            f"{path} is a pandas DataFrame pickle (ALPRO's webvid2m/txt/*.pkl) and pandas is not installed: "
            "pip install pandas, or convert it to a csv with columns video_id,text"
        ) from None
    frame = pd.read_pickle(path)
    video_col, text_col = _caption_columns(frame.columns, path)
    return [
        {"clip_name": str(v), "caption": str(t)}
        for v, t in zip(frame[video_col], frame[text_col], strict=True)
    ]


def _video_file(name: str) -> str:
    return name if Path(name).suffix else f"{name}.mp4"


def retrieval_pairs(entries: list[dict], path, paragraph: bool) -> list[tuple[str, str]]:
    """(video file relative to the media root, caption after ``pre_text``) for every caption."""
    pairs = []
    for e in entries:
        if "video" in e and "caption" in e:  # Singularity / sample data
            video = e["video"]
        elif "clip_name" in e and "caption" in e:  # ALPRO jsonl
            video = _video_file(e["clip_name"])
        else:
            raise DataError(f"{path}: retrieval entry with keys {sorted(e)}; expected video+caption or "
                             "clip_name+caption")  # fmt: skip
        captions = e["caption"]
        if isinstance(captions, str):
            captions = [captions]
        elif paragraph:
            captions = [" ".join(captions)]
        pairs.extend((video, pre_text(c)) for c in captions)
    return pairs


def qa_items(entries: list[dict], path) -> list[dict]:
    """Normalised QA entries: ``video`` (file), ``question`` (after ``pre_text``), ``answers`` (list),
    ``question_id``, ``answer_type`` (None when the format has none)."""
    items = []
    for i, e in enumerate(entries):
        if "video" in e:
            video = e["video"]
        elif "video_id" in e:
            video = _video_file(str(e["video_id"]))
        else:
            raise DataError(f"{path}: QA entry with keys {sorted(e)}; expected video or video_id")
        answer = e.get("answer", [])
        items.append({
            "video": video,
            "question": pre_text(e["question"]),
            "answers": [answer] if isinstance(answer, str) else list(answer),
            "question_id": e.get("question_id", i),
            "answer_type": e.get("answer_type"),
        })  # fmt: skip
    return items


def load_ans2label(path: str | os.PathLike) -> dict[str, int]:
    """The answer vocabulary: an answer list (JSON list, index = label) or an ``ans2label`` object."""
    vocab = read_json(require(path, "answer list", path), "a JSON list of answers or an ans2label object")
    if isinstance(vocab, dict):
        return {str(a): int(label) for a, label in vocab.items()}
    return {str(a): i for i, a in enumerate(vocab)}


# --- frames -------------------------------------------------------------------------------------------


class VideoTransform:
    """uint8 ``(T, H, W, 3)`` -> normalised float ``(T, 3, image_size, image_size)``.

    Training: square resize to ``resize_size``, one random square crop of ``image_size`` for all frames,
    optional horizontal flip. Test: square resize to ``image_size``.
    """

    def __init__(self, image_size: int, resize_size: int, train: bool, hflip: bool = False):
        self.image_size, self.resize_size, self.train, self.hflip = image_size, resize_size, train, hflip
        self.mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1) * 255

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        size = self.resize_size if self.train else self.image_size
        if video.shape[-2:] != (size, size):
            video = F.interpolate(
                video, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        if self.train:
            top, left = (int(torch.randint(0, size - self.image_size + 1, ())) for _ in range(2))
            video = video[..., top : top + self.image_size, left : left + self.image_size]
            if self.hflip and torch.rand(()) < 0.5:
                video = video.flip(-1)
        return (video - self.mean) / self.std


class _Frames(Dataset):
    """Shared video loading; a failed video is replaced by a random other item in training and raises
    at test (every test video must be scored)."""

    def __init__(self, media_root, anno_path, num_frames: int, sample: str, train: bool, transform) -> None:
        self.media_root = require(media_root, "video directory", anno_path)
        self.train = train
        self.sampler = functools.partial(alpro_indices, num_frames=num_frames, sample=sample, training=train)
        self.transform = transform

    def video_path(self, index: int) -> Path:
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        tries = TRAIN_TRIES if self.train else 1
        for attempt in range(1, tries + 1):
            try:
                frames, _, _ = read_sampled(self.video_path(index), self.sampler)
                return self.transform(frames), index
            except (VideoReadError, ValueError) as e:
                if attempt == tries:
                    raise
                logger.warning("%s; using a random other item instead", e)
                index = int(np.random.randint(len(self)))
        raise AssertionError("unreachable")


class RetrievalTrainDataset(_Frames):
    """Items ``(frames, caption, video_id)``; captions of one video share the id (VTC positives)."""

    def __init__(self, anno_path, media_root, *, num_frames, sample, image_size, resize_size,
                 hflip=False, paragraph=False) -> None:  # fmt: skip
        super().__init__(media_root, anno_path, num_frames, sample, True,
                         VideoTransform(image_size, resize_size, train=True, hflip=hflip))  # fmt: skip
        self.pairs = retrieval_pairs(read_annotations(anno_path), anno_path, paragraph)
        self.video_ids: dict[str, int] = {}
        for video, _ in self.pairs:
            self.video_ids.setdefault(video, len(self.video_ids))

    def __len__(self) -> int:
        return len(self.pairs)

    def video_path(self, index: int) -> Path:
        return self.media_root / self.pairs[index][0]

    def __getitem__(self, index: int):
        frames, index = self.load(index)
        video, caption = self.pairs[index]
        return frames, caption, self.video_ids[video]


class RetrievalEvalDataset(_Frames):
    """The distinct videos of a test file (items ``(frames, video_index)``) and all its texts:
    ``texts``, ``txt2vid[t]`` (the video of text t), ``vid2txt[v]`` (the texts of video v)."""

    def __init__(self, anno_path, media_root, *, num_frames, image_size, paragraph=False) -> None:
        super().__init__(media_root, anno_path, num_frames, "uniform", False,
                         VideoTransform(image_size, image_size, train=False))  # fmt: skip
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

    def video_path(self, index: int) -> Path:
        return self.media_root / self.videos[index]

    def __getitem__(self, index: int):
        return self.load(index)


class QADataset(_Frames):
    """Items ``(frames, question, label)``; label is the answer's class in ``ans2label`` (the most
    frequent of a question's answers that is in the vocabulary), -1 when none is (test only)."""

    def __init__(self, anno_path, media_root, ans2label: dict[str, int], *, train, num_frames, sample,
                 image_size, resize_size, hflip=False) -> None:  # fmt: skip
        super().__init__(media_root, anno_path, num_frames, sample if train else "uniform", train,
                         VideoTransform(image_size, resize_size, train=train, hflip=hflip))  # fmt: skip
        self.ans2label = ans2label
        items = qa_items(read_annotations(anno_path), anno_path)
        self.labels = [_label(item["answers"], ans2label) for item in items]
        if train:
            kept = [i for i, label in enumerate(self.labels) if label >= 0]
            if len(kept) < len(items):
                logger.info("%s: %d of %d questions have an answer outside the vocabulary; not trained on",
                            anno_path, len(items) - len(kept), len(items))  # fmt: skip
            items, self.labels = [items[i] for i in kept], [self.labels[i] for i in kept]
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def video_path(self, index: int) -> Path:
        return self.media_root / self.items[index]["video"]

    def __getitem__(self, index: int):
        frames, index = self.load(index)
        return frames, self.items[index]["question"], self.labels[index]


def _label(answers: Sequence[str], ans2label: dict[str, int]) -> int:
    known = [a for a in answers if a in ans2label]
    return ans2label[max(known, key=known.count)] if known else -1


# --- PEM regions ---------------------------------------------------------------------------------------

# Upstream's random_erase (src/datasets/dataset_pretrain_sparse.py): a rectangle of 30-50% of the frame,
# aspect ratio (h / w) between 0.3 and 1 / 0.3, on the patch grid, the same for every frame of a video.
REGION_AREA = (0.3, 0.5)
REGION_ASPECT = (0.3, 1 / 0.3)


def random_regions(
    video: torch.Tensor, patch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random rectangle per video for PEM: (region (B, H/p, W/p) bool over the patch grid,
    `black_outside(video, region)`, what the prompter scores against the entity prompts)."""
    b, _, _, h, w = video.shape
    region = sample_regions(b, h // patch_size, w // patch_size, generator).to(video.device)
    return region, black_outside(video, region, patch_size)


def sample_regions(n: int, gh: int, gw: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, gh, gw) bool: one rectangle of REGION_AREA of the grid with an aspect ratio in REGION_ASPECT
    per row, at least one cell, placed uniformly where it fits."""

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    region = torch.zeros(n, gh, gw, dtype=torch.bool)
    for i in range(n):
        area, aspect = uniform(*REGION_AREA) * gh * gw, uniform(*REGION_ASPECT)
        rh = min(gh, max(1, int((area * aspect) ** 0.5)))
        rw = min(gw, max(1, int((area / aspect) ** 0.5)))
        top = int(torch.randint(0, gh - rh + 1, (), generator=generator))
        left = int(torch.randint(0, gw - rw + 1, (), generator=generator))
        region[i, top : top + rh, left : left + rw] = True
    return region


def black_outside(video: torch.Tensor, region: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The normalised video (B, T, 3, H, W) with every pixel outside the region's patches black."""
    b, _, _, h, w = video.shape
    gh, gw = region.shape[1:]
    inside = torch.zeros(b, h, w, dtype=torch.bool, device=video.device)
    cells = region.to(video.device).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    inside[:, : gh * patch_size, : gw * patch_size] = cells
    black = (-torch.tensor(PIXEL_MEAN) / torch.tensor(PIXEL_STD)).to(video).view(1, 1, 3, 1, 1)
    return torch.where(inside[:, None, None], video, black)


# --- pretraining entities -------------------------------------------------------------------------------

# The prompt templates of ALPRO's paper (Table 8) and run_pretrain_sparse.py; an entity fills the {}.
VIDEO_PROMPT_TEMPLATES = tuple(
    f"A {kind} of {article} {{}}."
    for kind in ("footage", "video", "portrait", "video footage")
    for article in ("a", "the", "one")
)
IMAGE_PROMPT_TEMPLATES = tuple(
    f"A {kind} of {article} {{}}."
    for kind in ("photo", "picture", "good photo", "good picture")
    for article in ("a", "the", "one")
)
PROMPT_MAX_LEN = 15  # upstream tokenizes the prompts to 15 tokens


def read_entities(path: str | os.PathLike, limit: int) -> list[str]:
    """The first `limit` entities of an entity file (upstream's unigrams.txt: the entity is the first
    word of each line, e.g. ``man 41392``); blank lines are skipped, duplicates are an error."""
    path = require(path, "entity file", path)
    entities: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if words[0] in entities:
            raise DataError(f"{path}:{number}: entity {words[0]!r} listed twice")
        entities.append(words[0])
        if len(entities) == limit:
            break
    if not entities:
        raise DataError(f"{path} lists no entity; expected one per line, e.g. 'man 41392'")
    return entities


def prompt_texts(entities: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every entity, template by template (what `build_prompts` expects)."""
    return [template.format(entity) for template in templates for entity in entities]


# --- batching -----------------------------------------------------------------------------------------


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class TextCollate:
    """(frames, text, int) items -> ``frames`` (B, T, 3, H, W), ``text_input_ids``/``text_attention_mask``
    (B, L) and ``<label_key>`` (B,): the video id (retrieval) or the answer class (QA)."""

    def __init__(self, tokenizer, max_txt_l: int, label_key: str) -> None:
        self.tokenizer, self.max_txt_l, self.label_key = tokenizer, max_txt_l, label_key

    def __call__(self, batch):
        frames, texts, labels = zip(*batch, strict=True)
        text = tokenize(self.tokenizer, texts, self.max_txt_l)
        return {
            "frames": torch.stack(frames),
            "text_input_ids": text["input_ids"],
            "text_attention_mask": text["attention_mask"],
            self.label_key: torch.tensor(labels, dtype=torch.long),
        }


def video_collate(batch):
    """(frames, video_index) items -> ``frames``, ``video_idx``; the texts are tokenized once, apart."""
    frames, idx = zip(*batch, strict=True)
    return {"frames": torch.stack(frames), "video_idx": torch.tensor(idx, dtype=torch.long)}
