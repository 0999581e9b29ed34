"""Configs of the Singularity trainer: the model (`SingularityConfig`) and training (`TrainConfig`).

No torch here: the launcher imports this module to check `trainer.*` overrides on the laptop and to
register the schema with Hydra, before anything is submitted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainers.core.configs import (  # noqa: F401 - optional_schema: the launcher reads it here
    AMP_CHOICES,
    BertTextConfig,
    OptimConfig,
    check_counts,
    drop_unset,
    merge,
    optional_schema,
    replace_checked,
    require_answer_list,
)

FRAME_ENSEMBLES = ("concat", "mean", "max", "lse")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """BEiT image encoder (HF `BeitModel`) with relative position bias, layer scale and mean pooling."""

    image_res: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_scale_init_value: float = 0.1
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-12


@dataclass
class TextConfig(BertTextConfig):
    """BERT text + multimodal encoder: layers >= fusion_layer cross-attend to the frames."""

    fusion_layer: int = 9


@dataclass
class TemporalEncoderConfig:
    """Optional BERT-style encoder attending across frames at each spatial position."""

    enable: bool = False
    num_layers: int = 2
    # Upstream default False: ITC keeps the per-frame BEiT pooled features even with the temporal encoder.
    update_pooler_embed: bool = False


@dataclass
class LossWeights:
    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 1.0


@dataclass
class SingularityConfig:
    """Model config. The field defaults are upstream's (`configs/pretrain.yaml`, `config_bert.json`),
    so `SingularityConfig()` equals `SingularityConfig.base()`."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    temporal_vision_encoder: TemporalEncoderConfig = field(default_factory=TemporalEncoderConfig)
    loss_weight: LossWeights = field(default_factory=LossWeights)
    embed_dim: int = 256
    temp: float = 0.07
    num_frames: int = 1  # frames per video in training; sets the temporal_embeddings length
    num_frames_test: int = 4
    add_temporal_embed: bool = False
    # How test-time frames meet the text: "concat" joins all frame tokens before the fusion layers
    # (early fusion); "mean"/"max"/"lse" score each frame alone and pool the scores (late fusion).
    eval_frame_ensemble: str = "concat"
    itm_hard_neg: bool = True
    mlm: bool = False
    mlm_prob: float = 0.5
    k_test: int = 128
    num_decoder_layers: int = 3  # QA answer decoder
    max_answer_len: int = 5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with what is wrong and what would be right."""
        v, t = self.vision, self.text
        if self.eval_frame_ensemble not in FRAME_ENSEMBLES:
            raise ValueError(
                f"eval_frame_ensemble={self.eval_frame_ensemble!r}; valid: {list(FRAME_ENSEMBLES)}"
            )
        if self.eval_frame_ensemble != "concat" and self.num_frames != 1:
            raise ValueError(
                f"eval_frame_ensemble={self.eval_frame_ensemble!r} (late fusion) needs a single-frame model "
                f"(num_frames=1, got {self.num_frames}); use 'concat' for multi-frame models"
            )
        if v.hidden_size != t.hidden_size:
            # HF BertLayer's cross-attention projects keys/values from hidden_size, not a separate width.
            raise ValueError(
                f"vision.hidden_size ({v.hidden_size}) must equal text.hidden_size ({t.hidden_size})"
            )
        if v.image_res % v.patch_size:
            raise ValueError(
                f"vision.image_res ({v.image_res}) must be a multiple of patch_size ({v.patch_size})"
            )
        for name, hidden, heads in (
            ("vision", v.hidden_size, v.num_heads),
            ("text", t.hidden_size, t.num_heads),
        ):
            if hidden % heads:
                raise ValueError(f"{name}.hidden_size ({hidden}) must be divisible by num_heads ({heads})")
        if not 0 <= t.fusion_layer <= t.num_layers:
            raise ValueError(f"text.fusion_layer ({t.fusion_layer}) must be in [0, {t.num_layers}]")
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"mlm_prob ({self.mlm_prob}) must be in (0, 1)")
        for name in ("num_frames", "num_frames_test", "k_test", "num_decoder_layers", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temporal_vision_encoder.enable and self.temporal_vision_encoder.num_layers < 1:
            raise ValueError("temporal_vision_encoder.num_layers must be >= 1 when enabled")

    @classmethod
    def base(cls) -> SingularityConfig:
        """Upstream's model: BEiT-B/16 at 224, BERT-base with fusion_layer 9, embed_dim 256."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int, **text_fields: Any) -> SingularityConfig:
        """The `tiny` preset's model (tests, the CPU demo): a few hundred thousand parameters.

        `text_fields` override TextConfig fields (e.g. the tokenizer's special token ids).
        """
        tiny = PRESETS["tiny"]["model"]
        text = {**tiny["text"], "vocab_size": vocab_size, **text_fields}
        return replace_checked(cls(), {**tiny, "text": text}, "")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: SingularityConfig | None = None) -> SingularityConfig:
        """Build from a (nested) mapping over `defaults` (upstream's values when None).

        Unknown keys raise ValueError naming the valid ones.
        """
        return replace_checked(defaults if defaults is not None else cls(), d, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The `trainer:` node of a job config after its preset is applied.

    Defaults are upstream's retrieval fine-tuning (configs/ret_msrvtt.yaml): 5 epochs, lr 1e-5,
    32 videos per GPU, 1 training frame, 4 test frames, ITM re-ranking of the top 128.
    """

    family: str = "singularity"
    preset: str = "base"
    model: SingularityConfig = field(default_factory=SingularityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 5  # 0: evaluate `pretrained` (e.g. a released fine-tuned checkpoint) without training
    batch_size: int = 32  # per process
    batch_size_test: int = 64
    num_workers: int = 4  # loader processes per trainer process
    amp: str = "auto"  # auto: bf16 where the GPU has it, else fp16 with a grad scaler; off on CPU
    hflip: bool = True  # horizontal flip augmentation (off on the sample data: its captions say left/right)
    pretrained: str | None = None  # an upstream or our own checkpoint to start from (weights only)
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of every epoch only
    keep_checkpoints: int = 2
    eval_split: str = "test"  # annotation split evaluated at the end
    torch_threads: int | None = None  # None: OMP_NUM_THREADS, as the launcher sets it per task


# Presets: what `trainer.preset=<name>` changes from the defaults above. `tiny` is the CPU demo:
# a model of a few hundred thousand parameters that learns the sample data in about a minute.
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "tiny": {
        "model": {
            "vision": {
                "image_res": 64,
                "patch_size": 8,
                "hidden_size": 64,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 128,
                "drop_path_rate": 0.0,
            },
            "text": {
                "hidden_size": 64,
                "num_layers": 4,
                "fusion_layer": 2,
                "num_heads": 2,
                "intermediate_size": 128,
                "max_position_embeddings": 64,
            },
            "embed_dim": 32,
            "num_decoder_layers": 2,
            "k_test": 16,
            # Upstream samples ITM negatives from the ITC similarities (hard negatives); that assumes
            # pretrained encoders. From scratch the ITM head then never learns, so the demo draws
            # negatives uniformly.
            "itm_hard_neg": False,
        },
        "optim": {"lr": 2e-3, "weight_decay": 0.02, "warmup_epochs": 0.5, "min_lr_multi": 0.05},
        "epochs": 10,
        "batch_size": 32,
        "batch_size_test": 64,
        "num_workers": 1,
        "hflip": False,
    },
}


def preset_for(trainer: Mapping[str, Any], dataset: Mapping[str, Any]) -> str:
    """`auto`: tiny on the generated sample data, base (upstream) when data_root points at real data."""
    preset = trainer.get("preset") or "auto"
    if preset == "auto":
        return "tiny" if dataset.get("data_root") is None else "base"
    if preset not in PRESETS:
        raise ValueError(f"trainer.preset={preset!r}; valid: auto, {', '.join(PRESETS)}")
    return preset


def resolve(trainer: Mapping[str, Any], dataset: Mapping[str, Any]) -> TrainConfig:
    """The effective training config: defaults <- preset <- explicit (non-null) values.

    Raises ValueError naming the valid keys or values when something is wrong.
    """
    require_answer_list(dataset, "singularity")
    preset = preset_for(trainer, dataset)
    explicit = drop_unset({k: v for k, v in trainer.items() if k not in ("family", "preset")})
    if "optim" in explicit and "betas" in explicit["optim"]:
        explicit["optim"]["betas"] = tuple(explicit["optim"]["betas"])
    values = merge(PRESETS[preset], explicit)
    values["preset"] = preset
    config = replace_checked(TrainConfig(), values, "trainer")
    if config.amp not in AMP_CHOICES:
        raise ValueError(f"trainer.amp={config.amp!r}; valid: {', '.join(AMP_CHOICES)}")
    check_counts(config)
    return config
