"""Configs of the crossformer trainer: the model (`CrossformerConfig`) and training (`TrainConfig`, its
presets, `resolve`, and `optional_schema`, the Hydra schema of `conf/trainer/crossformer.yaml`).

No torch here: the launcher imports this module to check `trainer.*` overrides on the laptop.

The seed ("simple-multimodal", an ALPRO checkout grown into a video + audio + text model) builds four
Hugging Face models from config files: text DeBERTa-v2 (`microsoft/deberta-v2-xlarge`), audio ViT-MAE
(`facebook/vit-mae-base`) over a filterbank "image", video VideoMAE (`MCG-NJU/videomae-base`) and a ViT
(`google/vit-base-patch16-224-in21k`) as the fusion "crossformer". Its model file and its `configs/**.json`
are not public; what is known comes from the README, `train.py`, the MAE-style pretraining scripts and the
companion repository BinZhu-ece/VAT-multimodal (`utils/datacollator.py`, `utils/loss.py`,
`train_launch_lmdb_ddp.py`). See `trainers/crossformer/model.py` for what was inferred and from where.

Presets:
- `base` (= `CrossformerConfig()`): the four model cards' configs, with the seed's input geometry and
  data arguments (audio 1 x 128 mel x 992 frames, mask ratio 0.3; video 16 x 224 x 224, tubelet 2, tube
  mask ratio 0.8; MLM probability 0.3).
- `small`: the seed's `*_small.json` configs. Their contents are not public: the input geometry above is
  what the call sites fix (the collator reads frames, tubelet, patch and image size from the video config;
  the LMDB store holds (16, 3, 224, 224) videos); widths and depths are our choice of a ViT-S-like size.
- `tiny`: unit tests and the CPU demo (under 2M parameters with a small vocabulary).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainers.core.configs import (  # noqa: F401 - optional_schema: the launcher reads it here
    AMP_CHOICES,
    OptimConfig,
    check_counts,
    drop_unset,
    merge,
    optional_schema,
    replace_checked,
)


@dataclass
class TextConfig:
    """DeBERTa-v2 text encoder with its MLM head (defaults: `microsoft/deberta-v2-xlarge`).

    Special token ids are the DeBERTa-v2 tokenizer's ([PAD] 0, [CLS] 1, [SEP] 2, [MASK] 128000); set them
    to match yours. `mlm_probability` 0.3 is the seed's `--mlm_probability` (80/10/10 replacement).
    """

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_layers: int = 24
    num_heads: int = 24
    intermediate_size: int = 6144
    max_position_embeddings: int = 512
    relative_attention: bool = True
    position_buckets: int = 256
    max_relative_positions: int = -1
    norm_rel_ebd: str = "layer_norm"
    share_att_key: bool = True
    pos_att_type: tuple[str, ...] = ("p2c", "c2p")
    position_biased_input: bool = False
    conv_kernel_size: int = 3
    type_vocab_size: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-7
    initializer_range: float = 0.02
    pad_token_id: int = 0
    cls_token_id: int = 1
    sep_token_id: int = 2
    mask_token_id: int = 128000
    mlm_probability: float = 0.3


@dataclass
class AudioConfig:
    """ViT-MAE over a log-mel filterbank "image" of 1 channel x num_mel_bins x target_length frames
    (the seed's `--freq 128 --time 992`, kaldi fbank with a 10 ms shift). Encoder/decoder sizes:
    `facebook/vit-mae-base`; mask_ratio 0.3 is the seed's `--audio_mask_ratio` (the card's is 0.75)."""

    num_mel_bins: int = 128
    target_length: int = 992
    patch_size: int = 16
    num_channels: int = 1
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    decoder_hidden_size: int = 512
    decoder_num_layers: int = 8
    decoder_num_heads: int = 16
    decoder_intermediate_size: int = 2048
    mask_ratio: float = 0.3
    norm_pix_loss: bool = False
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02


@dataclass
class VideoConfig:
    """VideoMAE with its pretraining decoder (defaults: `MCG-NJU/videomae-base`), tube masking.

    mask_ratio 0.8 is the seed's `--video_mask_ratio`. The seed draws ONE mask for the whole batch;
    `mask_same_for_batch` False (default) draws one per video, which the reference lists as the fix of
    that pain point. Either way a mask covers the same spatial patches in every tubelet (tube masking) and
    masks exactly int(mask_ratio * patches per frame) of them, so every video keeps as many tokens.
    """

    image_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    decoder_hidden_size: int = 384
    decoder_num_layers: int = 4
    decoder_num_heads: int = 6
    decoder_intermediate_size: int = 1536
    mask_ratio: float = 0.8
    mask_same_for_batch: bool = False
    norm_pix_loss: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02


@dataclass
class FusionConfig:
    """The "crossformer": ViT encoder layers (defaults: `google/vit-base-patch16-224-in21k`) over the
    concatenated [audio; text; video] tokens, each with a modality type embedding."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02


