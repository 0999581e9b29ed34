"""ClipBERT (Lei et al., "Less is More: ClipBERT for Video-and-Language Learning via Sparse Sampling",
CVPR 2021), rebuilt from maintained `transformers` blocks.

One backbone, four heads (the upstream classes in parentheses, from jayleicn/ClipBERT
`src/modeling/{e2e_model,grid_feat,modeling}.py`):

- `ClipBertForRetrieval` (`ClipBertForVideoTextRetrieval`, loss_type "ce"): ITM over (video, caption)
  pairs, 2-way MLP on [CLS], cross-entropy over positives and sampled negatives.
- `ClipBertForQA` (`ClipBertForSequenceClassification`): MLP over the answer vocabulary (ans2label),
  cross-entropy, or BCE over soft scores for VQA-style data.
- `ClipBertForMultipleChoice` (`ClipBertForMultipleChoice`): one score per (question, option) pair.
- `ClipBertForPretraining` (`ClipBertForPreTraining`): MLM on the text positions + ITM on [CLS].

The backbone, per clip: a ResNet (HF `ResNetModel` in detectron2's R-50 layout: FrozenBN, stride in the
1x1 conv, res5 without dilation) gives stride-32 features; the grid encoder (3x3 conv 2048 -> hidden, no
bias; 2x2 max-pool; ReLU) halves them again (448 px -> 7x7); the frames of the clip are mean-pooled;
row and column position embeddings, a token-type embedding, LayerNorm and dropout make the visual
tokens; one BERT runs over [text tokens; visual tokens] (text padding masked, every visual token kept)
and its pooler reads [CLS]. Each clip is scored with the text on its own, and the clip logits are
combined by `aggregate_clip_logits` (mean / max / log-sum-exp), which training and evaluation share.

Inputs: `frames` (B, num_clips, frames_per_clip, 3, H, W) float, normalised as upstream's loader does:
RGB channel order, 0..255 scale, minus `vision.pixel_mean` = (123.675, 116.28, 103.53) (ImageNet's mean
in RGB), std 1 (`normalize_frames` does it). The model flips to BGR itself (input_format "BGR"), as
upstream's `GridFeatBackbone.forward`, so detectron2's BGR weights get BGR input. H = W = max_img_size
(the longer side resized to it, the rest zero-padded). `text_ids`/`text_mask` (N, L) with [CLS] first.
`text_to_video` (N,) maps each text to its video row (default: text i to video i), which is how one
decoded video serves several captions or questions (upstream's `n_examples_list`).

Parameter names: `cnn.backbone.*` is HF ResNet's layout (weights.py maps detectron2's
`cnn.feature.backbone.*`); everything else keeps upstream's names (`cnn.grid_encoder.0.weight`,
`transformer.bert.*`, `transformer.cls.*`, `transformer.classifier.{0,2}.*`), so upstream's released
`.pt` files load through `trainers.clipbert.weights.load_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, ResNetConfig, ResNetModel
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertEncoder,
    BertPooler,
    BertPreTrainingHeads,
)

from trainers.clipbert.config import (  # noqa: F401 - re-exported: the model's config lives beside it
    SCORE_AGGREGATIONS,
    ClipBertConfig,
    ClipConfig,
    HeadConfig,
    TransformerConfig,
    VisionConfig,
)

# Additive attention-mask value for padded keys. Finite (as upstream's -10000) so it survives fp16/bf16.
_MASKED = -10000.0


# --------------------------------------------------------------------------------------------------
# Clip score aggregation (shared by the losses and evaluation)
# --------------------------------------------------------------------------------------------------


def aggregate_clip_logits(clip_logits: torch.Tensor, how: str, dim: int = 1) -> torch.Tensor:
    """Combine per-clip logits (..., num_clips, K) over the clip dimension, as upstream.

    "mean" and "max" pool the logits. "lse" takes log-sum-exp over clips per class; cross-entropy on
    the result equals upstream's LSE loss, lse(all clips and classes) - lse(clips of the target class),
    and its softmax is the score upstream evaluates with.
    """
    if how == "mean":
        return clip_logits.mean(dim)
    if how == "max":
        return clip_logits.max(dim).values
    if how == "lse":
        return torch.logsumexp(clip_logits, dim=dim)
    raise ValueError(f"score aggregation {how!r}; valid: {list(SCORE_AGGREGATIONS)}")


def normalize_frames(frames: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
    """uint8 (or 0..255 float) RGB frames (..., 3, H, W) -> the model's input, as upstream's ImageNorm."""
    mean = torch.tensor(vision.pixel_mean, device=frames.device).view(3, 1, 1)
    std = torch.tensor(vision.pixel_std, device=frames.device).view(3, 1, 1)
    return (frames.float() - mean) / std


def instance_bce_with_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Upstream's VQA loss: mean BCE over every (example, label), times the number of labels."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype)) * targets.shape[1]


# --------------------------------------------------------------------------------------------------
# Vision: ResNet grid features
# --------------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (detectron2's FrozenBN): all four are
    buffers, so they load from checkpoints, never train, and behave the same in train and eval mode."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_batchnorm(child)


def build_resnet(vision: VisionConfig) -> ResNetModel:
    """HF ResNet with detectron2's R-50 conventions (see VisionConfig)."""
    config = ResNetConfig(
        num_channels=3,
        embedding_size=vision.stem_channels,
        hidden_sizes=list(vision.hidden_sizes),
        depths=list(vision.depths),
        layer_type="bottleneck",
        hidden_act="relu",
        downsample_in_first_stage=False,  # res2 keeps the stem's stride (the stem max-pool downsamples)
        downsample_in_bottleneck=vision.stride_in_1x1,
    )
    resnet = ResNetModel(config)
    if vision.frozen_batchnorm:
        _freeze_batchnorm(resnet)
    # detectron2's ResNet.freeze(freeze_at): 1 freezes the stem, k > 1 also stages res2..res{k}.
    frozen: list[nn.Module] = []
    if vision.freeze_backbone:
        frozen = [resnet]
    elif vision.freeze_at >= 1:
        frozen = [resnet.embedder, *resnet.encoder.stages[: vision.freeze_at - 1]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return resnet


class GridFeatBackbone(nn.Module):
    """`cnn`: ResNet + grid encoder. (N, T, 3, H, W) normalised frames -> (N, T, H/64, W/64, hidden)."""

    def __init__(self, vision: VisionConfig, hidden_size: int) -> None:
        super().__init__()
        self.input_format = vision.input_format
        self.backbone = build_resnet(vision)
        self.grid_encoder = nn.Sequential(
            nn.Conv2d(vision.hidden_sizes[-1], hidden_size, kernel_size=3, padding=1, bias=False),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.ReLU(inplace=True),
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        n, t = frames.shape[:2]
        x = frames.flatten(0, 1)
        if self.input_format == "BGR":
            x = x.flip(1)  # RGB -> BGR, as upstream: detectron2 weights expect BGR
        features = self.backbone.encoder(self.backbone.embedder(x)).last_hidden_state
        grid = self.grid_encoder(features)  # (N*T, D, h, w)
        return grid.unflatten(0, (n, t)).permute(0, 1, 3, 4, 2)


# --------------------------------------------------------------------------------------------------
# Cross-modal transformer
# --------------------------------------------------------------------------------------------------


def bert_config(t: TransformerConfig) -> BertConfig:
    return BertConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        intermediate_size=t.intermediate_size,
        hidden_act=t.hidden_act,
        hidden_dropout_prob=t.hidden_dropout_prob,
        attention_probs_dropout_prob=t.attention_probs_dropout_prob,
        max_position_embeddings=t.max_position_embeddings,
        type_vocab_size=t.type_vocab_size,
        layer_norm_eps=t.layer_norm_eps,
        initializer_range=t.initializer_range,
        pad_token_id=t.pad_token_id,
        attn_implementation="sdpa",
    )


class VisualInputEmbedding(nn.Module):
    """`transformer.bert.visual_embeddings`: mean over the clip's frames, + row and column position
    embeddings, + the (single) visual token type, LayerNorm, dropout.

    `position_embeddings` (1-D, max_position_embeddings rows) exists upstream and in its checkpoints but
    is never added; it is kept for loading and frozen, so DDP does not wait for its gradient.
    """

    def __init__(self, t: TransformerConfig, pixel_random_sampling_size: int = 0) -> None:
        super().__init__()
        self.pixel_random_sampling_size = pixel_random_sampling_size
        self.position_embeddings = nn.Embedding(t.max_position_embeddings, t.hidden_size)
        self.position_embeddings.weight.requires_grad_(False)
        self.row_position_embeddings = nn.Embedding(t.max_grid_row_position_embeddings, t.hidden_size)
        self.col_position_embeddings = nn.Embedding(t.max_grid_col_position_embeddings, t.hidden_size)
        self.token_type_embeddings = nn.Embedding(1, t.hidden_size)
        self.LayerNorm = nn.LayerNorm(t.hidden_size, eps=t.layer_norm_eps)
        self.dropout = nn.Dropout(t.hidden_dropout_prob)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (N, T, h, w, D) -> visual tokens (N, h*w, D) (fewer with pixel random sampling)."""
        grid = grid.mean(1)  # frames of one clip
        h, w, d = grid.shape[1:]
        rows = self.row_position_embeddings(torch.arange(h, device=grid.device))
        cols = self.col_position_embeddings(torch.arange(w, device=grid.device))
        grid = grid + rows.view(1, h, 1, d) + cols.view(1, 1, w, d)
        tokens = grid.reshape(grid.shape[0], h * w, d)
        if self.training and 0 < self.pixel_random_sampling_size < tokens.shape[1]:
            keep = torch.randperm(tokens.shape[1], device=tokens.device)[: self.pixel_random_sampling_size]
            tokens = tokens[:, keep.sort().values]
        tokens = tokens + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(tokens))


class ClipBertBaseModel(nn.Module):
    """`transformer.bert`: BERT text embeddings, visual embeddings, encoder, pooler."""

    def __init__(self, config: ClipBertConfig) -> None:
        super().__init__()
        bert = bert_config(config.transformer)
        self.embeddings = BertEmbeddings(bert)
        self.visual_embeddings = VisualInputEmbedding(
            config.transformer, config.vision.pixel_random_sampling_size
        )
        self.encoder = BertEncoder(bert)
        self.pooler = BertPooler(bert)

    def forward(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor, grid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text (N, L), grid (N, T, h, w, D) -> (sequence output (N, L + Lv, D), pooled [CLS] (N, D))."""
        text = self.embeddings(input_ids=text_ids)
        visual = self.visual_embeddings(grid)
        hidden = torch.cat([text, visual], dim=1)
        mask = torch.cat([text_mask.to(hidden.dtype), hidden.new_ones(visual.shape[:2])], dim=1)
        additive = (1.0 - mask[:, None, None, :]) * _MASKED
        for layer in self.encoder.layer:
            hidden = layer(hidden, attention_mask=additive)[0]
        return hidden, self.pooler(hidden)


def _mlp(hidden: int, scale: int, out: int) -> nn.Sequential:
    # Upstream's classifier: names classifier.0 / classifier.2 in every checkpoint.
    return nn.Sequential(nn.Linear(hidden, hidden * scale), nn.ReLU(True), nn.Linear(hidden * scale, out))


class ClipBertTransformer(nn.Module):
    """`transformer`: the BERT and the task head (`cls` for pretraining, `classifier` otherwise)."""

    def __init__(self, config: ClipBertConfig) -> None:
        super().__init__()
        t, h = config.transformer, config.head
        self.bert = ClipBertBaseModel(config)
        self.dropout = nn.Dropout(t.hidden_dropout_prob)
        if h.task == "pretrain":
            self.cls = BertPreTrainingHeads(bert_config(t))
        else:
            out = {"retrieval": 2, "qa": h.num_labels, "mc": 1}[h.task]
            self.classifier = _mlp(t.hidden_size, h.cls_hidden_scale, out)
        _init_bert_weights(self, t.initializer_range)
        if h.task == "pretrain":
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight


def _init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, std), zero biases, unit LayerNorm), as upstream's init_weights."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)  # the [PAD] row too, as upstream
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------------


