"""Singularity (Lei et al., "Revealing Single Frame Bias for Video-and-Language Learning"), rebuilt
from maintained `transformers` blocks.

Two models share one backbone:

- `Singularity`: retrieval and pretraining (ITC + ITM with hard negatives, + MLM when `config.mlm`).
- `SingularityQA`: open-ended QA with a small answer decoder that ranks a fixed answer list.

The backbone is a BEiT image encoder applied to every frame independently (single-frame training,
multi-frame inference), an optional temporal stage, and one BERT whose lower layers encode text alone
and whose upper layers (from `fusion_layer` on) cross-attend to the frame tokens.

Parameter names follow the upstream checkpoints (jayleicn/singularity, read from
`models/model_retrieval_base.py`, `models/model_vqa.py`, `models/xbert.py`, `tasks/shared_utils.py`),
so an official `.pth` loads with no missing or unexpected keys for the same config
(see `trainers.singularity.weights.load_weights`, which also maps between the layouts):

    vision_encoder.embeddings.cls_token
    vision_encoder.embeddings.patch_embeddings.projection.{weight,bias}
    vision_encoder.encoder.layer.{i}.lambda_1 / lambda_2                      (layer scale)
    vision_encoder.encoder.layer.{i}.layernorm_before / layernorm_after.{weight,bias}
    vision_encoder.encoder.layer.{i}.attention.attention.query.{weight,bias}
    vision_encoder.encoder.layer.{i}.attention.attention.key.weight           (BEiT keys have no bias)
    vision_encoder.encoder.layer.{i}.attention.attention.value.{weight,bias}
    vision_encoder.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table
    vision_encoder.encoder.layer.{i}.attention.output.dense / intermediate.dense / output.dense
    vision_encoder.pooler.layernorm.{weight,bias}                             (retrieval only; QA drops it)
    vision_layernorm.{weight,bias}
    temporal_embeddings                                                       (1, num_frames, 1, D), always
    temporal_vision_encoder.layer.{i}.{attention.self.*,attention.output.*,intermediate.*,output.*}
    text_encoder.embeddings.{word,position,token_type}_embeddings.weight, text_encoder.embeddings.LayerNorm.*
    text_encoder.encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}
    text_encoder.encoder.layer.{i}.attention.output.{dense,LayerNorm}.*
    text_encoder.encoder.layer.{i}.crossattention.{self.{query,key,value},output.{dense,LayerNorm}}.*
                                                                              (only i >= fusion_layer)
    text_encoder.encoder.layer.{i}.intermediate.dense.*, text_encoder.encoder.layer.{i}.output.{dense,LayerNorm}.*
    vision_proj.*, text_proj.*, temp, itm_head.*                              (retrieval only)

With `mlm=True` (upstream's pretraining model, `BertForMaskedLM`) the text encoder moves under
`text_encoder.bert.*` and the MLM head is `text_encoder.cls.predictions.{bias, transform.dense.*,
transform.LayerNorm.*, decoder.weight, decoder.bias}` (decoder weight tied to the word embeddings).
The QA model adds `text_decoder.bert.{embeddings.*, encoder.layer.{0..2}.*}` (every decoder layer has
`crossattention`) and `text_decoder.cls.predictions.*` (HF `BertLMHeadModel`).

Upstream checkpoints were written with transformers 4.15, which also saved the buffers
`...relative_position_bias.relative_position_index` and `text_encoder...embeddings.position_ids`; current
transformers recomputes them, and the loader ignores them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BeitConfig, BeitModel, BertConfig, BertLMHeadModel
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead

from trainers.core.bert import bert_config, init_bert_weights
from trainers.singularity.config import (  # noqa: F401 - re-exported: the model's config lives beside it
    FRAME_ENSEMBLES,
    LossWeights,
    SingularityConfig,
    TemporalEncoderConfig,
    TextConfig,
    VisionConfig,
)

# Additive attention-mask value for padded keys. Finite (as upstream's -10000) so it survives fp16/bf16.
_MASKED = -10000.0


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, L) 1 = attend / 0 = padding  ->  (N, 1, 1, L) additive mask (SDPA wants the query's dtype)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * _MASKED


class BertLayerStack(nn.Module):
    """A `layer` ModuleList of HF `BertLayer`s; layers with index >= `cross_attention_from` carry a
    `crossattention` block. Runs any contiguous slice of its layers."""

    def __init__(self, config: BertConfig, num_layers: int, cross_attention_from: int) -> None:
        super().__init__()
        # HF only builds cross-attention for decoder configs. The decoder flag has no other effect on a
        # BertLayer as long as an explicit attention mask is passed (see `forward`), so no causal mask.
        cross_config = copy.deepcopy(config)
        cross_config.is_decoder = True
        cross_config.add_cross_attention = True
        self.layer = nn.ModuleList(
            BertLayer(cross_config if i >= cross_attention_from else config, layer_idx=i)
            for i in range(num_layers)
        )

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        encoder_hidden: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attention_mask / encoder_mask: additive masks broadcastable to (N, heads, Lq, Lk)."""
        for layer in self.layer[start:end]:
            if layer.add_cross_attention and encoder_hidden is None:
                raise ValueError("fusion layers need the vision tokens (encoder_hidden)")
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden if layer.add_cross_attention else None,
                encoder_attention_mask=encoder_mask if layer.add_cross_attention else None,
            )[0]
        return hidden


