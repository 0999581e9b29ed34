"""Typed configs shared by the trainer families (no torch: the launcher imports these)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def replace_checked(obj: Any, overrides: Mapping[str, Any], path: str) -> Any:
    """dataclasses.replace that recurses into nested dataclasses and rejects unknown keys."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        where = f" in '{path}'" if path else ""
        raise ValueError(f"unknown key(s) {unknown}{where}; valid keys: {sorted(names)}")
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in overrides.items():
        current = getattr(obj, key)
        if dataclasses.is_dataclass(hints[key]):
            if isinstance(value, Mapping):
                value = replace_checked(current, value, f"{path}.{key}" if path else key)
            elif not isinstance(value, hints[key]):
                raise ValueError(
                    f"'{path + '.' if path else ''}{key}' must be a mapping, got {type(value).__name__}"
                )
        changes[key] = value
    return dataclasses.replace(obj, **changes)


@dataclass
class OptimConfig:
    """AdamW without decay on biases and 1-d parameters, cosine schedule stepped every iteration."""

    lr: float = 1e-5
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
    min_lr_multi: float = 0.1  # the cosine ends at lr * min_lr_multi
    max_grad_norm: float = -1.0  # <= 0: no clipping (upstream's default)


# Mixed precision choices of every PyTorch family (trainers/core/loop.py:autocast_dtype).
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def drop_unset(value: Any) -> Any:
    """Nested mapping without the None leaves (None in the YAML means 'keep the preset's value')."""
    if isinstance(value, Mapping):
        return {k: drop_unset(v) for k, v in value.items() if v is not None and drop_unset(v) != {}}
    return value


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def optional_schema(cls: type, name: str | None = None) -> type:
    """A copy of dataclass `cls` whose fields all default to None (nested dataclasses included).

    Registered with Hydra as the `trainer` schema: unknown keys and wrong types fail at compose
    time, and a null means "the preset decides".
    """
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sub = optional_schema(hint)
            fields.append((f.name, sub, field(default_factory=sub)))
        elif typing.get_origin(hint) is tuple:
            element = typing.get_args(hint)[0]  # tuple[float, float] / tuple[str, ...]: one element type
            fields.append((f.name, list[element] | None, field(default=None)))
        else:
            fields.append((f.name, hint | None if hint is not Any else Any, field(default=None)))
    return dataclasses.make_dataclass(name or f"Optional{cls.__name__}", fields)


@dataclass
class BertTextConfig:
    """A BERT text (+ multimodal) encoder as the families use it: layers >= fusion_layer are the
    multimodal ones (what they attend to differs per family). bert-base-uncased's sizes and special
    token ids by default; set the ids to match your tokenizer.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    fusion_layer: int = 9
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103


def check_counts(config: Any, *batch_sizes: str) -> None:
    """The counts every trainer loops over, checked the same way: `epochs` >= 0 (0: evaluate only),
    `batch_size` and the other named batch sizes >= 1, `num_workers` (where there is one) >= 0; and
    the optimizer's numbers: lr, weight decay, warmup and the final lr factor >= 0, betas in [0, 1)."""
    if config.epochs < 0:
        raise ValueError(f"trainer.epochs must be >= 0 (0: evaluate only), got {config.epochs}")
    for name in ("batch_size", *batch_sizes):
        if getattr(config, name) < 1:
            raise ValueError(f"trainer.{name} must be >= 1, got {getattr(config, name)}")
    workers = getattr(config, "num_workers", 0)
    if workers < 0:
        raise ValueError(f"trainer.num_workers must be >= 0 (0: load in the training process), got {workers}")
    optim = getattr(config, "optim", None)
    if optim is None:
        return
    for name in ("lr", "weight_decay", "warmup_epochs", "min_lr_multi"):
        value = getattr(optim, name, 0.0)
        if not value >= 0:  # NaN too
            raise ValueError(f"trainer.optim.{name} must be >= 0, got {value}")
    betas = tuple(optim.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"trainer.optim.betas must be two numbers in [0, 1), got {list(betas)}")


def require_answer_list(dataset: Mapping[str, Any], family: str) -> None:
    """QA as classification over a fixed answer list needs `dataset.anno.answer_list`; the custom
    jsonl QA format has none (ClipBERT builds its list from the training answers)."""
    anno = dataset.get("anno")
    if dataset.get("task") == "qa" and anno is not None and not anno.get("answer_list"):
        raise ValueError(
            f"dataset {dataset.get('name')} has no answer list (anno.answer_list) and {family} answers "
            "from a fixed list: add anno.answer_list (a JSON list of answers), or use trainer=clipbert, "
            "which builds the list from the training answers"
        )
