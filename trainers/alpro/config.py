"""Configs of the ALPRO trainer: the model (`AlproConfig`) and training (`TrainConfig`, its presets,
`resolve`, and `optional_schema`, the Hydra schema of `conf/trainer/alpro.yaml`).

No torch here: the launcher imports this module to check `trainer.*` overrides on the laptop.
Defaults are upstream's (salesforce/ALPRO: `config_release/base_model.json` for BERT,
`timesformer_divst_8x32_224_k600.json` and `src/modeling/timesformer/vit.py::TimeSformer` for the video
encoder, `src/modeling/alpro_models.py` for heads and losses), so `AlproConfig()` equals
`AlproConfig.base()`: the 8-frame retrieval model. `TASK_OVERRIDES` holds what upstream's task configs
change (frames, gradient checkpointing).
"""

from __future__ import annotations

import dataclasses
import os
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
class TextConfig(BertTextConfig):
    """BERT: layers < fusion_layer encode the text alone; layers >= fusion_layer run over the
    concatenated [text; video] tokens (upstream's xbert disables cross-attention).

    Special token ids default to bert-base-uncased's; set them to match your tokenizer.
    """

    fusion_layer: int = 6


@dataclass
class LossWeights:
    """Weights of the training losses. 0 switches a loss off; with mlm 0 the model has no MLM head.

    Upstream: pretraining itc + itm + mlm + mpm (PEM, the entity prompts' loss; its model then holds
    the frozen prompter), the prompter itc alone, retrieval itc + itm.
    """

    vtc: float = 1.0
    vtm: float = 1.0
    mlm: float = 1.0
    pem: float = 0.0


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
    # PEM (loss_weight.pem > 0): entities the prompter scores a video region against (upstream: the 1000
    # most frequent nouns of the corpus; the entity file may hold fewer), and the least probability of
    # the top entity for a region to count (upstream compares the top entity's index instead, a bug).
    num_entities: int = 1000
    pem_threshold: float = 0.2

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
        if not 0.0 <= self.pem_threshold < 1.0:
            raise ValueError(f"pem_threshold ({self.pem_threshold}) must be in [0, 1)")
        for name in ("embed_dim", "qa_hidden_scale", "num_entities"):
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
    "pretrain": {"video": {"num_frames": 4}},  # the prompter's and ALPRO's pretraining
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

# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

FRAME_SAMPLES = ("uniform", "rand", "nlvl_rand", "headtail")  # trainers.core.clip_sampling.ALPRO_SAMPLES

# Pretraining on video-caption pairs (dataset task `pretrain_captions`) has two stages, as upstream's
# run_scripts/pt_prompter.sh then pt_alpro.sh: `prompter` trains the teacher with VTC alone; `alpro`
# trains the model with VTC + VTM + MLM + PEM, the frozen prompter (`trainer.prompter=`) scoring video
# regions against the entity prompts. Both sample frames head-and-tail (config_release/pretrain_*.json).
STAGES = ("prompter", "alpro")
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "prompter": {"model": {"loss_weight": {"vtc": 1.0, "vtm": 0.0, "mlm": 0.0, "pem": 0.0}}, "sample": "headtail"},
    "alpro": {"model": {"loss_weight": {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0, "pem": 1.0}}, "sample": "headtail"},
}  # fmt: skip
PRETRAIN_TASK = "pretrain_captions"
# The tiny preset's pretraining, from scratch on the sample corpus. The prompter (VTC alone) leaves the
# ln(batch) plateau after 150-250 steps: 20 epochs, not 10 (seed 1: R@5 5 after 10 epochs, 44 after 20;
# chance 5). ALPRO starts from the prompter's weights (see TrainConfig.init_from_prompter).
TINY_STAGES: dict[str, dict[str, Any]] = {"prompter": {"epochs": 20}, "alpro": {"init_from_prompter": True}}


def _upstream_optim() -> OptimConfig:
    # config_release/*.json: AdamW betas (0.9, 0.98), weight decay 1e-3. Upstream decays linearly; the
    # shared loop's schedule is a cosine down to lr * min_lr_multi (0 here), the nearest it has.
    return OptimConfig(lr=2.5e-5, weight_decay=1e-3, betas=(0.9, 0.98), min_lr_multi=0.0, max_grad_norm=5.0)