class FusionTextEncoder(nn.Module):
    """BERT whose layers < fusion_layer see text only and layers >= fusion_layer also attend to vision.

    Modes, as upstream: "text" runs the text-only layers from token ids; "fusion" continues from the
    text hidden states through the fusion layers; "full" runs everything from token ids (QA).
    """

    def __init__(self, text: TextConfig) -> None:
        super().__init__()
        self.fusion_layer = text.fusion_layer
        config = bert_config(text)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertLayerStack(config, text.num_layers, cross_attention_from=text.fusion_layer)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        text_embeds: torch.Tensor | None = None,
        vision_embeds: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        mode: str = "full",
    ) -> torch.Tensor:
        """Return the last hidden states (N, L, D).

        input_ids: (N, L) for modes "text"/"full"; text_embeds: (N, L, D) for mode "fusion".
        attention_mask: (N, L) 1/0. vision_embeds: (N, Lv, D) for the fusion layers, vision_mask (N, Lv).
        """
        if mode in ("text", "full"):
            if input_ids is None:
                raise ValueError(f"mode={mode!r} needs input_ids")
            hidden = self.embeddings(input_ids=input_ids)
            start = 0
        elif mode == "fusion":
            if text_embeds is None:
                raise ValueError("mode='fusion' needs text_embeds")
            hidden = text_embeds
            start = self.fusion_layer
        else:
            raise ValueError(f"mode={mode!r}; valid: ['text', 'fusion', 'full']")
        end = self.fusion_layer if mode == "text" else None
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        encoder_mask = None
        if vision_embeds is not None:
            if vision_mask is None:
                vision_mask = torch.ones(vision_embeds.shape[:2], device=vision_embeds.device)
            encoder_mask = _additive_mask(vision_mask, hidden.dtype)
        return self.encoder(
            hidden,
            _additive_mask(attention_mask, hidden.dtype),
            start=start,
            end=end,
            encoder_hidden=vision_embeds,
            encoder_mask=encoder_mask,
        )


class MaskedLMTextEncoder(nn.Module):
    """Upstream's pretraining layout (`BertForMaskedLM`): the encoder under `bert`, the MLM head under
    `cls`, output embedding tied to the word embeddings."""

    def __init__(self, text: TextConfig) -> None:
        super().__init__()
        self.bert = FusionTextEncoder(text)
        self.cls = BertOnlyMLMHead(bert_config(text))

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.bert(*args, **kwargs)


