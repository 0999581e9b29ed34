"""Load upstream ALPRO checkpoints (and our own) into `Alpro` / `AlproQA`.

Upstream (salesforce/ALPRO) saves bare state dicts (`torch.save(model.state_dict())`, `ModelSaver` in
`src/utils/load_save.py`): `alpro_pretrained_ckpt.pt`, `prompter_pretrained.pt` and the fine-tuned
`ckpt/model_step_*.pt`. The names, read from `src/modeling/alpro_models.py`, `timesformer/vit.py` and
`xbert.py`:

    visual_encoder.model.{cls_token, pos_embed, time_embed, patch_embed.proj.*, norm.*, head.*}
    visual_encoder.model.blocks.{i}.{norm1, attn.qkv, attn.proj, temporal_norm1, temporal_attn.qkv,
        temporal_attn.proj, temporal_fc, norm2, mlp.fc1, mlp.fc2}.{weight,bias}
    text_encoder.bert.{embeddings,encoder.layer.{i}}.*, text_encoder.cls.predictions.*   (BertForMaskedLM)
    text_encoder.{embeddings,encoder.layer.{i}}.*                                        (QA: BertModel)
    vision_proj.*, text_proj.*, temp, itm_head.*, classifier.{0,2}.* (QA)
    mpm_head.*, prompter.* (pretraining: the entity-prompt head and the frozen prompter)

Our video encoder is HF's `TimesformerModel`, whose modules are the same as upstream's VisionTransformer
under other names (`VISUAL_RENAMES`); everything else keeps upstream's names. `load_weights` maps the
names, moves the text encoder between the `text_encoder.bert.*` and `text_encoder.*` layouts (as
upstream's `load_state_dict_with_pos_embed_resizing(remove_text_encoder_prefix=True)`), resizes the
time and position embeddings to the model's frames and image size (nearest, as upstream), drops what the
model deliberately lacks (the unused 400-class Kinetics `head`, the MLM head of a retrieval model,
pretraining-only and QA-unused heads) and reports everything else it could not place.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers.core import checkpoint
from trainers.core.weights import LoadReport, load_into, read_state_dict, strip_prefix

logger = logging.getLogger(__name__)

UPSTREAM_VISUAL = "visual_encoder.model."
OURS_VISUAL = "visual_encoder."

# upstream name under visual_encoder.model. -> ours under visual_encoder. ({i}: block index)
VISUAL_RENAMES: tuple[tuple[str, str], ...] = (
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("time_embed", "embeddings.time_embeddings"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("norm.{p}", "layernorm.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layer.{i}.attention.attention.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("blocks.{i}.temporal_norm1.{p}", "encoder.layer.{i}.temporal_layernorm.{p}"),
    ("blocks.{i}.temporal_attn.qkv.{p}", "encoder.layer.{i}.temporal_attention.attention.qkv.{p}"),
    ("blocks.{i}.temporal_attn.proj.{p}", "encoder.layer.{i}.temporal_attention.output.dense.{p}"),
    ("blocks.{i}.temporal_fc.{p}", "encoder.layer.{i}.temporal_dense.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
)

# Buffers older transformers saved (upstream used 4.11) and current versions recompute.
_BENIGN_SUFFIXES = ("position_ids", "token_type_ids")
# Upstream tensors a model may lack on purpose, with why.
_DROPPABLE: tuple[tuple[str, str], ...] = (
    ("visual_encoder.model.head.", "TimeSformer's Kinetics classifier, unused by ALPRO"),
    ("text_encoder.cls.", "MLM head, which this model does not have"),
    ("prompter.text_encoder.cls.", "the prompter's MLM head, which VTC never uses"),
    ("prompter.visual_encoder.model.head.", "TimeSformer's Kinetics classifier, unused by ALPRO"),
    ("mpm_head.", "pretraining entity-prompt head"),
    ("prompter.", "pretraining prompter (a separate model)"),
    ("vision_proj.", "VTC/VTM heads the QA model does not use"),
    ("text_proj.", "VTC/VTM heads the QA model does not use"),
    ("itm_head.", "VTC/VTM heads the QA model does not use"),
    ("temp", "VTC/VTM heads the QA model does not use"),
)


def _pattern(template: str) -> re.Pattern[str]:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{regex}$")


_UP_TO_OURS = [(_pattern(up), ours) for up, ours in VISUAL_RENAMES]
_OURS_TO_UP = [(_pattern(ours), up) for up, ours in VISUAL_RENAMES]


def _rename(name: str, table) -> str | None:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


PROMPTER = "prompter."  # a pretraining model's prompter: the same names under this prefix


def _split_prompter(key: str) -> tuple[str, str]:
    return (PROMPTER, key[len(PROMPTER) :]) if key.startswith(PROMPTER) else ("", key)


def to_ours(key: str) -> str | None:
    """Our name for an upstream `[prompter.]visual_encoder.model.*` key (None when it has no
    counterpart, e.g. the Kinetics head); other keys are returned unchanged."""
    prefix, rest = _split_prompter(key)
    if not rest.startswith(UPSTREAM_VISUAL):
        return key
    ours = _rename(rest[len(UPSTREAM_VISUAL) :], _UP_TO_OURS)
    return prefix + OURS_VISUAL + ours if ours is not None else None


def to_upstream(key: str) -> str:
    """Upstream's name for one of our keys (the inverse of `to_ours`)."""
    prefix, rest = _split_prompter(key)
    if rest.startswith(OURS_VISUAL):
        up = _rename(rest[len(OURS_VISUAL) :], _OURS_TO_UP)
        if up is None:
            raise KeyError(f"{key} has no upstream counterpart")
        return prefix + UPSTREAM_VISUAL + up
    return key


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load an upstream ALPRO checkpoint, or one of ours, into `model` and say what happened.

    source: a `.pt` path holding a bare state dict (upstream) or a dict with key "model", or a state
    dict. The report (also logged) lists missing, unexpected and shape-mismatched keys, the adaptations
    made, and the benign buffers ignored; `report.ok` when every tensor found its place.
    """
    state, name = read_state_dict(source)
    target = model.state_dict()
    report = LoadReport(source=name, total=len(target))

    state = strip_prefix(state, "module.", report)
    state = _rename_visual(state, report)
    state = _match_text_layout(state, target, report)
    _resize_embeddings(state, target, report)
    state = _drop_unused(state, target, report)

    load_into(model, state, report, _BENIGN_SUFFIXES)
    (logger.info if report.ok else logger.warning)("%s", report)
    return report


def load_prompter(prompter: nn.Module, source: str | os.PathLike) -> LoadReport:
    """Load a trained prompter into a pretraining model's `prompter`, without its entity prompts (they
    are built again from this run's entity list, as upstream's `load_pretrained_weights_without_prompts`).

    source: upstream's `prompter_pretrained.pt`, one of our checkpoints, its `checkpoints/` directory or
    its run directory (the latest checkpoint there).
    """
    state, _ = read_state_dict(checkpoint.resolve(source))
    state = {k: v for k, v in state.items() if not k.endswith("_prompt_feat")}
    # The prompter's own (to be rebuilt) prompt buffers, so they are not reported missing.
    state.update({k: v for k, v in prompter.state_dict().items() if k.endswith("_prompt_feat")})
    return load_weights(prompter, state)


def _rename_visual(state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    out, renamed = {}, 0
    for key, value in state.items():
        ours = to_ours(key)
        if ours is None:  # no counterpart: keep the upstream name, _drop_unused or the report decides
            out[key] = value
        else:
            out[ours] = value
            renamed += ours != key
    if renamed:
        report.adapted.append(f"renamed {renamed} TimeSformer tensors visual_encoder.model.* -> HF names")
    return out


def _text_prefix(keys) -> str:
    return "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in keys) else "text_encoder."


def _match_text_layout(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> dict[str, torch.Tensor]:
    src, dst = _text_prefix(state), _text_prefix(target)
    if src == dst:
        return state
    out = {}
    for key, value in state.items():
        moved = key.startswith(src) and not key.startswith("text_encoder.cls.")
        out[dst + key[len(src) :] if moved else key] = value
    report.adapted.append(f"{src}* -> {dst}*")
    return out


def _resize_embeddings(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> None:
    """Time embeddings (1, T, D) and position embeddings (1, 1 + N, D) to the model's frames and grid
    (the model's and, in a pretraining model, its prompter's)."""
    for prefix in ("", PROMPTER):
        _resize_video_embeddings(state, target, report, prefix)


def _resize_video_embeddings(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport, prefix: str
) -> None:
    key = prefix + "visual_encoder.embeddings.time_embeddings"
    if key in state and key in target and state[key].shape[1] != target[key].shape[1]:
        old = state[key]
        # As upstream's resize_temporal_embedding: nearest along time.
        state[key] = F.interpolate(old.transpose(1, 2), size=target[key].shape[1], mode="nearest").transpose(
            1, 2
        )
        report.adapted.append(
            f"{prefix}time embeddings {old.shape[1]} -> {target[key].shape[1]} frames (nearest)"
        )
    key = prefix + "visual_encoder.embeddings.position_embeddings"
    if key in state and key in target and state[key].shape[1] != target[key].shape[1]:
        old = state[key]
        src, dst = round((old.shape[1] - 1) ** 0.5), round((target[key].shape[1] - 1) ** 0.5)
        if src * src + 1 == old.shape[1] and dst * dst + 1 == target[key].shape[1]:
            # 2-D nearest over the patch grid, as upstream's and HF's forward-time resizing. (Upstream's
            # loader resizes the flattened sequence in 1-D; equal for the 224 crop every config uses.)
            grid = old[:, 1:].transpose(1, 2).reshape(1, old.shape[2], src, src)
            grid = F.interpolate(grid, size=(dst, dst), mode="nearest").flatten(2).transpose(1, 2)
            state[key] = torch.cat([old[:, :1], grid], dim=1)
            report.adapted.append(f"{prefix}position embeddings {src}x{src} -> {dst}x{dst} patches (nearest)")


def _drop_unused(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> dict[str, torch.Tensor]:
    out = dict(state)
    for prefix, why in _DROPPABLE:
        if any(k.startswith(prefix) for k in target):
            continue
        dropped = [k for k in out if k.startswith(prefix) and (k == prefix or prefix.endswith("."))]
        for key in dropped:
            del out[key]
        if dropped:
            report.adapted.append(f"dropped {prefix.rstrip('.')}* ({len(dropped)} tensors): {why}")
    return out


__all__ = [
    "LoadReport",
    "VISUAL_RENAMES",
    "load_prompter",
    "load_weights",
    "to_ours",
    "to_upstream",
]
