"""Finetune MERLOT Reserve for multiple-choice video QA: `python -m trainers.reserve <run_dir>/config.yaml`.

One process per host (TPU VM worker, or an emulated one on CPU); trainers/reserve/distributed.py joins
them. Data-parallel over a global 1-D mesh: each process feeds its own shard of the records, the global
batch is split along the mesh's `data` axis, parameters and optimizer state are replicated.

Where a run starts (written once, here):
  1. the latest committed step in <output>/checkpoints, where output = job.output_url (e.g.
     gs://bucket/prefix/jobs/0) when set, else the run dir: a requeued or recreated job continues
     its own progress (this comes before resume_from, or a requeued run would go back there forever),
  2. else trainer.resume_from (an Orbax checkpoints dir or one of its step dirs: params, optimizer
     state and position),
  3. else trainer.pretrained (upstream's fp16 flax checkpoint through weights.py: params only),
  4. else a fresh initialization from `seed`, identical on every process.

Preemption: a stop signal (SIGTERM, SIGUSR2) on any host sets a flag; after every step the processes
agree through a collective whether anyone got one, so all of them save the same step, wait until it is
committed and exit with REQUEUE_EXIT_CODE (75). The restarted job resumes at that step; its data order
depends only on (seed, epoch, step), so it ends with the parameters an uninterrupted run ends with.

Outputs (local run dir; process 0 also copies metrics.json and status/ to output_url when set):
progress.json, metrics.json, status/params.rank<p>.sha256, checkpoints (under output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainers.core import storage, tracking
from trainers.core.checkpoint import CheckpointError
from trainers.core.job import (
    REQUEUE_EXIT_CODE,
    Progress,
    StopSignal,
    load_config,
    setup_logging,
    write_json_atomic,
)
from trainers.reserve import distributed

log = logging.getLogger("trainers.reserve")


def make_optimizer(cfg, total_steps: int, steps_per_epoch: int):
    """AdamW (decay on matrices only), linear warmup then linear decay to 0; optional global-norm clip."""
    import jax
    import optax

    o = cfg.optim
    warmup = min(total_steps, int(o.warmup_epochs * steps_per_epoch))
    decay = optax.linear_schedule(o.lr, 0.0, max(1, total_steps - warmup))
    schedule = (
        decay
        if warmup == 0
        else optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), decay], [warmup])
    )
    tx = optax.adamw(
        schedule, b1=o.betas[0], b2=o.betas[1], eps=o.eps, weight_decay=o.weight_decay,
        mask=lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params),
    )  # fmt: skip
    if o.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.max_grad_norm), tx)
    return tx, schedule


def param_digest(params) -> str:
    """sha256 over every parameter's name and bytes (replicated, so each process sees all of it)."""
    import jax

    digest = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])
    ):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf.addressable_data(0))).tobytes())
    return digest.hexdigest()


