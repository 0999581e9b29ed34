"""Load upstream Singularity checkpoints (and our own) into `Singularity` / `SingularityQA`.

Upstream writes `torch.save({"model": state_dict, "optimizer": ..., "config": ..., ...})`; its
pretraining state dict keeps the text encoder under `text_encoder.bert.*` with an MLM head under
`text_encoder.cls.*`, its downstream ones under `text_encoder.*`. `load_weights` maps between those
layouts the way upstream's `tasks/shared_utils.setup_model` does, reports every key it could not place,
and never fails on the benign differences between the transformers version upstream saved with (4.15)
and ours.
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

from trainers.core.weights import LoadReport, load_into, read_state_dict, strip_prefix

logger = logging.getLogger(__name__)

# Buffers that transformers 4.15 saved and current versions recompute (or the other way round).
_BENIGN_SUFFIXES = ("relative_position_index", "position_ids", "token_type_ids")
# Parts of the retrieval model that upstream's QA model deletes.
_RETRIEVAL_ONLY = ("vision_proj.", "text_proj.", "itm_head.", "vision_encoder.pooler.")
_REL_POS_TABLE = "relative_position_bias.relative_position_bias_table"
_LAYER_KEY = re.compile(r"^(?P<prefix>.*encoder\.layer\.)(?P<num>\d+)(?P<rest>\..*)$")


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load a checkpoint into a Singularity model with `strict=False`, and say exactly what happened.

    source: a `.pth` path holding a bare state dict or a dict with key "model" (upstream's format), or a
    state dict. Handles: the pretraining layout into retrieval/QA models (`text_encoder.bert.*` <->
    `text_encoder.*`; the MLM head kept or dropped with `config.mlm`); pretraining or retrieval weights
    into QA (`text_decoder` initialised from text-encoder layers >= fusion_layer, its embeddings and
    MLM head, as upstream); BEiT relative-position-bias tables of another image size (bicubic
    interpolation); `temporal_embeddings` of another frame count (as upstream: the first frames copied,
    extra ones left at zero, surplus ones dropped); benign buffers from older transformers (ignored).
    The report is logged and returned.
    """
    state, name = read_state_dict(source)
    target = model.state_dict()
    report = LoadReport(source=name, total=len(target))

    state = strip_prefix(state, "module.", report)
    is_qa = any(k.startswith("text_decoder.") for k in target)
    if is_qa and not any(k.startswith("text_decoder.") for k in state):
        state = _decoder_from_encoder(state, model, report)
    state = _match_text_layout(state, target, report)
    if is_qa:
        state = _drop_retrieval_heads(state, target, report)
    _resize_rel_pos_tables(state, target, report)
    _resize_temporal_embeddings(state, target, report)

    load_into(model, state, report, _BENIGN_SUFFIXES)
    report.hints = _hints(state, model, report)

    (logger.info if report.ok else logger.warning)("%s", report)
    return report


def _text_prefix(keys) -> str:
    return "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in keys) else "text_encoder."


def _decoder_from_encoder(state: dict[str, torch.Tensor], model: nn.Module, report: LoadReport):
    """Upstream initialises the QA answer decoder from the multimodal layers of the text encoder:
    encoder layer fusion_layer + i -> decoder layer i, plus the embeddings and the MLM head."""
    fusion = model.config.text.fusion_layer
    num_decoder = model.config.num_decoder_layers
    enc = _text_prefix(state)
    out = dict(state)
    copied = 0
    for key, value in state.items():
        if key.startswith(enc + "embeddings."):
            out["text_decoder.bert." + key[len(enc) :]] = value
            copied += 1
        elif key.startswith("text_encoder.cls."):
            out["text_decoder." + key[len("text_encoder.") :]] = value
            copied += 1
        elif key.startswith(enc + "encoder.layer."):
            match = _LAYER_KEY.match(key[len(enc) :])
            layer = int(match["num"])
            if fusion <= layer < fusion + num_decoder:
                out[f"text_decoder.bert.encoder.layer.{layer - fusion}{match['rest']}"] = value
                copied += 1
    if copied:
        last = fusion + num_decoder - 1
        report.adapted.append(
            f"text_decoder initialised from text_encoder layers {fusion}..{last}, embeddings and MLM head "
            f"({copied} tensors)"
        )
    return out


