"""ALPRO (Li et al., "Align and Prompt: Video-and-Language Pre-training with Entity Prompts", CVPR 2022),
rebuilt from maintained `transformers` blocks.

Two models share one backbone:

- `Alpro`: pretraining and retrieval. VTC (video-text contrastive over the batch gathered from every
  process, learnable temperature), VTM (match / no-match on the multimodal [CLS], one hard negative
  video per text and one hard negative text per video), MLM (masked tokens predicted through the
  multimodal layers), PEM (prompting entity modeling: the frozen `AlproPrompter` scores a random region
  of the video against text prompts of the entities; the model predicts that distribution from its
  multimodal states of the region's patches). Retrieval scoring: VTC similarities, then VTM re-scoring
  of the top k.
- `AlproPrompter`: the PEM teacher, trained first with VTC alone; holds the entity prompts' features.
- `AlproQA`: open-ended QA as classification over ans2label with an MLP on the multimodal [CLS].

Backbone, as upstream (read from salesforce/ALPRO `src/modeling/alpro_models.py`,
`src/modeling/timesformer/vit.py`, `src/modeling/xbert.py`, `config_release/*.json`):

- Video: TimeSformer ViT-B/16 with divided space-time attention (HF `TimesformerModel`, a port of the
  same facebookresearch code upstream copied). Its token outputs (after the final LayerNorm) are
  averaged over time per patch: video_embeds = [CLS; mean_t(patch tokens)], (B, 1 + HW, D), upstream's
  `TimeSformer.forward_features(pooling='temporal')`.
- Text: BERT. Layers < fusion_layer (6) encode the text alone ("text" mode); layers >= fusion_layer run
  self-attention over the concatenated [text; video] tokens ("fusion" mode). Upstream's xbert sets
  `has_cross_attention = False`, so every layer is a plain `BertLayer` and the checkpoints carry no
  cross-attention weights.

Parameter names. The text side and heads keep upstream's names; the video encoder keeps HF's, which
`trainers.alpro.weights` maps to upstream's `visual_encoder.model.*` one to one:

    visual_encoder.embeddings.{cls_token, position_embeddings, time_embeddings}
    visual_encoder.embeddings.patch_embeddings.projection.{weight,bias}
    visual_encoder.encoder.layer.{i}.{layernorm_before, attention.attention.qkv, attention.output.dense,
        temporal_layernorm, temporal_attention.attention.qkv, temporal_attention.output.dense,
        temporal_dense, layernorm_after, intermediate.dense, output.dense}.{weight,bias}
    visual_encoder.layernorm.{weight,bias}
    text_encoder.bert.embeddings.*, text_encoder.bert.encoder.layer.{i}.*        (Alpro: BertForMaskedLM)
    text_encoder.cls.predictions.*                                            (Alpro with MLM)
    text_encoder.embeddings.*, text_encoder.encoder.layer.{i}.*                (AlproQA: BertModel)
    vision_proj.*, text_proj.*, temp, itm_head.*                              (Alpro)
    mpm_head.{0,2}.*, prompter.* (an AlproPrompter)                          (Alpro with PEM)
    video_prompt_feat, image_prompt_feat                                      (AlproPrompter)
    classifier.{0,2}.{weight,bias}                                            (AlproQA)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, TimesformerConfig, TimesformerModel
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead

from trainers.alpro.config import (  # noqa: F401 - re-exported: the model's config lives beside it
    AlproConfig,
    LossWeights,
    TextConfig,
    VideoConfig,
)
from trainers.core.bert import bert_config, init_bert_weights
from trainers.core.gather import all_gather_with_grad, concat_all_gather, global_mean, shard_rows

# Additive attention-mask value for padded keys: upstream's -10000, finite so it survives fp16/bf16.
_MASKED = -10000.0


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmaxes and losses (under autocast); fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, L) 1 = attend / 0 = padding  ->  (N, 1, 1, L) additive mask (SDPA wants the query's dtype)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * _MASKED


def build_timesformer(video: VideoConfig) -> TimesformerModel:
    """HF TimeSformer with upstream's hyper-parameters and initialisation."""
    config = TimesformerConfig(
        image_size=video.image_size,
        patch_size=video.patch_size,
        num_channels=3,
        num_frames=video.num_frames,
        hidden_size=video.hidden_size,
        num_hidden_layers=video.num_layers,
        num_attention_heads=video.num_heads,
        intermediate_size=video.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=video.drop_rate,
        attention_probs_dropout_prob=video.attn_drop_rate,
        initializer_range=0.02,
        layer_norm_eps=video.layer_norm_eps,
        qkv_bias=True,
        attention_type=video.attention_type,
        drop_path_rate=video.drop_path_rate,
    )
    model = TimesformerModel(config)
    if video.attention_type == "divided_space_time":
        # As upstream's VisionTransformer: the temporal branch of every block but the first starts at
        # zero, so an image-pretrained ViT initially behaves like the per-frame ViT.
        with torch.no_grad():
            for layer in model.encoder.layer[1:]:
                layer.temporal_dense.weight.zero_()
                layer.temporal_dense.bias.zero_()
    if video.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class _BertLayers(nn.Module):
    """Holds `layer` (HF BertLayer list) so parameter names read `encoder.layer.{i}.*`, as in BertModel."""

    def __init__(self, config: BertConfig, num_layers: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(num_layers))