class Run:
    """One trainer process: built from the job config, `train()` returns the exit status."""

    def __init__(self, job: dict[str, Any], env: distributed.JaxEnv) -> None:
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from trainers.reserve import data, prep
        from trainers.reserve.config import resolve

        self.job, self.env = job, env
        self.cfg = resolve(job["trainer"], job["dataset"])
        self.dataset = job["dataset"]
        self.run_dir = Path(job["job"]["run_dir"])
        self.output = job["job"].get("output_url") or str(self.run_dir)
        self.seed = int(job.get("seed", 0))
        if self.cfg.batch_size % env.global_devices or self.cfg.batch_size_eval % env.global_devices:
            raise ValueError(
                f"trainer.batch_size ({self.cfg.batch_size}) and batch_size_eval ({self.cfg.batch_size_eval}) "
                f"must be multiples of the number of devices ({env.global_devices}): the batch is split over them"
            )
        self.layout = prep.Layout.of(self.cfg)
        self.records = data.Records(data.records_url(self.dataset, self.cfg, self.layout), self.layout)
        count, index = env.process_count, env.process_index
        self.train_stream = data.ProcessStream(
            self.records, "train", self.cfg.batch_size // count, index, count, self.seed
        )
        self.eval_stream = None
        if self.cfg.eval_split != "none":
            self.eval_stream = data.ProcessStream(
                self.records, self.cfg.eval_split, self.cfg.batch_size_eval // count, index, count, self.seed
            )
        self.mesh = distributed.data_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.jax = jax

    # --- pieces -----------------------------------------------------------------------------------

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, Any]:
        return {
            k: self.jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()
        }

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        from trainers.reserve.data import patchify

        return {
            "images": patchify(batch["images"], self.cfg.model.vision.patch_size),
            "audio_clips": batch["audio_clips"].astype("float32"),
            "audio_seqs": batch["audio_seqs"],
            "textonly_seqs": batch["textonly_seqs"],
        }

    def build(self, total_steps: int):
        import jax

        from trainers.reserve.model import ReserveQA, qa_loss, qa_predict

        self.model = model = ReserveQA(self.cfg.model)
        self.tx, self.schedule = make_optimizer(
            self.cfg, total_steps, max(1, self.train_stream.steps_per_epoch)
        )
        example = {k: v[:1] for k, v in self.train_stream.eval_batch(0).items() if k != "weight"}  # shapes

        def init(key):
            import jax.numpy as jnp

            params = model.init(key, self.model_inputs({k: jnp.asarray(v) for k, v in example.items()}))[
                "params"
            ]
            return {"params": params, "opt_state": self.tx.init(params)}

        self.init_fn = jax.jit(init, out_shardings=self.replicated)
        self.abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
        self.abstract_state = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), self.abstract_state
        )

        def train_step(state, batch):
            def loss_fn(params):
                from_audio, from_text = model.apply({"params": params}, self.model_inputs(batch))
                return qa_loss(from_audio, from_text, batch["labels"])

            (loss, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            import optax

            params = optax.apply_updates(state["params"], updates)
            return {"params": params, "opt_state": opt_state}, {"loss": loss, **info}

        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

        def eval_step(params, batch):
            from_audio, from_text = model.apply({"params": params}, self.model_inputs(batch))
            preds = qa_predict(from_audio, from_text)
            w = batch["weight"]
            out = {f"correct_{k}": ((v == batch["labels"]) * w).sum() for k, v in preds.items()}
            return out | {"count": w.sum()}

        self.eval_step = jax.jit(
            eval_step, in_shardings=(self.replicated, self.batch_sharding), out_shardings=self.replicated
        )

    def initial_state(self, checkpointer) -> tuple[Any, int, float, str]:
        """(state, step, loss, where from), in the order of the module docstring."""
        import jax

        from trainers.reserve.checkpoint import Checkpointer, resolve_resume_from

        own = self._own_checkpoint(checkpointer)
        if own is not None:  # 1. our own newest committed step that every host can restore
            return own
        if self.cfg.resume_from:  # 2. an explicit checkpoint
            directory, step = resolve_resume_from(self.cfg.resume_from)
            other = Checkpointer(directory, read_only=True, asynchronous=False)
            state, meta = other.restore(step, self.abstract_state)
            other.close()
            return state, int(meta["step"]), float(meta.get("loss", math.nan)), f"{directory} step {step}"
        state = self.init_fn(jax.random.PRNGKey(self.seed))
        if self.cfg.pretrained:  # 3. upstream weights (params only)
            from trainers.reserve.weights import load_params

            source = self.cfg.pretrained
            if storage.is_remote(source):
                local = self.run_dir / "pretrained" / os.path.basename(source.rstrip("/"))
                storage.download(source, local)
                source = str(local)
            host = jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), state["params"])
            loaded, report = load_params(source, host)
            log.info("pretrained: %s", report)
            params = jax.tree_util.tree_map(self._replicate, loaded)
            state = {
                "params": params,
                "opt_state": jax.jit(self.tx.init, out_shardings=self.replicated)(params),
            }
            return state, 0, math.nan, f"pretrained {self.cfg.pretrained}"
        return state, 0, math.nan, f"initialization from seed {self.seed}"  # 4.

    def _own_checkpoint(self, checkpointer) -> tuple[Any, int, float, str] | None:
        """The newest committed step of our own checkpoints that every host restores, as initial_state
        returns it; None when there is none. A step damaged since its commit (a shard deleted from the
        bucket, a truncated file) is skipped for the one before it, as the PyTorch trainers do, and
        deleted once an older one restored (the run saves that step again). The hosts agree on each
        step through a collective, so all of them start from the same one. When no step restores (a
        changed model config, say), nothing is deleted."""
        steps = sorted(checkpointer.all_steps(), reverse=True)
        for n, step in enumerate(steps):
            try:
                state, meta = checkpointer.restore(step, self.abstract_state)
                failure = ""
            except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many kinds
                failure = " ".join(str(e).split(" [tensorstore_spec")[0].split())[:300] or type(e).__name__
            if not distributed.any_process(bool(failure)):
                for damaged in steps[:n]:
                    checkpointer.delete(damaged)
                origin = f"own checkpoint step {step}"
                if n:
                    origin += f"; newer step(s) {steps[:n]} could not be restored and were deleted"
                return state, int(meta["step"]), float(meta.get("loss", math.nan)), origin
            log.warning(
                "checkpoint step %d cannot be restored (%s); trying %s", step, failure or "on another host",
                f"step {steps[n + 1]}" if n + 1 < len(steps) else "nothing older",
            )  # fmt: skip
        if steps:
            raise CheckpointError(
                f"none of the committed checkpoints in {checkpointer.directory} (steps {steps}) can be "
                "restored (the warnings above say why): if the model config changed, resubmit with the "
                "one they were saved with; else remove them to start over"
            )
        return None

    def _replicate(self, value) -> Any:
        """A host value (the same on every process) as a replicated global jax.Array."""
        host = np.asarray(value)
        return self.jax.make_array_from_callback(host.shape, self.replicated, lambda idx: host[idx])

    def evaluate(self, params) -> dict[str, Any]:
        totals: dict[str, float] = {}
        for step in range(self.eval_stream.eval_steps):
            out = self.eval_step(params, self.global_batch(self.eval_stream.eval_batch(step)))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v.addressable_data(0))
        n = max(1.0, totals.get("count", 0.0))
        acc = {
            k.removeprefix("correct_"): 100.0 * v / n for k, v in totals.items() if k.startswith("correct_")
        }
        chance = 100.0 / self.cfg.model.num_answers
        return {
            "task": "mc_qa",
            "split": self.cfg.eval_split,
            "headline": {"accuracy": acc["joint"]},
            "chance": {"accuracy": chance},
            "metrics": {f"acc_{k}": v for k, v in acc.items()},
            "num_questions": int(totals.get("count", 0)),
            "num_answers": self.cfg.model.num_answers,
        }

    def publish(self, relative: str, payload: str) -> None:
        """Process 0 copies an output file under output_url (when it differs from the run dir)."""
        if self.env.is_main and self.output != str(self.run_dir):
            storage.write_text(storage.join(self.output, relative), payload)

    # --- the loop ---------------------------------------------------------------------------------

    def train(self, stop: StopSignal, tracker) -> int:
        from trainers.reserve.checkpoint import Checkpointer

        cfg = self.cfg
        steps_per_epoch = self.train_stream.steps_per_epoch
        if steps_per_epoch < 1 and cfg.epochs:
            raise ValueError(
                f"each process has {self.train_stream.min_examples} training examples, fewer than its batch "
                f"({self.train_stream.local_batch}); lower trainer.batch_size"
            )
        total_steps = cfg.epochs * steps_per_epoch
        self.build(total_steps)
        checkpointer = Checkpointer(
            storage.join(self.output, "checkpoints"),
            keep=cfg.keep_checkpoints,
            asynchronous=cfg.async_checkpointing,
        )
        try:
            return self._loop(checkpointer, stop, tracker, total_steps, steps_per_epoch)
        finally:
            checkpointer.wait()
            checkpointer.close()

    def _save(self, checkpointer, state, step: int, loss: float) -> None:
        started = time.perf_counter()
        epoch = step // max(1, self.train_stream.steps_per_epoch)
        checkpointer.save(step, state, {"step": step, "epoch": epoch, "loss": loss})
        log.info("checkpoint step %d started (loop blocked %.3fs)", step, time.perf_counter() - started)

    def _loop(self, checkpointer, stop, tracker, total_steps: int, steps_per_epoch: int) -> int:
        cfg, env = self.cfg, self.env
        state, step, loss_value, origin = self.initial_state(checkpointer)
        log.info("starting at step %d of %d (%s); output %s", step, total_steps, origin, self.output)
        progress = Progress(self.run_dir, total_steps, enabled=env.is_main)
        started = time.time()
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            batch = self.global_batch(self.train_stream.train_batch(epoch, in_epoch))
            state, info = self.train_step(state, batch)
            step += 1
            loss_value = float(info["loss"].addressable_data(0))
            if not math.isfinite(loss_value):
                log.error("loss is %s at step %d; stopping (lower trainer.optim.lr?)", loss_value, step)
                return 1
            lr = float(self.schedule(step))
            progress.update(step=step, epoch=epoch, loss=loss_value, lr=lr)
            if step % cfg.log_every == 0 or step == total_steps:
                parts = {k: float(v.addressable_data(0)) for k, v in info.items()}
                tracker.log({"lr": lr} | parts, step)
                log.info(
                    "epoch %d step %d/%d loss %.4f (%s) lr %.2e", epoch, step, total_steps, loss_value,
                    " ".join(f"{k} {v:.3f}" for k, v in parts.items() if k != "loss"), lr,
                )  # fmt: skip
            # Every process must stop at the same step, or the others wait in the next collective forever.
            if distributed.any_process(stop.requested):
                self._save(checkpointer, state, step, loss_value)
                checkpointer.wait()
                log.warning("stopped at step %d by a signal; checkpoint committed, exiting for requeue", step)
                return REQUEUE_EXIT_CODE
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                self._save(checkpointer, state, step, loss_value)
        if total_steps and checkpointer.latest_step() != step:
            self._save(checkpointer, state, step, loss_value)
        checkpointer.wait()
        self.finish(state["params"], step, time.time() - started, loss_value, tracker, progress)
        return 0

    def finish(self, params, steps: int, seconds: float, loss: float, tracker, progress) -> None:
        digest = param_digest(params)
        name = f"status/params.rank{self.env.process_index}.sha256"
        (self.run_dir / "status").mkdir(parents=True, exist_ok=True)
        (self.run_dir / name).write_text(digest + "\n")
        self.publish(name, digest + "\n")
        progress.update(force=True, step=steps, phase="eval", loss=loss)
        if self.eval_stream is not None:
            result = self.evaluate(params)  # every process: the evaluation is a global computation
        else:
            result = {"task": "mc_qa", "split": None, "headline": {}, "chance": {}, "metrics": {}}
        result.update(train_steps=steps, train_seconds=round(seconds, 1), final_loss=loss)
        if self.env.is_main:
            write_json_atomic(self.run_dir / "metrics.json", result)
            self.publish("metrics.json", json.dumps(result, indent=1))
            tracker.summary({f"eval/{k}": v for k, v in result["metrics"].items()} | result["headline"])
        if self.env.is_main and self.eval_stream is not None:
            log.info(
                "%s accuracy %.1f (chance %.1f): %s", result["split"], result["headline"]["accuracy"],
                result["chance"]["accuracy"], ", ".join(f"{k} {v:.1f}" for k, v in result["metrics"].items()),
            )  # fmt: skip


