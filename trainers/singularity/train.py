"""Train and evaluate Singularity: `python -m trainers.singularity <run_dir>/config.yaml`.

The family's recipe (model, data, losses, evaluation) for the shared training program in
trainers/core/loop.py, which owns resume, checkpoints, preemption, tracking and metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from trainers.core import loop
from trainers.core.sample_data import SAMPLE_DATASETS, ensure_sample_data
from trainers.core.sampling import ResumableSampler, SeededItems
from trainers.core.text import build_tokenizer
from trainers.core.weights import LoadReport
from trainers.singularity import data as sdata
from trainers.singularity.config import TrainConfig, resolve
from trainers.singularity.evaluation import evaluate_qa, evaluate_retrieval
from trainers.singularity.model import Singularity, SingularityQA
from trainers.singularity.weights import load_weights

log = logging.getLogger("trainers.singularity")


# ----------------------------------------------------------------------------- setup


def data_root(dataset: dict[str, Any]) -> Path:
    """The dataset's directory: data_root when given, else the generated sample (made if missing)."""
    if dataset.get("data_root"):
        return Path(dataset["data_root"]).expanduser()
    if dataset["name"] not in SAMPLE_DATASETS:
        raise SystemExit(
            f"dataset {dataset['name']} has no generated sample; set dataset.data_root= to its directory"
        )
    return ensure_sample_data(dataset["name"], scale=float(dataset.get("sample_scale") or 1.0))


def tokenizer_for(dataset: dict[str, Any], root: Path):
    spec = dataset.get("tokenizer")
    if spec is None:
        spec = root / "vocab.txt" if (root / "vocab.txt").exists() else "bert-base-uncased"
    return build_tokenizer(spec)


def model_config(cfg: TrainConfig, tokenizer):
    """The model config with the text vocabulary and special ids of the tokenizer actually used."""
    import dataclasses

    text = dataclasses.replace(
        cfg.model.text,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )
    return dataclasses.replace(cfg.model, text=text)


# ----------------------------------------------------------------------------- data


