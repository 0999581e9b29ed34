"""Load upstream ClipBERT checkpoints (and our own) into the ClipBERT models.

Upstream (jayleicn/ClipBERT) saves the bare `state_dict()` of its `ClipBert` module
(`src/utils/load_save.py` `ModelSaver`; released: `clipbert_image_text_pretrained.pt`). Its names come
from `src/modeling/e2e_model.py` (`self.cnn = GridFeatBackbone(...)`, `self.transformer = ...`),
`src/modeling/grid_feat.py` (`self.feature = build_model(detectron2 cfg)`, a `GeneralizedRCNN` whose
`backbone` is detectron2's ResNet, and `self.grid_encoder = nn.Sequential(conv3x3, MaxPool2d, ReLU)`),
`src/modeling/modeling.py` (`ClipBertBaseModel`: `embeddings`, `visual_embeddings`, `encoder`,
`pooler`; heads `cls` = `BertPreTrainingHeads`, `classifier` = Sequential(Linear, ReLU, Linear)) and
`src/modeling/transformers.py` (BERT layer names, as transformers 2.x). The mapping:

    upstream                                                   ours
    cnn.feature.backbone.stem.conv1.weight                     cnn.backbone.embedder.embedder.convolution.weight
    cnn.feature.backbone.stem.conv1.norm.{weight,bias,running_mean,running_var}
                                                               cnn.backbone.embedder.embedder.normalization.*
    cnn.feature.backbone.res{k}.{b}.conv{j}.weight             cnn.backbone.encoder.stages.{k-2}.layers.{b}.layer.{j-1}.convolution.weight
    cnn.feature.backbone.res{k}.{b}.conv{j}.norm.*             cnn.backbone.encoder.stages.{k-2}.layers.{b}.layer.{j-1}.normalization.*
    cnn.feature.backbone.res{k}.{b}.shortcut.weight            cnn.backbone.encoder.stages.{k-2}.layers.{b}.shortcut.convolution.weight
    cnn.feature.backbone.res{k}.{b}.shortcut.norm.*            cnn.backbone.encoder.stages.{k-2}.layers.{b}.shortcut.normalization.*
    cnn.feature.{proposal_generator,roi_heads}.*, cnn.feature.pixel_{mean,std}
                                                               dropped: detector parts ClipBERT never runs
    cnn.grid_encoder.0.weight                                  same
    transformer.bert.embeddings.{word,position,token_type}_embeddings.weight, .LayerNorm.*
                                                               same
    transformer.bert.visual_embeddings.{position,row_position,col_position,token_type}_embeddings.weight,
    transformer.bert.visual_embeddings.LayerNorm.*             same
    transformer.bert.encoder.layer.{i}.attention.self.{query,key,value}.*,
    transformer.bert.encoder.layer.{i}.attention.output.{dense,LayerNorm}.*,
    transformer.bert.encoder.layer.{i}.intermediate.dense.*, transformer.bert.encoder.layer.{i}.output.{dense,LayerNorm}.*
                                                               same (HF BertLayer)
    transformer.bert.pooler.dense.*                            same
    transformer.cls.predictions.{bias,transform.dense.*,transform.LayerNorm.*,decoder.weight,decoder.bias},
    transformer.cls.seq_relationship.*                         same (pretraining); dropped by task models
    transformer.classifier.{0,2}.{weight,bias}                 same (retrieval, QA, MC)

with k in 2..5 (res2..res5), j in 1..3. The component checkpoints upstream's pretraining starts from load
too: a detectron2 model (`backbone.*`, e.g. grid_feat_R-50.pth, optionally under "model") is read as
`cnn.feature.*`, a BERT (`bert.*`, `cls.*`; old `LayerNorm.gamma/beta` names accepted) as
`transformer.*`; the other half is then reported missing. `to_upstream_state_dict` writes the reverse
mapping, so a model trained here can be evaluated with upstream's code.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# One report type for every family's loader.
from trainers.core.weights import LoadReport, load_into, read_state_dict, strip_prefix

logger = logging.getLogger(__name__)

_UP_BACKBONE = "cnn.feature.backbone."
_OUR_BACKBONE = "cnn.backbone."
# Buffers one side saves and the other does not: BatchNorm's counter (trainable-BN models; FrozenBN has
# none) and BERT's position_ids / token_type_ids (saved by some transformers versions).
_BENIGN_SUFFIXES = ("num_batches_tracked", "position_ids", "token_type_ids")

_UP_STEM = re.compile(r"^stem\.conv1\.(?:(weight)|norm\.(\w+))$")
_UP_BLOCK = re.compile(r"^res(\d)\.(\d+)\.(conv(\d)|shortcut)\.(?:(weight)|norm\.(\w+))$")
_OUR_STEM = re.compile(r"^embedder\.embedder\.(?:convolution\.(weight)|normalization\.(\w+))$")
_OUR_BLOCK = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(layer\.(\d)|shortcut)\.(?:convolution\.(weight)|normalization\.(\w+))$"
)


def upstream_to_ours(key: str) -> str | None:
    """Our name for an upstream key; None for a detectron2 key ClipBERT does not use."""
    if not key.startswith("cnn.feature."):
        return key
    if not key.startswith(_UP_BACKBONE):
        return None
    rest = key[len(_UP_BACKBONE) :]
    if m := _UP_STEM.match(rest):
        leaf = "convolution.weight" if m[1] else f"normalization.{m[2]}"
        return f"{_OUR_BACKBONE}embedder.embedder.{leaf}"
    if m := _UP_BLOCK.match(rest):
        stage, block, part, conv, weight, norm = m.groups()
        where = f"layer.{int(conv) - 1}" if conv else "shortcut"
        leaf = "convolution.weight" if weight else f"normalization.{norm}"
        return f"{_OUR_BACKBONE}encoder.stages.{int(stage) - 2}.layers.{block}.{where}.{leaf}"
    return key  # an unknown backbone name: reported as unexpected under its own name


def ours_to_upstream(key: str) -> str:
    """The upstream name of one of our keys (the inverse of `upstream_to_ours`)."""
    if not key.startswith(_OUR_BACKBONE):
        return key
    rest = key[len(_OUR_BACKBONE) :]
    if m := _OUR_STEM.match(rest):
        leaf = "weight" if m[1] else f"norm.{m[2]}"
        return f"{_UP_BACKBONE}stem.conv1.{leaf}"
    if m := _OUR_BLOCK.match(rest):
        stage, block, part, conv, weight, norm = m.groups()
        where = f"conv{int(conv) + 1}" if conv is not None else "shortcut"
        leaf = "weight" if weight else f"norm.{norm}"
        return f"{_UP_BACKBONE}res{int(stage) + 2}.{block}.{where}.{leaf}"
    return key


def to_upstream_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under upstream's names (BatchNorm counters dropped: detectron2 has none)."""
    return {ours_to_upstream(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load an upstream or our own checkpoint into a ClipBERT model with `strict=False`, and say exactly
    what happened.

    source: a `.pt`/`.pth` path holding a bare state dict (upstream's format) or a dict with key
    "model", or a state dict. Handles: detectron2 -> HF ResNet names (see the module docstring); the
    detector parts and, for task models, the pretraining heads, which are dropped and listed under
    `adapted`; component checkpoints (detectron2 alone, BERT alone); DDP's "module." prefix; benign
    buffers of other versions (ignored). Shape mismatches (e.g. another answer vocabulary) are skipped
    and listed. The report is logged and returned.
    """
    state, name = read_state_dict(source, drop_non_tensors=True)
    target = model.state_dict()
    report = LoadReport(source=name, total=len(target))

    state = strip_prefix(state, "module.", report)
    state = _place_components(state, report)
    state = _map_backbone(state, report)
    state = _drop_unused_heads(state, target, report)

    load_into(model, state, report, _BENIGN_SUFFIXES, record_benign_missing=True)
    report.hints = _hints(report)

    (logger.info if report.ok else logger.warning)("%s", report)
    return report


def _place_components(state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Stand-alone detectron2 or BERT checkpoints (upstream's pretraining initialisation)."""
    if any(k.startswith(("cnn.", "transformer.")) for k in state):
        return state
    out = {}
    moved = {"detectron2": 0, "bert": 0}
    for key, value in state.items():
        if key.startswith(("backbone.", "proposal_generator.", "roi_heads.", "pixel_")):
            key = "cnn.feature." + key
            moved["detectron2"] += 1
        elif key.startswith(("bert.", "cls.")):
            key = "transformer." + key.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                "LayerNorm.beta", "LayerNorm.bias"
            )
            moved["bert"] += 1
        out[key] = value
    if moved["detectron2"]:
        report.adapted.append(f"detectron2 checkpoint: {moved['detectron2']} keys read as cnn.feature.*")
    if moved["bert"]:
        report.adapted.append(f"BERT checkpoint: {moved['bert']} keys read as transformer.*")
    return out


def _map_backbone(state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    out, renamed, dropped = {}, 0, 0
    for key, value in state.items():
        new = upstream_to_ours(key)
        if new is None:
            dropped += 1
            continue
        renamed += new != key
        out[new] = value
    if renamed:
        report.adapted.append(f"detectron2 ResNet -> HF ResNet names ({renamed} tensors)")
    if dropped:
        report.adapted.append(
            f"dropped {dropped} detectron2 tensors ClipBERT never runs (proposal_generator, roi_heads, pixel_mean/std)"
        )
    return out


def _drop_unused_heads(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> dict[str, torch.Tensor]:
    # Fine-tuning starts from the pretraining checkpoint: its MLM/ITM heads have no place in a task model.
    if any(k.startswith("transformer.cls.") for k in target):
        return state
    dropped = [k for k in state if k.startswith("transformer.cls.")]
    if dropped:
        report.adapted.append(
            f"dropped the pretraining heads transformer.cls.* ({len(dropped)} tensors): this task model has none"
        )
    return {k: v for k, v in state.items() if k not in dropped}


def _hints(report: LoadReport) -> list[str]:
    hints = []
    heads = [k for k in report.missing if k.startswith("transformer.classifier.")]
    if heads and len(heads) == len(report.missing):
        hints.append(
            "only the task head transformer.classifier.* is new: it starts from its initialisation, as "
            "upstream's fine-tuning from the pretrained checkpoint."
        )
    if any(k.startswith("transformer.classifier.") for k in report.mismatched):
        hints.append("the classifier's shape differs: another answer vocabulary (head.num_labels)?")
    if any(k.startswith(_OUR_BACKBONE) for k in report.unexpected):
        hints.append("backbone keys on both sides: is vision.depths the checkpoint's (R-50: 3, 4, 6, 3)?")
    return hints


__all__ = ["LoadReport", "load_weights", "ours_to_upstream", "to_upstream_state_dict", "upstream_to_ours"]