def _match_text_layout(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
):
    src, dst = _text_prefix(state), _text_prefix(target)
    if src == dst:
        return state
    out = {}
    if src == "text_encoder.bert.":  # pretraining checkpoint into a model without the MLM head
        head = [k for k in state if k.startswith("text_encoder.cls.")]
        for key, value in state.items():
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
            elif not key.startswith("text_encoder.cls."):
                out[key] = value
        report.adapted.append("text_encoder.bert.* -> text_encoder.*")
        if head:
            report.adapted.append(
                f"dropped text_encoder.cls.* ({len(head)} tensors): this model's text encoder has no MLM head"
            )
    else:  # downstream checkpoint into the pretraining layout; the MLM head stays as initialised
        for key, value in state.items():
            moved = key.startswith(src) and not key.startswith("text_encoder.cls.")
            out[dst + key[len(src) :] if moved else key] = value
        report.adapted.append("text_encoder.* -> text_encoder.bert.*")
    return out


def _drop_retrieval_heads(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
):
    dropped = [k for k in state if k not in target and (k.startswith(_RETRIEVAL_ONLY) or k == "temp")]
    if dropped:
        report.adapted.append(
            f"dropped {len(dropped)} retrieval-only tensors (vision_proj, text_proj, temp, itm_head, BEiT pooler) "
            "that the QA model does not have"
        )
    return {k: v for k, v in state.items() if k not in dropped}


def resize_rel_pos_table(table: torch.Tensor, num_rows: int) -> torch.Tensor:
    """BEiT relative position bias table ((2S-1)^2 + 3, heads) -> (num_rows, heads).

    The (2S-1) x (2S-1) grid of offsets is resized bicubically per head; the 3 trailing rows ([CLS]
    to token, token to [CLS], [CLS] to [CLS]) are kept. Upstream uses scipy's (now removed) interp2d on
    a geometric grid; the two agree where it matters (same size: identity).
    """
    extra = 3
    src = round((table.shape[0] - extra) ** 0.5)
    dst = round((num_rows - extra) ** 0.5)
    if src * src + extra != table.shape[0] or dst * dst + extra != num_rows:
        raise ValueError(
            f"not a square BEiT relative position table: {tuple(table.shape)} -> {num_rows} rows"
        )
    heads = table.shape[1]
    grid = table[:-extra].t().reshape(1, heads, src, src).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    resized = grid.reshape(heads, dst * dst).t().to(table.dtype)
    return torch.cat([resized, table[-extra:]])


def _resize_rel_pos_tables(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
):
    resized = []
    for key in [k for k in state if k.endswith(_REL_POS_TABLE) and k in target]:
        want = target[key].shape[0]
        if state[key].shape[0] != want and state[key].shape[1] == target[key].shape[1]:
            before = state[key].shape[0]
            state[key] = resize_rel_pos_table(state[key], want)
            resized.append(key)
    if resized:
        report.adapted.append(
            f"interpolated {len(resized)} BEiT relative position tables from {before} to {want} rows (image size)"
        )


def _resize_temporal_embeddings(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> None:
    key = "temporal_embeddings"
    if key not in state or key not in target or state[key].shape == target[key].shape:
        return
    old, new = state[key], target[key].clone()
    if old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:]:
        return  # a real mismatch; reported as such
    n_old, n_new = old.shape[1], new.shape[1]
    # As upstream's load_temp_embed_with_mismatch: frames beyond the checkpoint's keep the model's
    # values (zeros at init; zero padding works, see Frozen-in-Time), surplus frames are dropped.
    # At run time, more frames than embeddings are handled by interpolation (encode_vision).
    n = min(n_old, n_new)
    new[:, :n] = old[:, :n].to(new.dtype)
    state[key] = new
    report.adapted.append(
        f"temporal_embeddings {n_old} -> {n_new} frames ({'zero-padded' if n_new > n_old else 'truncated'})"
    )


def _hints(state: Mapping[str, torch.Tensor], model: nn.Module, report: LoadReport) -> list[str]:
    # The most common mistake upstream (issue #17): a temporal checkpoint evaluated without the flags.
    hints = []
    config = getattr(model, "config", None)
    temporal_in_ckpt = {
        int(k.split(".")[2]) for k in report.unexpected if k.startswith("temporal_vision_encoder.layer.")
    }
    if temporal_in_ckpt:
        hints.append(
            f"the checkpoint has a temporal vision encoder ({max(temporal_in_ckpt) + 1} layers): set "
            f"temporal_vision_encoder.enable=True, num_layers={max(temporal_in_ckpt) + 1}."
        )
    embeds = state.get("temporal_embeddings")
    if config is not None and not config.add_temporal_embed and embeds is not None and embeds.abs().sum() > 0:
        hints.append("the checkpoint's temporal_embeddings are trained but add_temporal_embed is False.")
    if any(k.startswith("temporal_vision_encoder.") for k in report.missing):
        hints.append(
            "the model's temporal vision encoder is not in the checkpoint and stays randomly initialised."
        )
    return hints


__all__ = ["LoadReport", "load_weights", "resize_rel_pos_table"]
