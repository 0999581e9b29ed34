"""Load crossformer checkpoints into `Crossformer`: ours, the seed's (inferred layout), the model cards'.

Three layouts, told apart by their key prefixes:

1. Ours (`text.*`, `audio.*`, `video.*`, `fusion.*`, heads; see `trainers.crossformer.model`), bare or
   under "model", with or without DDP's `module.`.
2. The seed's HF Trainer checkpoint (`output_dir/checkpoint-<step>/pytorch_model.bin` or
   `model.safetensors`: the state dict of its `cross_former` module). Its model file is not public: we
   infer that it holds the four HF pretraining models it builds from `--{text,audio,video,fusion}_model_
   name_or_path` as `{text,audio,video,fusion}_model` (`*_encoder` accepted too), under their HF names,
   so `text_model.deberta.*` -> `text.deberta.*` and so on, and ViTModel's `embeddings.cls_token` ->
   `fusion.cls_token`. Its own heads have unknown names and are reported as unexpected, never guessed.
3. One model card's weights (the seed's `--*_model_name_or_path`): `deberta.*` / `lm_predictions.*`
   (microsoft/deberta-v2-*), `vit.*` + `decoder.*` (facebook/vit-mae-*), `videomae.*` (MCG-NJU/videomae-*),
   ViTModel's `embeddings.*` / `encoder.layer.*` (google/vit-*). They go into that part; the other parts
   are reported missing.

Adaptations, each reported: ViT-MAE's RGB patch kernels summed to the fbank's one channel (a grey image
gives the same response), its fixed sin-cos tables dropped (ours are built for the fbank grid), ViT's
patch and position embeddings and pooler dropped (the crossformer takes tokens, not pixels).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.core.weights import LoadReport, load_into, read_state_dict, strip_prefix

logger = logging.getLogger(__name__)

PARTS = ("text", "audio", "video", "fusion")
# The seed's (inferred) attribute names of its four models -> ours.
UPSTREAM_PREFIXES: dict[str, str] = {
    **{f"{part}_model.": f"{part}." for part in PARTS},
    **{f"{part}_encoder.": f"{part}." for part in PARTS},
}
# The first key component of each model card's state dict -> the part it loads into.
CARD_PREFIXES: dict[str, str] = {
    "deberta.": "text",
    "lm_predictions.": "text",
    "vit.": "audio",
    "videomae.": "video",
    "encoder_to_decoder.": "video",
    "mask_token": "video",
}
_BENIGN_SUFFIXES = ("position_ids", "token_type_ids")
_FIXED_TABLES = ("audio.vit.embeddings.position_embeddings", "audio.decoder.decoder_pos_embed")
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")  # in an HF Trainer checkpoint folder


def _read(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(source, Mapping):
        return read_state_dict(source)
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / f for f in CHECKPOINT_FILES if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path} holds none of {', '.join(CHECKPOINT_FILES)}; give the checkpoint file"
            )
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return read_state_dict(load_file(os.fspath(path)))[0], os.fspath(path)
    return read_state_dict(path, drop_non_tensors=True)


def _card_part(state: Mapping[str, torch.Tensor]) -> str | None:
    """The part a single model card's state dict belongs to, or None when it is not one."""
    keys = list(state)
    if any(k.startswith(("text.", "audio.", "video.", "fusion.")) for k in keys):
        return None
    if any(k.startswith(tuple(UPSTREAM_PREFIXES)) for k in keys):
        return None
    if keys and all(k.startswith(("embeddings.", "encoder.", "layernorm.", "pooler.")) for k in keys):
        return "fusion"  # a bare ViTModel
    if any(k.startswith("vit.") for k in keys) and any(k.startswith("decoder.decoder_embed") for k in keys):
        return "audio"  # ViT-MAE: its decoder is `decoder.decoder_*`; VideoMAE's `decoder.head`
    for prefix, part in CARD_PREFIXES.items():
        if any(k.startswith(prefix) for k in keys):
            return part
    return None


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load one of the three layouts into `model` and say what happened (`report.ok`: every tensor
    placed); see the module docstring. source: a file, an HF Trainer checkpoint folder, or a state dict."""
    state, name = _read(source)
    target = model.state_dict()
    report = LoadReport(source=name, total=len(target))
    state = strip_prefix(state, "module.", report)
    part = _card_part(state)
    if part is not None:
        state = {f"{part}.{k}": v for k, v in state.items()}
        report.adapted.append(f"a {part} model card's weights, loaded as {part}.* (the other parts stay)")
    else:
        state = _rename_upstream(state, report)
    state = _adapt(state, target, report)
    load_into(model, state, report, _BENIGN_SUFFIXES)
    if part is not None:  # the other parts are not in a model card: say so once, not key by key
        others = [k for k in report.missing if not k.startswith(f"{part}.")]
        report.missing = [k for k in report.missing if k.startswith(f"{part}.")]
        if others:
            report.hints.append(f"{len(others)} tensors outside {part}.* keep their initial values.")
    (logger.info if report.ok else logger.warning)("%s", report)
    return report


def _rename_upstream(state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    out, renamed = {}, 0
    for key, value in state.items():
        for up, ours in UPSTREAM_PREFIXES.items():
            if key.startswith(up):
                key = ours + key[len(up) :]
                renamed += 1
                break
        out[key] = value
    if renamed:
        report.adapted.append(f"renamed {renamed} tensors of the seed's *_model.* parts to ours")
    return out


def _adapt(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> dict[str, torch.Tensor]:
    out = dict(state)
    # ViTModel (fusion): our [CLS] is fusion.cls_token; pixels never enter the crossformer.
    if "fusion.embeddings.cls_token" in out:
        cls = out.pop("fusion.embeddings.cls_token")
        if "fusion.cls_token" in target:
            out["fusion.cls_token"] = cls
    dropped = [k for k in out if k.startswith(("fusion.embeddings.", "fusion.pooler."))]
    if "fusion.cls_token" not in target:
        dropped += [k for k in out if k == "fusion.cls_token"]
    for key in dropped:
        del out[key]
    if dropped:
        report.adapted.append(f"dropped {len(dropped)} ViT embedding / pooler tensors the crossformer lacks")
    # ViT-MAE on RGB images -> our one-channel fbank.
    key = "audio.vit.embeddings.patch_embeddings.projection.weight"
    if (
        key in out
        and key in target
        and out[key].shape[1] != target[key].shape[1]
        and target[key].shape[1] == 1
    ):
        out[key] = out[key].sum(dim=1, keepdim=True)
        report.adapted.append(
            f"summed the {state[key].shape[1]} input channels of the audio patch kernels to 1"
        )
    for key in _FIXED_TABLES:
        if key in out and key in target and out[key].shape != target[key].shape:
            del out[key]
            report.adapted.append(f"kept our fixed sin-cos {key} for the fbank grid")
    return out


__all__ = ["CARD_PREFIXES", "LoadReport", "UPSTREAM_PREFIXES", "load_weights"]
