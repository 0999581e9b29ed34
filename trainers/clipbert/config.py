"""Config of the ClipBERT model (`ClipBertConfig`): vision, cross-modal BERT, sparse clips, task heads.

No torch here: the launcher imports this module to check `trainer.*` overrides on the laptop before
anything is submitted.

Upstream values were read from jayleicn/ClipBERT: `src/configs/base_model.json` (the BERT),
`src/configs/detectron2_configs/{Base-RCNN-grid,R-50-grid}.yaml` with `src/modeling/grid_feat.py` (the
CNN: detectron2 R-50, FrozenBN, stride in the 1x1 conv, RES5_DILATION forced to 1, FREEZE_AT 2 by
detectron2's default), `src/configs/msrvtt_ret_base_resnet50.json` and `src/configs/config.py` (clips,
pixel statistics, heads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The recursive, unknown-key-rejecting `dataclasses.replace` every family's config uses.
# TODO(lead): move to a shared trainers/core module; imported from the first family meanwhile.
from trainers.core.configs import replace_checked

SCORE_AGGREGATIONS = ("mean", "max", "lse")
TASKS = ("retrieval", "qa", "mc", "pretrain")
QA_LOSSES = ("ce", "bce")
INPUT_FORMATS = ("BGR", "RGB")


@dataclass
class VisionConfig:
    """ResNet grid features (HF `ResNetModel`, detectron2's R-50 layout) + the grid encoder.

    Frames enter the model as upstream's loader leaves them: RGB channel order, 0..255 scale, minus
    `pixel_mean` (the ImageNet mean in RGB), divided by `pixel_std` (ones). With input_format "BGR" the
    model flips the channels before the CNN, as upstream's `GridFeatBackbone.forward`, so the detectron2
    weights see the BGR, mean-subtracted input they were trained on.
    """

    depths: tuple[int, ...] = (3, 4, 6, 3)  # res2..res5 blocks
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)  # res2..res5 output channels
    stem_channels: int = 64
    stride_in_1x1: bool = True  # detectron2 RESNETS.STRIDE_IN_1X1 (MSRA weights): stride in the first 1x1
    frozen_batchnorm: bool = True  # detectron2 RESNETS.NORM "FrozenBN": fixed statistics and affine
    freeze_at: int = 2  # detectron2 BACKBONE.FREEZE_AT: 0 none, 1 stem, 2 stem + res2, ... 5 all stages
    freeze_backbone: bool = False  # upstream's `freeze_cnn`: the whole ResNet frozen (grid encoder trains)
    input_format: str = "BGR"
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB order, 0..255 scale
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Longer side resized to this and zero-padded to a square by the data pipeline. The CNN has stride 32
    # and the grid encoder pools by 2: 448 -> 7x7 = 49 visual tokens, 768 -> 12x12 = 144.
    max_img_size: int = 448
    # Pretraining keeps this many random visual tokens in training (Pixel-BERT's trick); 0 keeps all.
    pixel_random_sampling_size: int = 0

    @property
    def grid_size(self) -> int:
        """Visual tokens per side for a max_img_size x max_img_size input."""
        return self.max_img_size // 64


@dataclass
class TransformerConfig:
    """The single-stream BERT over [text tokens; visual tokens] (upstream's base_model.json)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    max_grid_row_position_embeddings: int = 100
    max_grid_col_position_embeddings: int = 100
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0


@dataclass
class ClipConfig:
    """Sparse sampling: each video gives `num_clips` short clips of `frames_per_clip` frames; frames are
    mean-pooled within a clip, every clip is scored with the text alone, and the clip scores are combined
    by `score_agg` (upstream `score_agg_func`; msrvtt_ret_base_resnet50.json: 8 clips x 2 frames, lse;
    16 clips at test)."""

    num_clips: int = 8  # upstream train_n_clips
    num_clips_test: int = 16  # upstream inference_n_clips
    frames_per_clip: int = 2  # upstream num_frm
    score_agg: str = "lse"  # mean | max | lse (log-sum-exp, inside the cross-entropy)


@dataclass
class HeadConfig:
    """Which head sits on the pooled [CLS] and how it is trained.

    retrieval: MLP hidden -> cls_hidden_scale*hidden -> ReLU -> 2 (ITM match / no match), cross-entropy
    over a positive caption and `itm_neg_size` sampled negatives per video. qa: the same MLP over the
    answer vocabulary (`num_labels` = len(ans2label)); cross-entropy, or BCE over soft scores (VQA).
    mc: the MLP to one score per (question, option), cross-entropy over `num_choices` options.
    pretrain: BERT's MLM head on the text positions + ITM (`seq_relationship`) on [CLS].
    """

    task: str = "retrieval"
    num_labels: int = 1500  # qa; upstream msrvtt_qa uses max(len(ans2label), 1500)
    num_choices: int = 5  # mc (TGIF-QA action/transition, MSRVTT-MC)
    cls_hidden_scale: int = 2
    qa_loss: str = "ce"  # ce | bce (upstream's instance_bce_with_logits, scaled by num_labels)
    itm_neg_size: int = 1  # retrieval: negative captions per positive
    mlm_probability: float = 0.15  # pretrain


@dataclass
class ClipBertConfig:
    """Model config. The field defaults are upstream's (base_model.json + R-50 + msrvtt retrieval), so
    `ClipBertConfig()` equals `ClipBertConfig.base()`."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        # YAML and JSON give lists; the dataclasses keep tuples so configs compare and hash alike.
        for name in ("depths", "hidden_sizes", "pixel_mean", "pixel_std"):
            setattr(self.vision, name, tuple(getattr(self.vision, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with what is wrong and what would be right."""
        v, t, c, h = self.vision, self.transformer, self.clips, self.head
        if len(v.depths) != len(v.hidden_sizes) or not v.depths:
            raise ValueError(
                f"vision.depths {list(v.depths)} and vision.hidden_sizes {list(v.hidden_sizes)} need one "
                "entry per ResNet stage"
            )
        if any(s % 4 for s in v.hidden_sizes):
            raise ValueError(
                f"vision.hidden_sizes {list(v.hidden_sizes)} must be multiples of 4 (bottleneck)"
            )
        if not 0 <= v.freeze_at <= len(v.depths) + 1:
            raise ValueError(f"vision.freeze_at={v.freeze_at} must be in [0, {len(v.depths) + 1}]")
        if v.input_format not in INPUT_FORMATS:
            raise ValueError(f"vision.input_format={v.input_format!r}; valid: {list(INPUT_FORMATS)}")
        if len(v.pixel_mean) != 3 or len(v.pixel_std) != 3 or min(v.pixel_std) <= 0:
            raise ValueError("vision.pixel_mean and vision.pixel_std need 3 values, std > 0")
        if v.max_img_size < 64:
            raise ValueError(f"vision.max_img_size={v.max_img_size} gives no grid; it must be >= 64")
        if v.grid_size > min(t.max_grid_row_position_embeddings, t.max_grid_col_position_embeddings):
            raise ValueError(
                f"vision.max_img_size={v.max_img_size} gives a {v.grid_size}x{v.grid_size} grid, more than "
                f"the row/col position embeddings ({t.max_grid_row_position_embeddings}, "
                f"{t.max_grid_col_position_embeddings})"
            )
        if v.pixel_random_sampling_size < 0:
            raise ValueError("vision.pixel_random_sampling_size must be >= 0 (0: keep every visual token)")
        if t.hidden_size % t.num_heads:
            raise ValueError(
                f"transformer.hidden_size ({t.hidden_size}) must be divisible by num_heads ({t.num_heads})"
            )
        for name in ("num_clips", "num_clips_test", "frames_per_clip"):
            if getattr(c, name) < 1:
                raise ValueError(f"clips.{name} must be >= 1, got {getattr(c, name)}")
        if c.score_agg not in SCORE_AGGREGATIONS:
            raise ValueError(f"clips.score_agg={c.score_agg!r}; valid: {list(SCORE_AGGREGATIONS)}")
        if h.task not in TASKS:
            raise ValueError(f"head.task={h.task!r}; valid: {list(TASKS)}")
        if h.qa_loss not in QA_LOSSES:
            raise ValueError(f"head.qa_loss={h.qa_loss!r}; valid: {list(QA_LOSSES)}")
        if h.task == "qa" and h.qa_loss == "bce" and c.score_agg == "lse":
            # Upstream asserts the same: log-sum-exp pooling is defined inside the cross-entropy.
            raise ValueError("clips.score_agg='lse' needs head.qa_loss='ce'; use 'mean' or 'max' with 'bce'")
        for name in ("num_labels", "num_choices", "cls_hidden_scale", "itm_neg_size"):
            if getattr(h, name) < 1:
                raise ValueError(f"head.{name} must be >= 1, got {getattr(h, name)}")
        if not 0.0 < h.mlm_probability < 1.0:
            raise ValueError(f"head.mlm_probability ({h.mlm_probability}) must be in (0, 1)")

    @classmethod
    def base(cls, **head_fields: Any) -> ClipBertConfig:
        """Upstream's model: R-50 grid features at 448, BERT-base, 8 clips x 2 frames, LSE.

        `head_fields` set HeadConfig fields (e.g. task="qa", num_labels=len(ans2label)).
        """
        return replace_checked(cls(), {"head": head_fields}, "")

    @classmethod
    def tiny(cls, vocab_size: int, **head_fields: Any) -> ClipBertConfig:
        """The `tiny` preset's model (tests, the CPU demo): about 200 thousand parameters."""
        tiny = MODEL_PRESETS["tiny"]
        transformer = {**tiny["transformer"], "vocab_size": vocab_size}
        return replace_checked(cls(), {**tiny, "transformer": transformer, "head": head_fields}, "")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: ClipBertConfig | None = None) -> ClipBertConfig:
        """Build from a (nested) mapping over `defaults` (upstream's values when None).

        Unknown keys raise ValueError naming the valid ones.
        """
        return replace_checked(defaults if defaults is not None else cls(), d, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What each preset changes in the model from the defaults above. `tiny` is the CPU demo: a four-stage
# ResNet of one block each with trainable BatchNorm (it starts from scratch, where frozen statistics
# would make every normalisation the identity), 128-pixel frames (a 2x2 grid), a 2-layer BERT.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "tiny": {
        "vision": {
            "depths": (1, 1, 1, 1),
            "hidden_sizes": (16, 32, 64, 128),
            "stem_channels": 8,
            "frozen_batchnorm": False,
            "freeze_at": 0,
            "max_img_size": 128,
        },
        "transformer": {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 64,
            "max_grid_row_position_embeddings": 16,
            "max_grid_col_position_embeddings": 16,
        },
        "clips": {"num_clips": 2, "num_clips_test": 4, "frames_per_clip": 2},
    },
}


__all__ = [
    "INPUT_FORMATS",
    "MODEL_PRESETS",
    "QA_LOSSES",
    "SCORE_AGGREGATIONS",
    "TASKS",
    "ClipBertConfig",
    "ClipConfig",
    "HeadConfig",
    "TransformerConfig",
    "VisionConfig",
]
