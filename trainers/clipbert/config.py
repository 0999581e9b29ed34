"""Configs of the ClipBERT trainer: the model (`ClipBertConfig`: vision, cross-modal BERT, sparse clips,
task heads) and training (`TrainConfig`, its presets, `resolve`, and `optional_schema`, the Hydra schema
of `conf/trainer/clipbert.yaml`).

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

from trainers.core.configs import (  # noqa: F401 - optional_schema: the launcher reads it here
    AMP_CHOICES,
    OptimConfig,
    check_counts,
    drop_unset,
    merge,
    optional_schema,
    replace_checked,
)

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
# The tiny BERT starts from scratch, so it gets an initialisation for its width (std 0.1, about
# 1/sqrt(64)), not BERT's 0.02, which assumes pretrained weights get loaded over it: at 0.02 the
# attention and value paths of a 64-wide model are so small at first that [CLS] hardly depends on the
# visual tokens (shuffling the videos of a batch moved the logits by ~0.2% of their spread), and 150
# steps learn only the answer prior of each question type, not colour, shape or size from pixels.
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
            "initializer_range": 0.1,
        },
        "clips": {"num_clips": 2, "num_clips_test": 4, "frames_per_clip": 2},
    },
}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

VIDEO_STORES = ("files", "lmdb")
DATASET_TASKS = ("retrieval", "qa")  # the dataset tasks the trainer runs (head.task follows the dataset)


def _upstream_optim() -> OptimConfig:
    # src/configs/msrvtt_ret_base_resnet50.json: AdamW betas (0.9, 0.98), weight decay 1e-3 (the CNN gets
    # the same lr and decay), grad_norm 5, linear decay after a warmup of 10% of the steps (config.py's
    # warmup_ratio). The shared loop's schedule is a cosine down to lr * min_lr_multi (0 here).
    return OptimConfig(
        lr=5e-5, weight_decay=1e-3, betas=(0.9, 0.98), warmup_epochs=2.0, min_lr_multi=0.0, max_grad_norm=5.0
    )


@dataclass
class TrainConfig:
    """The `trainer:` node of a ClipBERT job config after its preset is applied.

    Defaults are upstream's MSRVTT retrieval fine-tuning (src/configs/msrvtt_ret_base_resnet50.json):
    8 clips x 2 frames at 2 fps in training, 16 clips at test, LSE over clip scores, 448 px frames,
    ITM with 1 negative caption per positive, lr 5e-5, 20 epochs, 16 videos per GPU, max_txt_len 100,
    fp16 (here `amp: auto`). The `base` preset adds what the dataset's own upstream config changes.

    Frames are read from video files under the dataset's media_dir (`video_store: files`) or, as
    upstream, from an LMDB of the encoded files keyed by the path without extension (`video_store:
    lmdb`, at `video_lmdb`, default `<data_root>/<media_dir>.lmdb`; build it with
    `python -m trainers.clipbert.lmdb_pack <video_dir> <out.lmdb>`).
    """

    family: str = "clipbert"
    preset: str = "base"
    model: ClipBertConfig = field(default_factory=ClipBertConfig)
    optim: OptimConfig = field(default_factory=_upstream_optim)
    epochs: int = 20  # 0: evaluate `pretrained` without training
    batch_size: int = 16  # videos per process
    batch_size_test: int = 16
    num_workers: int = 4
    amp: str = "auto"  # upstream trains with Apex O2 fp16
    target_fps: float = 2.0  # upstream `fps`: a clip of frames_per_clip frames spans frames_per_clip/fps s
    max_txt_len: int | None = None  # tokens per text; null: the dataset's max_txt_l
    # QA: up to this many questions of one video share one decoded video in a batch (upstream's
    # max_n_example_per_group; 1 = one item per question).
    max_n_example_per_group: int = 1
    video_store: str = "files"
    video_lmdb: str | None = None
    pretrained: str | None = None  # upstream (`clipbert_image_text_pretrained.pt`) or our own checkpoint
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_split: str = "test"
    torch_threads: int | None = None


# What upstream's src/configs/<dataset>_base_resnet50.json changes from the defaults above (the `base`
# preset). DiDeMo accumulates 4 batches of 8; the shared loop has no accumulation, so a 32-video batch
# per process stands for it (the same gradient when memory allows).
BASE_BY_DATASET: dict[str, dict[str, Any]] = {
    "msrvtt": {},
    "didemo": {"batch_size": 32, "batch_size_test": 8},
    "msrvtt_qa": {"epochs": 10, "optim": {"warmup_epochs": 1.0}},
}

# `tiny` is the CPU demo and the tests' model: the tiny model (MODEL_PRESETS), 2 clips x 2 frames at
# 4 fps (a clip spans half a second of the 2-second sample videos), 4 clips at test; all the questions
# of a video share its decoded clips.
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "tiny": {
        "model": {**MODEL_PRESETS["tiny"], "head": {"num_labels": 1}},
        "optim": {"lr": 2e-3, "weight_decay": 0.01, "warmup_epochs": 0.5, "min_lr_multi": 0.05,
                  "max_grad_norm": 5.0},
        "epochs": 6,
        "batch_size": 16,
        "batch_size_test": 32,
        "num_workers": 1,
        "amp": "off",
        "target_fps": 4.0,
        "max_n_example_per_group": 4,
    },
}  # fmt: skip

# What the tiny preset changes for a task. Retrieval: ITM from scratch (upstream's one negative caption
# per positive) learns only from the part of [CLS] that depends on the (text, video) pair, a few percent
# of its variance at init (the visual tokens hardly differ between videos before the CNN has learned),
# and BERT's dropout 0.1 (meant for fine-tuning pretrained weights) adds more noise than that: the ITM
# loss stayed at the constant prediction's ln 2 and R@k at chance. With dropout 0.1 no run escaped it
# within 300-400 steps (itm_neg_size 1, 3 or 7; lr 5e-4 to 2e-3; one run of 1000 steps escaped after
# ~850); with dropout 0 it escapes after ~150 (itm_neg_size 1 and 3 alike, so upstream's 1 stays). More
# steps after that and a gentler lr: on the msrvtt sample (100 test videos, chance R@1/5/10 = 1/5/10),
# `python -m launcher trainer=clipbert dataset=msrvtt seed=S` measured R@1/5/10 4/36/62 (S=42, the
# default) and 7/30/56 (S=0) with 12 epochs; 8 epochs gave 3/10/23 (S=42), and dropout 0 with the QA
# values (6 epochs, lr 2e-3) 2/11/28. About 100 s on 2 CPU cores. QA keeps the values it was tuned with
# (dropout 0.1, 6 epochs, lr 2e-3).
TINY_BY_TASK: dict[str, dict[str, Any]] = {
    "retrieval": {
        "model": {"transformer": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        "epochs": 12,
        "optim": {"lr": 1e-3},
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


def _ints(values: Any) -> Any:
    # The Hydra schema types tuples as list[float]; ResNet depths and widths are ints.
    return tuple(int(v) for v in values) if values is not None else None


def resolve(trainer: Mapping[str, Any], dataset: Mapping[str, Any]) -> TrainConfig:
    """The effective training config: defaults <- preset (base: + the dataset's upstream config; tiny: +
    TINY_BY_TASK) <- explicit (non-null) values; the head's task follows the dataset's. Raises ValueError naming the
    valid keys or values when something is wrong.
    """
    preset = preset_for(trainer, dataset)
    explicit = drop_unset({k: v for k, v in trainer.items() if k not in ("family", "preset")})
    if "optim" in explicit and "betas" in explicit["optim"]:
        explicit["optim"]["betas"] = tuple(explicit["optim"]["betas"])
    vision = explicit.get("model", {}).get("vision", {})
    for key in ("depths", "hidden_sizes"):
        if key in vision:
            vision[key] = _ints(vision[key])
    task = str(dataset.get("task"))
    if task not in DATASET_TASKS:
        raise ValueError(f"dataset.task={task!r}: ClipBERT trains {', '.join(DATASET_TASKS)} datasets")
    asked = explicit.get("model", {}).get("head", {}).get("task")
    if asked is not None and asked != task:
        raise ValueError(
            f"trainer.model.head.task={asked!r} but dataset {dataset.get('name')} is a {task} dataset; "
            "leave head.task unset (it follows the dataset)"
        )
    values = PRESETS[preset]
    if preset == "base":
        values = merge(values, BASE_BY_DATASET.get(str(dataset.get("name")), {}))
    elif preset == "tiny":
        values = merge(values, TINY_BY_TASK.get(task, {}))
    values = merge(merge(values, {"model": {"head": {"task": task}}}), explicit)
    values["preset"] = preset
    config = replace_checked(TrainConfig(), values, "trainer")
    config.model.__post_init__()  # tuples back, then validate
    if config.amp not in AMP_CHOICES:
        raise ValueError(f"trainer.amp={config.amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if config.video_store not in VIDEO_STORES:
        raise ValueError(f"trainer.video_store={config.video_store!r}; valid: {', '.join(VIDEO_STORES)}")
    if not config.target_fps > 0:
        raise ValueError(f"trainer.target_fps must be > 0, got {config.target_fps}")
    if config.max_txt_len is not None and config.max_txt_len < 2:
        raise ValueError(f"trainer.max_txt_len must be >= 2 ([CLS] and [SEP]), got {config.max_txt_len}")
    if config.max_n_example_per_group < 1:
        raise ValueError(
            f"trainer.max_n_example_per_group must be >= 1, got {config.max_n_example_per_group}"
        )
    check_counts(config, "batch_size_test")
    if task == "retrieval" and config.batch_size < 2 and config.epochs > 0:
        raise ValueError(
            "trainer.batch_size must be >= 2 for retrieval: ITM negatives come from other videos"
        )
    return config


__all__ = [
    "BASE_BY_DATASET",
    "DATASET_TASKS",
    "PRESETS",
    "TINY_BY_TASK",
    "TrainConfig",
    "VIDEO_STORES",
    "optional_schema",
    "preset_for",
    "resolve",
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
