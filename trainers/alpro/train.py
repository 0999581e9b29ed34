"""Train and evaluate ALPRO: `python -m trainers.alpro <run_dir>/config.yaml`.

The family's recipe (model, data, losses, evaluation) for the shared training program in
trainers/core/loop.py, which owns resume, checkpoints, preemption, tracking and metrics. Retrieval
fine-tunes with VTC (gathered over every process) + VTM (+ MLM when its weight is > 0); QA with
cross-entropy over the answer vocabulary (ans2label).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from trainers.alpro import data as adata
from trainers.alpro.config import AlproConfig, TrainConfig, resolve
from trainers.alpro.evaluation import evaluate_qa, evaluate_retrieval
from trainers.alpro.model import Alpro, AlproQA
from trainers.alpro.weights import load_weights
from trainers.core import loop
from trainers.core.sampling import ResumableSampler, SeededItems
from trainers.singularity.train import data_root, tokenizer_for

log = logging.getLogger("trainers.alpro")


def model_config(cfg: TrainConfig, tokenizer, num_labels: int = 0) -> AlproConfig:
    """The model config with the tokenizer's vocabulary and special ids, and the QA class count."""
    text = dataclasses.replace(
        cfg.model.text,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )
    return dataclasses.replace(cfg.model, text=text, num_labels=num_labels or cfg.model.num_labels)


class AlproRecipe:
    """ALPRO for trainers.core.loop: retrieval (VTC + VTM [+ MLM]) or QA (classification)."""

    def __init__(self, job: dict[str, Any], device: torch.device) -> None:
        self.dataset = job["dataset"]
        self.cfg = resolve(job["trainer"], self.dataset)
        self.name = f"alpro {self.dataset['task']} on {self.dataset['name']}: preset {self.cfg.preset}"
        self.root = data_root(self.dataset)
        self.media = self.root / self.dataset["media_dir"]
        self.tokenizer = tokenizer_for(self.dataset, self.root)
        self.qa = self.dataset["task"] == "qa"
        self.ans2label = adata.load_ans2label(self.anno("answer_list")) if self.qa else {}

    def anno(self, split: str) -> Path:
        return self.root / self.dataset["anno"][split]

    @property
    def video(self):
        return self.cfg.model.video

    def build_model(self) -> torch.nn.Module:
        if self.qa:
            return AlproQA(model_config(self.cfg, self.tokenizer, num_labels=len(self.ans2label)))
        return Alpro(model_config(self.cfg, self.tokenizer))

    def load_pretrained(self, model: torch.nn.Module, source: str) -> str:
        return str(load_weights(model, source))

    def train_dataset(self) -> torch.utils.data.Dataset:
        common = dict(num_frames=self.video.num_frames, sample=self.cfg.sample, image_size=self.video.image_size,
                      resize_size=self.cfg.resize_size, hflip=self.cfg.hflip)  # fmt: skip
        if self.qa:
            return adata.QADataset(self.anno("train"), self.media, self.ans2label, train=True, **common)
        return adata.RetrievalTrainDataset(
            self.anno("train"), self.media, paragraph=bool(self.dataset.get("paragraph")), **common
        )

    def collate(self) -> adata.TextCollate:
        return adata.TextCollate(self.tokenizer, self.dataset["max_txt_l"], "labels" if self.qa else "idx")

    def train_data(self, seed: int, env) -> tuple:
        train_set = self.train_dataset()
        sampler = ResumableSampler(len(train_set), self.cfg.batch_size, seed, env.rank, env.world_size)
        loader = loop.make_loader(
            SeededItems(train_set), self.cfg.batch_size, self.cfg.num_workers, self.collate(), sampler=sampler,
            # A generator of its own: creating an iterator must not consume the training RNG stream.
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        return loader, sampler

    def losses(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.qa:
            return model(
                batch["frames"], batch["text_input_ids"], batch["text_attention_mask"], batch["labels"]
            )
        return model(batch["frames"], batch["text_input_ids"], batch["text_attention_mask"], idx=batch["idx"])

    def after_step(self, model: torch.nn.Module) -> None:
        if hasattr(model, "clamp_temp"):
            model.clamp_temp()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """Evaluate on `cfg.eval_split`; the metrics file's payload (headline + chance level)."""
        cfg, dataset = self.cfg, self.dataset
        split = cfg.eval_split if cfg.eval_split in dataset["anno"] else "test"
        if self.qa:
            eval_set = adata.QADataset(
                self.anno(split), self.media, self.ans2label, train=False, num_frames=self.video.num_frames,
                sample="uniform", image_size=self.video.image_size, resize_size=self.video.image_size,
            )  # fmt: skip
            loader = loop.make_loader(eval_set, cfg.batch_size_test, cfg.num_workers, self.collate())
            batches = (
                (b["frames"], b["text_input_ids"], b["text_attention_mask"], b["labels"]) for b in loader
            )
            types = [item["answer_type"] for item in eval_set.items]
            metrics = evaluate_qa(model, batches, device, types)
            return {
                "task": "qa",
                "split": split,
                "headline": {"accuracy": metrics["accuracy"]},
                "chance": {"accuracy": 100.0 / len(self.ans2label)},
                "metrics": metrics,
                "num_questions": len(eval_set),
                "num_answers": len(self.ans2label),
            }
        eval_set = adata.RetrievalEvalDataset(
            self.anno(split), self.media, num_frames=self.video.num_frames, image_size=self.video.image_size,
            paragraph=bool(dataset.get("paragraph")),
        )  # fmt: skip
        loader = loop.make_loader(eval_set, cfg.batch_size_test, cfg.num_workers, adata.video_collate)
        text = adata.tokenize(self.tokenizer, eval_set.texts, dataset["max_txt_l"])
        metrics = evaluate_retrieval(
            model, ((b["frames"], b["video_idx"]) for b in loader), text["input_ids"], text["attention_mask"],
            eval_set.txt2vid, eval_set.vid2txt, cfg.model.k_test, device,
        )  # fmt: skip
        n = len(eval_set)
        return {
            "task": "retrieval",
            "split": split,
            # Text-to-video retrieval: vid_r* (the retrieved items are videos), as Singularity reports.
            "headline": {f"R@{r}": metrics[f"vid_r{r}"] for r in (1, 5, 10)},
            "chance": {f"R@{r}": 100.0 * min(r, n) / n for r in (1, 5, 10)},
            "metrics": metrics,
            "num_videos": n,
            "num_texts": len(eval_set.texts),
        }


def main() -> None:
    loop.main(AlproRecipe, "trainers.alpro")