@dataclass
class TrainConfig:
    """The `trainer:` node of an ALPRO job config after its preset is applied.

    Defaults are upstream's MSRVTT retrieval fine-tuning (config_release/msrvtt_ret.json): 8 frames
    (`rand` in training, `uniform` at test), 224 crops of frames resized to 256, lr 2.5e-5, 5 epochs,
    8 videos per GPU, gradient-norm clip 5. The `base` preset adds what the dataset's own upstream
    config changes (`BASE_BY_DATASET`).
    """

    family: str = "alpro"
    preset: str = "base"
    model: AlproConfig = field(default_factory=lambda: AlproConfig.from_dict(TASK_OVERRIDES["msrvtt_ret"]))
    optim: OptimConfig = field(default_factory=_upstream_optim)
    epochs: int = 5  # 0: evaluate `pretrained` without training
    batch_size: int = 8  # per process
    batch_size_test: int = 64
    num_workers: int = 4
    amp: str = "off"  # upstream fine-tunes in fp32 (`fp16: 0`); auto: bf16/fp16 as the GPU allows
    sample: str = "rand"  # training frame choice; evaluation always takes `uniform` frames
    resize_size: int = 256  # frames are resized (square) to this, then randomly cropped to image_size
    hflip: bool = False  # upstream's fine-tuning does not flip
    pretrained: str | None = None  # upstream (`alpro_pretrained_ckpt.pt`) or our own checkpoint
    # Pretraining (dataset task pretrain_captions) only: which stage, and for `alpro` the trained prompter
    # (upstream's prompter_pretrained.pt, or one of our prompter runs: a checkpoint, its checkpoints/
    # directory or its run directory). Its entity prompts are built from dataset.entities at the start.
    stage: str = "alpro"
    prompter: str | None = None
    # Stage alpro: start the model from the prompter's weights (the same backbone) rather than from
    # `pretrained` / the initialisation. The tiny preset does: from scratch, MLM pulls the text encoder
    # away while VTC still sits on its ln(batch) plateau, and nothing is learned (upstream starts both
    # stages from pretrained TimeSformer and BERT weights instead).
    init_from_prompter: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_split: str = "test"
    torch_threads: int | None = None


# What upstream's config_release/<dataset>.json changes from the defaults above (the `base` preset).
# Upstream's QA configs accumulate 2 batches of 12; the shared loop has no accumulation, so a 24-video
# batch per process stands for it (the same gradient when memory allows).
BASE_BY_DATASET: dict[str, dict[str, Any]] = {
    "msrvtt": {"model": TASK_OVERRIDES["msrvtt_ret"]},
    "didemo": {
        "model": TASK_OVERRIDES["didemo_ret"],
        "optim": {"lr": 4e-5, "max_grad_norm": 20.0},
        "epochs": 10,
        "batch_size": 12,
    },
    "msrvtt_qa": {
        "model": TASK_OVERRIDES["msrvtt_qa"],
        "optim": {"lr": 5e-5, "max_grad_norm": 5.0},
        "epochs": 10,
        "batch_size": 24,
    },
    "msvd_qa": {
        "model": TASK_OVERRIDES["msvd_qa"],
        "optim": {"lr": 5e-5, "max_grad_norm": 20.0},
        "epochs": 15,
        "batch_size": 24,
    },
    # config_release/pretrain_{prompter,alpro}.json: 4 frames, lr 1e-4 with 5% warmup, 10 epochs, 16
    # videos per GPU (the prompter accumulates 2), gradient-norm clip 20.
    "webvid": {
        "model": TASK_OVERRIDES["pretrain"],
        "optim": {"lr": 1e-4, "max_grad_norm": 20.0, "warmup_epochs": 0.5},
        "epochs": 10,
        "batch_size": 16,
    },
}

# `tiny` is the CPU demo: a model of about 100k parameters that learns the sample data in about a
# minute on one or two cores (32 px crops of 36 px frames, 2 frames).
# Batches of 16, not 32: from scratch the video [CLS] hardly differs across a batch at first, so VTC
# sits on its ln(batch) plateau for 150-250 steps until the encoders pick the shapes out. With 32 (half
# the steps) DiDeMo (two motions per video, a two-sentence paragraph) left it late or not at all
# (seeds 42/1/2/3: R@5 5/19/12/13); with 16, R@5 19/22/22/30 (chance 5). MSR-VTT learns with either.
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "tiny": {
        "model": {**MODEL_PRESETS["tiny"], "loss_weight": {"vtc": 1.0, "vtm": 1.0, "mlm": 0.0}},
        "optim": {"lr": 2e-3, "weight_decay": 0.02, "warmup_epochs": 0.5, "min_lr_multi": 0.05,
                  "max_grad_norm": 5.0},
        "epochs": 10,
        "batch_size": 16,
        "batch_size_test": 64,
        "num_workers": 1,
        "resize_size": 36,
        "amp": "off",
    },
}  # fmt: skip


