"""Train and evaluate ClipBERT: `python -m trainers.clipbert <run_dir>/config.yaml`.

The family's recipe (model, data, losses, evaluation) for the shared training program in
trainers/core/loop.py, which owns resume, checkpoints, preemption, tracking and metrics. Retrieval
fine-tunes with ITM: each video's caption plus `itm_neg_size` captions of other videos in the process's
batch, cross-entropy on the clip-aggregated match logits; QA with cross-entropy over the answer
vocabulary (ans2label). Both sample `num_clips` sparse clips per video in training and evaluate on
`num_clips_test` evenly spaced ones.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from trainers.clipbert import data as cdata
from trainers.clipbert.config import ClipBertConfig, TrainConfig, resolve
from trainers.clipbert.evaluation import evaluate_qa, evaluate_retrieval
from trainers.clipbert.model import build_model, sample_itm_negatives
from trainers.clipbert.weights import load_weights
from trainers.core import loop
from trainers.core.sampling import ResumableSampler, SeededItems
from trainers.core.weights import LoadReport
from trainers.singularity.train import data_root, tokenizer_for

log = logging.getLogger("trainers.clipbert")


def model_config(cfg: TrainConfig, tokenizer, num_answers: int = 0) -> ClipBertConfig:
    """The model config with the tokenizer's vocabulary and, for QA, room for every answer (upstream
    sizes the classifier max(len(ans2label), num_labels): 1500 for msrvtt_qa)."""
    transformer = dataclasses.replace(
        cfg.model.transformer, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
    )
    head = cfg.model.head
    if head.task == "qa":
        head = dataclasses.replace(head, num_labels=max(num_answers, head.num_labels))
    return dataclasses.replace(cfg.model, transformer=transformer, head=head)


class ClipBertRecipe:
    """ClipBERT for trainers.core.loop: retrieval (ITM with sampled negatives) or QA (classification)."""

    family = "clipbert"

    def __init__(self, job: dict[str, Any], device: torch.device) -> None:
        self.dataset = job["dataset"]
        self.cfg = resolve(job["trainer"], self.dataset)
        self.name = (
            f"{self.family} {self.dataset['task']} on {self.dataset['name']}: preset {self.cfg.preset}"
        )
        self.root = data_root(self.dataset)
        self.source = cdata.VideoSource(self.root / self.dataset["media_dir"], self.lmdb_path())
        self.tokenizer = tokenizer_for(self.dataset, self.root)
        self.max_len = self.cfg.max_txt_len or int(self.dataset["max_txt_l"])
        self.qa = self.dataset["task"] == "qa"
        self.ans2label: dict[str, int] = {}
        if self.qa:
            answer_list = self.dataset["anno"].get("answer_list")
            train_items = [] if answer_list else cdata.read_qa(self.anno("train"))
            self.ans2label = cdata.answer_vocabulary(answer_list and self.root / answer_list, train_items)

    def anno(self, split: str) -> Path:
        return self.root / self.dataset["anno"][split]

    def lmdb_path(self) -> Path | None:
        if self.cfg.video_store != "lmdb":
            return None
        if self.cfg.video_lmdb:
            return self.root / Path(self.cfg.video_lmdb).expanduser()  # an absolute path stays itself
        return self.root / f"{self.dataset['media_dir']}.lmdb"

    def clips(self, train: bool) -> dict[str, Any]:
        c = self.cfg.model.clips
        return {"num_clips": c.num_clips if train else c.num_clips_test, "frames_per_clip": c.frames_per_clip,
                "target_fps": self.cfg.target_fps}  # fmt: skip

    def build_model(self) -> torch.nn.Module:
        return build_model(model_config(self.cfg, self.tokenizer, len(self.ans2label)))

    def load_pretrained(self, model: torch.nn.Module, source: str) -> LoadReport:
        return load_weights(model, source)

    def train_dataset(self) -> torch.utils.data.Dataset:
        vision = self.cfg.model.vision
        if self.qa:
            return cdata.QADataset(
                cdata.read_qa(self.anno("train")), self.source, vision, self.ans2label, train=True,
                group_size=self.cfg.max_n_example_per_group, **self.clips(train=True),
            )  # fmt: skip
        return cdata.RetrievalTrainDataset(
            self.anno("train"), self.source, vision, paragraph=bool(self.dataset.get("paragraph")),
            **self.clips(train=True),
        )  # fmt: skip

    def train_data(self, seed: int, env) -> tuple:
        train_set = self.train_dataset()
        sampler = ResumableSampler(len(train_set), self.cfg.batch_size, seed, env.rank, env.world_size)
        loader = loop.make_loader(
            SeededItems(train_set), self.cfg.batch_size, self.cfg.num_workers,
            cdata.GroupCollate(self.tokenizer, self.max_len), sampler=sampler,
            # A generator of its own: creating an iterator must not consume the training RNG stream.
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        return loader, sampler

    def losses(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        frames, ids, mask = batch["frames"], batch["text_input_ids"], batch["text_attention_mask"]
        if self.qa:
            return {
                "qa": model(frames, ids, mask, batch["labels"], text_to_video=batch["text_to_video"])["loss"]
            }
        # Negatives are captions of other videos of this process's batch, drawn from the process's torch
        # RNG (seeded per rank by the loop and checkpointed with it, so a resumed run draws the same ones).
        ids, mask, labels, text_to_video = sample_itm_negatives(
            ids, mask, self.cfg.model.head.itm_neg_size, video_ids=batch["video_ids"].tolist()
        )
        return {"itm": model(frames, ids, mask, labels, text_to_video=text_to_video)["loss"]}

    def after_step(self, model: torch.nn.Module) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """Evaluate on `cfg.eval_split`; the metrics file's payload (headline + chance level)."""
        cfg, dataset = self.cfg, self.dataset
        split = cfg.eval_split if cfg.eval_split in dataset["anno"] else "test"
        vision = cfg.model.vision
        if self.qa:
            # Every question of a video shares its decoded clips at test.
            eval_set = cdata.QADataset(
                cdata.read_qa(self.anno(split)), self.source, vision, self.ans2label, train=False,
                group_size=10_000, **self.clips(train=False),
            )  # fmt: skip
            loader = loop.make_loader(eval_set, cfg.batch_size_test, cfg.num_workers,
                             cdata.GroupCollate(self.tokenizer, self.max_len))  # fmt: skip
            types = [eval_set.items[i]["answer_type"] for group in eval_set.groups for i in group]
            metrics = evaluate_qa(model, loader, device, types)
            return {
                "task": "qa",
                "split": split,
                "headline": {"accuracy": metrics["accuracy"]},
                "chance": {"accuracy": 100.0 / len(self.ans2label)},
                "metrics": metrics,
                "num_questions": len(eval_set.items),
                "num_answers": len(self.ans2label),
            }
        eval_set = cdata.RetrievalEvalDataset(
            self.anno(split), self.source, vision, paragraph=bool(dataset.get("paragraph")),
            **self.clips(train=False),
        )  # fmt: skip
        loader = loop.make_loader(eval_set, cfg.batch_size_test, cfg.num_workers, cdata.video_collate)
        text = cdata.tokenize(self.tokenizer, eval_set.texts, self.max_len)
        metrics = evaluate_retrieval(
            model, ((b["frames"], b["video_idx"]) for b in loader), text["input_ids"], text["attention_mask"],
            eval_set.txt2vid, eval_set.vid2txt, device,
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
    loop.main(ClipBertRecipe, "trainers.clipbert")
