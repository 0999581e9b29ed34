"""Train and evaluate ALPRO: `python -m trainers.alpro <run_dir>/config.yaml`.

The family's recipe (model, data, losses, evaluation) for the shared training program in
trainers/core/loop.py, which owns resume, checkpoints, preemption, tracking and metrics. Retrieval
fine-tunes with VTC (gathered over every process) + VTM (+ MLM when its weight is > 0); QA with
cross-entropy over the answer vocabulary (ans2label). Pretraining on video-caption pairs (dataset task
pretrain_captions) trains the prompter (`trainer.stage=prompter`: VTC alone), then ALPRO
(`trainer.stage=alpro trainer.prompter=<the prompter run>`: VTC + VTM + MLM + PEM); both are evaluated
by zero-shot retrieval on the held-out split, the prompter also by how often its top entity for a video
is a word of the video's caption.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from trainers.alpro import data as adata
from trainers.alpro.config import PRETRAIN_TASK, AlproConfig, TrainConfig, resolve
from trainers.alpro.evaluation import evaluate_entities, evaluate_qa, evaluate_retrieval
from trainers.alpro.model import Alpro, AlproPrompter, AlproQA
from trainers.alpro.weights import load_prompter, load_weights
from trainers.core import loop
from trainers.core.sampling import ResumableSampler, SeededItems
from trainers.core.weights import LoadReport, local_source
from trainers.singularity.train import data_root, tokenizer_for

log = logging.getLogger("trainers.alpro")


def model_config(cfg: TrainConfig, tokenizer, num_labels: int = 0, num_entities: int = 0) -> AlproConfig:
    """The model config with the tokenizer's vocabulary and special ids, the QA class count and the
    number of PEM entities (those of the entity file, at most model.num_entities)."""
    text = dataclasses.replace(
        cfg.model.text,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )
    return dataclasses.replace(
        cfg.model,
        text=text,
        num_labels=num_labels or cfg.model.num_labels,
        num_entities=num_entities or cfg.model.num_entities,
    )


class AlproRecipe:
    """ALPRO for trainers.core.loop: retrieval (VTC + VTM [+ MLM]) or QA (classification)."""

    family = "alpro"

    def __init__(self, job: dict[str, Any], device: torch.device) -> None:
        self.dataset = job["dataset"]
        self.run_dir = Path(job.get("job", {}).get("run_dir", "."))  # tests build recipes without one
        self.cfg = resolve(job["trainer"], self.dataset)
        self.name = (
            f"{self.family} {self.dataset['task']} on {self.dataset['name']}: preset {self.cfg.preset}"
        )
        self.root = data_root(self.dataset)
        self.media = self.root / self.dataset["media_dir"]
        self.tokenizer = tokenizer_for(self.dataset, self.root)
        self.qa = self.dataset["task"] == "qa"
        self.ans2label = adata.load_ans2label(self.anno("answer_list")) if self.qa else {}
        self.pretraining = self.dataset["task"] == PRETRAIN_TASK
        self.stage = self.cfg.stage if self.pretraining else None
        if self.pretraining:
            self.name += f", stage {self.stage}"
        entities = self.dataset.get("entities") if self.pretraining else None
        self.entities = (
            adata.read_entities(self.root / entities, self.cfg.model.num_entities) if entities else []
        )

    def anno(self, split: str) -> Path:
        return self.root / self.dataset["anno"][split]

    @property
    def video(self):
        return self.cfg.model.video

    def build_model(self) -> torch.nn.Module:
        if self.qa:
            return AlproQA(model_config(self.cfg, self.tokenizer, num_labels=len(self.ans2label)))
        config = model_config(self.cfg, self.tokenizer, num_entities=len(self.entities))
        if self.stage == "prompter":
            return AlproPrompter(config)
        model = Alpro(config)
        if model.prompter is not None and self.cfg.prompter:
            source = local_source(self.cfg.prompter, self.run_dir / "prompter")
            log.info("prompter %s: %s", self.cfg.prompter, load_prompter(model.prompter, source))
            self.build_prompts(model.prompter)
            if self.cfg.init_from_prompter:
                backbone = {
                    k: v for k, v in model.prompter.state_dict().items() if not k.endswith("_prompt_feat")
                }
                unexpected = model.load_state_dict(backbone, strict=False).unexpected_keys
                if unexpected:
                    raise ValueError(f"the prompter has tensors the model lacks: {unexpected[:5]}")
                log.info(
                    "started from the prompter's weights (%d tensors; trainer.init_from_prompter)",
                    len(backbone),
                )
        return model

    def build_prompts(self, prompter: AlproPrompter) -> None:
        """The prompter's entity prompt features for this run's entity list (video and image templates)."""
        for kind, templates in (
            ("video", adata.VIDEO_PROMPT_TEMPLATES),
            ("image", adata.IMAGE_PROMPT_TEMPLATES),
        ):
            text = adata.tokenize(
                self.tokenizer, adata.prompt_texts(self.entities, templates), adata.PROMPT_MAX_LEN
            )
            device = prompter.temp.device
            prompter.build_prompts(
                text["input_ids"].to(device), text["attention_mask"].to(device), len(templates), kind
            )
        log.info(
            "entity prompts built for %d entities (%s, ...)", len(self.entities), ", ".join(self.entities[:5])
        )

    def load_pretrained(self, model: torch.nn.Module, source: str) -> LoadReport:
        return load_weights(model, source)

    def train_dataset(self) -> torch.utils.data.Dataset:
        common = dict(num_frames=self.video.num_frames, sample=self.cfg.sample, image_size=self.video.image_size,
                      resize_size=self.cfg.resize_size, hflip=self.cfg.hflip)  # fmt: skip
        if self.qa:
            return adata.QADataset(self.anno("train"), self.media, self.ans2label, train=True, **common)
        paragraph = bool(self.dataset.get("paragraph")) and not self.pretraining
        return adata.RetrievalTrainDataset(self.anno("train"), self.media, paragraph=paragraph, **common)

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
        pem = {}
        if self.cfg.model.loss_weight.pem > 0:
            region, region_video = adata.random_regions(batch["frames"], self.video.patch_size)
            pem = {"region": region, "region_video": region_video}
        return model(
            batch["frames"], batch["text_input_ids"], batch["text_attention_mask"], idx=batch["idx"], **pem
        )

    def after_step(self, model: torch.nn.Module) -> None:
        if hasattr(model, "clamp_temp"):
            model.clamp_temp()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """Evaluate on `cfg.eval_split`; the metrics file's payload (headline + chance level)."""
        cfg, dataset = self.cfg, self.dataset
        anno = dataset["anno"]
        split = cfg.eval_split if cfg.eval_split in anno else ("test" if "test" in anno else "val")
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
        result = {
            "task": "retrieval",
            "split": split,
            # Text-to-video retrieval: vid_r* (the retrieved items are videos), as Singularity reports.
            "headline": {f"R@{r}": metrics[f"vid_r{r}"] for r in (1, 5, 10)},
            "chance": {f"R@{r}": 100.0 * min(r, n) / n for r in (1, 5, 10)},
            "metrics": metrics,
            "num_videos": n,
            "num_texts": len(eval_set.texts),
        }
        if self.stage == "prompter" and self.entities:
            self.build_prompts(model)
            batches = ((b["frames"], b["video_idx"]) for b in loader)
            captions = [[eval_set.texts[t] for t in texts] for texts in eval_set.vid2txt]
            entity = evaluate_entities(model, batches, captions, self.entities, device)
            result["metrics"].update(entity)
            result["headline"]["entity@1"] = entity["entity_acc"]
            result["chance"]["entity@1"] = entity["entity_chance"]
        if self.pretraining:
            result.update(task=f"pretrain ({self.stage}), zero-shot retrieval")
        return result


def main() -> None:
    loop.main(AlproRecipe, "trainers.alpro")