def _quiet_closed_loop(hook):
    """sys.unraisablehook `hook` without the "Event loop is closed" errors of a failed Orbax save. Its
    event loop closes at the first write that fails while tensorstore still finishes the other arrays'
    writes; each of their callbacks then fails to reach the loop, and tensorstore reports that as an
    unraisable error: one traceback per array, burying the one line that says why the save failed."""

    def quiet(unraisable) -> None:
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        hook(unraisable)

    return quiet


def train(config_path: str) -> int:
    job = load_config(config_path)
    stop = StopSignal()  # first: a signal during the slow set-up still ends in a clean requeue
    env = distributed.setup()
    # jax.distributed.initialize installs JAX's own SIGTERM handler (its preemption notifier); ours goes
    # back on top, keeping a signal that came during set-up. The loop's collective makes every host agree.
    received, stop = stop.received, StopSignal()
    stop.received = received
    setup_logging(env.process_index)
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    # Orbax logs every file it writes at INFO, and a failed save at ERROR from each of its threads (with
    # asyncio's "Task exception was never retrieved" for each array); the error itself reaches the loop.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # gcsfs logs each request it gives up on with a traceback; the error also reaches its caller, which
    # reports it (a save that keeps failing says so once a minute: checkpoint.NOTICE_EVERY_S).
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    logging.getLogger("fsspec").setLevel(logging.WARNING)  # and fsspec every read-ahead cache it opens
    log.info(
        "reserve on %s: process %d of %d (%s), %d local / %d global devices",
        job["dataset"]["name"], env.process_index, env.process_count, env.source, env.local_devices,
        env.global_devices,
    )  # fmt: skip
    tracker = tracking.start(job, env.is_main)
    try:
        code = Run(job, env).train(stop, tracker)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    if code == REQUEUE_EXIT_CODE:
        tracker.preempted()
    else:
        tracker.finish(exit_code=code)
    return code


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) != 1:
        raise SystemExit("usage: python -m trainers.reserve <run_dir>/config.yaml")
    try:
        code = train(argv[0])
    except CheckpointError as e:  # a full disk, a bucket this job cannot write: the line says which
        log.error("%s", e)
        code = 1
    except (FileNotFoundError, ValueError) as e:
        # Missing or malformed data, a config that does not fit the records: the message says what to do.
        log.error("%s", e)
        code = 2
    except Exception:
        log.exception("the trainer failed")
        code = 1
    if code not in (0, REQUEUE_EXIT_CODE) and distributed.process_count() > 1:
        # Leave at once. The other hosts may be waiting for this one in a collective, and a shutdown
        # (also JAX's at exit) would wait for them at its barrier for minutes; once this process is
        # gone, they fail too and the launcher stops the job.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    try:
        distributed.teardown()
    except Exception as e:  # noqa: BLE001 - the exit status is what matters now
        log.warning("jax.distributed.shutdown: %s", e)
    sys.exit(code)
