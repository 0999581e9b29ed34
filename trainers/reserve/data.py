"""Stream prepared Reserve records (trainers/reserve/prep.py) to the training loop.

Each process reads only its own shards (shard i belongs to process i % process_count), through
trainers/core/storage.py, so records may sit on gs://. The order of a process's examples in an epoch
is a permutation drawn from (seed, epoch, process), and step t takes positions t*b .. (t+1)*b of it:
a run resumed at any step sees exactly the batches an uninterrupted run would have seen.

Also prepares the sample data on first use (cached beside it), so a run needs no manual prep step.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from trainers.core import storage
from trainers.core.sample_data import build_once
from trainers.reserve import prep
from trainers.reserve.config import TrainConfig

log = logging.getLogger("trainers.reserve.data")

FIELDS = ("images", "audio_clips", "audio_seqs", "textonly_seqs", "labels")


class Records:
    """The records of one prep run: meta.json (layout, vocabulary, shards) and lazily read shards."""

    def __init__(self, url: str, expected: prep.Layout | None = None, cache_shards: int = 16) -> None:
        self.url = url
        meta_url = storage.join(url, prep.META)
        if not storage.exists(meta_url):
            raise FileNotFoundError(
                f"no prepared records at {url} ({prep.META} missing: never prepared or unfinished); run "
                f"python -m trainers.reserve.prep --dataset ... --data-root ... --out {url}"
            )
        self.meta = json.loads(storage.read_text(meta_url))
        self.layout = prep.Layout.from_dict(self.meta["layout"])
        if expected is not None and self.layout != expected:
            diff = {
                k: (v, getattr(expected, k))
                for k, v in self.layout.to_dict().items()
                if v != expected.to_dict()[k]
            }
            raise ValueError(
                f"records at {url} were prepared for another model layout ({{field: (records, model)}} {diff}); "
                "prepare them again with this model's preset, or change the trainer config to match"
            )
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._cache_size = cache_shards

    def shards(self, split: str) -> list[tuple[str, int]]:
        if split not in self.meta["splits"]:
            raise ValueError(
                f"records at {self.url} have no split {split!r}; they have {sorted(self.meta['splits'])}"
            )
        s = self.meta["splits"][split]
        return list(zip(s["shards"], s["counts"], strict=True))

    def shard(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._cache:
            with np.load(io.BytesIO(storage.read_bytes(storage.join(self.url, name)))) as z:
                self._cache[name] = {k: z[k] for k in z.files}
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return self._cache[name]


class ProcessStream:
    """This process's part of a split: fixed-size local batches in a (seed, epoch, process) order."""

    def __init__(
        self, records: Records, split: str, local_batch: int, process: int, count: int, seed: int
    ) -> None:
        shards = records.shards(split)
        if len(shards) < count:
            raise ValueError(
                f"split {split} has {len(shards)} shard(s) for {count} processes: every process reads its own "
                f"shards; prepare with a smaller --examples-per-shard so there are at least {count}"
            )
        self.records, self.local_batch, self.process, self.seed = records, local_batch, process, seed
        owned = [shards[i] for i in range(process, len(shards), count)]
        # (shard name, row) of every example this process owns, in shard order
        self.index = [(name, row) for name, n in owned for row in range(n)]
        per_process = [sum(shards[i][1] for i in range(p, len(shards), count)) for p in range(count)]
        self.min_examples, self.max_examples = min(per_process), max(per_process)

    @property
    def steps_per_epoch(self) -> int:
        """Training steps per epoch: the same on every process (the smallest share decides)."""
        return self.min_examples // self.local_batch

    @property
    def eval_steps(self) -> int:
        """Evaluation steps covering every example of the largest share (smaller ones pad)."""
        return -(-self.max_examples // self.local_batch)

    def train_batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch, self.process]).permutation(len(self.index))
        take = order[step * self.local_batch : (step + 1) * self.local_batch]
        return self._gather([self.index[i] for i in take])

    def eval_batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch `step` in file order; `weight` 0 marks padding past this process's last example."""
        rows = self.index[step * self.local_batch : (step + 1) * self.local_batch]
        weight = np.zeros(self.local_batch, np.float32)
        weight[: len(rows)] = 1.0
        rows = rows + [self.index[0]] * (self.local_batch - len(rows))
        return self._gather(rows) | {"weight": weight}

    def _gather(self, rows: list[tuple[str, int]]) -> dict[str, np.ndarray]:
        return {k: np.stack([self.records.shard(name)[k][row] for name, row in rows]) for k in FIELDS}


def patchify(images, patch: int):
    """uint8 frames [..., H, W, 3] -> normalized patches [..., H/p * W/p, p*p*3] (upstream's input layout)."""
    import jax.numpy as jnp

    *lead, h, w, c = images.shape
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.array([0.485, 0.456, 0.406])) / jnp.array([0.229, 0.224, 0.225])  # ImageNet statistics
    x = x.reshape(*lead, h // patch, patch, w // patch, patch, c)
    x = jnp.moveaxis(x, -4, -3)  # [..., h/p, w/p, p, p, c]
    return x.reshape(*lead, (h // patch) * (w // patch), patch * patch * c)


def sample_records(dataset: dict[str, Any], cfg: TrainConfig, layout: prep.Layout) -> str:
    """The records of the generated sample data for this layout: made (and cached) on first use."""
    from trainers.reserve import sample_data

    name = dataset["name"]
    root = sample_data.ensure_sample_data(name, float(dataset.get("sample_scale") or 1.0))
    key = hashlib.sha256(
        json.dumps([layout.to_dict(), cfg.on_bad_input, prep.RECORDS_FORMAT]).encode()
    ).hexdigest()[:12]
    out = root.parent / f".{root.name}-records-{key}"

    def build(tmp: Path) -> None:
        prep.prepare(name, root, str(tmp), layout, sample_data.QA_FILES[name], examples_per_shard=8,
                     on_bad_input=cfg.on_bad_input)  # fmt: skip

    return str(build_once(out, build, lambda path: (path / prep.META).exists(), f"sample records of {name}"))


def records_url(dataset: dict[str, Any], cfg: TrainConfig, layout: prep.Layout) -> str:
    """`dataset.records` when set; the sample data's records when data_root is null; else an error that
    names the prep command."""
    if dataset.get("records"):
        return str(dataset["records"])
    if dataset.get("data_root") is None:
        return sample_records(dataset, cfg, layout)
    raise FileNotFoundError(
        f"dataset.records is not set: prepare {dataset['data_root']} first with "
        f"python -m trainers.reserve.prep --dataset {dataset['name']} --data-root {dataset['data_root']} "
        f"--out <dir or gs://...> --preset {cfg.preset}, then set dataset.records=<that out>"
    )


__all__ = ["ProcessStream", "Records", "patchify", "records_url", "sample_records"]
