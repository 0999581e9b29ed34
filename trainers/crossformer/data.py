"""The crossformer's data: the seed's csv of video / audio / text files, decoding, and batch collation.

Format (the seed's `train.csv` / `validation.csv`, read by `datasets.load_dataset('csv')` upstream): a
header naming the columns `video`, `audio` and `text` (any order, other columns ignored), one row per
clip; each value is a path relative to its root (`dataset.video_root`, `audio_root`, `text_root`,
themselves relative to `dataset.data_root` unless absolute), e.g. ``youtube_5/<id>.mp4,
youtube_5/<id>.mp3, youtube_5/<id>.txt``. The text file holds the title; what follows the first `#`
(hashtags) is dropped, as the seed's LMDB builder does, and the rest normalised by `pre_text`.
`max_samples` keeps the first rows only (the seed's `--max_train_samples` / `--max_eval_samples`).

Per item: video frames chosen by `trainers.core.clip_sampling.crossformer_indices` (the seed's
`sample_frame_indices(clip_len, frame_sample_rate)`: a random window in training, the centred one at
test), decoded by `read_sampled` (only those frames), then as `VideoMAEFeatureExtractor`: shortest side
resized to `image_size`, centre crop, ImageNet mean / std. Audio: `trainers.crossformer.audio`'s kaldi
fbank image. Training items also carry a random `key` drawn from the item's own seed (`SeededItems`).

`TrainCollate` tokenizes and draws everything random about a batch (MLM positions and replacements, the
video tube masks, the audio patch masks, the video-text matching shuffle) from one generator seeded by
the batch's item keys: a batch is the same wherever and whenever it is built (any loader worker, after
a resume), and a test can rebuild it exactly.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from trainers.core.clip_sampling import crossformer_indices, read_sampled
from trainers.core.inputs import DataError
from trainers.core.text import pre_text
from trainers.core.video import VideoReadError
from trainers.crossformer.audio import AudioReadError, fbank_image, read_audio
from trainers.crossformer.config import CrossformerConfig
from trainers.crossformer.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    make_audio_mask,
    make_video_mask,
    mask_tokens,
    vtm_shuffle,
)
from trainers.singularity.data import require

logger = logging.getLogger(__name__)

COLUMNS = ("video", "audio", "text")  # the seed's csv columns
TRAIN_TRIES = 3  # a clip that fails to load in training is replaced by a random other one, this many times


def read_rows(path: str | os.PathLike, max_samples: int | None = None) -> list[dict[str, str]]:
    """The (video, audio, text) rows of a csv, the first `max_samples` only when given."""
    path = require(path, "csv file", path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: header {reader.fieldnames} lacks column(s) {missing}; expected a header row with "
                f"{', '.join(COLUMNS)} (paths relative to the video, audio and text roots)"
            )
        rows = []
        for number, row in enumerate(reader, start=2):
            if max_samples is not None and len(rows) >= max_samples:
                break
            empty = [c for c in COLUMNS if not (row[c] or "").strip()]
            if empty:
                raise DataError(
                    f"{path}, line {number}: empty {', '.join(empty)}; every row names three files"
                )
            rows.append({c: row[c].strip() for c in COLUMNS})
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def read_title(path: str | os.PathLike) -> str:
    """A text file's title: the text before the first `#`, normalised by `pre_text`."""
    return pre_text(Path(path).read_text(encoding="utf-8").split("#", 1)[0])


