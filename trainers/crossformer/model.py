"""The crossformer video + audio + text model ("simple-multimodal"), rebuilt from `transformers` blocks.

What is known and from where. The seed's model file (`models/crossformer.py`, `cross_former(model_args,
audio_config, text_config, video_config, fusion_config)`) is not public. Read instead:

- seed `train.py` / MAE-style pretraining scripts: the four HF configs (DeBERTa-v2 text, ViT-MAE audio,
  VideoMAE video, ViT fusion); the LMDB script imports `VideoMAEForPreTraining`, `ViTMAEForPreTraining` and
  `ViTModel`, so the encoders come with their pretraining decoders and the fusion is a ViT; the model
  returns `({'mask_logits': [audio, text, video]}, {'vt_cls_token': ...})` with each entry a `['logits']`
  of an HF output, and the eval metric reads the text MLM logits; arguments `use_t_cls_to_vt_m`,
  `contrastive_dim`, `contrastive_loss_before_fusion`, weights `alpha beta gama delte theta`.
- VAT-multimodal `utils/datacollator.py`: text MLM masking (p 0.3, 80/10/10, at least one token), the
  video mask `bool_masked_pos` (one for the whole batch), the VTM shuffle (the first
  int(B * (1 - vt_match_ratio)) videos shuffled against their texts, label = still aligned) and the
  contrastive labels (which text each video belongs to after the shuffle); `utils/loss.py`: `ClipLoss`,
  CLIP's symmetric cross-entropy with a logit scale and those labels.

What we inferred (no public line fixes it):

- One fusion pass over [audio; text; video] tokens with modality type embeddings. The reconstruction
  heads read the FUSED tokens (the MLM head the fused text, the MAE decoders the fused visible patches),
  so every objective trains the crossformer; the decoders then fill in the masked patches as in MAE.
- The VTM shuffle is done once, before fusion, and the same fused sequence serves every head (the seed's
  collator shuffles the batch before the model sees it, so its model can only have seen shuffled pairs).
- The contrastive features: text [CLS] and the mean of the video tokens, from the encoders
  (`contrastive_loss_before_fusion`) or from the fused sequence, projected to `contrastive_dim`; a
  learnable logit scale as CLIP (`ClipLoss` takes one).
- Which loss weight goes to which objective: see `trainers.crossformer.config.LossWeights`.

Where we differ from the seed, on purpose:

- Masks per sample (`video.mask_same_for_batch` False): the seed used one video mask for the whole batch.
  Its collator also drew it as `randn(seq) < ratio`, about 79% of the tokens and a random count, and not as
  tubes; ours masks exactly int(ratio * patches per frame) patches per frame grid, the same in every
  tubelet (VideoMAE's tube masking).
- The VTM shuffle is a derangement of a random subset: exactly int(B * (1 - vt_match_ratio)) pairs are
  negatives (the seed's plain shuffle leaves some of them aligned, labelled 1).
- The contrastive loss compares the local rows with the batch of every process (`all_gather_with_grad`,
  global-rank offsets); the seed's loss saw the local batch only.
- The audio ViT-MAE runs on the rectangular fbank grid (num_mel_bins/p x target_length/p); HF's
  ViT-MAE builds its fixed sin-cos tables for square grids only, so `build_audio_mae` rebuilds them.

Parameter names follow the HF pretraining models, so model-card weights load by prefix:

    text.deberta.*, text.lm_predictions.lm_head.*          DebertaV2ForMaskedLM (legacy=False head)
    audio.vit.*, audio.decoder.*                            ViTMAEForPreTraining
    video.videomae.*, video.encoder_to_decoder.*, video.mask_token, video.decoder.*
                                                            VideoMAEForPreTraining
    fusion.encoder.layer.{i}.*, fusion.layernorm.*          ViTModel's (no patch embeddings, no pooler)
    fusion.cls_token, fusion.modality_embeddings.*          ours (ViT's embeddings.cls_token)
    to_fusion.{audio,text,video}, from_fusion.{...}, text_proj, video_proj, logit_scale, vtm_head
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    VideoMAEConfig,
    VideoMAEForPreTraining,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)
from transformers.models.vit.modeling_vit import ViTLayer

from trainers.core.gather import all_gather_with_grad, shard_rows
from trainers.crossformer.config import (  # noqa: F401 - re-exported: the model's config lives beside it
    AudioConfig,
    CrossformerConfig,
    FusionConfig,
    LossWeights,
    TextConfig,
    VideoConfig,
)

# VideoMAE's feature extractor normalises frames with ImageNet's statistics; the pixel targets undo it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Modality type ids of the fusion input.
AUDIO, TEXT, VIDEO = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# Masks and the video-text shuffle (what the seed's collator drew; here when the batch does not carry them)
# --------------------------------------------------------------------------------------------------


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform noise from `generator` (CPU) or the global RNG, on `device`."""
    if generator is not None:
        return torch.rand(shape, generator=generator).to(device)
    return torch.rand(shape, device=device)