def build_train_data(cfg: TrainConfig, dataset: dict, root: Path, tokenizer, seed: int, env) -> tuple:
    media = root / dataset["media_dir"]
    image_res = cfg.model.vision.image_res
    if dataset["task"] == "qa":
        train_set = sdata.QADataset(
            root / dataset["anno"]["train"], media, train=True, num_frames=cfg.model.num_frames,
            image_res=image_res, hflip=cfg.hflip,
        )  # fmt: skip
        collate = sdata.QATrainCollate(tokenizer, dataset["max_txt_l"], cfg.model.max_answer_len)
    else:
        train_set = sdata.RetrievalTrainDataset(
            root / dataset["anno"]["train"], media, num_frames=cfg.model.num_frames, sample="rand",
            image_res=image_res, train=True, hflip=cfg.hflip, paragraph=bool(dataset.get("paragraph")),
        )  # fmt: skip
        collate = sdata.RetrievalTrainCollate(tokenizer, dataset["max_txt_l"])
    sampler = ResumableSampler(len(train_set), cfg.batch_size, seed, env.rank, env.world_size)
    loader = torch.utils.data.DataLoader(
        SeededItems(train_set),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
        # A generator of its own: creating an iterator must not consume the training RNG stream.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, dataset: dict, root: Path, tokenizer, device) -> dict[str, Any]:
    """Evaluate on `cfg.eval_split`; returns the metrics file's payload (headline + chance level)."""
    media = root / dataset["media_dir"]
    split = cfg.eval_split if cfg.eval_split in dataset["anno"] else "test"
    anno = root / dataset["anno"][split]
    image_res = cfg.model.vision.image_res
    if dataset["task"] == "qa":
        eval_set = sdata.QADataset(
            anno, media, train=False, num_frames=cfg.model.num_frames_test, image_res=image_res,
            answer_list=root / dataset["anno"]["answer_list"],
        )  # fmt: skip
        answers = [f"{a} [SEP]" for a in eval_set.answer_list]
        enc = sdata.tokenize(tokenizer, answers, cfg.model.max_answer_len + 1)
        index = {a: i for i, a in enumerate(eval_set.answer_list)}
        loader = sdata.build_loader(
            eval_set, cfg.batch_size_test, train=False, num_workers=cfg.num_workers,
            collate_fn=sdata.QAEvalCollate(tokenizer, dataset["max_txt_l"]),
        )  # fmt: skip

        def batches():
            for b in loader:
                gt = [index.get(eval_set.ground_truth[q][0], -1) for q in b["question_ids"]]
                yield b["frames"], b["question_input_ids"], b["question_attention_mask"], torch.tensor(gt)

        k = min(cfg.model.k_test, len(answers))
        metrics = evaluate_qa(model, batches(), enc["input_ids"], enc["attention_mask"], k, device)
        chance = 100.0 / len(answers)
        return {
            "task": "qa",
            "split": split,
            "headline": {"accuracy": metrics["accuracy"]},
            "chance": {"accuracy": chance},
            "metrics": metrics,
            "num_questions": len(eval_set),
        }
    eval_set = sdata.RetrievalEvalDataset(
        anno, media, num_frames_test=cfg.model.num_frames_test, sample="middle", image_res=image_res,
        paragraph=bool(dataset.get("paragraph")),
    )  # fmt: skip
    loader = sdata.build_loader(
        eval_set, cfg.batch_size_test, train=False, num_workers=cfg.num_workers,
        collate_fn=sdata.retrieval_eval_collate,
    )  # fmt: skip
    text = sdata.tokenize(tokenizer, eval_set.texts, dataset["max_txt_l"])
    k = min(cfg.model.k_test, len(eval_set))
    metrics = evaluate_retrieval(
        model, ((b["frames"], b["video_idx"]) for b in loader), text["input_ids"], text["attention_mask"],
        eval_set.txt2vid, eval_set.vid2txt, k, device,
    )  # fmt: skip
    n_videos = len(eval_set)
    # Text-to-video retrieval: upstream names it vid_r* (the retrieved items are videos).
    headline = {f"R@{r}": metrics[f"vid_r{r}"] for r in (1, 5, 10)}
    return {
        "task": "retrieval",
        "split": split,
        "headline": headline,
        "chance": {f"R@{r}": 100.0 * min(r, n_videos) / n_videos for r in (1, 5, 10)},
        "metrics": metrics,
        "num_videos": n_videos,
        "num_texts": len(eval_set.texts),
    }


# ----------------------------------------------------------------------------- the recipe


class SingularityRecipe:
    """Singularity for trainers.core.loop: retrieval (ITC + ITM [+ MLM]) or QA (answer decoder)."""

    family = "singularity"

    def __init__(self, job: dict[str, Any], device: torch.device) -> None:
        self.dataset = job["dataset"]
        self.cfg = resolve(job["trainer"], self.dataset)
        self.name = (
            f"{self.family} {self.dataset['task']} on {self.dataset['name']}: preset {self.cfg.preset}"
        )
        self.root = data_root(self.dataset)
        self.tokenizer = tokenizer_for(self.dataset, self.root)
        self.qa = self.dataset["task"] == "qa"

    def build_model(self) -> torch.nn.Module:
        model_cls = SingularityQA if self.qa else Singularity
        return model_cls(model_config(self.cfg, self.tokenizer))

    def load_pretrained(self, model: torch.nn.Module, source: str) -> LoadReport:
        return load_weights(model, source)

    def train_data(self, seed: int, env) -> tuple:
        return build_train_data(self.cfg, self.dataset, self.root, self.tokenizer, seed, env)

    def losses(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.qa:
            loss = model(
                batch["frames"], batch["question_input_ids"], batch["question_attention_mask"],
                batch["answer_input_ids"], batch["answer_attention_mask"], batch["answer_weights"],
                batch["answers_per_question"],
            )  # fmt: skip
            return {"qa": loss}
        return model(batch["frames"], batch["text_input_ids"], batch["text_attention_mask"], batch["idx"])

    def after_step(self, model: torch.nn.Module) -> None:
        if hasattr(model, "clamp_temp"):
            model.clamp_temp()

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        return evaluate(model, self.cfg, self.dataset, self.root, self.tokenizer, device)


def main() -> None:
    loop.main(SingularityRecipe, "trainers.singularity")
