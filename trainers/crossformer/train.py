"""Train and evaluate the crossformer: `python -m trainers.crossformer <run_dir>/config.yaml`.

The family's recipe (model, data, losses, evaluation) for the shared training program in
trainers/core/loop.py, which owns resume, checkpoints, preemption, tracking and metrics. Pretraining
optimises the five objectives with the seed's weights (text MLM, audio MAE, video MAE, video-text
matching, contrastive over the batch of every process); evaluation scores the validation clips
(`trainers.crossformer.evaluation`).

Dataset keys (conf/dataset/vat.yaml): `anno.train` / `anno.validation` (the csv files),
`video_root` / `audio_root` / `text_root` (relative to data_root unless absolute), `tokenizer`,
`max_txt_l`, and `max_train_samples` / `max_eval_samples` (the first rows only; null: all).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from trainers.core import loop
from trainers.core.sampling import ResumableSampler, SeededItems
from trainers.core.text import VOCAB_FILE, build_tokenizer
from trainers.core.weights import LoadReport
from trainers.crossformer import data as cdata
from trainers.crossformer.config import CrossformerConfig, TrainConfig, resolve
from trainers.crossformer.evaluation import evaluate_matching
from trainers.crossformer.model import Crossformer
from trainers.crossformer.weights import load_weights
from trainers.singularity.train import data_root

log = logging.getLogger("trainers.crossformer")


def tokenizer_for(dataset: dict[str, Any], root: Path, cfg: TrainConfig) -> tuple[Any, bool]:
    """(tokenizer, whether it came from a vocab.txt): dataset.tokenizer, else the data root's vocab.txt
    (the sample data's: every word of its captions), else trainer.tokenizer (the seed's DeBERTa-v2 one,
    from the local Hugging Face cache)."""
    spec = dataset.get("tokenizer")
    if spec is None:
        spec = root / VOCAB_FILE if (root / VOCAB_FILE).exists() else cfg.tokenizer
    path = Path(str(spec)).expanduser()
    return build_tokenizer(spec), path.is_file() or (path / VOCAB_FILE).is_file()


def model_config(cfg: TrainConfig, tokenizer, exact_vocab: bool) -> CrossformerConfig:
    """The model config with the tokenizer's special ids and vocabulary: exactly its size for a vocab.txt
    tokenizer, at least the config's otherwise (DeBERTa-v2's embedding has 128100 rows for 128001 tokens,
    and its checkpoints must load)."""
    size = len(tokenizer) if exact_vocab else max(len(tokenizer), cfg.model.text.vocab_size)
    text = dataclasses.replace(
        cfg.model.text,
        vocab_size=size,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )
    return dataclasses.replace(cfg.model, text=text)


class CrossformerRecipe:
    """The crossformer for trainers.core.loop: five pretraining objectives, matching evaluation."""

    family = "crossformer"

    def __init__(self, job: dict[str, Any], device: torch.device) -> None:
        self.dataset = job["dataset"]
        self.cfg = resolve(job["trainer"], self.dataset)
        self.name = (
            f"{self.family} {self.dataset['task']} on {self.dataset['name']}: preset {self.cfg.preset}"
        )
        self.root = data_root(self.dataset)
        self.roots = {k: self.root / self.dataset[f"{k}_root"] for k in cdata.COLUMNS}
        self.tokenizer, exact_vocab = tokenizer_for(self.dataset, self.root, self.cfg)
        self.model_cfg = model_config(self.cfg, self.tokenizer, exact_vocab)

    def anno(self, split: str) -> Path:
        return self.root / self.dataset["anno"][split]

    def build_model(self) -> torch.nn.Module:
        return Crossformer(self.model_cfg)

    def load_pretrained(self, model: torch.nn.Module, source: str) -> LoadReport:
        return load_weights(model, source)

    def clips(self, split: str, train: bool) -> cdata.ClipDataset:
        limit = self.dataset.get("max_train_samples" if train else "max_eval_samples")
        return cdata.ClipDataset(
            self.anno(split), self.roots, self.model_cfg, train=train, frame_sample_rate=self.cfg.frame_sample_rate,
            fbank_mean=self.cfg.fbank_mean, fbank_std=self.cfg.fbank_std, max_samples=limit,
        )  # fmt: skip

    def collate(self) -> cdata.TrainCollate:
        return cdata.TrainCollate(self.tokenizer, self.dataset["max_txt_l"], self.model_cfg)

    def train_data(self, seed: int, env) -> tuple:
        train_set = self.clips("train", train=True)
        sampler = ResumableSampler(len(train_set), self.cfg.batch_size, seed, env.rank, env.world_size)
        loader = torch.utils.data.DataLoader(
            SeededItems(train_set), batch_size=self.cfg.batch_size, sampler=sampler,
            num_workers=self.cfg.num_workers, collate_fn=self.collate(), pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.num_workers > 0,
            # A generator of its own: creating an iterator must not consume the training RNG stream.
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        return loader, sampler

    def losses(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return model(**batch)

    def after_step(self, model: torch.nn.Module) -> None:
        """Nothing: the logit scale is clamped where it is used."""

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """Retrieval and VTM accuracy on `cfg.eval_split`; the metrics file's payload."""
        cfg = self.cfg
        split = cfg.eval_split if cfg.eval_split in self.dataset["anno"] else "validation"
        eval_set = self.clips(split, train=False)
        # A clip is a (video, audio) pair; every row's text is a query whose answer is its row's clip.
        clip_of: dict[tuple[str, str], int] = {}
        clip_rows: list[int] = []
        txt2clip: list[int] = []
        for row_index, row in enumerate(eval_set.rows):
            key = (row["video"], row["audio"])
            if key not in clip_of:
                clip_of[key] = len(clip_rows)
                clip_rows.append(row_index)
            txt2clip.append(clip_of[key])
        clip2txt: list[list[int]] = [[] for _ in clip_rows]
        for text_index, clip in enumerate(txt2clip):
            clip2txt[clip].append(text_index)
        texts = [cdata.read_title(eval_set.path(i, "text")) for i in range(len(eval_set))]
        text = cdata.tokenize(self.tokenizer, texts, self.dataset["max_txt_l"])
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(eval_set, clip_rows), batch_size=cfg.batch_size_test,
            num_workers=cfg.num_workers, collate_fn=cdata.eval_collate,
        )  # fmt: skip
        row_to_clip = {row: clip for clip, row in enumerate(clip_rows)}
        batches = (
            (b["video"], b["audio"], torch.tensor([row_to_clip[r] for r in b["index"].tolist()]))
            for b in loader
        )
        metrics = evaluate_matching(
            model, batches, text["input_ids"], text["attention_mask"], txt2clip, clip2txt, device,
            eval_masks=cfg.eval_masks,
        )  # fmt: skip
        n = len(clip_rows)
        headline = {f"R@{r}": metrics[f"vid_r{r}"] for r in (1, 5, 10) if f"vid_r{r}" in metrics}
        chance = {f"R@{r}": 100.0 * min(r, n) / n for r in (1, 5, 10) if f"R@{r}" in headline}
        if "vtm_accuracy" in metrics:
            headline["VTM acc"], chance["VTM acc"] = metrics["vtm_accuracy"], 50.0
        return {
            "task": self.dataset["task"],
            "split": split,
            # Text-to-video retrieval (vid_r*: the retrieved items are clips), as the other families report.
            "headline": headline,
            "chance": chance,
            "metrics": metrics,
            "num_clips": n,
            "num_texts": len(texts),
        }


def main() -> None:
    loop.main(CrossformerRecipe, "trainers.crossformer")
