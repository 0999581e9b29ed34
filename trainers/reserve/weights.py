"""Load upstream MERLOT Reserve flax checkpoints (and our own) into `ReservePretrainer` / `ReserveQA`.

Upstream (rowanz/merlot_reserve `mreserve/checkpoint.py`) writes `flax.training.checkpoints` files: the
msgpack of a TrainState state dict ({"step", "params", "opt_state"}) with every float32 leaf cast to
float16. The released `gs://merlotreserve/ckpts/{base,large}[_resadapt]` files are such files. Our tree
keeps upstream's names (see `trainers.reserve.model`), so loading is: take `params`, cast to the model's
dtypes, check names and shapes. Finetuning drops `head` and `span_encoder` and starts `proj` fresh, as
upstream's finetuning scripts do; those count as adapted, not as errors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.core import unfreeze

from trainers.core.weights import LoadReport

# Pretraining-only parts a finetuning model lacks on purpose, and the head it adds.
_DROPPED_FOR_FINETUNING = ("head", "span_encoder")
_NEW_FOR_FINETUNING = ("proj",)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw tree of a flax msgpack checkpoint file, or of the newest `ckpt_<step>` file in a directory
    (where `flax.training.checkpoints.save_checkpoint(prefix="ckpt_")` writes them)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        steps = [
            (int(m.group(1)), name) for name in os.listdir(path) if (m := re.fullmatch(r"ckpt_(\d+)", name))
        ]
        if not steps:
            raise FileNotFoundError(f"no ckpt_<step> file in {path}")
        path = os.path.join(path, max(steps)[1])
    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())


def save_params(path: str | os.PathLike, params: Mapping[str, Any], dtype: Any = np.float16) -> None:
    """Write params as upstream stores them: a {"params": ...} msgpack with float32 leaves cast to `dtype`."""

    def cast(x: Any) -> np.ndarray:
        x = np.asarray(x)
        return x.astype(dtype) if x.dtype == np.float32 else x

    tree = jax.tree_util.tree_map(cast, unfreeze(params))
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize({"step": 0, "params": tree}))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def load_params(
    path_or_tree: str | os.PathLike | Mapping[str, Any], model_params: Mapping[str, Any]
) -> tuple[dict[str, Any], LoadReport]:
    """Fill `model_params` (the model's initialized params, or their `jax.eval_shape` shapes) from a
    checkpoint: a path (see `read_checkpoint`), a TrainState-like {"params": ...} tree or a bare params
    tree. Leaves are cast to the model's dtypes (upstream stores float16).

    Returns (params, report). Leaves the checkpoint lacks, or has with another shape, keep the model's
    values (listed as missing / mismatched); checkpoint leaves the model lacks are listed as unexpected.
    """
    if isinstance(path_or_tree, (str, os.PathLike)):
        source, tree = os.fspath(path_or_tree), read_checkpoint(path_or_tree)
    else:
        source, tree = "a params tree", path_or_tree
    tree = unfreeze(tree)
    model_params = unfreeze(model_params)
    report = LoadReport(source=source)
    if "params" in tree and "params" not in model_params:
        step = tree.get("step")
        tree = tree["params"]
        report.adapted.append(
            "took 'params' of a train-state checkpoint" + (f" (step {step})" if step else "")
        )

    ours, theirs = _flatten(model_params), _flatten(tree)
    report.total = len(ours)
    top_ours = {k.split("/")[0] for k in ours}
    out = {}
    for name, target in ours.items():
        if name not in theirs:
            if name.split("/")[0] in _NEW_FOR_FINETUNING:
                report.adapted.append(f"{name}: new finetuning head, initialized")
            else:
                report.missing.append(name)
            out[name] = target
            continue
        value = np.asarray(theirs[name])
        if tuple(value.shape) != tuple(target.shape):
            report.mismatched.append(
                f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}"
            )
            out[name] = target
            continue
        out[name] = jnp.asarray(value, dtype=target.dtype)
        report.loaded += 1
    dropped: dict[str, int] = {}
    for name in theirs.keys() - ours.keys():
        top = name.split("/")[0]
        if top in _DROPPED_FOR_FINETUNING and top not in top_ours:
            dropped[top] = dropped.get(top, 0) + 1
        else:
            report.unexpected.append(name)
    report.unexpected.sort()
    for top, n in sorted(dropped.items()):
        report.adapted.append(f"dropped {top} ({n} tensors; pretraining only)")
    return _unflatten(out), report


__all__ = ["load_params", "read_checkpoint", "save_params"]
