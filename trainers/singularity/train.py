"""Train and evaluate Singularity: `python -m trainers.singularity <run_dir>/config.yaml`.

The order in which a run finds its starting point (written once, here):
  1. the latest complete checkpoint in <run_dir>/checkpoints (a restarted or requeued job),
  2. else `trainer.pretrained` (weights only: an upstream or our own checkpoint),
  3. else a fresh initialisation from `seed`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainers.core import checkpoint, distributed, tracking
from trainers.core.job import (
    REQUEUE_EXIT_CODE,
    Progress,
    StopSignal,
    load_config,
    seed_everything,
    setup_logging,
    write_json_atomic,
)
from trainers.core.sample_data import SAMPLE_DATASETS, ensure_sample_data
from trainers.core.sampling import ResumableSampler, SeededItems
from trainers.core.text import build_tokenizer
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, embeddings' 1-d params or `temp`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith(".bias") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_multi: float):
    """Linear warmup to the base lr, then cosine down to base lr * min_multi, stepped per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_multi + (1 - min_multi) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


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


# ----------------------------------------------------------------------------- training


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (each rank draws its own dropout / negatives), for the checkpoint."""
    state = checkpoint.rng_state()
    if not dist.is_initialized():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(
    ckpt_dir: Path, model, optimizer, scheduler, scaler, step: int, epoch: int, cfg, env, loss: float
) -> None:
    rng = gather_rng_states()
    if env.is_main:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "global_step": step,
            "epoch": epoch,
            "loss": loss,  # a run resumed after its last step still reports its final loss
            "rng": rng,
            "world_size": env.world_size,
        }
        path = checkpoint.save(ckpt_dir, step, state, keep=cfg.keep_checkpoints)
        log.info("checkpoint %s", path)
    distributed.barrier()  # nobody moves on (or exits) before the checkpoint is complete


def write_param_digest(run_dir: Path, model: torch.nn.Module, env) -> None:
    """A hash of this rank's final parameters: replicas (and resumed runs) can be compared exactly."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    status = run_dir / "status"
    status.mkdir(parents=True, exist_ok=True)
    (status / f"params.rank{env.rank}.sha256").write_text(digest.hexdigest() + "\n")


def train(config_path: str) -> int:
    job = load_config(config_path)
    env, device = distributed.setup()
    setup_logging(env.rank)
    tracker = tracking.start(job, env.is_main)
    try:
        code = _train(job, env, device, tracker)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    if code == REQUEUE_EXIT_CODE:
        tracker.preempted()
    else:
        tracker.finish(exit_code=code)
    return code


