"""Model config of the crossformer trainer (`CrossformerConfig`).

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

from trainers.core.configs import replace_checked


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

__all__ = [
    "AudioConfig",
    "CrossformerConfig",
    "FusionConfig",
    "LossWeights",
    "MODEL_PRESETS",
    "TextConfig",
    "UPSTREAM_LOSS_WEIGHTS",
    "VideoConfig",
]