class ClipBert(nn.Module):
    """Backbone shared by the task models: `cnn` (GridFeatBackbone) and `transformer`."""

    task = ""

    def __init__(self, config: ClipBertConfig) -> None:
        super().__init__()
        config.validate()
        if config.head.task != self.task:
            raise ValueError(
                f"{type(self).__name__} needs head.task={self.task!r}, got {config.head.task!r} "
                "(build_model picks the class from the config)"
            )
        self.config = config
        self.cnn = GridFeatBackbone(config.vision, config.transformer.hidden_size)
        self.transformer = ClipBertTransformer(config)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, C, T, 3, H, W) -> grid features (B, C, T, h, w, D); every clip in one CNN pass."""
        if frames.dim() != 6:
            raise ValueError(
                f"frames must be (batch, num_clips, frames_per_clip, 3, H, W), got {tuple(frames.shape)}"
            )
        b, c = frames.shape[:2]
        return self.cnn(frames.flatten(0, 1)).unflatten(0, (b, c))

    def pooled_per_clip(
        self,
        frames: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        text_to_video: torch.Tensor | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every (text, clip) pair through the BERT.

        Returns (sequence output (N, C, L + Lv, D), pooled [CLS] (N, C, D)) for N texts and C clips.
        """
        grid = self.encode_frames(frames)  # (B, C, T, h, w, D)
        n, c = text_ids.shape[0], grid.shape[1]
        if text_to_video is None:
            if grid.shape[0] != n:
                raise ValueError(
                    f"{n} texts for {grid.shape[0]} videos: pass text_to_video to say which video each "
                    "text belongs to"
                )
        else:
            index = torch.as_tensor(text_to_video, device=grid.device, dtype=torch.long)
            if index.shape != (n,):
                raise ValueError(
                    f"text_to_video must have one entry per text ({n}), got {tuple(index.shape)}"
                )
            grid = grid.index_select(0, index)
        sequence, pooled = self.transformer.bert(
            text_ids.repeat_interleave(c, dim=0),
            text_mask.repeat_interleave(c, dim=0),
            grid.flatten(0, 1),
        )
        return sequence.view(n, c, *sequence.shape[1:]), pooled.view(n, c, -1)

    def clip_logits(
        self,
        frames: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        text_to_video: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """(N, C, K): the classifier on the pooled [CLS] of every (text, clip) pair."""
        _, pooled = self.pooled_per_clip(frames, text_ids, text_mask, text_to_video)
        return self.transformer.classifier(self.transformer.dropout(pooled))

    def aggregate(self, clip_logits: torch.Tensor) -> torch.Tensor:
        return aggregate_clip_logits(clip_logits, self.config.clips.score_agg, dim=1)


class ClipBertForRetrieval(ClipBert):
    """Video-text matching: logits (no match, match) per (caption, video) pair."""

    task = "retrieval"

    def forward(
        self,
        frames: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        text_to_video: torch.Tensor | Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """frames (B, C, T, 3, H, W); captions (N, L), each paired with video text_to_video[i];
        labels (N,) 1 = the caption describes the video, 0 = a sampled negative.

        Returns clip_logits (N, C, 2), logits (N, 2) aggregated over clips, and loss (mean ITM
        cross-entropy) when labels are given.
        """
        clip_logits = self.clip_logits(frames, text_ids, text_mask, text_to_video)
        logits = self.aggregate(clip_logits)
        out = {"clip_logits": clip_logits, "logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels.view(-1))
        return out

    @torch.no_grad()
    def score(
        self,
        frames: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        text_to_video: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Match probability (N,) of every (caption, video) pair, as upstream ranks with at test time."""
        logits = self.aggregate(self.clip_logits(frames, text_ids, text_mask, text_to_video))
        return F.softmax(logits.float(), dim=-1)[:, 1]


def sample_itm_negatives(
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    neg_size: int,
    video_ids: Sequence[Any] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An ITM batch from one positive caption per video: each video also gets `neg_size` captions of
    other videos in the batch, drawn uniformly (upstream draws them from the whole training set).

    video_ids (B,): captions of a video with the same id are never its negatives (default: all distinct).
    Returns (text_ids, text_mask, labels, text_to_video) with (1 + neg_size) rows per video, the positive
    first, for `ClipBertForRetrieval.forward`.
    """
    b = text_ids.shape[0]
    keys = list(range(b)) if video_ids is None else list(video_ids)
    same = torch.tensor([[keys[i] == keys[j] for j in range(b)] for i in range(b)])
    rows, labels = [], []
    for i in range(b):
        candidates = (~same[i]).nonzero().flatten()
        if len(candidates) == 0:
            raise ValueError("ITM negatives need at least two different videos in the batch")
        pick = candidates[torch.randint(len(candidates), (neg_size,), generator=generator)]
        rows += [i, *pick.tolist()]
        labels += [1] + [0] * neg_size
    index = torch.tensor(rows, device=text_ids.device)
    text_to_video = torch.arange(b, device=text_ids.device).repeat_interleave(1 + neg_size)
    return (
        text_ids[index],
        text_mask[index],
        torch.tensor(labels, device=text_ids.device),
        text_to_video,
    )


class ClipBertForQA(ClipBert):
    """Open-ended QA as classification over the answer vocabulary (ans2label)."""

    task = "qa"

    def forward(
        self,
        frames: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        text_to_video: torch.Tensor | Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Questions (N, L). labels: (N,) answer indices for qa_loss "ce" (-100 ignores a question whose
        answer is out of vocabulary), or (N, num_labels) soft scores for "bce".

        Returns clip_logits (N, C, num_labels), logits (N, num_labels) and loss when labels are given.
        """
        clip_logits = self.clip_logits(frames, text_ids, text_mask, text_to_video)
        logits = self.aggregate(clip_logits)
        out = {"clip_logits": clip_logits, "logits": logits}
        if labels is not None:
            if self.config.head.qa_loss == "bce":
                out["loss"] = instance_bce_with_logits(logits.float(), labels)
            else:
                out["loss"] = F.cross_entropy(logits.float(), labels.view(-1), ignore_index=-100)
        return out


class ClipBertForMultipleChoice(ClipBert):
    """One score per (question + option, video); the options of a question compete in a softmax."""

    task = "mc"

    def forward(
        self,
        frames: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """frames (B, C, T, 3, H, W); text (B * num_choices, L), the options of video b in rows
        b * num_choices ... (b + 1) * num_choices - 1; labels (B,) the right option.

        Returns clip_logits (B, C, num_choices), logits (B, num_choices) and loss when labels are given.
        """
        k = self.config.head.num_choices
        b = frames.shape[0]
        if text_ids.shape[0] != b * k:
            raise ValueError(f"{b} videos x {k} options need {b * k} text rows, got {text_ids.shape[0]}")
        text_to_video = torch.arange(b, device=text_ids.device).repeat_interleave(k)
        scores = self.clip_logits(frames, text_ids, text_mask, text_to_video)  # (B*k, C, 1)
        clip_logits = scores.view(b, k, -1).transpose(1, 2)
        logits = self.aggregate(clip_logits)
        out = {"clip_logits": clip_logits, "logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels.view(-1))
        return out


class ClipBertForPretraining(ClipBert):
    """Image/video-text pretraining: MLM on the text positions and ITM on [CLS] (one clip)."""

    task = "pretrain"

    def forward(
        self,
        frames: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        mlm_labels: torch.Tensor | None = None,
        itm_labels: torch.Tensor | None = None,
        text_to_video: torch.Tensor | Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """frames (B, 1, T, 3, H, W) (images: T = 1). mlm_labels (N, L) with -100 where not masked;
        itm_labels (N,) 1 = matching pair. Returns mlm_scores (N, L, vocab), itm_scores (N, 2) and, for
        the labels given, mlm_loss (mean over masked tokens) and itm_loss.
        """
        if frames.shape[1] != 1:
            raise ValueError(f"pretraining takes one clip per example, got {frames.shape[1]}")
        sequence, pooled = self.pooled_per_clip(frames, text_ids, text_mask, text_to_video)
        # Only the text positions go through the MLM head (upstream does the same to save compute).
        mlm_scores, itm_scores = self.transformer.cls(sequence[:, 0, : text_ids.shape[1]], pooled[:, 0])
        out = {"mlm_scores": mlm_scores, "itm_scores": itm_scores}
        if mlm_labels is not None:
            total = F.cross_entropy(
                mlm_scores.flatten(0, 1).float(), mlm_labels.flatten(), ignore_index=-100, reduction="sum"
            )
            # Sum / count so a batch where nothing got masked gives 0, not NaN.
            out["mlm_loss"] = total / (mlm_labels != -100).sum().clamp(min=1)
        if itm_labels is not None:
            out["itm_loss"] = F.cross_entropy(itm_scores.float(), itm_labels.view(-1))
        return out


MODEL_CLASSES: dict[str, type[ClipBert]] = {
    "retrieval": ClipBertForRetrieval,
    "qa": ClipBertForQA,
    "mc": ClipBertForMultipleChoice,
    "pretrain": ClipBertForPretraining,
}


def build_model(config: ClipBertConfig) -> ClipBert:
    """The model for `config.head.task`."""
    return MODEL_CLASSES[config.head.task](config)


__all__ = [
    "MODEL_CLASSES",
    "ClipBert",
    "ClipBertConfig",
    "ClipBertForMultipleChoice",
    "ClipBertForPretraining",
    "ClipBertForQA",
    "ClipBertForRetrieval",
    "FrozenBatchNorm2d",
    "aggregate_clip_logits",
    "build_model",
    "build_resnet",
    "instance_bce_with_logits",
    "normalize_frames",
    "sample_itm_negatives",
]
