"""Model config of the ALPRO trainer (`AlproConfig`).

No torch here: the launcher imports this module to check `trainer.*` overrides on the laptop.
Defaults are upstream's (salesforce/ALPRO: `config_release/base_model.json` for BERT,
`timesformer_divst_8x32_224_k600.json` and `src/modeling/timesformer/vit.py::TimeSformer` for the video
encoder, `src/modeling/alpro_models.py` for heads and losses), so `AlproConfig()` equals
`AlproConfig.base()`: the 8-frame retrieval model. `TASK_OVERRIDES` holds what upstream's task configs
change (frames, gradient checkpointing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# One pure helper shared by the families' configs (dataclasses.replace that recurses and names the
# valid keys on a typo). It lives with the Singularity config for now.
from trainers.core.configs import replace_checked

# Upstream's TimeSformer wrapper fixes divided space-time attention; joint attention keeps the same
# token layout. ("space_only" folds frames into the batch and is not supported.)
ATTENTION_TYPES = ("divided_space_time", "joint_space_time")


@dataclass
class VideoConfig:
    """TimeSformer ViT-B/16 (HF `TimesformerModel`), divided space-time attention.

    Upstream hard-codes width 768, 12 layers, 12 heads, MLP ratio 4, qkv bias and LayerNorm eps 1e-6;
    `num_frames` is the task's `num_frm` (4 pretraining, 8 retrieval, 16 QA).
    """

    image_size: int = 224
    patch_size: int = 16
    num_frames: int = 8
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    attention_type: str = "divided_space_time"
    drop_rate: float = 0.0  # upstream drop_rate (embeddings and projections)
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    gradient_checkpointing: bool = False  # upstream's `_gc.json` configs (16-frame QA)


@dataclass
class TextConfig:
    """BERT: layers < fusion_layer encode the text alone; layers >= fusion_layer run over the
    concatenated [text; video] tokens (upstream's xbert disables cross-attention).

    Special token ids default to bert-base-uncased's; set them to match your tokenizer.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    fusion_layer: int = 6
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


@dataclass
class LossWeights:
    """Weights of the training losses. 0 switches a loss off; with mlm 0 the model has no MLM head.

    Upstream: pretraining itc + itm + mlm (+ mpm, the prompter's entity loss), retrieval itc + itm.
    """

    vtc: float = 1.0
    vtm: float = 1.0
    mlm: float = 1.0


@dataclass
class AlproConfig:
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss_weight: LossWeights = field(default_factory=LossWeights)
    embed_dim: int = 256  # VTC projection width (vision_proj, text_proj)
    temp: float = 0.07  # initial learnable temperature, clamped to [temp_min, temp_max] every step
    temp_min: float = 0.001
    temp_max: float = 0.5
    # VTM negatives: drawn from softmax(similarity) with positives removed (upstream), or uniformly among
    # the non-positives (a from-scratch model's similarities say nothing yet).
    vtm_hard_negatives: bool = True
    mlm_prob: float = 0.15
    k_test: int = 0  # retrieval: ITM re-scores the top k of the VTC ranking; 0 = every pair (upstream)
    num_labels: int = 0  # QA classes (len(ans2label)); only the QA model reads it
    qa_hidden_scale: int = 2  # QA MLP hidden width = hidden_size * scale (upstream cls_hidden_scale)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with what is wrong and what would be right."""
        v, t = self.video, self.text
        if v.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"video.attention_type={v.attention_type!r}; valid: {list(ATTENTION_TYPES)}")
        if v.hidden_size != t.hidden_size:
            # The fusion layers self-attend over [text; video] tokens: one width for both.
            raise ValueError(
                f"video.hidden_size ({v.hidden_size}) must equal text.hidden_size ({t.hidden_size})"
            )
        if v.image_size % v.patch_size:
            raise ValueError(
                f"video.image_size ({v.image_size}) must be a multiple of patch_size ({v.patch_size})"
            )
        for name, hidden, heads in (
            ("video", v.hidden_size, v.num_heads),
            ("text", t.hidden_size, t.num_heads),
        ):
            if hidden % heads:
                raise ValueError(f"{name}.hidden_size ({hidden}) must be divisible by num_heads ({heads})")
        if not 0 <= t.fusion_layer <= t.num_layers:
            raise ValueError(f"text.fusion_layer ({t.fusion_layer}) must be in [0, {t.num_layers}]")
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"mlm_prob ({self.mlm_prob}) must be in (0, 1)")
        if not 0.0 < self.temp_min <= self.temp <= self.temp_max:
            raise ValueError(
                f"need 0 < temp_min ({self.temp_min}) <= temp ({self.temp}) <= temp_max ({self.temp_max})"
            )
        for name in ("embed_dim", "qa_hidden_scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("k_test", "num_labels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_frames", "num_layers"):
            if getattr(v, name) < 1:
                raise ValueError(f"video.{name} must be >= 1, got {getattr(v, name)}")
        weights = dataclasses.asdict(self.loss_weight)
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"loss_weight must be >= 0 with at least one > 0, got {weights}")

    @classmethod
    def base(cls, task: str | None = None) -> AlproConfig:
        """Upstream's model: TimeSformer-B/16 at 224, BERT-base with fusion_layer 6, embed_dim 256.

        task: one of TASK_OVERRIDES (frames and gradient checkpointing as upstream's task config).
        """
        return cls.from_dict(_task_overrides(task)) if task else cls()

    @classmethod
    def tiny(cls, vocab_size: int, **text_fields: Any) -> AlproConfig:
        """The `tiny` preset (tests, the CPU demo): a few hundred thousand parameters.

        `text_fields` override TextConfig fields (e.g. the tokenizer's special token ids).
        """
        tiny = MODEL_PRESETS["tiny"]
        text = {**tiny["text"], "vocab_size": vocab_size, **text_fields}
        return replace_checked(cls(), {**tiny, "text": text}, "")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: AlproConfig | None = None) -> AlproConfig:
        """Build from a (nested) mapping over `defaults` (upstream's values when None).

        Unknown keys raise ValueError naming the valid ones.
        """
        return replace_checked(defaults if defaults is not None else cls(), d, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _task_overrides(task: str) -> dict[str, Any]:
    if task not in TASK_OVERRIDES:
        raise ValueError(f"task={task!r}; valid: {sorted(TASK_OVERRIDES)}")
    return TASK_OVERRIDES[task]


# What upstream's `config_release/<task>.json` changes in the model (num_frm, the `_gc` video config,
# the losses its model class computes). QA classes come from the dataset's ans2label.
TASK_OVERRIDES: dict[str, dict[str, Any]] = {
    "pretrain": {"video": {"num_frames": 4}},
    "msrvtt_ret": {"video": {"num_frames": 8}, "loss_weight": {"mlm": 0.0}},
    "didemo_ret": {"video": {"num_frames": 8}, "loss_weight": {"mlm": 0.0}},
    "msrvtt_qa": {"video": {"num_frames": 16, "gradient_checkpointing": True}},
    "msvd_qa": {"video": {"num_frames": 16, "gradient_checkpointing": True}, "num_labels": 2423},
}

# Model presets. `tiny` is the CPU demo and the unit tests' model.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "tiny": {
        "video": {
            "image_size": 32,
            "patch_size": 8,
            "num_frames": 2,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "drop_path_rate": 0.0,
        },
        "text": {
            "hidden_size": 32,
            "num_layers": 4,
            "fusion_layer": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
        "embed_dim": 16,
        "k_test": 8,
        # Hard negatives assume pretrained encoders; from scratch the VTM head then never learns.
        "vtm_hard_negatives": False,
    },
}

__all__ = [
    "ATTENTION_TYPES",
    "AlproConfig",
    "LossWeights",
    "MODEL_PRESETS",
    "TASK_OVERRIDES",
    "TextConfig",
    "VideoConfig",
]
