"""The training program every PyTorch family shares; a family supplies a `Recipe`.

`python -m trainers.<family> <run_dir>/config.yaml` ends up in `run(config_path, make_recipe)`.
The loop owns what must be the same everywhere: the resume order, the optimizer and schedule,
mixed precision, the preemption contract (a stop signal → a checkpoint at a step every rank agrees
on → exit REQUEUE_EXIT_CODE), periodic atomic checkpoints with every rank's RNG state, progress,
tracking, the parameter digest and metrics.json. The recipe owns the model, the data and the
evaluation.

The order in which a run finds its starting point (written once, here):
  1. the latest complete checkpoint in <run_dir>/checkpoints (a restarted or requeued job),
  2. else `trainer.pretrained` (weights only: an upstream or our own checkpoint, one of our run
     directories for its latest checkpoint, or a gs:// URL),
  3. else a fresh initialisation from `seed`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainers.core import checkpoint, distributed, tracking
from trainers.core.distributed import DistEnv
from trainers.core.inputs import DataError
from trainers.core.job import (
    REQUEUE_EXIT_CODE,
    Progress,
    StopSignal,
    load_config,
    seed_everything,
    setup_logging,
    write_json_atomic,
)
from trainers.core.sampling import ResumableSampler
from trainers.core.weights import LoadReport, WeightsError, local_source, summarize_keys

log = logging.getLogger("trainers")


class Recipe(Protocol):
    """What a family provides. `cfg` has the common training fields: optim (lr, weight_decay,
    betas, warmup_epochs, min_lr_multi, max_grad_norm), epochs, amp, pretrained,
    checkpoint_every, keep_checkpoints, torch_threads."""

    cfg: Any
    family: str  # "singularity", "clipbert", ...: the trainer= choice
    name: str  # for log lines, e.g. "singularity retrieval on msrvtt"

    def build_model(self) -> torch.nn.Module: ...

    def load_pretrained(self, model: torch.nn.Module, source: str) -> LoadReport:
        """Load weights (upstream layouts included), log and return what was loaded."""
        ...

    def train_data(self, seed: int, env: DistEnv) -> tuple[Any, ResumableSampler]:
        """The training loader and its (resumable) sampler."""
        ...

    def losses(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weighted losses of one batch (already on the device); their sum is optimised."""
        ...

    def after_step(self, model: torch.nn.Module) -> None:
        """After each optimizer step (e.g. clamp a learnable temperature)."""
        ...

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """The metrics.json payload: task, split, headline, chance, metrics."""
        ...