@dataclass
class LossWeights:
    """Weights of the five objectives; 0 switches one off (and drops its head).

    The seed passes them as `--alpha 0.1 --beta 0.2 --gama 1.0 --delte 0.5 --theta 1.5` to the
    unpublished model; no public line says which weight multiplies which loss. Our mapping
    (`UPSTREAM_LOSS_WEIGHTS`) follows the order in which every call site lists the parts: the
    constructor `cross_former(model_args, audio_config, text_config, video_config, fusion_config)` and
    the output `mask_logits = [audio, text, video]` give alpha, beta, gama to the audio MAE, text MLM
    and video MAE; the two fusion objectives follow, VTM (delte) before the contrastive loss (theta),
    whose flags (`contrastive_dim`, `contrastive_loss_before_fusion`) appear only in the later scripts.
    """

    audio_mae: float = 0.1  # alpha
    text_mlm: float = 0.2  # beta
    video_mae: float = 1.0  # gama
    vtm: float = 0.5  # delte
    contrastive: float = 1.5  # theta

    @classmethod
    def from_upstream(cls, **weights: float) -> LossWeights:
        """Build from the seed's argument names (alpha, beta, gama, delte, theta)."""
        unknown = sorted(set(weights) - set(UPSTREAM_LOSS_WEIGHTS))
        if unknown:
            raise ValueError(f"unknown weight(s) {unknown}; valid: {list(UPSTREAM_LOSS_WEIGHTS)}")
        return cls(**{UPSTREAM_LOSS_WEIGHTS[k]: float(v) for k, v in weights.items()})


# The seed's weight argument -> our objective (see LossWeights: inferred, not read).
UPSTREAM_LOSS_WEIGHTS: dict[str, str] = {
    "alpha": "audio_mae",
    "beta": "text_mlm",
    "gama": "video_mae",
    "delte": "vtm",
    "theta": "contrastive",
}