class FusionBert(nn.Module):
    """BERT (no pooler) whose layers < fusion_layer see the text and whose layers >= fusion_layer see
    the concatenated [text; video] sequence: upstream's xbert `BertModel` with `mode='text'/'fusion'`."""

    def __init__(self, text: TextConfig) -> None:
        super().__init__()
        self.fusion_layer = text.fusion_layer
        config = bert_config(text)
        self.embeddings = BertEmbeddings(config)
        self.encoder = _BertLayers(config, text.num_layers)

    def _run(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, end: int | None) -> torch.Tensor:
        additive = _additive_mask(mask, hidden.dtype)
        for layer in self.encoder.layer[start:end]:
            hidden = layer(hidden, attention_mask=additive)[0]
        return hidden

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) ids and 1/0 mask -> text states (N, L, D) after the text-only layers."""
        return self._run(self.embeddings(input_ids=input_ids), attention_mask, 0, self.fusion_layer)

    def fuse(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Concatenated [text; video] states (N, L, D) and mask (N, L) -> multimodal states (N, L, D)."""
        return self._run(embeds, attention_mask, self.fusion_layer, None)


class MaskedLMTextEncoder(nn.Module):
    """Upstream's `BertForMaskedLM` layout: the encoder under `bert`, the MLM head (output embedding tied
    to the word embeddings) under `cls`, or no head when MLM is off."""

    def __init__(self, text: TextConfig, mlm_head: bool) -> None:
        super().__init__()
        self.bert = FusionBert(text)
        self.cls = BertOnlyMLMHead(bert_config(text)) if mlm_head else None
        init_bert_weights(self, text.initializer_range)
        if self.cls is not None:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------