def _train(job: dict[str, Any], env, device, tracker: tracking.Tracker) -> int:
    run_dir = Path(job["job"]["run_dir"])
    dataset = job["dataset"]
    seed = int(job["seed"])
    cfg = resolve(job["trainer"], dataset)
    torch.set_num_threads(cfg.torch_threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
    log.info(
        "singularity %s on %s: preset %s, rank %d of %d (%s), device %s",
        dataset["task"], dataset["name"], cfg.preset, env.rank, env.world_size, env.source, device,
    )  # fmt: skip
    stop = StopSignal()
    root = data_root(dataset)
    tokenizer = tokenizer_for(dataset, root)

    seed_everything(seed)  # identical initial weights on every rank
    model_cls = SingularityQA if dataset["task"] == "qa" else Singularity
    model = model_cls(model_config(cfg, tokenizer)).to(device)
    ckpt_dir = run_dir / "checkpoints"
    resume_from = checkpoint.latest(ckpt_dir)
    state = None
    if resume_from is not None:  # 1. our own latest checkpoint
        state = checkpoint.load(resume_from)
        model.load_state_dict(state["model"])
        log.info("resuming from %s (step %d)", resume_from, state["global_step"])
    elif cfg.pretrained:  # 2. pretrained weights
        log.info("%s", load_weights(model, cfg.pretrained))
    # 3. otherwise: the initialisation above
    if cfg.epochs == 0:  # evaluation only, e.g. of a released fine-tuned checkpoint
        if not cfg.pretrained and resume_from is None:
            log.warning(
                "trainer.epochs=0 without trainer.pretrained: evaluating a randomly initialised model"
            )
        finish(model, cfg, dataset, root, tokenizer, device, run_dir, env, 0, 0.0, float("nan"), tracker)
        return 0

    loader, sampler = build_train_data(cfg, dataset, root, tokenizer, seed, env)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)
    )
    scheduler = cosine_schedule(
        optimizer, int(cfg.optim.warmup_epochs * steps_per_epoch), total_steps, cfg.optim.min_lr_multi
    )
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    step = 0
    loss_value = float("nan")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["global_step"])
        loss_value = float(state.get("loss", loss_value))
        rng = state["rng"]
        checkpoint.set_rng_state(rng[env.rank] if len(rng) == env.world_size else rng[0])
    else:
        seed_everything(seed + env.rank)  # from here on each rank draws its own randomness
    del state

    raw_model = model
    if env.distributed:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    progress = Progress(run_dir, total_steps, enabled=env.is_main)
    started = time.time()
    model.train()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        sampler.set_position(epoch, step % steps_per_epoch if epoch == step // steps_per_epoch else 0)
        for batch in loader:
            batch = {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            }
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if dataset["task"] == "qa":
                    loss = model(
                        batch["frames"], batch["question_input_ids"], batch["question_attention_mask"],
                        batch["answer_input_ids"], batch["answer_attention_mask"], batch["answer_weights"],
                        batch["answers_per_question"],
                    )  # fmt: skip
                    losses = {"qa": loss}
                else:
                    losses = model(
                        batch["frames"], batch["text_input_ids"], batch["text_attention_mask"], batch["idx"]
                    )
                    loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if hasattr(raw_model, "clamp_temp"):
                raw_model.clamp_temp()
            step += 1
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                log.error("loss is %s at step %d; stopping (lower trainer.optim.lr?)", loss_value, step)
                return 1
            progress.update(step=step, epoch=epoch, loss=loss_value, lr=scheduler.get_last_lr()[0])
            if step % 10 == 0 or step == total_steps:
                tracker.log(
                    {"loss": loss_value, "lr": scheduler.get_last_lr()[0]}
                    | {f"loss/{k}": float(v.detach()) for k, v in losses.items()},
                    step,
                )
                log.info(
                    "epoch %d step %d/%d loss %.4f (%s) lr %.2e",
                    epoch, step, total_steps, loss_value,
                    " ".join(f"{k} {float(v.detach()):.3f}" for k, v in losses.items()),
                    scheduler.get_last_lr()[0],
                )  # fmt: skip
            # Every rank must agree to stop at the same step, or the others hang in the next all-reduce.
            if distributed.all_reduce_max(1.0 if stop.requested else 0.0) > 0:
                save_checkpoint(
                    ckpt_dir, raw_model, optimizer, scheduler, scaler, step, epoch, cfg, env, loss_value
                )
                log.warning("stopped at step %d by a signal; exiting for requeue", step)
                return REQUEUE_EXIT_CODE
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                save_checkpoint(
                    ckpt_dir, raw_model, optimizer, scheduler, scaler, step, epoch, cfg, env, loss_value
                )
        save_checkpoint(ckpt_dir, raw_model, optimizer, scheduler, scaler, step, epoch, cfg, env, loss_value)

    write_param_digest(run_dir, raw_model, env)
    progress.update(force=True, step=step, phase="eval", loss=loss_value)
    finish(
        raw_model,
        cfg,
        dataset,
        root,
        tokenizer,
        device,
        run_dir,
        env,
        step,
        time.time() - started,
        loss_value,
        tracker,
    )
    return 0


def finish(model, cfg, dataset, root, tokenizer, device, run_dir, env, steps, seconds, loss, tracker) -> None:
    """Evaluate on rank 0, write metrics.json, and let every rank leave together."""
    if env.is_main:
        result = evaluate(model, cfg, dataset, root, tokenizer, device)
        result.update(train_steps=steps, train_seconds=round(seconds, 1), final_loss=loss)
        write_json_atomic(run_dir / "metrics.json", result)
        tracker.summary({f"eval/{k}": v for k, v in result["metrics"].items()} | result["headline"])
        log.info(
            "%s on %s: %s (chance %s)",
            result["task"], result["split"],
            ", ".join(f"{k} {v:.1f}" for k, v in result["headline"].items()),
            ", ".join(f"{k} {v:.1f}" for k, v in result["chance"].items()),
        )  # fmt: skip
    distributed.barrier()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m trainers.singularity <run_dir>/config.yaml")
    try:
        code = train(argv[0])
    except FileNotFoundError as e:
        # Missing data, annotation or tokenizer files: the message says what to do; no traceback.
        log.error("%s", e)
        code = 2
    finally:
        distributed.teardown()
    sys.exit(code)