def _build_beit(vision: VisionConfig, with_pooler: bool) -> BeitModel:
    config = BeitConfig(
        image_size=vision.image_res,
        patch_size=vision.patch_size,
        hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        intermediate_size=vision.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=vision.layer_norm_eps,
        use_mask_token=False,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=True,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=vision.layer_scale_init_value,
        drop_path_rate=vision.drop_path_rate,
        use_mean_pooling=True,
        attn_implementation="sdpa",
    )
    return BeitModel(config, add_pooling_layer=with_pooler)


def _aggregate(scores: torch.Tensor, how: str, dim: int = 0) -> torch.Tensor:
    """Late-fusion pooling over frames, as upstream: mean, max or log-sum-exp."""
    if how == "mean":
        return scores.mean(dim)
    if how == "max":
        return scores.max(dim).values
    if how == "lse":
        return torch.logsumexp(scores, dim=dim)
    raise ValueError(f"late fusion needs eval_frame_ensemble in ['mean', 'max', 'lse'], got {how!r}")


class _SingularityBackbone(nn.Module):
    """Vision encoder, temporal stage and fusion text encoder, shared by retrieval and QA."""

    def __init__(self, config: SingularityConfig, vision_pooler: bool, mlm_layout: bool) -> None:
        super().__init__()
        config.validate()
        self.config = config
        width = config.vision.hidden_size
        self.vision_encoder = _build_beit(config.vision, with_pooler=vision_pooler)
        # BEiT with mean pooling has no final LayerNorm on its token outputs; upstream adds this one.
        self.vision_layernorm = nn.LayerNorm(width, eps=1e-12)

        self.text_encoder: nn.Module = (
            MaskedLMTextEncoder(config.text) if mlm_layout else FusionTextEncoder(config.text)
        )
        init_bert_weights(self.text_encoder, config.text.initializer_range)
        if mlm_layout:
            self.text_encoder.tie_weights()

        # Upstream always creates this parameter (it is in every checkpoint) and adds it only with
        # add_temporal_embed. Frozen when unused so DDP does not wait for a gradient that never comes.
        self.temporal_embeddings = nn.Parameter(
            torch.zeros(1, config.num_frames, 1, width), requires_grad=config.add_temporal_embed
        )
        if config.temporal_vision_encoder.enable:
            n = config.temporal_vision_encoder.num_layers
            temporal_config = bert_config(config.text, num_hidden_layers=n)
            self.temporal_vision_encoder = BertLayerStack(temporal_config, n, cross_attention_from=n)
            init_bert_weights(self.temporal_vision_encoder, config.text.initializer_range)

    @property
    def text_bert(self) -> FusionTextEncoder:
        """The fusion BERT, whichever layout holds it."""
        enc = self.text_encoder
        return enc.bert if isinstance(enc, MaskedLMTextEncoder) else enc

    def encode_vision(
        self, frames: torch.Tensor, per_frame: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """frames (B, T, 3, H, W), normalised -> (vision_embeds (B, T, L, D), pooled (B, T, D)).

        Each frame goes through BEiT alone. Unless `per_frame` (what late fusion uses, as upstream), the
        temporal embeddings and the temporal encoder then mix information across frames.
        `pooled` is None for the QA model, which has no BEiT pooler.
        """
        b, t = frames.shape[:2]
        out = self.vision_encoder(pixel_values=frames.flatten(0, 1))
        embeds = self.vision_layernorm(out.last_hidden_state)
        embeds = embeds.view(b, t, embeds.shape[1], embeds.shape[2])
        pooled = out.pooler_output.view(b, t, -1) if out.pooler_output is not None else None
        if per_frame:
            return embeds, pooled
        if self.config.add_temporal_embed:
            embeds = embeds + self.temporal_embeddings_for(t).to(embeds.dtype)
        if t > 1 and self.config.temporal_vision_encoder.enable:
            embeds = self._temporal_encode(embeds)
            if self.config.temporal_vision_encoder.update_pooler_embed:
                pooled = embeds[:, :, 0]
        return embeds, pooled

    def temporal_embeddings_for(self, num_frames: int) -> torch.Tensor:
        """(1, num_frames, 1, D): the first frames' embeddings, or a linear interpolation when there are
        more frames than trained embeddings (e.g. 12 test frames for a 4-frame model)."""
        emb = self.temporal_embeddings
        if num_frames <= emb.shape[1]:
            return emb[:, :num_frames]
        stretched = F.interpolate(emb.squeeze(2).transpose(1, 2), size=num_frames, mode="linear")
        return stretched.transpose(1, 2).unsqueeze(2)

    def _temporal_encode(self, embeds: torch.Tensor) -> torch.Tensor:
        # Each spatial token attends over the same position in all frames: fold space into the batch.
        b, t, length, d = embeds.shape
        seq = embeds.transpose(1, 2).reshape(b * length, t, d)
        no_padding = torch.zeros(1, 1, 1, t, device=seq.device, dtype=seq.dtype)
        seq = self.temporal_vision_encoder(seq, no_padding)
        return seq.reshape(b, length, t, d).transpose(1, 2).contiguous()

    def fuse(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, vision_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Run the fusion layers. vision_embeds (N, T, L, D) are joined over frames ("concat")."""
        vision = vision_embeds.reshape(vision_embeds.shape[0], -1, vision_embeds.shape[-1])
        return self.text_bert(
            attention_mask=text_mask,
            text_embeds=text_embeds,
            vision_embeds=vision,
            vision_mask=torch.ones(vision.shape[:2], device=vision.device),
            mode="fusion",
        )


# --------------------------------------------------------------------------------------------------
# Retrieval / pretraining
# --------------------------------------------------------------------------------------------------


class Singularity(_SingularityBackbone):
    """Retrieval and pretraining model: ITC + ITM (+ MLM when `config.mlm`).

    The train loop calls `clamp_temp()` once per step (upstream clamps at the start of each forward).
    """

    def __init__(self, config: SingularityConfig) -> None:
        super().__init__(config, vision_pooler=True, mlm_layout=config.mlm)
        width = config.text.hidden_size
        self.vision_proj = nn.Linear(config.vision.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        self.itm_head = nn.Linear(width, 2)

    @torch.no_grad()
    def clamp_temp(self, min_val: float = 0.001, max_val: float = 0.5) -> None:
        """Keep the learnable temperature in [0.001, 0.5], as upstream."""
        self.temp.clamp_(min_val, max_val)

    def encode_text(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) ids and mask -> (text_embeds (N, L, D) from the text-only layers, [CLS] (N, D))."""
        embeds = self.text_bert(text_ids, text_mask, mode="text")
        return embeds, embeds[:, 0]

    def vision_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, T, D) pooled frames -> L2-normalised ITC features (B, T, embed_dim)."""
        return F.normalize(self.vision_proj(pooled), dim=-1)

    def text_features(self, text_cls: torch.Tensor) -> torch.Tensor:
        """(N, D) [CLS] -> L2-normalised ITC features (N, embed_dim)."""
        return F.normalize(self.text_proj(text_cls), dim=-1)

    @staticmethod
    def similarity(vision_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B_v, B_t) averaged over frames; no temperature."""
        return torch.einsum("vte,ne->vtn", vision_feat, text_feat).mean(1)

    def itm_scores(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, vision_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Cross-encoder match score (N,) (the itm_head's "match" logit) for N aligned (text, video) pairs.

        vision_embeds: (N, T, L, D). With eval_frame_ensemble "concat" all frames are fused at once;
        otherwise each frame is scored alone and the scores pooled (mean / max / log-sum-exp).
        """
        how = self.config.eval_frame_ensemble
        if how == "concat" or vision_embeds.shape[1] == 1:
            return self.itm_head(self.fuse(text_embeds, text_mask, vision_embeds)[:, 0])[:, 1]
        per_frame = [
            self.itm_head(self.fuse(text_embeds, text_mask, vision_embeds[:, i : i + 1])[:, 0])[:, 1]
            for i in range(vision_embeds.shape[1])
        ]
        return _aggregate(torch.stack(per_frame), how)

    def forward(
        self, frames: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, idx: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Weighted training losses {"itc", "itm"[, "mlm"]}.

        frames (B, T, 3, H, W) normalised; text_ids/text_mask (B, L); idx (B,) video ids, equal ids are
        positives of each other (a video with several captions in one batch).
        """
        vision_embeds, pooled = self.encode_vision(frames)
        text_embeds, text_cls = self.encode_text(text_ids, text_mask)

        sim_v2t = self.similarity(self.vision_features(pooled), self.text_features(text_cls)) / self.temp
        positives = idx.view(-1, 1) == idx.view(1, -1)
        losses = {
            "itc": self._itc_loss(sim_v2t, positives),
            "itm": self._itm_loss(sim_v2t.detach(), positives, text_embeds, text_mask, vision_embeds),
        }
        if self.config.mlm:
            losses["mlm"] = self._mlm_loss(text_ids, text_mask, vision_embeds)
        weights = dataclasses.asdict(self.config.loss_weight)
        return {name: weights[name] * loss for name, loss in losses.items()}

    @staticmethod
    def _itc_loss(sim_v2t: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        # Soft targets: every caption of the same video is a positive, sharing the probability mass.
        # In-batch negatives only (no gather across GPUs), as upstream. fp32 for the softmax under autocast.
        sim_v2t = sim_v2t.float()
        targets = positives.to(sim_v2t.dtype)
        targets = targets / targets.sum(1, keepdim=True)
        loss_v2t = -(F.log_softmax(sim_v2t, dim=1) * targets).sum(1).mean()
        loss_t2v = -(F.log_softmax(sim_v2t.t(), dim=1) * targets).sum(1).mean()
        return (loss_v2t + loss_t2v) / 2

    def _sample_negatives(self, sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """One negative column per row: drawn from softmax(sim) with positives removed (hard negatives),
        or uniformly among the non-positives."""
        with torch.no_grad():
            if self.config.itm_hard_neg:
                weights = F.softmax(sim.float(), dim=1)
            else:
                weights = torch.ones_like(sim, dtype=torch.float)
            weights = weights.masked_fill(positives, 0.0)
            # A row whose every column is a positive (a batch of one video) has no true negative;
            # fall back to any other column instead of failing, or to itself for a batch of one.
            empty = weights.sum(1) <= 0
            if empty.any():
                n = sim.shape[0]
                fallback = (
                    1.0 - torch.eye(n, device=sim.device) if n > 1 else torch.ones(1, 1, device=sim.device)
                )
                weights = torch.where(empty[:, None], fallback, weights)
            return torch.multinomial(weights, 1).squeeze(1)

    def _itm_loss(
        self,
        sim_v2t: torch.Tensor,
        positives: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        vision_embeds: torch.Tensor,
    ) -> torch.Tensor:
        n = sim_v2t.shape[0]
        neg_video_for_text = self._sample_negatives(sim_v2t.t(), positives)
        neg_text_for_video = self._sample_negatives(sim_v2t, positives)
        # One fusion pass over [positives; (text, negative video); (negative text, video)].
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text_for_video]])
        mask_all = torch.cat([text_mask, text_mask, text_mask[neg_text_for_video]])
        vision_all = torch.cat([vision_embeds, vision_embeds[neg_video_for_text], vision_embeds])
        logits = self.itm_head(self.fuse(text_all, mask_all, vision_all)[:, 0])
        labels = torch.zeros(3 * n, dtype=torch.long, device=logits.device)
        labels[:n] = 1
        return F.cross_entropy(logits, labels)

    def mask_tokens(self, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking with probability mlm_prob: of the chosen tokens 80% -> [MASK], 10% -> random
        token, 10% unchanged. [PAD] and [CLS] are never chosen. Returns (input_ids, labels with -100)."""
        t = self.config.text
        ids = text_ids.clone()
        labels = text_ids.clone()
        chosen = torch.bernoulli(torch.full(ids.shape, self.config.mlm_prob, device=ids.device)).bool()
        chosen &= (ids != t.pad_token_id) & (ids != t.cls_token_id)
        labels[~chosen] = -100
        to_mask = torch.bernoulli(torch.full(ids.shape, 0.8, device=ids.device)).bool() & chosen
        ids[to_mask] = t.mask_token_id
        # Half of the remaining 20% -> 10% overall.
        to_random = torch.bernoulli(torch.full(ids.shape, 0.5, device=ids.device)).bool() & chosen & ~to_mask
        random_words = torch.randint(t.vocab_size, ids.shape, device=ids.device)
        ids[to_random] = random_words[to_random]
        return ids, labels

    def _mlm_loss(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor, vision_embeds: torch.Tensor
    ) -> torch.Tensor:
        ids, labels = self.mask_tokens(text_ids)
        hidden = self.text_bert(ids, text_mask, mode="text")
        hidden = self.fuse(hidden, text_mask, vision_embeds)
        logits = self.text_encoder.cls(hidden)
        # Sum / count instead of mean so a batch where nothing got masked gives 0, not NaN.
        total = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return total / (labels != -100).sum().clamp(min=1)


# --------------------------------------------------------------------------------------------------
# Question answering
# --------------------------------------------------------------------------------------------------


class SingularityQA(_SingularityBackbone):
    """Open-ended QA: the fusion BERT encodes the question against the frames; a small BERT decoder
    (every layer cross-attends to the question states) scores answers from a fixed list."""

    def __init__(self, config: SingularityConfig) -> None:
        # Upstream's QA model deletes the ITC/ITM heads and the BEiT pooler and never uses MLM.
        super().__init__(config, vision_pooler=False, mlm_layout=False)
        decoder_config = bert_config(
            config.text,
            num_hidden_layers=config.num_decoder_layers,
            is_decoder=True,
            add_cross_attention=True,
        )
        self.text_decoder = BertLMHeadModel(decoder_config)

    def encode_question(
        self, frames: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor, per_frame: bool = False
    ) -> list[torch.Tensor]:
        """Question states (B, Lq, D) fused with the frames: one tensor for "concat" (or one frame),
        else one per frame (late fusion)."""
        vision_embeds, _ = self.encode_vision(frames, per_frame=per_frame)
        if not per_frame:
            vision_embeds = vision_embeds.flatten(1, 2)[:, None]
        vision_mask = torch.ones(vision_embeds.shape[0], vision_embeds.shape[2], device=frames.device)
        return [
            self.text_bert(
                q_ids, q_mask, vision_embeds=vision_embeds[:, i], vision_mask=vision_mask, mode="full"
            )
            for i in range(vision_embeds.shape[1])
        ]

    def _answer_nll(
        self,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Per-answer negative log-likelihood (N,), summed over its tokens (not [CLS], not [PAD])."""
        logits = self.text_decoder(
            input_ids=answer_ids,
            attention_mask=answer_mask,
            encoder_hidden_states=question_states,
            encoder_attention_mask=question_mask,
            use_cache=False,
        ).logits
        targets = answer_ids.masked_fill(answer_ids == self.config.text.pad_token_id, -100)[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
        )
        return nll.view(targets.shape).sum(1)

    def forward(
        self,
        frames: torch.Tensor,
        q_ids: torch.Tensor,
        q_mask: torch.Tensor,
        a_ids: torch.Tensor,
        a_mask: torch.Tensor,
        weights: torch.Tensor,
        n: torch.Tensor | Sequence[int],
    ) -> torch.Tensor:
        """Answer-frequency weighted LM loss, summed over answers and divided by the batch size.

        q_ids/q_mask (B, Lq); a_ids/a_mask (sum(n), La), answers of question b are consecutive and start
        with [CLS]; weights (sum(n),); n (B,) answers per question.
        """
        (question_states,) = self.encode_question(frames, q_ids, q_mask)
        counts = torch.as_tensor(n, device=q_ids.device)
        states = question_states.repeat_interleave(counts, dim=0)
        mask = q_mask.repeat_interleave(counts, dim=0)
        nll = self._answer_nll(a_ids, a_mask, states, mask)
        return (weights.to(nll.dtype) * nll).sum() / frames.shape[0]

    def _first_token_probs(
        self, answer_ids: torch.Tensor, question_states: torch.Tensor, q_mask: torch.Tensor
    ):
        # Probability of every answer's first real token after [CLS], from one decoder step.
        start = answer_ids[0, 0].repeat(question_states.shape[0], 1)
        logits = self.text_decoder(
            input_ids=start,
            encoder_hidden_states=question_states,
            encoder_attention_mask=q_mask,
            use_cache=False,
        ).logits[:, 0]
        return F.softmax(logits.float(), dim=-1)

    def _sequence_log_likelihood(
        self,
        topk_ids: torch.Tensor,
        topk_probs: torch.Tensor,
        question_states: torch.Tensor,
        q_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
    ) -> torch.Tensor:
        b, k = topk_ids.shape
        ids = answer_ids[topk_ids.flatten()]
        mask = answer_mask[topk_ids.flatten()]
        nll = self._answer_nll(
            ids, mask, question_states.repeat_interleave(k, dim=0), q_mask.repeat_interleave(k, dim=0)
        )
        # As upstream: log p(first token) plus the decoder's log-likelihood of the whole answer, which
        # counts the first token a second time. Kept so the ranking matches upstream's.
        return topk_probs.log() - nll.view(b, k)

    @torch.no_grad()
    def rank_answers(
        self,
        question_states: Sequence[torch.Tensor],
        q_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the k answers whose first token is most likely, re-rank them by sequence likelihood.

        question_states: one (B, Lq, D) tensor, or one per frame for late fusion.
        answer_ids/answer_mask: (A, La), every answer starting with [CLS]. Returns (answer indices (B, k),
        probabilities (B, k)), best first.
        """
        k = min(k, answer_ids.shape[0])
        how = self.config.eval_frame_ensemble
        probs = [self._first_token_probs(answer_ids, s, q_mask) for s in question_states]
        if len(probs) == 1:
            first = probs[0]
        else:
            # As upstream: pool the per-frame probabilities, then a softmax over the pooled values.
            first = F.softmax(_aggregate(torch.stack(probs), how), dim=-1)
        topk_probs, topk_ids = first.index_select(1, answer_ids[:, 1]).topk(k, dim=1)
        scores = [
            self._sequence_log_likelihood(topk_ids, topk_probs, s, q_mask, answer_ids, answer_mask)
            for s in question_states
        ]
        score = scores[0] if len(scores) == 1 else _aggregate(torch.stack(scores), how)
        probs_k, order = F.softmax(score, dim=-1).topk(k, dim=1)
        return topk_ids.gather(1, order), probs_k

    @torch.no_grad()
    def predict(
        self,
        frames: torch.Tensor,
        q_ids: torch.Tensor,
        q_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: int | None = None,
    ) -> torch.Tensor:
        """Index into the answer list (B,) of the best answer per question (k defaults to config.k_test)."""
        per_frame = self.config.eval_frame_ensemble != "concat"
        states = self.encode_question(frames, q_ids, q_mask, per_frame=per_frame)
        ids, _ = self.rank_answers(states, q_mask, answer_ids, answer_mask, k or self.config.k_test)
        return ids[:, 0]


__all__ = [
    "FRAME_ENSEMBLES",
    "LossWeights",
    "Singularity",
    "SingularityConfig",
    "SingularityQA",
    "TemporalEncoderConfig",
    "TextConfig",
    "VisionConfig",
]