def make_loader(dataset, batch_size: int, num_workers: int, collate, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader as the families use it: workers kept across epochs, pinned memory on GPUs."""
    if num_workers > 0:
        # Tokenizing happens in the workers; the Rust tokenizer's own thread pool does not survive fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0, **kwargs,
    )  # fmt: skip


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, 1-d parameters or scalars like `temp`."""
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
    """bf16 where the GPU has it (auto), else fp16 with a grad scaler; nothing on CPU."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (each rank draws its own dropout / negatives), for the checkpoint."""
    state = checkpoint.rng_state()
    if not dist.is_initialized():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def write_param_digest(run_dir: Path, model: torch.nn.Module, env: DistEnv) -> None:
    """A hash of this rank's final parameters: replicas (and resumed runs) can be compared exactly."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    status = run_dir / "status"
    status.mkdir(parents=True, exist_ok=True)
    (status / f"params.rank{env.rank}.sha256").write_text(digest.hexdigest() + "\n")


class _Trainer:
    """The state of one training run between steps, so that saving it is one call."""

    def __init__(self, recipe: Recipe, model, env: DistEnv, device, run_dir: Path, tracker) -> None:
        self.recipe, self.cfg, self.env, self.device = recipe, recipe.cfg, env, device
        self.run_dir, self.tracker = run_dir, tracker
        self.raw_model = model
        self.ckpt_dir = run_dir / "checkpoints"

    def save(self, step: int, epoch: int, loss: float) -> None:
        rng = gather_rng_states()
        if self.env.is_main:
            state = {
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "global_step": step,
                "epoch": epoch,
                "loss": loss,  # a run resumed after its last step still reports its final loss
                "rng": rng,
                "world_size": self.env.world_size,
            }
            path = checkpoint.save(self.ckpt_dir, step, state, keep=self.cfg.keep_checkpoints)
            log.info("checkpoint %s", path)
        distributed.barrier()  # nobody moves on (or exits) before the checkpoint is complete

    def finish(self, steps: int, seconds: float, loss: float) -> None:
        """Evaluate on rank 0, write metrics.json, and let every rank leave together."""
        if self.env.is_main:
            result = self.recipe.evaluate(self.raw_model, self.device)
            result.update(train_steps=steps, train_seconds=round(seconds, 1), final_loss=loss)
            write_json_atomic(self.run_dir / "metrics.json", result)
            self.tracker.summary({f"eval/{k}": v for k, v in result["metrics"].items()} | result["headline"])
            log.info(
                "%s on %s: %s (chance %s)",
                result["task"], result["split"],
                ", ".join(f"{k} {v:.1f}" for k, v in result["headline"].items()),
                ", ".join(f"{k} {v:.1f}" for k, v in result["chance"].items()),
            )  # fmt: skip
        distributed.barrier()

    def run(self, seed: int, stop: StopSignal) -> int:
        cfg, env, device, model = self.cfg, self.env, self.device, self.raw_model
        found = checkpoint.load_latest(self.ckpt_dir)
        resume_from, state = found if found is not None else (None, None)
        if resume_from is not None:  # 1. our own latest checkpoint (that can be read)
            model.load_state_dict(state["model"])
            log.info("resuming from %s (step %d)", resume_from, state["global_step"])
        elif cfg.pretrained:  # 2. pretrained weights
            source = local_source(cfg.pretrained, self.run_dir / "pretrained")
            report = self.recipe.load_pretrained(model, source)  # each family's loader logs it
            if report.total and report.loaded == 0:
                raise WeightsError(
                    f"trainer.pretrained={cfg.pretrained}: not one of the {report.total} tensors of the "
                    f"{self.recipe.family} model is in {source}"
                    + (f" (it holds {summarize_keys(report.unexpected)})" if report.unexpected else "")
                    + ": a checkpoint of another family or model? Nothing was trained"
                )
        # 3. otherwise: the initialisation the recipe made from `seed`
        if cfg.epochs == 0:  # evaluation only, e.g. of a released fine-tuned checkpoint
            if not cfg.pretrained and resume_from is None:
                log.warning(
                    "trainer.epochs=0 without trainer.pretrained: evaluating a randomly initialised model"
                )
            self.finish(0, 0.0, float("nan"))
            return 0

        loader, sampler = self.recipe.train_data(seed, env)
        steps_per_epoch = sampler.batches_per_epoch
        total_steps = cfg.epochs * steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)
        )
        self.scheduler = cosine_schedule(
            self.optimizer,
            int(cfg.optim.warmup_epochs * steps_per_epoch),
            total_steps,
            cfg.optim.min_lr_multi,
        )
        amp_dtype = autocast_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        step, loss_value = 0, float("nan")
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            step = int(state["global_step"])
            loss_value = float(state.get("loss", loss_value))
            rng = state["rng"]
            checkpoint.set_rng_state(rng[env.rank] if len(rng) == env.world_size else rng[0])
        else:
            seed_everything(seed + env.rank)  # from here on each rank draws its own randomness
        del state

        if env.distributed:
            # find_unused_parameters: a head whose loss weight is 0 gets no gradient; without it DDP
            # would skip averaging that head's whole bucket (and every parameter sharing it).
            model = DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
            )
        progress = Progress(self.run_dir, total_steps, enabled=env.is_main)
        started = time.time()
        model.train()
        for epoch in range(step // steps_per_epoch, cfg.epochs):
            sampler.set_position(epoch, step % steps_per_epoch if epoch == step // steps_per_epoch else 0)
            for batch in loader:
                batch = {
                    k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
                }
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = self.recipe.losses(model, batch)
                    loss = sum(losses.values())
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.optim.max_grad_norm > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.recipe.after_step(self.raw_model)
                step += 1
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    log.error("loss is %s at step %d; stopping (lower trainer.optim.lr?)", loss_value, step)
                    return 1
                lr = self.scheduler.get_last_lr()[0]
                progress.update(step=step, epoch=epoch, loss=loss_value, lr=lr)
                if step % 10 == 0 or step == total_steps:
                    parts = {k: float(v.detach()) for k, v in losses.items()}
                    self.tracker.log(
                        {"loss": loss_value, "lr": lr} | {f"loss/{k}": v for k, v in parts.items()}, step
                    )
                    log.info(
                        "epoch %d step %d/%d loss %.4f (%s) lr %.2e", epoch, step, total_steps, loss_value,
                        " ".join(f"{k} {v:.3f}" for k, v in parts.items()), lr,
                    )  # fmt: skip
                # Every rank must agree to stop at the same step, or the others hang in the next all-reduce.
                if distributed.all_reduce_max(1.0 if stop.requested else 0.0) > 0:
                    self.save(step, epoch, loss_value)
                    log.warning("stopped at step %d by a signal; exiting for requeue", step)
                    return REQUEUE_EXIT_CODE
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                    self.save(step, epoch, loss_value)
            self.save(step, epoch, loss_value)

        write_param_digest(self.run_dir, self.raw_model, env)
        progress.update(force=True, step=step, phase="eval", loss=loss_value)
        self.finish(step, time.time() - started, loss_value)
        return 0


def train(config_path: str, make_recipe: Callable[[dict[str, Any], torch.device], Recipe]) -> int:
    """One trainer process: set up, build the family's recipe, train and evaluate; the exit status."""
    job = load_config(config_path)
    env, device = distributed.setup()
    setup_logging(env.rank)
    tracker = tracking.start(job, env.is_main)
    try:
        stop = StopSignal()  # before anything slow: a signal during setup still stops cleanly
        recipe = make_recipe(job, device)
        torch.set_num_threads(recipe.cfg.torch_threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
        log.info(
            "%s: rank %d of %d (%s), device %s", recipe.name, env.rank, env.world_size, env.source, device
        )
        seed = int(job["seed"])
        seed_everything(seed)  # identical initial weights on every rank
        model = recipe.build_model().to(device)
        trainer = _Trainer(recipe, model, env, device, Path(job["job"]["run_dir"]), tracker)
        code = trainer.run(seed, stop)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    if code == REQUEUE_EXIT_CODE:
        tracker.preempted()
    else:
        tracker.finish(exit_code=code)
    return code


def main(make_recipe: Callable[[dict[str, Any], torch.device], Recipe], program: str) -> None:
    """`python -m trainers.<family> <run_dir>/config.yaml`."""
    argv = sys.argv[1:]
    if len(argv) != 1:
        raise SystemExit(f"usage: python -m {program} <run_dir>/config.yaml")
    try:
        code = train(argv[0], make_recipe)
    except FileNotFoundError as e:
        # Missing data, annotation or tokenizer files: the message says what to do; no traceback.
        log.error("%s", e)
        code = 2
    except DataError as e:  # an annotation or data file it cannot use: the message says where and why
        log.error("%s", e)
        code = 2
    except WeightsError as e:  # trainer.pretrained= names a file it cannot use
        log.error("%s", e)
        code = 2
    except checkpoint.CheckpointError as e:
        log.error("%s", e)
        code = 1
    finally:
        distributed.teardown()
    sys.exit(code)