@dataclass
class CrossformerConfig:
    text: TextConfig = field(default_factory=TextConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    loss_weight: LossWeights = field(default_factory=LossWeights)
    contrastive_dim: int = 768
    # False (seed's default): video and text features are read from the fused sequence, where a matched
    # pair has already attended to each other; True: from the encoders (CLIP proper).
    contrastive_loss_before_fusion: bool = False
    vt_match_ratio: float = 0.5  # fraction of the batch whose video stays with its text (VTM positives)
    # True (seed's default): VTM reads the fused text [CLS]; False: a learned fusion [CLS] token.
    use_t_cls_to_vt_m: bool = True
    temperature: float = 0.07  # initial contrastive temperature (learnable logit scale, as CLIP)
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with what is wrong and what would be right."""
        t, a, v, f = self.text, self.audio, self.video, self.fusion
        for name, hidden, heads in (
            ("text", t.hidden_size, t.num_heads),
            ("audio", a.hidden_size, a.num_heads),
            ("audio.decoder", a.decoder_hidden_size, a.decoder_num_heads),
            ("video", v.hidden_size, v.num_heads),
            ("video.decoder", v.decoder_hidden_size, v.decoder_num_heads),
            ("fusion", f.hidden_size, f.num_heads),
        ):
            if hidden % heads:
                raise ValueError(f"{name} hidden size ({hidden}) must be divisible by its heads ({heads})")
        for name, size in (("num_mel_bins", a.num_mel_bins), ("target_length", a.target_length)):
            if size % a.patch_size:
                raise ValueError(f"audio.{name} ({size}) must be a multiple of patch_size ({a.patch_size})")
        if v.image_size % v.patch_size:
            raise ValueError(
                f"video.image_size ({v.image_size}) must be a multiple of patch_size ({v.patch_size})"
            )
        if v.num_frames % v.tubelet_size:
            raise ValueError(
                f"video.num_frames ({v.num_frames}) must be a multiple of tubelet_size ({v.tubelet_size})"
            )
        for name, ratio in (("audio.mask_ratio", a.mask_ratio), ("video.mask_ratio", v.mask_ratio)):
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"{name} ({ratio}) must be in [0, 1)")
        if not 0.0 < t.mlm_probability < 1.0:
            raise ValueError(f"text.mlm_probability ({t.mlm_probability}) must be in (0, 1)")
        if not 0.0 <= self.vt_match_ratio <= 1.0:
            raise ValueError(f"vt_match_ratio ({self.vt_match_ratio}) must be in [0, 1]")
        if self.contrastive_dim < 1:
            raise ValueError(f"contrastive_dim must be >= 1, got {self.contrastive_dim}")
        if not (self.temperature > 0.0 and 1.0 / self.temperature <= self.max_logit_scale):
            raise ValueError(
                f"need temperature > 0 and 1/temperature <= max_logit_scale ({self.max_logit_scale}), "
                f"got {self.temperature}"
            )
        weights = dataclasses.asdict(self.loss_weight)
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"loss_weight must be >= 0 with at least one > 0, got {weights}")

    @classmethod
    def base(cls) -> CrossformerConfig:
        """The model cards' sizes with the seed's inputs, masks and loss weights."""
        return cls()

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CrossformerConfig:
        """One of MODEL_PRESETS, then `overrides` (a nested mapping, checked like from_dict)."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"preset={name!r}; valid: {sorted(MODEL_PRESETS)}")
        return replace_checked(cls.from_dict(MODEL_PRESETS[name]), overrides, "")

    @classmethod
    def tiny(cls, vocab_size: int | None = None, **text_fields: Any) -> CrossformerConfig:
        """The `tiny` preset; `vocab_size` / `text_fields` set the tokenizer's vocabulary and ids."""
        text = dict(text_fields)
        if vocab_size is not None:
            text["vocab_size"] = vocab_size
        return cls.preset("tiny", text=text)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: CrossformerConfig | None = None) -> CrossformerConfig:
        """Build from a (nested) mapping over `defaults` (the base config when None).

        Unknown keys raise ValueError naming the valid ones.
        """
        return replace_checked(defaults if defaults is not None else cls(), d, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "small": {
        "text": {"hidden_size": 384, "num_layers": 4, "num_heads": 6, "intermediate_size": 1536},
        "audio": {
            "hidden_size": 384,
            "num_layers": 4,
            "num_heads": 6,
            "intermediate_size": 1536,
            "decoder_hidden_size": 256,
            "decoder_num_layers": 2,
            "decoder_num_heads": 8,
            "decoder_intermediate_size": 1024,
        },
        "video": {
            "hidden_size": 384,
            "num_layers": 4,
            "num_heads": 6,
            "intermediate_size": 1536,
            "decoder_hidden_size": 192,
            "decoder_num_layers": 2,
            "decoder_num_heads": 3,
            "decoder_intermediate_size": 768,
        },
        "fusion": {"hidden_size": 384, "num_layers": 4, "num_heads": 6, "intermediate_size": 1536},
        "contrastive_dim": 384,
    },
    "tiny": {
        "text": {
            "vocab_size": 1000,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "position_buckets": 16,
            "mask_token_id": 4,
        },
        "audio": {
            "num_mel_bins": 16,
            "target_length": 64,
            "patch_size": 8,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "decoder_hidden_size": 32,
            "decoder_num_layers": 1,
            "decoder_num_heads": 2,
            "decoder_intermediate_size": 64,
        },
        "video": {
            "image_size": 32,
            "patch_size": 8,
            "num_frames": 4,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "decoder_hidden_size": 32,
            "decoder_num_layers": 1,
            "decoder_num_heads": 2,
            "decoder_intermediate_size": 64,
        },
        "fusion": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
        "contrastive_dim": 16,
    },
}

# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

# The tokenizer the seed names (`--tokenizer_name`); a hub name, read from the local HF cache only.
UPSTREAM_TOKENIZER = "microsoft/deberta-v2-xlarge"
# AudioSet's fbank statistics, which AudioMAE / AST normalise with as (fbank - mean) / (2 * std).
AUDIOSET_FBANK_MEAN = -4.2677393
AUDIOSET_FBANK_STD = 4.5689974


def _upstream_optim() -> OptimConfig:
    # The seed's train.py under HF Trainer: lr 2e-5, warmup_ratio 0.1 of 50 epochs, cosine to 0, and the
    # Trainer's defaults for the rest (AdamW betas (0.9, 0.999), weight decay 0, gradient-norm clip 1.0).
    return OptimConfig(
        lr=2e-5, weight_decay=0.0, betas=(0.9, 0.999), warmup_epochs=5.0, min_lr_multi=0.0, max_grad_norm=1.0
    )


