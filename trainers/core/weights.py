"""What loading a checkpoint did, reported the same way by every family's `load_weights`."""

from __future__ import annotations

import logging
import os
import pickle
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class WeightsError(ValueError):
    """A weights file that cannot be used: unreadable, not a state dict, or nothing in it fits the model."""


@dataclass
class LoadReport:
    """What `load_weights` did. `ok` when every model tensor was loaded and every checkpoint tensor used."""

    source: str
    loaded: int = 0
    total: int = 0
    missing: list[str] = field(default_factory=list)  # model tensors left at their initial values
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors nothing used
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape", skipped
    adapted: list[str] = field(default_factory=list)  # renames, interpolations, deliberate drops
    ignored: list[str] = field(default_factory=list)  # benign buffers (see _BENIGN_SUFFIXES)
    hints: list[str] = field(default_factory=list)  # likely config mistakes

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"Loaded {self.loaded}/{self.total} model tensors from {self.source}"]
        if self.adapted:
            parts.append("adapted: " + "; ".join(self.adapted))
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} ({len(keys)}): {summarize_keys(keys)}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} benign buffers")
        if self.hints:
            parts.append("hint: " + " ".join(self.hints))
        return "; ".join(parts).rstrip(".") + "."


def summarize_keys(keys: list[str], limit: int = 8) -> str:
    """Group keys by their first two components so a missing module reads as one line."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        group = ".".join(parts[:2]) + ".*" if len(parts) > 2 else key
        groups[group] = groups.get(group, 0) + 1
    items = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# The PyTorch half: torch is imported inside the functions, because the JAX family imports
# LoadReport from this module too.

_log = logging.getLogger("trainers.weights")


def local_source(source: str, directory: str | os.PathLike) -> str:
    """A weights setting (`trainer.pretrained=`, `trainer.prompter=`) as a local path for the loaders.

    A gs:// object is downloaded into `directory` (by local rank 0 of each node while the others wait;
    the copy is checked against the bucket's MD5), a run or checkpoints directory stands for its latest
    checkpoint, anything else (a file, a model card folder) is returned as it is.
    """
    from trainers.core import checkpoint, distributed, storage

    if storage.is_remote(source):
        local = Path(directory) / posixpath.basename(source.rstrip("/"))
        if distributed.from_environ().local_rank == 0:
            _log.info("downloading %s to %s", source, local)
            storage.download(source, local)
        distributed.barrier()
        return str(local)
    return str(checkpoint.find(source) or source)


def read_state_dict(source: Any, drop_non_tensors: bool = False) -> tuple[dict[str, Any], str]:
    """A checkpoint's tensors by name, from a path (a bare state dict or a dict with a "model" one)
    or a state dict. Non-tensor entries are an error, or dropped with `drop_non_tensors`.

    The safe (weights-only) unpickler is tried first; checkpoints that also pickle configs or other
    metadata are then unpickled in full, with a warning.
    """
    import torch

    if isinstance(source, Mapping):
        obj, name = source, "<state_dict>"
    else:
        name = os.fspath(source)
        if os.path.isdir(name):
            raise WeightsError(
                f"{name} is a directory without checkpoints; give a checkpoint file, or a run directory "
                "(or its checkpoints/ directory): its latest checkpoint is loaded"
            )
        try:
            try:
                obj = torch.load(name, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                _log.warning(
                    "%s holds non-tensor objects; unpickling it in full (load only files you trust)", name
                )
                obj = torch.load(name, map_location="cpu", weights_only=False)
        except FileNotFoundError:  # main() reports a missing file as bad input, with its own message
            raise
        except Exception as e:  # a truncated or foreign file: RuntimeError, EOFError, UnpicklingError, ...
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise WeightsError(f"{name} cannot be read as a PyTorch checkpoint ({reason})") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{name} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if drop_non_tensors:
        if not tensors:
            raise WeightsError(
                f"{name} holds no tensors; expected a state dict or a dict with a 'model' state dict"
            )
    elif len(tensors) != len(obj):
        not_tensors = sorted(k for k in obj if k not in tensors)
        raise WeightsError(
            f"{name} is neither a state dict nor a dict with a 'model' state dict; "
            f"non-tensor entries: {not_tensors[:10]}"
        )
    return tensors, name


def strip_prefix(state: dict[str, Any], prefix: str, report: LoadReport) -> dict[str, Any]:
    """Without `prefix` when every key has it (a state dict saved from the DDP wrapper)."""
    if state and all(k.startswith(prefix) for k in state):
        report.adapted.append(f"stripped '{prefix}' from every key")
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def tied_names(model, loaded: set[str]) -> set[str]:
    """Names of parameters that share storage with a loaded one (e.g. an MLM decoder tied to the
    word embeddings): they count as loaded."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    satisfied: set[str] = set()
    for names in by_param.values():
        if len(names) > 1 and any(n in loaded for n in names):
            satisfied.update(names)
    return satisfied


def load_into(
    model,
    state: dict[str, Any],
    report: LoadReport,
    benign_suffixes: tuple[str, ...],
    record_benign_missing=False,
) -> None:
    """The last step every family's `load_weights` shares, after mapping names to the model's.

    Benign buffers of other library versions are ignored, shape mismatches skipped and listed, the
    rest loaded with `strict=False`, and the report's missing / unexpected / loaded filled in.
    Benign buffers the model lacks in the checkpoint are not "missing" (listed as ignored when
    `record_benign_missing`).
    """
    target = model.state_dict()
    for key in [k for k in state if k not in target and k.endswith(benign_suffixes)]:
        report.ignored.append(key)
        del state[key]
    skipped = [k for k in state if k in target and state[k].shape != target[k].shape]
    for key in skipped:
        report.mismatched.append(f"{key}: {tuple(state[key].shape)} vs {tuple(target[key].shape)}")
        del state[key]
    result = model.load_state_dict(state, strict=False)
    satisfied = tied_names(model, loaded=set(state) & set(target))
    not_loaded = [k for k in result.missing_keys if k not in satisfied]
    if record_benign_missing:
        report.ignored += [k for k in not_loaded if k.endswith(benign_suffixes)]
    not_loaded = [k for k in not_loaded if not k.endswith(benign_suffixes)]
    report.missing = [k for k in not_loaded if k not in skipped]
    report.unexpected = list(result.unexpected_keys)
    report.loaded = report.total - len(not_loaded)  # benign buffers count as loaded
