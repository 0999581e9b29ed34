"""Model config of the MERLOT Reserve trainer (`ReserveConfig`).

No jax here: the launcher imports this module to check `trainer.*` overrides on the laptop.
Defaults are upstream's base model (rowanz/merlot_reserve `pretrain/configs/base.yaml`, module defaults
in `mreserve/modeling.py`), so `ReserveConfig()` equals `ReserveConfig.preset("base")`. Upstream uses
one width for every encoder (vision and audio tokens are fed straight into the joint transformer), so
`hidden_size` and `size_per_head` live at the top and every encoder has `hidden_size // size_per_head`
heads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainers.core.configs import (  # noqa: F401 - optional_schema: the launcher reads it here
    check_counts,
    drop_unset,
    merge,
    optional_schema,
    replace_checked,
)

# Special token ids of upstream's lowercase BPE vocabulary (mreserve/lowercase_encoder.py).
PADDING, START, END, MASK, MASKAUDIO, AUDIOSPAN, LTOVPOOL = 0, 1, 2, 3, 4, 5, 6

DTYPES = ("float32", "bfloat16")
# "upstream": upstream's apply_rotary, which (by its own comment) is not a true rotation; pretrained
# checkpoints were trained with it, so it is the default. "standard": RoFormer's pairwise rotation,
# whose q.k depends only on relative position; for training from scratch.
ROTARY_VARIANTS = ("upstream", "standard")


@dataclass(frozen=True)
class VisionConfig:
    """ViT over pre-patched frames [*, grid_h * grid_w, patch_size**2 * 3], then 2x2 attention pooling.

    `output_grid` is the patch grid: (12, 20) (192x320 px) at pretraining, (18, 32) for the
    resolution-adapted checkpoints that TVQA / SiQ2 finetuning use.
    """

    patch_size: int = 16
    output_grid: tuple[int, int] = (12, 20)
    num_layers: int = 12
    pooling_ratio: int = 2

    @property
    def num_patches(self) -> int:
        return self.output_grid[0] * self.output_grid[1]

    @property
    def tokens_per_frame(self) -> int:
        """Pooled tokens each frame contributes to the joint sequence (60 at 12x20)."""
        return self.num_patches // self.pooling_ratio**2


@dataclass(frozen=True)
class AudioConfig:
    """Log-mel spectrogram encoder. Each segment is split into `num_subsegments` sub-segments of
    `seq_length` frames of `num_mels + 1` features (the extra one is the playback speed); a strided
    Conv1d of width `patch_size` embeds them and attention pooling leaves `token_length` tokens."""

    num_mels: int = 64
    seq_length: int = 60
    patch_size: int = 2
    token_length: int = 6
    num_layers: int = 12
    num_subsegments: int = 3

    @property
    def num_features(self) -> int:
        return self.num_mels + 1

    @property
    def pooling_ratio(self) -> int:
        return self.seq_length // (self.token_length * self.patch_size)


@dataclass(frozen=True)
class SpanConfig:
    """Span encoder: encodes a masked-out text span (at most `max_length` tokens) into its CLS target."""

    num_layers: int = 4
    max_length: int = 15  # upstream's text_span_length (without the CLS token)


@dataclass(frozen=True)
class JointConfig:
    num_layers: int = 12


@dataclass(frozen=True)
class SegmentConfig:
    """Layout of a training example: `num_segments` segments (one frame, audio and subtitle tokens each),
    fed to the joint transformer `num_segments // num_segment_groups` segments at a time.

    `seq_len` = tokens_per_frame * num_segments // num_segment_groups + lang_seq_len at pretraining.
    """

    num_segments: int = 16
    num_segment_groups: int = 2
    lang_seq_len: int = 160
    seq_len: int = 640
    mask_rate: float = 0.25
    num_text_spans_to_include: int = 48
    num_audio2text_seqs: int = 1
    num_text2audio_seqs: int = 1
    num_text_seqs: int = 1


@dataclass(frozen=True)
class ReserveConfig:
    hidden_size: int = 768
    size_per_head: int = 64
    mlp_ratio: int = 4
    vocab_size: int = 32768
    rotary_hsize: int = 32  # leading dims of each head that get rotary position embeddings
    rotary_variant: str = "upstream"
    dtype: str = "float32"  # compute dtype; parameters stay float32 ("bfloat16" on TPU, as upstream)
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    span: SpanConfig = field(default_factory=SpanConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    segments: SegmentConfig = field(default_factory=SegmentConfig)
    # Contrastive heads imgs_to_audio, text_to_audio, stuff_to_span: learnable log-scales initialized to
    # 1 and clipped at log(max_contrastive_scale).
    max_contrastive_scale: float = 100.0
    prefer_multimodal_spans: float = 4.0  # spans seen in audio/text sequences are sampled 4x as often
    video_src_split_prob: float = 0.1  # chance to cut a group's attention in two (pretraining)
    num_answers: int = 0  # multiple-choice finetuning: 5 for TVQA, 2 for Social-IQ 2.0

    def __post_init__(self) -> None:
        grid = tuple(self.vision.output_grid)  # YAML and Hydra give lists
        if grid != self.vision.output_grid:
            object.__setattr__(self, "vision", dataclasses.replace(self.vision, output_grid=grid))
        self.validate()

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.size_per_head

    @property
    def max_log_scale(self) -> float:
        return math.log(self.max_contrastive_scale)

    def validate(self) -> None:
        """Raise ValueError with what is wrong and what would be right."""
        v, a, s = self.vision, self.audio, self.segments
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; valid: {list(DTYPES)}")
        if self.rotary_variant not in ROTARY_VARIANTS:
            raise ValueError(f"rotary_variant={self.rotary_variant!r}; valid: {list(ROTARY_VARIANTS)}")
        if self.hidden_size % self.size_per_head:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of size_per_head ({self.size_per_head})"
            )
        # The joint transformer uses 4 rotary axes (h, w, segment, token), each with a cos/sin pair.
        if self.rotary_hsize % 8 or not 0 < self.rotary_hsize <= self.size_per_head:
            raise ValueError(
                f"rotary_hsize ({self.rotary_hsize}) must be a positive multiple of 8 and "
                f"<= size_per_head ({self.size_per_head})"
            )
        if len(v.output_grid) != 2 or any(g % v.pooling_ratio for g in v.output_grid):
            raise ValueError(
                f"vision.output_grid {v.output_grid} must be (h, w), both multiples of pooling_ratio "
                f"({v.pooling_ratio})"
            )
        if a.seq_length % (a.token_length * a.patch_size):
            raise ValueError(
                f"audio.seq_length ({a.seq_length}) must be a multiple of token_length * patch_size "
                f"({a.token_length} * {a.patch_size})"
            )
        if s.num_segments % s.num_segment_groups:
            raise ValueError(
                f"segments.num_segments ({s.num_segments}) must be a multiple of num_segment_groups "
                f"({s.num_segment_groups})"
            )
        if not 0.0 < s.mask_rate < 1.0:
            raise ValueError(f"segments.mask_rate ({s.mask_rate}) must be in (0, 1)")
        for name in ("num_layers",):
            for part in ("vision", "audio", "span", "joint"):
                if getattr(getattr(self, part), name) < 1:
                    raise ValueError(f"{part}.{name} must be >= 1")
        if self.num_answers < 0 or self.num_answers == 1:
            raise ValueError(f"num_answers must be 0 (pretraining) or >= 2, got {self.num_answers}")

    @property
    def pretrain_seq_len(self) -> int:
        """The joint sequence length that upstream's `seq_len` must equal."""
        s = self.segments
        return self.vision.tokens_per_frame * s.num_segments // s.num_segment_groups + s.lang_seq_len

    @classmethod
    def preset(cls, name: str, task: str | None = None) -> ReserveConfig:
        """`tiny` (tests, CPU), `base` or `large` (upstream's), optionally with a finetuning task's changes."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"preset={name!r}; valid: {sorted(MODEL_PRESETS)}")
        config = cls.from_dict(MODEL_PRESETS[name])
        if task is not None:
            if task not in TASK_OVERRIDES:
                raise ValueError(f"task={task!r}; valid: {sorted(TASK_OVERRIDES)}")
            config = cls.from_dict(TASK_OVERRIDES[task], defaults=config)
        return config

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: ReserveConfig | None = None) -> ReserveConfig:
        """Build from a (nested) mapping over `defaults` (upstream's base when None).

        Unknown keys raise ValueError naming the valid ones.
        """
        return replace_checked(defaults if defaults is not None else cls(), d, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "base": {},  # pretrain/configs/base.yaml
    "large": {  # pretrain/configs/large.yaml
        "hidden_size": 1024,
        "joint": {"num_layers": 24},
        "vision": {"num_layers": 24},
    },
    "tiny": {
        "hidden_size": 32,
        "size_per_head": 16,
        "rotary_hsize": 8,
        "vocab_size": 64,
        "vision": {"patch_size": 4, "output_grid": (4, 4), "num_layers": 1},
        "audio": {"num_mels": 8, "seq_length": 12, "token_length": 2, "num_layers": 1},
        "span": {"num_layers": 1, "max_length": 5},
        "joint": {"num_layers": 2},
        # 4 pooled tokens per frame, 2 segments per group: 4 * 2 + 16 = 24 <= seq_len, which also holds
        # the audio-text matching sequence (4 segments x (3 sub-segments x 2 tokens + LTOVPOOL))
        "segments": {
            "num_segments": 4,
            "lang_seq_len": 16,
            "seq_len": 32,
            "mask_rate": 0.5,
            "num_text_spans_to_include": 2,
        },
    },
}

# What upstream's finetuning scripts change (finetune/tvqa/tvqa_finetune.py; the SiQ fork's
# finetune/tvqa/siq2_finetune.py): 7 segments, 256 language tokens, the resolution-adapted grid.
TASK_OVERRIDES: dict[str, dict[str, Any]] = {
    "tvqa": {
        "num_answers": 5,
        "vision": {"output_grid": (18, 32)},
        "segments": {"num_segments": 7, "num_segment_groups": 1, "lang_seq_len": 256},
    },
    "siq2": {
        "num_answers": 2,
        "vision": {"output_grid": (18, 32)},
        "segments": {"num_segments": 7, "num_segment_groups": 1, "lang_seq_len": 256},
    },
}

# --------------------------------------------------------------------------------------------------
# Training (the `trainer:` node of conf/trainer/reserve.yaml)
# --------------------------------------------------------------------------------------------------

# Multiple-choice QA finetuning: how many answers each dataset's questions have.
TASKS = {"tvqa": 5, "siq2": 2}
ON_BAD_INPUT = ("skip", "fail")


@dataclass
class ReserveOptim:
    """AdamW as upstream's finetuning (finetune/optimization.py): beta2 0.98, eps 1e-6, weight decay 0.1
    on matrices only, linear warmup then linear decay to 0. (Upstream decays towards the pretrained
    weights, `subtract_old_weights`; here decay is towards 0.)"""

    lr: float = 5e-6
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_epochs: float = 0.5
    max_grad_norm: float = -1.0  # <= 0: no clipping


@dataclass
class TrainConfig:
    """The `trainer:` node of a Reserve job config after its preset is applied.

    Defaults are upstream's TVQA finetuning (finetune/tvqa/tvqa_finetune.py): the base model with the
    dataset's task changes, 3 epochs, a global batch of 32 (split over every device of every host).
    """

    family: str = "reserve"
    preset: str = "base"
    model: ReserveConfig = field(default_factory=lambda: ReserveConfig.preset("base", "tvqa"))
    optim: ReserveOptim = field(default_factory=ReserveOptim)
    epochs: int = 3
    batch_size: int = 32  # global: over every device of every host (the data axis of the mesh)
    batch_size_eval: int = 32
    segment_seconds: float = 4.667  # upstream's segment length for TVQA and SiQ2 (7 segments = 32.7 s)
    pretrained: str | None = None  # upstream fp16 flax checkpoint (file or ckpt_<step> dir)
    resume_from: str | None = None  # an Orbax checkpoints dir (its latest step) or one step dir in it
    save_every: int = 0  # steps between checkpoints; 0: only at the end and on a stop signal
    keep_checkpoints: int = 2
    async_checkpointing: bool = True  # upload while training goes on
    on_bad_input: str = "skip"  # prep: skip a malformed input (reported with file and line) or fail
    log_every: int = 10
    eval_split: str = "val"  # "none": no evaluation (metrics.json then only has the training figures)


# `tiny` is the CPU demo and the tests' model: 3 segments of 2 s, 16x16 px frames, 40 language tokens.
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "large": {"model": MODEL_PRESETS["large"]},
    "tiny": {
        "model": merge(
            MODEL_PRESETS["tiny"],
            {
                "vocab_size": 128,
                "segments": {"num_segments": 3, "num_segment_groups": 1, "lang_seq_len": 40},
            },
        ),
        "optim": {"lr": 2e-3, "weight_decay": 0.01, "warmup_epochs": 0.5, "max_grad_norm": 1.0},
        "epochs": 8,
        "batch_size": 8,
        "batch_size_eval": 16,
        "segment_seconds": 2.0,
    },
}


def preset_for(trainer: Mapping[str, Any], dataset: Mapping[str, Any]) -> str:
    """`auto`: tiny on the generated sample data, base (upstream) when data_root points at real data."""
    preset = trainer.get("preset") or "auto"
    if preset == "auto":
        return "tiny" if dataset.get("data_root") is None and not dataset.get("records") else "base"
    if preset not in PRESETS:
        raise ValueError(f"trainer.preset={preset!r}; valid: auto, {', '.join(PRESETS)}")
    return preset


def resolve(trainer: Mapping[str, Any], dataset: Mapping[str, Any]) -> TrainConfig:
    """The effective training config: defaults <- preset (+ the dataset's upstream task changes) <-
    explicit (non-null) values. Raises ValueError naming the valid keys or values when something is wrong.
    """
    name = str(dataset.get("name"))
    if name not in TASKS:
        raise ValueError(f"dataset {name!r}: the reserve trainer finetunes on {sorted(TASKS)}")
    preset = preset_for(trainer, dataset)
    explicit = drop_unset({k: v for k, v in trainer.items() if k not in ("family", "preset")})
    if "optim" in explicit and "betas" in explicit["optim"]:
        explicit["optim"]["betas"] = tuple(float(b) for b in explicit["optim"]["betas"])
    grid = explicit.get("model", {}).get("vision", {}).get("output_grid")
    if grid is not None:
        explicit["model"]["vision"]["output_grid"] = tuple(int(g) for g in grid)
    # The model: the preset's, with the task's changes for upstream sizes (tiny keeps its small layout).
    model = ReserveConfig.preset("tiny" if preset == "tiny" else preset, None if preset == "tiny" else name)
    values = merge(PRESETS[preset], explicit)
    values["model"] = merge(values.get("model", {}), {"num_answers": TASKS[name]})
    values["model"] = merge(values["model"], explicit.get("model", {}))
    config = replace_checked(TrainConfig(model=model), values | {"preset": preset}, "trainer")
    config.model.validate()
    if config.on_bad_input not in ON_BAD_INPUT:
        raise ValueError(f"trainer.on_bad_input={config.on_bad_input!r}; valid: {', '.join(ON_BAD_INPUT)}")
    check_counts(config, "batch_size_eval")
    if config.save_every < 0 or config.keep_checkpoints < 1 or config.log_every < 1:
        raise ValueError("trainer.save_every must be >= 0, keep_checkpoints and log_every >= 1")
    if config.segment_seconds <= 0:
        raise ValueError(f"trainer.segment_seconds must be > 0, got {config.segment_seconds}")
    return config


__all__ = [
    "AUDIOSPAN",
    "PRESETS",
    "ReserveOptim",
    "TASKS",
    "TrainConfig",
    "optional_schema",
    "preset_for",
    "resolve",
    "AudioConfig",
    "END",
    "JointConfig",
    "LTOVPOOL",
    "MASK",
    "MASKAUDIO",
    "MODEL_PRESETS",
    "PADDING",
    "ROTARY_VARIANTS",
    "ReserveConfig",
    "START",
    "SegmentConfig",
    "SpanConfig",
    "TASK_OVERRIDES",
    "VisionConfig",
]