@dataclass
class TrainConfig:
    """The `trainer:` node of a crossformer job config after its preset is applied.

    Defaults are the seed's `train.py` command line: 4 samples per GPU, 50 epochs, lr 2e-5 with 10%
    warmup and a cosine decay, fp16, 16 frames from a window of 16 x 4 frames (`frame_sample_rate`),
    kaldi fbank audio (128 mel bins, 992 frames) and the DeBERTa-v2 tokenizer.
    """

    family: str = "crossformer"
    preset: str = "base"
    model: CrossformerConfig = field(default_factory=CrossformerConfig)
    optim: OptimConfig = field(default_factory=_upstream_optim)
    epochs: int = 50  # 0: evaluate `pretrained` without training
    batch_size: int = 4  # per process (the seed's per_device_train_batch_size)
    batch_size_test: int = 4  # videos per batch at evaluation; pairs are scored in chunks of 16x this
    num_workers: int = 4
    amp: str = "fp16"  # the seed's --fp16 True; auto: bf16 where the GPU has it
    frame_sample_rate: int = 4  # the seed's sample_frame_indices(clip_len=num_frames, frame_sample_rate=4)
    # Audio: kaldi fbank (25 ms hanning windows, 10 ms shift) normalised as (x - mean) / (2 * std).
    fbank_mean: float = AUDIOSET_FBANK_MEAN
    fbank_std: float = AUDIOSET_FBANK_STD
    # Used when dataset.tokenizer is null and the data root ships no vocab.txt.
    tokenizer: str = UPSTREAM_TOKENIZER
    # Evaluation draws MAE masks too (seeded per video): the crossformer only ever sees the visible
    # patches in pretraining. False: the encoders see every patch.
    eval_masks: bool = True
    pretrained: str | None = None  # our checkpoint, the seed's (HF Trainer) or the model cards' weights
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_split: str = "validation"
    torch_threads: int | None = None


# `tiny` is the CPU demo: a model of about 1M parameters on 32 px frames and 16-bin, 64-frame fbanks.
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "tiny": {
        # Contrastive features from the encoders (the seed's option; its default reads the fused ones):
        # from scratch on a CPU budget the dual-encoder features learn retrieval, the fused ones not yet.
        "model": {**MODEL_PRESETS["tiny"], "video": {**MODEL_PRESETS["tiny"]["video"], "mask_ratio": 0.5},
                  "contrastive_loss_before_fusion": True},
        "optim": {"lr": 1e-3, "weight_decay": 0.01, "warmup_epochs": 0.5, "min_lr_multi": 0.05,
                  "max_grad_norm": 1.0},
        "epochs": 12,
        "batch_size": 16,
        "batch_size_test": 32,
        "num_workers": 0,
        "amp": "off",
        "frame_sample_rate": 2,
    },
}  # fmt: skip

TASKS = ("pretrain",)


def preset_for(trainer: Mapping[str, Any], dataset: Mapping[str, Any]) -> str:
    """`auto`: tiny on the generated sample data, base (the seed's) when data_root points at real data."""
    preset = trainer.get("preset") or "auto"
    if preset == "auto":
        return "tiny" if dataset.get("data_root") is None else "base"
    if preset not in PRESETS:
        raise ValueError(f"trainer.preset={preset!r}; valid: auto, {', '.join(PRESETS)}")
    return preset


def resolve(trainer: Mapping[str, Any], dataset: Mapping[str, Any]) -> TrainConfig:
    """The effective training config: defaults <- preset <- explicit (non-null) values. Raises
    ValueError naming the valid keys or values when something is wrong (dataset sample limits too)."""
    preset = preset_for(trainer, dataset)
    explicit = drop_unset({k: v for k, v in trainer.items() if k not in ("family", "preset")})
    if "optim" in explicit and "betas" in explicit["optim"]:
        explicit["optim"]["betas"] = tuple(explicit["optim"]["betas"])
    if "pos_att_type" in explicit.get("model", {}).get("text", {}):
        explicit["model"]["text"]["pos_att_type"] = tuple(explicit["model"]["text"]["pos_att_type"])
    values = merge(PRESETS[preset], explicit)
    values["preset"] = preset
    config = replace_checked(TrainConfig(), values, "trainer")
    config.model.validate()
    if config.amp not in AMP_CHOICES:
        raise ValueError(f"trainer.amp={config.amp!r}; valid: {', '.join(AMP_CHOICES)}")
    check_counts(config, "batch_size_test")
    if config.frame_sample_rate < 1:
        raise ValueError(f"trainer.frame_sample_rate must be >= 1, got {config.frame_sample_rate}")
    if not config.fbank_std > 0:
        raise ValueError(f"trainer.fbank_std must be > 0, got {config.fbank_std}")
    for key in ("max_train_samples", "max_eval_samples"):
        limit = dataset.get(key)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"dataset.{key} must be a whole number >= 1 or null (all rows), got {limit!r}")
    return config


__all__ = [
    "AudioConfig",
    "CrossformerConfig",
    "FusionConfig",
    "LossWeights",
    "MODEL_PRESETS",
    "PRESETS",
    "TextConfig",
    "TrainConfig",
    "UPSTREAM_LOSS_WEIGHTS",
    "UPSTREAM_TOKENIZER",
    "VideoConfig",
    "optional_schema",
    "resolve",
]