def mae_num_masked(num_patches: int, ratio: float) -> int:
    """Patches ViT-MAE masks out of `num_patches`: it keeps int(n * (1 - ratio)) (HF's `random_masking`)."""
    return num_patches - int(num_patches * (1.0 - ratio))


def tube_num_masked(patches_per_frame: int, ratio: float) -> int:
    """Patches of a frame grid VideoMAE's tube masking hides: int(ratio * n) (its TubeMaskingGenerator)."""
    return int(ratio * patches_per_frame)


def random_patch_mask(
    batch: int,
    num_patches: int,
    count: int,
    same_for_batch: bool = False,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """(batch, num_patches) bool, True = masked: exactly `count` per row at random positions (one draw
    shared by the batch when same_for_batch)."""
    rows = 1 if same_for_batch else batch
    noise = _rand((rows, num_patches), generator, device)
    order = noise.argsort(dim=1)
    mask = torch.zeros(rows, num_patches, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, order[:, :count], True)
    return mask.expand(batch, -1).clone() if same_for_batch else mask


def tube_mask(
    batch: int,
    num_frames: int,
    tubelet_size: int,
    grid: int,
    ratio: float,
    same_for_batch: bool = False,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """VideoMAE tube masking: (batch, (num_frames // tubelet_size) * grid**2) bool, True = masked.

    One spatial mask of grid x grid patches (exactly tube_num_masked(grid**2, ratio) masked) repeated
    over every tubelet, in VideoMAE's token order (time-major: token = t * grid**2 + row * grid + col).
    """
    count = tube_num_masked(grid * grid, ratio)
    spatial = random_patch_mask(batch, grid * grid, count, same_for_batch, generator, device)
    return spatial.repeat(1, num_frames // tubelet_size)


def vtm_shuffle(
    batch: int, match_ratio: float, generator: torch.Generator | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which video goes with each text for video-text matching.

    Returns (order (B,) long, labels (B,) long): fusion row i pairs text i with video order[i];
    labels[i] = 1 when order[i] == i. int(B * (1 - match_ratio)) random rows (at least 2, or none) get
    another row's video: a cyclic shift among them, so each of them is a negative.
    """
    order = torch.arange(batch, device=device)
    num_shuffled = int(batch * (1.0 - match_ratio))
    if num_shuffled >= 2:
        chosen = order[_rand((batch,), generator, device).argsort()[:num_shuffled]]
        order = order.clone()
        order[chosen] = chosen.roll(1)
    return order, (order == torch.arange(batch, device=device)).long()


def make_video_mask(
    config: CrossformerConfig, batch: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Tube mask (batch, num_video_tokens), per video or one for the batch (video.mask_same_for_batch)."""
    v = config.video
    grid = v.image_size // v.patch_size
    return tube_mask(
        batch, v.num_frames, v.tubelet_size, grid, v.mask_ratio, v.mask_same_for_batch, generator, device
    )


def make_audio_mask(
    config: CrossformerConfig, batch: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Random patch mask (batch, num_audio_patches), one per sample, as ViT-MAE."""
    a = config.audio
    n = (a.num_mel_bins // a.patch_size) * (a.target_length // a.patch_size)
    return random_patch_mask(batch, n, mae_num_masked(n, a.mask_ratio), False, generator, device)


def mask_tokens(
    config: CrossformerConfig,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking at text.mlm_probability of the non-special, non-padding tokens: 80% -> [MASK],
    10% -> a random token, 10% unchanged. Returns (input ids, labels with -100 where not predicted)."""
    t = config.text
    ids, labels = text_ids.clone(), text_ids.clone()
    chosen = _rand(ids.shape, generator, ids.device) < t.mlm_probability
    for special in (t.pad_token_id, t.cls_token_id, t.sep_token_id):
        chosen &= ids != special
    if text_mask is not None:
        chosen &= text_mask.bool()
    labels[~chosen] = -100
    replace = _rand(ids.shape, generator, ids.device)
    ids[chosen & (replace < 0.8)] = t.mask_token_id
    randomise = chosen & (replace >= 0.8) & (replace < 0.9)
    random_ids = (_rand(ids.shape, generator, ids.device) * t.vocab_size).long().clamp(max=t.vocab_size - 1)
    ids[randomise] = random_ids[randomise]
    return ids, labels


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table for a grid_h x grid_w grid (row-major patches), (1, [1 +]
    grid_h * grid_w, dim). The first half of the channels encodes the column, the second the row, as HF's
    `get_2d_sincos_pos_embed` (which equals this on square grids); the [CLS] row is zero."""
    if dim % 4:
        raise ValueError(f"sin-cos position width must be a multiple of 4, got {dim}")

    def encode(pos: torch.Tensor, width: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2.0))
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    table = torch.cat([encode(cols, dim // 2), encode(rows, dim // 2)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table])
    return table.float().unsqueeze(0)


def deberta_config(text: TextConfig) -> DebertaV2Config:
    return DebertaV2Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        intermediate_size=text.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=text.hidden_dropout_prob,
        attention_probs_dropout_prob=text.attention_probs_dropout_prob,
        max_position_embeddings=text.max_position_embeddings,
        type_vocab_size=text.type_vocab_size,
        initializer_range=text.initializer_range,
        layer_norm_eps=text.layer_norm_eps,
        relative_attention=text.relative_attention,
        max_relative_positions=text.max_relative_positions,
        position_buckets=text.position_buckets,
        norm_rel_ebd=text.norm_rel_ebd,
        share_att_key=text.share_att_key,
        pos_att_type=list(text.pos_att_type),
        position_biased_input=text.position_biased_input,
        conv_kernel_size=text.conv_kernel_size,
        conv_act="gelu",
        pad_token_id=text.pad_token_id,
        legacy=False,  # `lm_predictions.lm_head.*`, the layout of Microsoft's DeBERTa-v2 checkpoints
        # That head multiplies by the word embeddings itself; HF's tying would instead overwrite its
        # hidden x hidden `dense` with the vocab x hidden embeddings (transformers 4.57, legacy=False).
        tie_word_embeddings=False,
    )


def build_text_model(text: TextConfig, mlm_head: bool) -> DebertaV2ForMaskedLM:
    """DeBERTa-v2 with the MLM head (output projection tied to the word embeddings), or without it."""
    model = DebertaV2ForMaskedLM(deberta_config(text))
    if not mlm_head:
        model.lm_predictions = None
    return model


def build_audio_mae(audio: AudioConfig, decoder: bool = True) -> ViTMAEForPreTraining:
    """ViT-MAE over a (num_channels, num_mel_bins, target_length) spectrogram.

    HF's ViT-MAE fills its fixed sin-cos tables for a square grid only (and fails on others), so it is
    built for a square grid of the same width and the tables and patch geometry are then set for the
    real one; the learned weights do not depend on the grid.
    """
    p = audio.patch_size
    grid_h, grid_w = audio.num_mel_bins // p, audio.target_length // p
    config = ViTMAEConfig(
        hidden_size=audio.hidden_size,
        num_hidden_layers=audio.num_layers,
        num_attention_heads=audio.num_heads,
        intermediate_size=audio.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=audio.hidden_dropout_prob,
        attention_probs_dropout_prob=audio.attention_probs_dropout_prob,
        initializer_range=audio.initializer_range,
        layer_norm_eps=audio.layer_norm_eps,
        image_size=p * grid_h,
        patch_size=p,
        num_channels=audio.num_channels,
        qkv_bias=True,
        decoder_num_attention_heads=audio.decoder_num_heads,
        decoder_hidden_size=audio.decoder_hidden_size,
        decoder_num_hidden_layers=audio.decoder_num_layers,
        decoder_intermediate_size=audio.decoder_intermediate_size,
        mask_ratio=audio.mask_ratio,
        norm_pix_loss=audio.norm_pix_loss,
    )
    model = ViTMAEForPreTraining(config)
    size = (audio.num_mel_bins, audio.target_length)
    model.config.image_size = size
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.image_size = size
    embeddings.patch_embeddings.num_patches = embeddings.num_patches = grid_h * grid_w
    embeddings.position_embeddings = nn.Parameter(
        sincos_2d(audio.hidden_size, grid_h, grid_w), requires_grad=False
    )
    if decoder:
        model.decoder.decoder_pos_embed = nn.Parameter(
            sincos_2d(audio.decoder_hidden_size, grid_h, grid_w), requires_grad=False
        )
    else:
        model.decoder = None
    return model


def build_video_mae(video: VideoConfig, decoder: bool = True) -> VideoMAEForPreTraining:
    """VideoMAE with its pretraining decoder (or without: encoder only)."""
    config = VideoMAEConfig(
        image_size=video.image_size,
        patch_size=video.patch_size,
        num_channels=video.num_channels,
        num_frames=video.num_frames,
        tubelet_size=video.tubelet_size,
        hidden_size=video.hidden_size,
        num_hidden_layers=video.num_layers,
        num_attention_heads=video.num_heads,
        intermediate_size=video.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=video.hidden_dropout_prob,
        attention_probs_dropout_prob=video.attention_probs_dropout_prob,
        initializer_range=video.initializer_range,
        layer_norm_eps=video.layer_norm_eps,
        qkv_bias=True,
        use_mean_pooling=False,  # keeps the encoder's final LayerNorm, as the pretraining checkpoints
        decoder_num_attention_heads=video.decoder_num_heads,
        decoder_hidden_size=video.decoder_hidden_size,
        decoder_num_hidden_layers=video.decoder_num_layers,
        decoder_intermediate_size=video.decoder_intermediate_size,
        norm_pix_loss=video.norm_pix_loss,
    )
    model = VideoMAEForPreTraining(config)
    if decoder:
        # VideoMAE's reference code starts the mask token at trunc_normal(0.02); HF leaves it at zero.
        nn.init.trunc_normal_(model.mask_token, std=0.02)
    else:
        model.encoder_to_decoder = model.mask_token = model.decoder = None
    return model


class FusionEncoder(nn.Module):
    """ViT encoder layers over [([CLS];) audio; text; video] tokens with modality type embeddings.

    The layers are HF `ViTLayer`s (names `encoder.layer.{i}.*`, `layernorm.*` as in `ViTModel`, so ViT
    weights load); their attention runs here through SDPA with a key-padding mask, which HF's ViT
    attention does not take (padded text tokens must not be attended to).
    """

    def __init__(self, fusion: FusionConfig, cls_token: bool) -> None:
        super().__init__()
        config = ViTConfig(
            hidden_size=fusion.hidden_size,
            num_hidden_layers=fusion.num_layers,
            num_attention_heads=fusion.num_heads,
            intermediate_size=fusion.intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=fusion.hidden_dropout_prob,
            attention_probs_dropout_prob=fusion.attention_probs_dropout_prob,
            layer_norm_eps=fusion.layer_norm_eps,
            qkv_bias=True,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, fusion.hidden_size)) if cls_token else None
        self.modality_embeddings = nn.Embedding(3, fusion.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(ViTLayer(config) for _ in range(fusion.num_layers))
        self.layernorm = nn.LayerNorm(fusion.hidden_size, eps=fusion.layer_norm_eps)
        _init_vit_weights(self, fusion.initializer_range)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=fusion.initializer_range)

    def _layer(self, layer: ViTLayer, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        attn = layer.attention.attention
        b, n, _ = x.shape
        h = layer.layernorm_before(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            heads(attn.query(h)),
            heads(attn.key(h)),
            heads(attn.value(h)),
            attn_mask=keep[:, None, None, :],
            dropout_p=attn.dropout_prob if self.training else 0.0,
        )
        x = x + layer.attention.output(context.transpose(1, 2).reshape(b, n, -1), x)
        return layer.output(layer.intermediate(layer.layernorm_after(x)), x)

    def forward(self, parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> list[torch.Tensor]:
        """parts: (tokens (B, N_k, D), attend (B, N_k) bool, modality id) per modality. Returns the fused
        tokens of each part (after the final LayerNorm), preceded by the fused [CLS] when there is one."""
        tokens = [t + self.modality_embeddings.weight[m] for t, _, m in parts]
        keep = [a for _, a, _ in parts]
        sizes = [t.shape[1] for t in tokens]
        if self.cls_token is not None:
            b = tokens[0].shape[0]
            tokens.insert(0, self.cls_token.expand(b, -1, -1))
            keep.insert(0, torch.ones(b, 1, dtype=torch.bool, device=tokens[0].device))
            sizes.insert(0, 1)
        x, attend = torch.cat(tokens, dim=1), torch.cat(keep, dim=1)
        for layer in self.encoder.layer:
            x = self._layer(layer, x, attend)
        return list(self.layernorm(x).split(sizes, dim=1))


def _init_vit_weights(module: nn.Module, std: float) -> None:
    """ViT's initialisation (normal(0, std) weights, zero biases, unit LayerNorm) for modules built
    outside a `PreTrainedModel`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _projection(width_in: int, width_out: int, std: float) -> nn.Module:
    if width_in == width_out:
        return nn.Identity()
    proj = nn.Linear(width_in, width_out)
    _init_vit_weights(proj, std)
    return proj


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmaxes and losses (under autocast); fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def video_pixel_targets(video: torch.Tensor, config: VideoConfig) -> torch.Tensor:
    """Reconstruction targets (B, num_tokens, tubelet * p * p * C) in VideoMAE's token order.

    Frames are un-normalised (ImageNet statistics) back to [0, 1]; with norm_pix_loss each tubelet
    patch is normalised per channel (unbiased std), as VideoMAE's pretraining.
    """
    b, t, c, h, w = video.shape
    ts, p = config.tubelet_size, config.patch_size
    frames = video
    if c == 3:
        mean = video.new_tensor(IMAGENET_MEAN)[None, None, :, None, None]
        std = video.new_tensor(IMAGENET_STD)[None, None, :, None, None]
        frames = video * std + mean
    elif not config.norm_pix_loss:
        raise ValueError("un-normalising needs RGB frames; set video.norm_pix_loss for other channels")
    patches = frames.reshape(b, t // ts, ts, c, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 5, 7, 3)
    patches = patches.reshape(b, -1, ts * p * p, c)
    if config.norm_pix_loss:
        patches = (patches - patches.mean(dim=-2, keepdim=True)) / (
            patches.var(dim=-2, keepdim=True).sqrt() + 1e-6
        )
    return patches.reshape(b, patches.shape[1], -1)


def audio_pixel_targets(audio: torch.Tensor, config: AudioConfig) -> torch.Tensor:
    """(B, C, F, T) spectrogram -> (B, num_patches, p * p * C) in ViT-MAE's patch layout (row-major
    patches, pixels (row, col, channel)); per-patch normalised with norm_pix_loss, as ViT-MAE."""
    b, c, h, w = audio.shape
    p = config.patch_size
    patches = audio.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    if config.norm_pix_loss:
        patches = (patches - patches.mean(dim=-1, keepdim=True)) / (
            patches.var(dim=-1, keepdim=True) + 1e-6
        ).sqrt()
    return patches


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches (mask (B, N) bool); 0 when none is masked."""
    per_patch = (_upcast(pred) - _upcast(target)).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


@dataclass
class CrossformerOutput:
    """Everything one forward computed. `losses` (weighted, one per objective with a weight > 0) is what
    `forward` returns by default; the rest are the seed's outputs and what the masks and shuffle were.

    mask_logits: {"audio": (B, num_patches, p*p*C) predictions of every patch, "text": (B, L, vocab),
    "video": (B, num_masked, tubelet*p*p*C) predictions of the masked tokens}, those with a head.
    vt_cls_token: (B, D) the fused token VTM reads. video_order: row i fused text i with video order[i].
    """

    losses: dict[str, torch.Tensor]
    mask_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    vt_cls_token: torch.Tensor | None = None
    vtm_logits: torch.Tensor | None = None
    vtm_labels: torch.Tensor | None = None
    audio_mask: torch.Tensor | None = None
    video_mask: torch.Tensor | None = None
    video_order: torch.Tensor | None = None


class Crossformer(nn.Module):
    """Text, audio and video encoders, the ViT crossformer over their tokens, and five objectives:
    text MLM, audio MAE, video MAE (on the fused tokens), video-text matching on the fused
    `vt_cls_token`, and a CLIP-style video-text contrastive loss over the global batch."""

    def __init__(self, config: CrossformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        w = config.loss_weight
        self.text = build_text_model(config.text, mlm_head=w.text_mlm > 0)
        self.audio = build_audio_mae(config.audio, decoder=w.audio_mae > 0)
        self.video = build_video_mae(config.video, decoder=w.video_mae > 0)
        width = config.fusion.hidden_size
        std = config.fusion.initializer_range
        self.fusion = FusionEncoder(config.fusion, cls_token=not config.use_t_cls_to_vt_m)
        encoder_widths = {
            "audio": config.audio.hidden_size,
            "text": config.text.hidden_size,
            "video": config.video.hidden_size,
        }
        self.to_fusion = nn.ModuleDict({k: _projection(d, width, std) for k, d in encoder_widths.items()})
        decoded = {"audio": w.audio_mae > 0, "text": w.text_mlm > 0, "video": w.video_mae > 0}
        self.from_fusion = nn.ModuleDict(
            {k: _projection(width, d, std) for k, d in encoder_widths.items() if decoded[k]}
        )
        self.vtm_head = _projection(width, 2, std) if w.vtm > 0 else None
        if w.contrastive > 0:
            video_width = config.video.hidden_size if config.contrastive_loss_before_fusion else width
            text_width = config.text.hidden_size if config.contrastive_loss_before_fusion else width
            self.video_proj = nn.Linear(video_width, config.contrastive_dim)
            self.text_proj = nn.Linear(text_width, config.contrastive_dim)
            _init_vit_weights(self.video_proj, std)
            _init_vit_weights(self.text_proj, std)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature)))
        else:
            self.video_proj = self.text_proj = self.logit_scale = None

    # -- inputs -------------------------------------------------------------------------------------

    @property
    def num_audio_patches(self) -> int:
        a = self.config.audio
        return (a.num_mel_bins // a.patch_size) * (a.target_length // a.patch_size)

    @property
    def num_video_tokens(self) -> int:
        v = self.config.video
        return (v.num_frames // v.tubelet_size) * (v.image_size // v.patch_size) ** 2

    def make_video_mask(
        self, batch: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """Tube mask (batch, num_video_tokens), per video or one for the batch (video.mask_same_for_batch)."""
        return make_video_mask(self.config, batch, generator, device)

    def make_audio_mask(
        self, batch: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """Random patch mask (batch, num_audio_patches), one per sample, as ViT-MAE."""
        return make_audio_mask(self.config, batch, generator, device)

    def mask_tokens(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking (see the module function `mask_tokens`)."""
        return mask_tokens(self.config, text_ids, text_mask, generator)

    def _check_shapes(self, audio: torch.Tensor, video: torch.Tensor) -> None:
        a, v = self.config.audio, self.config.video
        want_a = (a.num_channels, a.num_mel_bins, a.target_length)
        want_v = (v.num_frames, v.num_channels, v.image_size, v.image_size)
        if tuple(audio.shape[1:]) != want_a:
            raise ValueError(
                f"audio of shape {tuple(audio.shape)}; this model takes (B, {', '.join(map(str, want_a))})"
            )
        if tuple(video.shape[1:]) != want_v:
            raise ValueError(
                f"video of shape {tuple(video.shape)}; this model takes (B, {', '.join(map(str, want_v))})"
            )

    # -- forward ------------------------------------------------------------------------------------

    def forward(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        audio: torch.Tensor,
        video: torch.Tensor,
        mlm_labels: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        video_order: torch.Tensor | None = None,
        return_outputs: bool = False,
    ) -> dict[str, torch.Tensor] | CrossformerOutput:
        """Weighted losses {"audio_mae", "text_mlm", "video_mae", "vtm", "contrastive"} (those with a
        weight > 0), or the whole CrossformerOutput with return_outputs.

        text_ids/text_mask (B, L): token ids (already masked when mlm_labels is given) and 1/0 padding
        mask; mlm_labels (B, L) with -100 where not predicted, drawn by `mask_tokens` when None.
        audio (B, C, num_mel_bins, target_length) fbank; video (B, T, 3, H, W) normalised frames.
        video_mask (B, num_video_tokens) / audio_mask (B, num_audio_patches) bool, True = hidden from the
        encoder; each row must mask as many as the ratio says (`make_video_mask`, `make_audio_mask`).
        video_order (B,) long: fusion row i pairs text i with video video_order[i] (`vtm_shuffle` when
        None). Masks and shuffle use the global RNG when drawn here.
        """
        cfg, w = self.config, self.config.loss_weight
        self._check_shapes(audio, video)
        b, device = text_ids.shape[0], text_ids.device
        if mlm_labels is None and w.text_mlm > 0:
            text_ids, mlm_labels = self.mask_tokens(text_ids, text_mask)
        if video_mask is None:
            video_mask = self.make_video_mask(b, device=device)
        if audio_mask is None:
            audio_mask = self.make_audio_mask(b, device=device)
        if video_order is None:
            video_order, vtm_labels = vtm_shuffle(b, cfg.vt_match_ratio, device=device)
        else:
            vtm_labels = (video_order == torch.arange(b, device=device)).long()
        video_mask, audio_mask = video_mask.bool(), audio_mask.bool()
        counts = video_mask.sum(1)
        if (counts != counts[0]).any():
            raise ValueError(f"every row of video_mask must mask as many tokens; got {counts.tolist()}")

        # Encoders: the visible patches only (MAE), the whole (masked) text.
        text_states = self.text.deberta(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
        audio_out = self.audio.vit(audio, noise=self._audio_noise(audio_mask))
        audio_states = audio_out.last_hidden_state  # (B, 1 + kept, D): ViT-MAE's [CLS] and kept patches
        video_states = self.video.videomae(video, bool_masked_pos=video_mask).last_hidden_state

        # VTM: row i of the fusion sees text i and audio i with video video_order[i].
        fused_video_states = video_states[video_order]
        fused_video_mask = video_mask[video_order]
        ones = torch.ones(b, 1, dtype=torch.bool, device=device)
        parts = [
            (self.to_fusion["audio"](audio_states), ones.expand(-1, audio_states.shape[1]), AUDIO),
            (self.to_fusion["text"](text_states), text_mask.bool(), TEXT),
            (self.to_fusion["video"](fused_video_states), ones.expand(-1, video_states.shape[1]), VIDEO),
        ]
        fused = self.fusion(parts)
        fusion_cls = fused.pop(0) if self.fusion.cls_token is not None else None
        fused_audio, fused_text, fused_video = fused
        vt_cls_token = fused_text[:, 0] if cfg.use_t_cls_to_vt_m else fusion_cls[:, 0]

        out = CrossformerOutput(
            losses={},
            vt_cls_token=vt_cls_token,
            vtm_labels=vtm_labels,
            audio_mask=audio_mask,
            video_mask=fused_video_mask,
            video_order=video_order,
        )
        if w.audio_mae > 0:
            logits = self.audio.decoder(self.from_fusion["audio"](fused_audio), audio_out.ids_restore).logits
            target = audio_pixel_targets(audio, cfg.audio)
            out.mask_logits["audio"] = logits
            out.losses["audio_mae"] = w.audio_mae * _masked_mse(logits, target, audio_mask)
        if w.text_mlm > 0:
            logits = self.text.lm_predictions(
                self.from_fusion["text"](fused_text), self.text.deberta.embeddings.word_embeddings
            )
            out.mask_logits["text"] = logits
            out.losses["text_mlm"] = w.text_mlm * _mlm_loss(logits, mlm_labels)
        if w.video_mae > 0:
            logits = self._decode_video(self.from_fusion["video"](fused_video), fused_video_mask)
            with torch.no_grad():
                target = video_pixel_targets(video[video_order], cfg.video)
                target = target[fused_video_mask].reshape(b, -1, target.shape[-1])
            out.mask_logits["video"] = logits
            out.losses["video_mae"] = w.video_mae * F.mse_loss(_upcast(logits), _upcast(target))
        if w.vtm > 0:
            out.vtm_logits = self.vtm_head(vt_cls_token)
            out.losses["vtm"] = w.vtm * F.cross_entropy(_upcast(out.vtm_logits), vtm_labels)
        if w.contrastive > 0:
            if cfg.contrastive_loss_before_fusion:
                video_feat, text_feat = video_states.mean(1), text_states[:, 0]
                order = torch.arange(b, device=device)  # encoder rows are not shuffled
            else:
                video_feat, text_feat = fused_video.mean(1), fused_text[:, 0]
                order = video_order
            out.losses["contrastive"] = w.contrastive * self.contrastive_loss(
                F.normalize(self.video_proj(video_feat), dim=-1),
                F.normalize(self.text_proj(text_feat), dim=-1),
                order,
            )
        return out if return_outputs else out.losses

    def _audio_noise(self, audio_mask: torch.Tensor) -> torch.Tensor:
        """ViT-MAE keeps the patches of lowest noise: kept patches get [0, 0.5), masked ones [1, 1.5)."""
        n = audio_mask.shape[1]
        expected = mae_num_masked(n, self.config.audio.mask_ratio)
        counts = audio_mask.sum(1)
        if (counts != expected).any():
            raise ValueError(
                f"audio_mask must mask exactly {expected} of {n} patches per row "
                f"(audio.mask_ratio {self.config.audio.mask_ratio}); got {counts.tolist()}"
            )
        ramp = torch.arange(n, device=audio_mask.device, dtype=torch.float32) / (2 * n)
        return audio_mask.float() + ramp

    def _decode_video(self, visible: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """VideoMAE's pretraining decoder: visible tokens + their positions, then mask tokens + theirs;
        returns the predictions (B, num_masked, tubelet * p * p * C) of the masked tokens, in token order."""
        v = self.video
        x = v.encoder_to_decoder(visible)
        b, _, d = x.shape
        pos = v.position_embeddings.to(device=x.device, dtype=x.dtype).expand(b, -1, -1)
        pos_visible = pos[~mask].reshape(b, -1, d)
        pos_masked = pos[mask].reshape(b, -1, d)
        x = torch.cat([x + pos_visible, v.mask_token + pos_masked], dim=1)
        return v.decoder(x, pos_masked.shape[1]).logits

    def contrastive_loss(
        self, video_feat: torch.Tensor, text_feat: torch.Tensor, video_order: torch.Tensor
    ) -> torch.Tensor:
        """CLIP's symmetric cross-entropy of the local rows against the batch of every process.

        video_feat/text_feat (B, E) L2-normalised; local video row i is the video of text video_order[i]
        (the seed's v_/t_constrative_label). Averaged over the local rows: with DDP averaging gradients
        this is the gradient of the loss over the global batch.
        """
        dim = video_feat.shape[1]
        rows = shard_rows(video_feat)  # this process's rows in the gathered batch (global-rank offset)
        gathered = all_gather_with_grad(torch.cat([video_feat, text_feat], dim=1))
        all_video, all_text = gathered[:, :dim], gathered[:, dim:]
        scale = self.logit_scale.exp().clamp(max=self.config.max_logit_scale)
        logits_v2t = _upcast(scale * video_feat @ all_text.t())
        logits_t2v = _upcast(scale * text_feat @ all_video.t())
        inverse = torch.empty_like(video_order)
        inverse[video_order] = torch.arange(len(video_order), device=video_order.device)
        loss = F.cross_entropy(logits_v2t, video_order + rows.start) + F.cross_entropy(
            logits_t2v, inverse + rows.start
        )
        return loss / 2

    # -- evaluation: encoders once per item, the crossformer once per (text, clip) pair ----------------

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's states (B, L, text width)."""
        return self.text.deberta(input_ids=text_ids, attention_mask=text_mask).last_hidden_state

    def encode_audio(self, audio: torch.Tensor, audio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The audio encoder's states (B, 1 + visible patches, audio width); every patch when audio_mask
        is None (ViT-MAE masks by its config's ratio, set to 0 for the call)."""
        if audio_mask is not None:
            return self.audio.vit(audio, noise=self._audio_noise(audio_mask)).last_hidden_state
        config = self.audio.vit.embeddings.config
        ratio, config.mask_ratio = config.mask_ratio, 0.0
        try:
            return self.audio.vit(audio).last_hidden_state
        finally:
            config.mask_ratio = ratio

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The video encoder's states (B, visible tokens, video width); every token when video_mask is None."""
        mask = video_mask.bool() if video_mask is not None else None
        return self.video.videomae(video, bool_masked_pos=mask).last_hidden_state

    def pair_scores(
        self,
        audio_states: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        video_states: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Scores of aligned rows: row i fuses audio i, text i and video i (encoder states).

        "similarity" (B,): cosine of the contrastive features, as the loss reads them (fused, or from the
        encoders with contrastive_loss_before_fusion); "vtm" (B,): the VTM head's match-minus-mismatch
        logit. Each is present when its objective's weight is > 0.
        """
        cfg, b = self.config, text_states.shape[0]
        ones = torch.ones(b, 1, dtype=torch.bool, device=text_states.device)
        fused = self.fusion([
            (self.to_fusion["audio"](audio_states), ones.expand(-1, audio_states.shape[1]), AUDIO),
            (self.to_fusion["text"](text_states), text_mask.bool(), TEXT),
            (self.to_fusion["video"](video_states), ones.expand(-1, video_states.shape[1]), VIDEO),
        ])  # fmt: skip
        fusion_cls = fused.pop(0) if self.fusion.cls_token is not None else None
        _, fused_text, fused_video = fused
        out = {}
        if self.vtm_head is not None:
            vt_cls = fused_text[:, 0] if cfg.use_t_cls_to_vt_m else fusion_cls[:, 0]
            logits = _upcast(self.vtm_head(vt_cls))
            out["vtm"] = logits[:, 1] - logits[:, 0]
        if self.video_proj is not None:
            if cfg.contrastive_loss_before_fusion:
                video_feat, text_feat = video_states.mean(1), text_states[:, 0]
            else:
                video_feat, text_feat = fused_video.mean(1), fused_text[:, 0]
            v = F.normalize(_upcast(self.video_proj(video_feat)), dim=-1)
            t = F.normalize(_upcast(self.text_proj(text_feat)), dim=-1)
            out["similarity"] = (v * t).sum(-1)
        return out


def _mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the predicted tokens; 0 (not NaN) when none is masked."""
    total = F.cross_entropy(
        _upcast(logits.flatten(0, 1)), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return total / (labels != -100).sum().clamp(min=1)


__all__ = [
    "AudioConfig",
    "Crossformer",
    "CrossformerConfig",
    "CrossformerOutput",
    "FusionConfig",
    "FusionEncoder",
    "LossWeights",
    "TextConfig",
    "VideoConfig",
    "audio_pixel_targets",
    "build_audio_mae",
    "make_audio_mask",
    "make_video_mask",
    "mask_tokens",
    "build_text_model",
    "build_video_mae",
    "random_patch_mask",
    "sincos_2d",
    "mae_num_masked",
    "tube_mask",
    "tube_num_masked",
    "video_pixel_targets",
    "vtm_shuffle",
]