class VideoTransform:
    """uint8 (T, H, W, 3) -> float (T, 3, size, size), as VideoMAEFeatureExtractor: shortest side resized
    to `size` (bilinear), centre crop, scaled to [0, 1] and normalised with ImageNet's statistics."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        h, w = video.shape[-2:]
        scale = self.size / min(h, w)
        new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        if (new_h, new_w) != (h, w):
            video = F.interpolate(
                video, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        video = video[..., top : top + self.size, left : left + self.size]
        return (video - self.mean) / self.std


class ClipDataset(Dataset):
    """Items {"video" (T, 3, S, S), "audio" (1, mel bins, frames), "text" str, "index", "key"} of a csv."""

    def __init__(
        self,
        csv_path: str | os.PathLike,
        roots: Mapping[str, str | os.PathLike],
        model: CrossformerConfig,
        *,
        train: bool,
        frame_sample_rate: int,
        fbank_mean: float,
        fbank_std: float,
        max_samples: int | None = None,
    ) -> None:
        self.roots = {k: require(roots[k], f"{k} root", csv_path) for k in COLUMNS}
        self.rows = read_rows(csv_path, max_samples)
        self.train = train
        v, a = model.video, model.audio
        self.sampler = functools.partial(
            crossformer_indices, clip_len=v.num_frames, frame_sample_rate=frame_sample_rate, training=train
        )
        self.transform = VideoTransform(v.image_size)
        self.audio_args = dict(num_mel_bins=a.num_mel_bins, target_length=a.target_length, mean=fbank_mean,
                               std=fbank_std)  # fmt: skip

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, index: int, column: str) -> Path:
        return self.roots[column] / self.rows[index][column]

    def load(self, index: int) -> dict:
        frames, _, _ = read_sampled(self.path(index, "video"), self.sampler)
        audio = fbank_image(read_audio(self.path(index, "audio")), **self.audio_args)
        return {
            "video": self.transform(frames),
            "audio": torch.from_numpy(audio),
            "text": read_title(self.path(index, "text")),
            "index": index,
        }

    def __getitem__(self, index: int) -> dict:
        tries = TRAIN_TRIES if self.train else 1
        for attempt in range(1, tries + 1):
            try:
                item = self.load(index)
                break
            except (VideoReadError, AudioReadError, OSError, ValueError) as e:
                if attempt == tries:
                    raise
                logger.warning("%s; using a random other clip instead", e)
                index = int(np.random.randint(len(self)))
        if (
            self.train
        ):  # drawn from the item's seed (SeededItems): the batch's masks and shuffle derive from it
            item["key"] = int(torch.randint(0, 2**62, ()))
        return item


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batch_generator(keys: Sequence[int]) -> torch.Generator:
    """A generator seeded by a batch's item keys (order included)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


class TrainCollate:
    """Training items -> the model's inputs: masked `text_ids`, `text_mask`, `mlm_labels`, `audio`,
    `video`, `audio_mask`, `video_mask`, `video_order` (the VTM shuffle). Everything random comes from
    `batch_generator` of the items' keys."""

    def __init__(self, tokenizer, max_txt_l: int, model: CrossformerConfig) -> None:
        self.tokenizer, self.max_txt_l, self.model = tokenizer, max_txt_l, model

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        b = len(items)
        text = tokenize(self.tokenizer, [it["text"] for it in items], self.max_txt_l)
        g = batch_generator([it["key"] for it in items])
        batch = {"text_mask": text["attention_mask"]}
        if self.model.loss_weight.text_mlm > 0:
            batch["text_ids"], batch["mlm_labels"] = mask_tokens(
                self.model, text["input_ids"], text["attention_mask"], g
            )
        else:
            batch["text_ids"] = text["input_ids"]
        batch["video_mask"] = make_video_mask(self.model, b, g)
        batch["audio_mask"] = make_audio_mask(self.model, b, g)
        batch["video_order"], _ = vtm_shuffle(b, self.model.vt_match_ratio, g)
        batch["audio"] = torch.stack([it["audio"] for it in items])
        batch["video"] = torch.stack([it["video"] for it in items])
        return batch


def eval_collate(items: Sequence[dict]) -> dict:
    """Evaluation items -> `video`, `audio` stacked, `index` (row numbers); texts are tokenized apart."""
    return {
        "video": torch.stack([it["video"] for it in items]),
        "audio": torch.stack([it["audio"] for it in items]),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


__all__ = [
    "COLUMNS",
    "ClipDataset",
    "TrainCollate",
    "VideoTransform",
    "batch_generator",
    "eval_collate",
    "read_rows",
    "read_title",
    "tokenize",
]