def preset_for(trainer: Mapping[str, Any], dataset: Mapping[str, Any]) -> str:
    """`auto`: tiny on the generated sample data, base (upstream) when data_root points at real data."""
    preset = trainer.get("preset") or "auto"
    if preset == "auto":
        return "tiny" if dataset.get("data_root") is None else "base"
    if preset not in PRESETS:
        raise ValueError(f"trainer.preset={preset!r}; valid: auto, {', '.join(PRESETS)}")
    return preset


def resolve(trainer: Mapping[str, Any], dataset: Mapping[str, Any]) -> TrainConfig:
    """The effective training config: defaults <- preset (base: + the dataset's upstream config) <-
    explicit (non-null) values. Raises ValueError naming the valid keys or values when something is wrong.
    """
    require_answer_list(dataset, "alpro")
    preset = preset_for(trainer, dataset)
    explicit = drop_unset({k: v for k, v in trainer.items() if k not in ("family", "preset")})
    if "optim" in explicit and "betas" in explicit["optim"]:
        explicit["optim"]["betas"] = tuple(explicit["optim"]["betas"])
    values = PRESETS[preset]
    if preset == "base":
        values = merge(values, BASE_BY_DATASET.get(str(dataset.get("name")), {}))
    stage = explicit.get("stage", TrainConfig.stage)
    if stage not in STAGES:
        raise ValueError(f"trainer.stage={stage!r}; valid: {', '.join(STAGES)}")
    pretraining = dataset.get("task") == PRETRAIN_TASK
    if pretraining:
        values = merge(values, STAGE_DEFAULTS[stage])
        if preset == "tiny":
            values = merge(values, TINY_STAGES[stage])
    values = merge(values, explicit)
    values["preset"] = preset
    config = replace_checked(TrainConfig(), values, "trainer")
    config.model.validate()
    if config.amp not in AMP_CHOICES:
        raise ValueError(f"trainer.amp={config.amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if config.sample not in FRAME_SAMPLES:
        raise ValueError(f"trainer.sample={config.sample!r}; valid: {', '.join(FRAME_SAMPLES)}")
    if config.resize_size < config.model.video.image_size:
        raise ValueError(
            f"trainer.resize_size ({config.resize_size}) must be >= trainer.model.video.image_size "
            f"({config.model.video.image_size}): training crops image_size out of the resized frames"
        )
    check_counts(config)
    _check_stage(config, dataset, pretraining)
    return config


def _check_stage(config: TrainConfig, dataset: Mapping[str, Any], pretraining: bool) -> None:
    pem = config.model.loss_weight.pem > 0
    if pem and not pretraining:
        raise ValueError(
            f"trainer.model.loss_weight.pem > 0 needs a pretraining dataset (task {PRETRAIN_TASK}, e.g. "
            f"dataset=webvid); {dataset.get('name')} is a {dataset.get('task')} dataset"
        )
    if not pretraining:
        return
    if config.stage == "prompter" and pem:
        raise ValueError("trainer.stage=prompter trains with VTC alone: set trainer.model.loss_weight.pem=0")
    if pem and not dataset.get("entities"):
        raise ValueError("PEM needs an entity list: set dataset.entities (upstream: unigrams.txt)")
    if (
        config.prompter
        and "://" not in config.prompter
        and not os.path.exists(os.path.expanduser(config.prompter))
    ):
        raise ValueError(
            f"trainer.prompter={config.prompter} does not exist; give upstream's prompter_pretrained.pt, or "
            "the run directory (or a checkpoint) of a trainer.stage=prompter run"
        )
    if pem and not config.prompter and not config.pretrained:
        raise ValueError(
            "trainer.stage=alpro with PEM needs the trained prompter: first run trainer.stage=prompter on "
            "this dataset, then pass trainer.prompter=<its run dir or checkpoint> (or upstream's "
            "prompter_pretrained.pt); or set trainer.model.loss_weight.pem=0"
        )


__all__ = [
    "ATTENTION_TYPES",
    "PRETRAIN_TASK",
    "STAGES",
    "AlproConfig",
    "BASE_BY_DATASET",
    "PRESETS",
    "TrainConfig",
    "optional_schema",
    "resolve",
    "LossWeights",
    "MODEL_PRESETS",
    "TASK_OVERRIDES",
    "TextConfig",
    "VideoConfig",
]