class _AlproBackbone(nn.Module):
    """TimeSformer video encoder and the fusion BERT, shared by pretraining/retrieval and QA."""

    def __init__(self, config: AlproConfig, text_encoder: nn.Module) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.visual_encoder = build_timesformer(config.video)
        self.text_encoder = text_encoder

    @property
    def text_bert(self) -> FusionBert:
        enc = self.text_encoder
        return enc.bert if isinstance(enc, MaskedLMTextEncoder) else enc

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W), normalised RGB -> video_embeds (B, 1 + HW, D): [CLS] and the patch
        tokens averaged over time."""
        v = self.config.video
        b, t, c, h, w = video.shape
        if (t, c, h, w) != (v.num_frames, 3, v.image_size, v.image_size):
            # HF's TimeSformer layers read the frame count and grid size from their config.
            raise ValueError(
                f"video of shape {tuple(video.shape)}; this model takes (B, {v.num_frames}, 3, "
                f"{v.image_size}, {v.image_size}): set video.num_frames / video.image_size "
                "(load_weights resizes the time and position embeddings)"
            )
        tokens = self.visual_encoder(pixel_values=video).last_hidden_state  # (B, 1 + HW*T, D), (hw t) order
        patches = tokens[:, 1:].reshape(b, -1, t, tokens.shape[-1]).mean(2)
        return torch.cat([tokens[:, :1], patches], dim=1)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) ids and mask -> text states (N, L, D) from the text-only layers."""
        return self.text_bert.encode_text(text_ids, text_mask)

    def fuse(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, video_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Multimodal states (N, L + 1 + HW, D) of [text; video]; every video token is attended to."""
        video_mask = torch.ones(video_embeds.shape[:2], dtype=text_mask.dtype, device=text_mask.device)
        return self.text_bert.fuse(
            torch.cat([text_embeds, video_embeds], dim=1), torch.cat([text_mask, video_mask], dim=1)
        )


# --------------------------------------------------------------------------------------------------
# Pretraining / retrieval
# --------------------------------------------------------------------------------------------------


class Alpro(_AlproBackbone):
    """VTC + VTM (+ MLM when loss_weight.mlm > 0, + PEM when loss_weight.pem > 0): upstream's
    AlproForPretrain, and AlproForVideoTextRetrieval (mlm = pem = 0).

    With PEM the model holds the frozen prompter (`prompter`, never trained, always in eval mode) and
    the entity head `mpm_head` (hidden -> 2 hidden -> num_entities), as upstream."""

    def __init__(self, config: AlproConfig) -> None:
        super().__init__(config, MaskedLMTextEncoder(config.text, mlm_head=config.loss_weight.mlm > 0))
        width = config.text.hidden_size
        self.vision_proj = nn.Linear(config.video.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        self.itm_head = nn.Linear(width, 2)
        self.prompter: AlproPrompter | None = None
        self.mpm_head: nn.Sequential | None = None
        if config.loss_weight.pem > 0:
            self.prompter = AlproPrompter(prompter_config(config))
            self.prompter.requires_grad_(False)
            self.prompter.eval()
            self.mpm_head = nn.Sequential(
                nn.Linear(width, 2 * width), nn.ReLU(inplace=True), nn.Linear(2 * width, config.num_entities)
            )

    def train(self, mode: bool = True) -> Alpro:
        super().train(mode)
        if self.prompter is not None:  # the teacher's pseudo-labels come without dropout
            self.prompter.eval()
        return self

    @torch.no_grad()
    def clamp_temp(self) -> None:
        """Keep the temperature in [temp_min, temp_max]; upstream does it at the start of each forward."""
        self.temp.clamp_(self.config.temp_min, self.config.temp_max)

    def video_features(self, video_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 1 + HW, D) -> L2-normalised VTC features (B, embed_dim) from the video [CLS]."""
        return F.normalize(self.vision_proj(video_embeds[:, 0]), dim=-1)

    def text_features(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """(N, L, D) -> L2-normalised VTC features (N, embed_dim) from the text [CLS]."""
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def itm_logits(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, video_embeds: torch.Tensor
    ) -> torch.Tensor:
        """VTM logits (N, 2) (index 1 = match) for N aligned (text, video) pairs."""
        return self.itm_head(self.fuse(text_embeds, text_mask, video_embeds)[:, 0])

    def forward(
        self,
        video: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        mlm_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        region_video: torch.Tensor | None = None,
        region: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted losses {"vtc", "vtm", "mlm", "pem"} (those with a weight > 0).

        video (B, T, 3, H, W); text_ids/text_mask (B, L). mlm_ids/mlm_labels (B, L): masked input and
        labels (-100 = not predicted); drawn with `mask_tokens` when not given. idx (B,): optional video
        ids; equal ids are positives of each other (several captions of one video in a batch). Without
        it the i-th video and i-th text are the only positive pair (upstream). PEM needs region (B, h, w)
        bool over the patch grid and region_video, the video blacked out outside it
        (`trainers.alpro.data.random_regions`).

        Under DDP the VTC compares the local rows with the batch of every process; the loss averages over
        the local rows, so DDP's gradient averaging gives the gradient of the global-batch loss.
        """
        self.clamp_temp()
        weights = self.config.loss_weight
        video_embeds = self.encode_video(video)
        text_embeds = self.encode_text(text_ids, text_mask)
        losses: dict[str, torch.Tensor] = {}

        if weights.vtc > 0 or weights.vtm > 0:
            video_feat, text_feat = self.video_features(video_embeds), self.text_features(text_embeds)
            if weights.vtc > 0:
                loss, sim_local, positives = self.vtc_loss(video_feat, text_feat, idx)
                losses["vtc"] = weights.vtc * loss
            else:
                with torch.no_grad():
                    sim_local = video_feat @ text_feat.t() / self.temp
                    positives = _positives(
                        idx, idx, slice(0, len(text_feat)), len(video_feat), sim_local.device
                    )
            if weights.vtm > 0:
                loss, fused = self.vtm_loss(
                    text_embeds, text_mask, video_embeds, sim_local.detach(), positives
                )
                losses["vtm"] = weights.vtm * loss
        if weights.pem > 0:
            if region is None or region_video is None:
                raise ValueError("PEM (loss_weight.pem > 0) needs region and region_video")
            if weights.vtm <= 0:  # else the VTM pass already fused the positive pairs
                fused = self.fuse(text_embeds, text_mask, video_embeds)
            losses["pem"] = weights.pem * self.pem_loss(fused, text_ids.shape[1], region, region_video)
        if weights.mlm > 0:
            if mlm_ids is None or mlm_labels is None:
                mlm_ids, mlm_labels = self.mask_tokens(text_ids)
            losses["mlm"] = weights.mlm * self.mlm_loss(mlm_ids, text_mask, mlm_labels, video_embeds)
        return losses

    def vtc_loss(
        self, video_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contrastive loss of the local rows against the gathered batch of every process.

        Returns (loss, the local block of the video-to-text similarities (B, B) / temp, the local block
        of the positives (B, B)); the blocks are what VTM samples its negatives from, as upstream.
        """
        dim = video_feat.shape[1]
        rows = shard_rows(video_feat)  # this process's place in the gathered batch: the GLOBAL rank's
        gathered = all_gather_with_grad(torch.cat([video_feat, text_feat], dim=1))
        all_video, all_text = gathered[:, :dim], gathered[:, dim:]
        sim_v2t = video_feat @ all_text.t() / self.temp
        sim_t2v = text_feat @ all_video.t() / self.temp
        all_idx = concat_all_gather(idx) if idx is not None else None
        positives = _positives(idx, all_idx, rows, gathered.shape[0], sim_v2t.device)
        sim_v2t, sim_t2v = _upcast(sim_v2t), _upcast(sim_t2v)
        targets = positives.to(sim_v2t.dtype)
        targets = targets / targets.sum(1, keepdim=True)
        loss_v2t = -(F.log_softmax(sim_v2t, dim=1) * targets).sum(1).mean()
        loss_t2v = -(F.log_softmax(sim_t2v, dim=1) * targets).sum(1).mean()
        return (loss_v2t + loss_t2v) / 2, sim_v2t[:, rows], positives[:, rows]

    def _sample_negatives(self, sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """One negative column per row: from softmax(sim) without the positives (hard negatives) or
        uniformly among the non-positives."""
        with torch.no_grad():
            if self.config.vtm_hard_negatives:
                weights = F.softmax(sim.float().masked_fill(positives, float("-inf")), dim=1)
                weights = torch.nan_to_num(weights, nan=0.0)  # rows that are all positives
            else:
                weights = (~positives).float()
            # A row with no negative at all (a batch of one video) takes any other column, or itself.
            empty = weights.sum(1) <= 0
            if empty.any():
                n = sim.shape[1]
                fallback = (
                    1.0 - torch.eye(sim.shape[0], n, device=sim.device) if n > 1 else torch.ones_like(sim)
                )
                weights = torch.where(empty[:, None], fallback, weights)
            return torch.multinomial(weights, 1).squeeze(1)

    def vtm_loss(
        self,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        video_embeds: torch.Tensor,
        sim_v2t: torch.Tensor,
        positives: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over B positive pairs, B (text, negative video) and B (negative text, video),
        and the multimodal states (B, L + 1 + HW, D) of the positive pairs (what PEM reads, as upstream).

        sim_v2t, positives: (B videos, B texts) of the local batch.
        """
        b = text_embeds.shape[0]
        neg_video_for_text = self._sample_negatives(sim_v2t.t(), positives.t())
        neg_text_for_video = self._sample_negatives(sim_v2t, positives)
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text_for_video]])
        mask_all = torch.cat([text_mask, text_mask, text_mask[neg_text_for_video]])
        video_all = torch.cat([video_embeds, video_embeds[neg_video_for_text], video_embeds])
        fused = self.fuse(text_all, mask_all, video_all)
        logits = self.itm_head(fused[:, 0])
        labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)
        labels[:b] = 1
        return F.cross_entropy(_upcast(logits), labels), fused[:b]

    def pem_loss(
        self, fused: torch.Tensor, text_len: int, region: torch.Tensor, region_video: torch.Tensor
    ) -> torch.Tensor:
        """Soft cross-entropy between the prompter's entity distribution for region_video and the
        model's prediction from its multimodal states of the region's patches (mean-pooled).

        fused (B, text_len + 1 + HW, D): multimodal states of the (text, whole video) pairs; region
        (B, h, w) bool with h * w = HW. Regions whose top entity has probability < pem_threshold do not
        count; the mean is over the counted regions of every process (0 when there is none).
        """
        if self.prompter is None:
            raise RuntimeError("this model has no prompter (loss_weight.pem = 0)")
        targets, keep = self.prompter.pseudo_labels(region_video)
        patches = fused[:, text_len + 1 :]
        weights = region.flatten(1).to(patches.dtype)
        if weights.shape[1] != patches.shape[1]:
            raise ValueError(f"region has {weights.shape[1]} patches, the video {patches.shape[1]}")
        pooled = (patches * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        log_probs = F.log_softmax(_upcast(self.mpm_head(pooled)), dim=1)
        per_region = -(log_probs * targets.to(log_probs.dtype)).sum(1)
        return global_mean((per_region * keep).sum(), keep.sum())

    def mask_tokens(self, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking with probability mlm_prob ([PAD], [CLS], [SEP] never chosen): of the chosen
        tokens 80% -> [MASK], 10% -> a random token, 10% unchanged. Returns (input_ids, labels with -100)."""
        t = self.config.text
        ids, labels = text_ids.clone(), text_ids.clone()
        chosen = torch.bernoulli(torch.full(ids.shape, self.config.mlm_prob, device=ids.device)).bool()
        for special in (t.pad_token_id, t.cls_token_id, t.sep_token_id):
            chosen &= ids != special
        labels[~chosen] = -100
        to_mask = torch.bernoulli(torch.full(ids.shape, 0.8, device=ids.device)).bool() & chosen
        ids[to_mask] = t.mask_token_id
        to_random = torch.bernoulli(torch.full(ids.shape, 0.5, device=ids.device)).bool() & chosen & ~to_mask
        ids[to_random] = torch.randint(t.vocab_size, ids.shape, device=ids.device)[to_random]
        return ids, labels

    def mlm_loss(
        self,
        mlm_ids: torch.Tensor,
        text_mask: torch.Tensor,
        mlm_labels: torch.Tensor,
        video_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Masked tokens predicted from the text part of the multimodal states (video not masked)."""
        if self.text_encoder.cls is None:
            raise RuntimeError("this model has no MLM head (loss_weight.mlm = 0)")
        hidden = self.fuse(self.encode_text(mlm_ids, text_mask), text_mask, video_embeds)
        logits = self.text_encoder.cls(hidden[:, : mlm_ids.shape[1]])
        # The mean over the predicted tokens of every process (0 rather than NaN when none was masked).
        total = F.cross_entropy(
            _upcast(logits.flatten(0, 1)), mlm_labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return global_mean(total, (mlm_labels != -100).sum())

    @torch.no_grad()
    def retrieval_scores(
        self,
        video_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        k: int | None = None,
        batch_size: int = 64,
    ) -> dict[str, torch.Tensor]:
        """Score every (video, text) pair of an evaluation set.

        video_embeds (Nv, 1 + HW, D) from `encode_video`; text_embeds/text_mask (Nt, L(, D)) from
        `encode_text`. Returns {"vtc": (Nv, Nt) similarities / temp, "v2t": (Nv, Nt) VTM match
        probabilities for each video's top-k texts by VTC, "t2v": the same for each text's top-k videos};
        pairs outside the top k score -inf. k None: config.k_test; 0 or >= N: every pair (upstream).
        """
        k = self.config.k_test if k is None else k
        sim = self.video_features(video_embeds) @ self.text_features(text_embeds).t() / self.temp
        if self.config.loss_weight.vtm <= 0:  # an untrained VTM head (the prompter): VTC alone
            return {"vtc": sim, "v2t": sim, "t2v": sim}
        nv, nt = sim.shape
        if k <= 0 or k >= max(nv, nt):
            v2t_mask = t2v_mask = torch.ones_like(sim, dtype=torch.bool)
        else:
            v2t_mask = torch.zeros_like(sim, dtype=torch.bool)
            v2t_mask.scatter_(1, sim.topk(min(k, nt), dim=1).indices, True)
            t2v_mask = torch.zeros_like(sim, dtype=torch.bool)
            t2v_mask.scatter_(0, sim.topk(min(k, nv), dim=0).indices, True)
        pairs = (v2t_mask | t2v_mask).nonzero()
        itm = torch.full_like(sim, float("-inf"))
        for chunk in pairs.split(batch_size):
            v, t = chunk[:, 0], chunk[:, 1]
            logits = self.itm_logits(text_embeds[t], text_mask[t], video_embeds[v])
            itm[v, t] = F.softmax(logits.float(), dim=1)[:, 1].to(itm.dtype)
        neg_inf = torch.full_like(sim, float("-inf"))
        return {
            "vtc": sim,
            "v2t": torch.where(v2t_mask, itm, neg_inf),
            "t2v": torch.where(t2v_mask, itm, neg_inf),
        }


def prompter_config(config: AlproConfig) -> AlproConfig:
    """The prompter's config for a pretraining model's config: the same backbone, VTC alone."""
    return dataclasses.replace(config, loss_weight=LossWeights(vtc=1.0, vtm=0.0, mlm=0.0, pem=0.0))


class AlproPrompter(Alpro):
    """Upstream's Prompter: ALPRO's backbone trained with VTC alone, then frozen as the PEM teacher.

    `video_prompt_feat` / `image_prompt_feat` (num_entities, embed_dim): per entity, the mean over the
    prompt templates ("A video of a {}.", ...) of the normalised text features, as upstream (not
    normalised again); built by `build_prompts` from the entity list."""

    def __init__(self, config: AlproConfig) -> None:
        if config.loss_weight.pem > 0:
            raise ValueError("the prompter trains with VTC alone (loss_weight.pem must be 0)")
        super().__init__(config)
        self.register_buffer("video_prompt_feat", torch.zeros(config.num_entities, config.embed_dim))
        self.register_buffer("image_prompt_feat", torch.zeros(config.num_entities, config.embed_dim))

    @torch.no_grad()
    def build_prompts(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        num_templates: int,
        kind: str = "video",
        chunk: int = 4096,
    ) -> None:
        """Set the `<kind>_prompt_feat` buffer from tokenized prompts (num_templates * num_entities, L)
        ordered template by template (all entities of the first template, then the second, ...)."""
        buffer = getattr(self, f"{kind}_prompt_feat")
        if ids.shape[0] != num_templates * buffer.shape[0]:
            raise ValueError(
                f"{ids.shape[0]} prompts for {buffer.shape[0]} entities x {num_templates} templates"
            )
        was_training = self.training
        self.eval()
        feats = torch.cat([
            self.text_features(self.encode_text(ids[s : s + chunk], mask[s : s + chunk]))
            for s in range(0, ids.shape[0], chunk)
        ])  # fmt: skip
        buffer.copy_(feats.view(num_templates, buffer.shape[0], -1).mean(0))
        self.train(was_training)

    @torch.no_grad()
    def pseudo_labels(self, video: torch.Tensor, kind: str = "video") -> tuple[torch.Tensor, torch.Tensor]:
        """(B, num_entities) softmax over the entity prompts of each video's similarity / temp, and
        (B,) bool: the top entity's probability reaches pem_threshold (the others are ignored)."""
        feats = self.video_features(self.encode_video(video))
        probs = F.softmax(_upcast(feats @ getattr(self, f"{kind}_prompt_feat").t() / self.temp), dim=1)
        return probs, probs.max(1).values >= self.config.pem_threshold


def _positives(
    idx: torch.Tensor | None, all_idx: torch.Tensor | None, rows: slice, num_columns: int, device
) -> torch.Tensor:
    """(B, num_columns) bool: local row i is positive with gathered column j."""
    if idx is not None:
        return idx.view(-1, 1) == all_idx.view(1, -1)
    b = rows.stop - rows.start
    positives = torch.zeros(b, num_columns, dtype=torch.bool, device=device)
    positives[:, rows] = torch.eye(b, dtype=torch.bool, device=device)
    return positives


# --------------------------------------------------------------------------------------------------
# Question answering
# --------------------------------------------------------------------------------------------------


class AlproQA(_AlproBackbone):
    """Upstream's AlproForSequenceClassification: the multimodal [CLS] through an MLP
    (hidden -> hidden * qa_hidden_scale -> num_labels), cross-entropy over ans2label classes.

    Upstream's QA model also builds vision_proj, text_proj, temp and itm_head, which it never uses;
    this one does not (load_weights drops them)."""

    def __init__(self, config: AlproConfig) -> None:
        if config.num_labels < 1:
            raise ValueError("AlproQA needs config.num_labels >= 1 (the size of ans2label)")
        text_encoder = FusionBert(config.text)
        init_bert_weights(text_encoder, config.text.initializer_range)
        super().__init__(config, text_encoder)
        width = config.text.hidden_size
        hidden = width * config.qa_hidden_scale
        self.classifier = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, config.num_labels)
        )

    def logits(self, video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, num_labels) answer logits for questions text_ids/text_mask (B, L) about video (B, T, 3, H, W)."""
        fused = self.fuse(self.encode_text(text_ids, text_mask), text_mask, self.encode_video(video))
        return self.classifier(fused[:, 0])

    def forward(
        self, video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """{"qa": cross-entropy} against labels (B,) (ans2label indices)."""
        return {"qa": F.cross_entropy(_upcast(self.logits(video, text_ids, text_mask)), labels)}

    @torch.no_grad()
    def predict(self, video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B,) index of the most likely answer."""
        return self.logits(video, text_ids, text_mask).argmax(-1)


__all__ = [
    "Alpro",
    "AlproConfig",
    "AlproPrompter",
    "AlproQA",
    "FusionBert",
    "LossWeights",
    "TextConfig",
    "VideoConfig",
    "build_timesformer",
]
