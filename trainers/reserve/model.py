"""MERLOT Reserve in Flax linen, with upstream's parameter tree so its flax checkpoints load.

Structure and names follow rowanz/merlot_reserve (`mreserve/modeling.py`, `pretrain/pretrain_model.py`,
`finetune/tvqa/tvqa_finetune.py`); the code is ours. Tree of `ReservePretrainer` (base):

    vision_encoder/embedding                          Dense(768 -> H) over 16x16x3 patches
    vision_encoder/transformer/{cls, pre_ln, layer_00..11, final_ln, cls_proj}
        layer_NN/{pre_attn_ln, attention_layer/{qkv, attn_proj}, pre_mlp_ln, mlp_layer/{intermediate, out}}
    vision_encoder/seq_attnpool/{query, key, value, out}
    audio_encoder/embedding                           Conv1d(65 -> H, width 2, stride 2)
    audio_encoder/transformer/...                     as above
    audio_encoder/seq_attnpool/...
    token_encoder/Embed_0/embedding                   (vocab, H)
    span_encoder/transformer/...
    joint_transformer/{pre_ln, layer_00..11, final_ln}
    head                                              Dense(H -> H), the joint projection
    contrastive_scales                                (3,) log-scales

`ReserveQA` (finetuning) has no `head` or `span_encoder` and adds `proj` (Dense H -> 1, no bias), as
upstream's finetuning does; it keeps `contrastive_scales` and the encoders' `cls_proj`, which it does
not use, so upstream's finetuned checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trainers.reserve.config import (
    AUDIOSPAN,
    LTOVPOOL,
    MASK,
    MASKAUDIO,
    PADDING,
    ReserveConfig,
)

Array = Any

# ----------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rotary_coordinates(length: int, center_origin: bool = True) -> jnp.ndarray:
    """1-D positions: [-L/2, ..., -1, 1, ..., L/2] centred (zero skipped), else [1, ..., L]."""
    if center_origin:
        half = length // 2
        return jnp.concatenate(
            [jnp.arange(half, dtype=jnp.float32) - half, 1.0 + jnp.arange(length - half, dtype=jnp.float32)]
        )
    return 1.0 + jnp.arange(length, dtype=jnp.float32)


def rotary_coordinates_2d(h: int, w: int) -> jnp.ndarray:
    """[h * w, 2] positions of a patch grid, scaled as a crop of a square box of side max(h, w) + 1."""
    scale = 1.0 / (max(h, w) + 1.0)
    hh, ww = jnp.meshgrid(scale * rotary_coordinates(h), scale * rotary_coordinates(w), indexing="ij")
    return jnp.stack([hh, ww], -1).reshape(h * w, 2)


def multimodal_rotary_coordinates(
    batch: int,
    length: int,
    h: Array | None = None,
    w: Array | None = None,
    segment_idx: Array | None = None,
    token_idx: Array | None = None,
    max_segment: float = 16.0,
    max_token: float = 1024.0,
) -> jnp.ndarray:
    """[B, L, 4] joint-transformer positions (h, w, segment, token); absent axes are 0."""
    zeros = jnp.zeros((batch, length), jnp.float32)
    return jnp.stack(
        [
            zeros if h is None else h,
            zeros if w is None else w,
            zeros if segment_idx is None else segment_idx / max_segment,
            zeros if token_idx is None else token_idx / max_token,
        ],
        -1,
    )


def rotary_sinusoids(coords: Array, rotary_hsize: int, max_freq: float = 10.0) -> jnp.ndarray:
    """coords [*batch, L, D] -> [*batch, 2 (cos, sin), L, rotary_hsize], each angle repeated twice so
    that consecutive dims (2i, 2i+1) share one. Frequencies are log-spaced from 1 to max_freq / 2."""
    *batch, length, num_axes = coords.shape
    per_axis = rotary_hsize // (2 * num_axes)
    if per_axis < 1 or rotary_hsize % (2 * num_axes):
        raise ValueError(f"rotary_hsize {rotary_hsize} must be a multiple of 2 * {num_axes} axes")
    freqs = jnp.logspace(0.0, math.log2(max_freq / 2.0), per_axis, base=2, dtype=jnp.float32)
    radians = (coords[..., None].astype(jnp.float32) * freqs * np.pi).reshape(*batch, length, -1)
    return jnp.repeat(jnp.stack([jnp.cos(radians), jnp.sin(radians)], -3), 2, axis=-1)


def apply_rotary(qk: Array, sinusoids: Array, variant: str = "upstream") -> Array:
    """Position-encode the first rotary_hsize dims of each head of qk [*batch, L, heads, d].

    "standard" rotates each pair (x_2i, x_2i+1) by its angle, so q.k depends only on the difference of
    positions. "upstream" reproduces `mreserve.modeling.apply_rotary` (its cos and sin are swapped and
    the partner dims are the wrong ones), which scales x_2i by (sin - cos) and x_2i+1 by (sin + cos):
    not a rotation, but what the released checkpoints were trained with.
    """
    rotary_hsize = sinusoids.shape[-1]
    extra = qk.ndim - sinusoids.ndim  # sinusoids may lack the batch dims of qk
    sinusoids = sinusoids.reshape((1,) * extra + sinusoids.shape)
    cos = sinusoids[..., 0, :, None, :].astype(qk.dtype)
    sin = sinusoids[..., 1, :, None, :].astype(qk.dtype)
    x = qk[..., :rotary_hsize]
    if variant == "standard":
        partner = jnp.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
        x = x * cos + partner * sin
    elif variant == "upstream":
        partner = jnp.stack([-x[..., ::2], x[..., 1::2]], -1).reshape(x.shape)
        x = x * sin + partner * cos
    else:
        raise ValueError(f"rotary variant {variant!r}; valid: ['upstream', 'standard']")
    return jnp.concatenate([x, qk[..., rotary_hsize:]], -1)


# ----------------------------------------------------------------------------------------------------
# Transformer


def kernel_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Upstream's init: truncated normal, std min(18 / fan_in, 0.02) / sqrt(2) (deeper layers smaller)."""
    if len(shape) == 3:  # DenseGeneral kernels: (H, heads, d) in, (heads, d, H) out
        fan_in = shape[0] * shape[1] if shape[0] < shape[2] else shape[0]
    else:
        fan_in = shape[-2]
    std = min(18.0 / fan_in, 0.02) / np.sqrt(2.0)
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * std


def quick_gelu(x: Array) -> Array:
    return x * nn.sigmoid(1.702 * x)


def unit_normalize(x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    return (x32 / jnp.sqrt(jnp.square(x32).sum(-1, keepdims=True) + 1e-5)).astype(x.dtype)


class AttentionLayer(nn.Module):
    hidden_size: int
    size_per_head: int
    rotary_variant: str = "upstream"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, sinusoids: Array | None, attention_bias: Array | None) -> Array:
        heads = self.hidden_size // self.size_per_head
        qkv = nn.DenseGeneral(
            (3 * heads, self.size_per_head), dtype=self.dtype, kernel_init=kernel_init, name="qkv"
        )(x)
        query_key, value = jnp.split(qkv, [2 * heads], axis=-2)
        if sinusoids is not None:
            query_key = apply_rotary(query_key, sinusoids, self.rotary_variant)
        query, key = jnp.split(query_key, [heads], axis=-2)
        probs = nn.attention.dot_product_attention_weights(query, key, bias=attention_bias, dtype=self.dtype)
        out = jnp.einsum("...hqk,...khd->...qhd", probs, value)
        return nn.DenseGeneral(
            self.hidden_size,
            axis=(-2, -1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=kernel_init,
            name="attn_proj",
        )(out)


class MLPBlock(nn.Module):
    mlp_ratio: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hidden = x.shape[-1]
        y = nn.Dense(hidden * self.mlp_ratio, dtype=self.dtype, kernel_init=kernel_init, name="intermediate")(
            x
        )
        return nn.Dense(hidden, use_bias=False, dtype=self.dtype, kernel_init=kernel_init, name="out")(
            quick_gelu(y)
        )


class TransformerLayer(nn.Module):
    hidden_size: int
    size_per_head: int
    mlp_ratio: int = 4
    rotary_variant: str = "upstream"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, sinusoids: Array | None, attention_bias: Array | None) -> Array:
        ln = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="pre_attn_ln")(x)
        x = x + AttentionLayer(
            self.hidden_size, self.size_per_head, self.rotary_variant, self.dtype, name="attention_layer"
        )(ln, sinusoids, attention_bias)
        ln = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="pre_mlp_ln")(x)
        return x + MLPBlock(self.mlp_ratio, self.dtype, name="mlp_layer")(ln)


class TransformerEncoder(nn.Module):
    """Pre-LN transformer with rotary positions; with `add_cls_token`, a learned CLS token in front whose
    final state goes through `cls_proj`. Returns {"seq": [*, L, H]} (+ "cls": [*, H])."""

    hidden_size: int
    num_layers: int
    size_per_head: int = 64
    mlp_ratio: int = 4
    rotary_hsize: int = 32
    rotary_variant: str = "upstream"
    add_cls_token: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        rotary_coords: Array,
        attention_mask: Array | None = None,
        is_valid: Array | None = None,
    ) -> dict[str, Array]:
        *batch, _, _ = x.shape
        if self.add_cls_token:
            cls = self.param("cls", nn.initializers.normal(stddev=0.02), (self.hidden_size,))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (*batch, 1, self.hidden_size)), x], -2)
            if is_valid is not None:
                is_valid = jnp.concatenate([jnp.ones((*batch, 1), bool), is_valid], -1)
            # the CLS token sits at the origin
            rotary_coords = jnp.concatenate([jnp.zeros_like(rotary_coords[..., :1, :]), rotary_coords], -2)
        sinusoids = rotary_sinusoids(rotary_coords, self.rotary_hsize)

        if is_valid is not None:
            attention_mask = is_valid[..., :, None] & is_valid[..., None, :]
        bias = None
        if attention_mask is not None:
            bias = jnp.where(attention_mask[..., None, :, :], 0.0, -1e10).astype(self.dtype)

        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="pre_ln")(x)
        for i in range(self.num_layers):
            x = TransformerLayer(
                self.hidden_size,
                self.size_per_head,
                self.mlp_ratio,
                self.rotary_variant,
                self.dtype,
                name=f"layer_{i:02d}",
            )(x, sinusoids, bias)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="final_ln")(x)
        if not self.add_cls_token:
            return {"seq": x}
        cls_out = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=kernel_init, name="cls_proj")(
            x[..., 0, :]
        )
        return {"seq": x[..., 1:, :], "cls": cls_out}


def _encoder(config: ReserveConfig, num_layers: int, add_cls_token: bool, name: str) -> TransformerEncoder:
    return TransformerEncoder(
        hidden_size=config.hidden_size,
        num_layers=num_layers,
        size_per_head=config.size_per_head,
        mlp_ratio=config.mlp_ratio,
        rotary_hsize=config.rotary_hsize,
        rotary_variant=config.rotary_variant,
        add_cls_token=add_cls_token,
        dtype=_dtype(config),
        name=name,
    )


def _dtype(config: ReserveConfig) -> Any:
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def _attention_pool(config: ReserveConfig, groups: Array) -> Array:
    """groups [N, k, H] -> [N, H]: attention with the mean of each group as the query (`seq_attnpool`)."""
    pooled = nn.MultiHeadDotProductAttention(
        num_heads=config.num_heads, dtype=_dtype(config), deterministic=True, name="seq_attnpool"
    )(groups.mean(-2, keepdims=True), groups, groups)
    return pooled[:, 0]


# ----------------------------------------------------------------------------------------------------
# Encoders


class VisionEncoder(nn.Module):
    """Frames as patches [N, grid_h * grid_w, P*P*3] -> {"cls": [N, H], "seq": [N, hw, H],
    "seq_attnpool": [N, hw / r^2, H]} (each r x r block of patches attention-pooled to one token)."""

    config: ReserveConfig

    @nn.compact
    def __call__(self, patches: Array) -> dict[str, Array]:
        c, v = self.config, self.config.vision
        n, hw, pp3 = patches.shape
        if hw != v.num_patches or pp3 != 3 * v.patch_size**2:
            raise ValueError(
                f"images must be [N, {v.num_patches}, {3 * v.patch_size**2}] (grid {v.output_grid}, "
                f"patch {v.patch_size}), got {patches.shape}"
            )
        x = nn.Dense(c.hidden_size, dtype=_dtype(c), kernel_init=kernel_init, name="embedding")(patches)
        gh, gw = v.output_grid
        out = _encoder(c, v.num_layers, True, "transformer")(x, rotary_coordinates_2d(gh, gw))
        r = v.pooling_ratio
        blocks = out["seq"].reshape(n * gh // r, r, gw // r, r, c.hidden_size).swapaxes(-4, -3)
        pooled = _attention_pool(c, blocks.reshape(-1, r * r, c.hidden_size))
        return {**out, "seq_attnpool": pooled.reshape(n, v.tokens_per_frame, c.hidden_size)}


class AudioEncoder(nn.Module):
    """Spectrogram sub-segments [N, seq_length, num_mels + 1] -> {"cls": [N, H], "seq", "seq_attnpool":
    [N, token_length, H]}."""

    config: ReserveConfig

    @nn.compact
    def __call__(self, spectrogram: Array) -> dict[str, Array]:
        c, a = self.config, self.config.audio
        n, length, features = spectrogram.shape
        if length != a.seq_length or features != a.num_features:
            raise ValueError(
                f"audio clips must be [N, {a.seq_length}, {a.num_features}] (mels + playback speed), "
                f"got {spectrogram.shape}"
            )
        x = nn.Conv(
            c.hidden_size,
            kernel_size=(a.patch_size,),
            strides=(a.patch_size,),
            dtype=_dtype(c),
            kernel_init=kernel_init,
            name="embedding",
        )(spectrogram)
        tokens = length // a.patch_size
        coords = rotary_coordinates(tokens)[:, None] / tokens
        out = _encoder(c, a.num_layers, True, "transformer")(x, coords)
        pooled = _attention_pool(c, out["seq"].reshape(-1, a.pooling_ratio, c.hidden_size))
        return {**out, "seq_attnpool": pooled.reshape(n, a.token_length, c.hidden_size)}


class SpanEncoder(nn.Module):
    """Embedded text spans [N, L, H] with validity [N, L] -> [N, H] (the CLS projection)."""

    config: ReserveConfig

    @nn.compact
    def __call__(self, x: Array, is_valid: Array) -> Array:
        c = self.config
        length = x.shape[-2]
        if length > c.span.max_length:
            raise ValueError(f"text spans have {length} tokens; span.max_length is {c.span.max_length}")
        # not centred: most spans are short. Scaled by max_length + 1, as upstream (max_len 16).
        coords = rotary_coordinates(length, center_origin=False)[:, None] / (c.span.max_length + 1)
        return _encoder(c, c.span.num_layers, True, "transformer")(x, coords, is_valid=is_valid)["cls"]


class TokenEmbedder(nn.Module):
    """Embeds several token arrays with one table (`Embed_0`), keeping each one's shape."""

    config: ReserveConfig

    @nn.compact
    def __call__(self, tokens: dict[str, Array]) -> dict[str, Array]:
        c = self.config
        init = nn.initializers.normal(0.02) if c.hidden_size <= 768 else nn.initializers.xavier_uniform()
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=_dtype(c), embedding_init=init)
        keys = sorted(tokens)
        flat = jnp.concatenate([tokens[k].reshape(-1) for k in keys])
        pieces = jnp.split(embed(flat), np.cumsum([tokens[k].size for k in keys])[:-1])
        return {k: p.reshape(*tokens[k].shape, c.hidden_size) for k, p in zip(keys, pieces, strict=True)}


# ----------------------------------------------------------------------------------------------------
# The joint model


def one_hot_pool(do_pool: Array, idx: Array, values: Array, num_slots: int, rows: int | None = None):
    """Sum values[b, l] into slot idx[b, l] where do_pool (so each MASK position lands on its target).

    With `rows`, [B', L] inputs are first regrouped into `rows` rows (several sequences per example).
    Returns (pooled [rows, num_slots, H], one_hot [rows, L', num_slots]).
    """
    if rows is not None:
        do_pool = do_pool.reshape(rows, -1)
        idx = idx.reshape(rows, -1)
        values = values.reshape(rows, -1, values.shape[-1])
    one_hot = jax.nn.one_hot(jnp.where(do_pool, idx, -1), num_slots, dtype=values.dtype)
    return jnp.einsum("bls,blh->bsh", one_hot, values), one_hot


class MerlotReserve(nn.Module):
    """Shared parts of the pretraining and QA models: the encoders, the joint transformer and
    `prepare_multimodal_inputs`, which builds a joint sequence [tokens (audio spliced in); frames]."""

    config: ReserveConfig

    def setup(self) -> None:
        c = self.config
        self.vision_encoder = VisionEncoder(c)
        self.audio_encoder = AudioEncoder(c)
        self.token_encoder = TokenEmbedder(c)
        self.joint_transformer = _encoder(c, c.joint.num_layers, False, None)
        self.contrastive_scales = self.param("contrastive_scales", nn.initializers.ones, (3,))

    def prepare_multimodal_inputs(
        self,
        tokens: Array,
        token_embs: Array,
        token_segment_idx: Array | None = None,
        vision_input: Array | None = None,
        vision_segment_offset: int = 0,
        audio_spans: Array | None = None,
        audio_pointers: Array | None = None,
        padding_len: int | None = None,
        video_src_idx: Array | None = None,
    ) -> dict[str, Array]:
        """Joint-transformer inputs for B sequences.

        tokens [B, L] with embeddings [B, L, H]; every AUDIOSPAN token is replaced by the next of the
        `audio.token_length` tokens of audio span `audio_pointers[b, l]` of audio_spans [B, spans, T, H].
        vision_input [B, frames * tokens_per_frame, H] is appended after the tokens; frame f gets segment
        index f + vision_segment_offset. padding_len pads to that length. video_src_idx [B, segments]
        stops tokens of different source videos (packed into one sequence) attending to each other.
        Returns {"x": [B, L', H], "rotary_coords": [B, L', 4], "attention_mask": [B, L', L']}.
        """
        c = self.config
        b, length = tokens.shape
        x = token_embs
        if audio_spans is not None and audio_pointers is not None:
            is_audio = tokens == AUDIOSPAN
            # the k-th AUDIOSPAN token of a run takes token k of its span (spans are contiguous runs)
            sub = jnp.maximum(jnp.cumsum(is_audio.astype(jnp.int32), -1) - 1, 0) % c.audio.token_length
            audio_embs = audio_spans[jnp.arange(b)[:, None], jnp.maximum(audio_pointers, 0), sub]
            x = jnp.where(is_audio[..., None], audio_embs.astype(x.dtype), x)

        token_idx = jnp.broadcast_to(1.0 + jnp.arange(length, dtype=jnp.float32), (b, length))
        seg = None if token_segment_idx is None else token_segment_idx.astype(jnp.float32)
        coords = multimodal_rotary_coordinates(b, length, segment_idx=seg, token_idx=token_idx)
        is_valid = tokens != PADDING
        vis_segment_idx = None
        if vision_input is not None:
            v = c.vision
            hp, wp = v.output_grid[0] // v.pooling_ratio, v.output_grid[1] // v.pooling_ratio
            vis_len = vision_input.shape[1]
            frames = vis_len // (hp * wp)
            hw = jnp.tile(rotary_coordinates_2d(hp, wp), (frames, 1))
            vis_segment_idx = vision_segment_offset + jnp.repeat(jnp.arange(frames), hp * wp)
            vis_coords = multimodal_rotary_coordinates(
                b,
                vis_len,
                h=jnp.broadcast_to(hw[:, 0], (b, vis_len)),
                w=jnp.broadcast_to(hw[:, 1], (b, vis_len)),
                segment_idx=jnp.broadcast_to(vis_segment_idx.astype(jnp.float32), (b, vis_len)),
            )
            coords = jnp.concatenate([coords, vis_coords], 1)
            x = jnp.concatenate([x, vision_input.astype(x.dtype)], 1)
            is_valid = jnp.concatenate([is_valid, jnp.ones((b, vis_len), bool)], 1)

        extra = 0
        if padding_len is not None:
            extra = padding_len - x.shape[1]
            if extra < 0:
                raise ValueError(f"joint sequence has {x.shape[1]} tokens, more than seq_len {padding_len}")
            if extra:
                x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
                coords = jnp.pad(coords, ((0, 0), (0, extra), (0, 0)))
                is_valid = jnp.pad(is_valid, ((0, 0), (0, extra)))
        mask = is_valid[:, None, :] & is_valid[:, :, None]

        if video_src_idx is not None and token_segment_idx is not None:
            rows = jnp.arange(b)[:, None]
            src = [video_src_idx[rows, token_segment_idx]]
            if vis_segment_idx is not None:
                src.append(video_src_idx[rows, vis_segment_idx - vision_segment_offset])
            if extra:
                src.append(jnp.full((b, extra), -1, video_src_idx.dtype))
            src = jnp.concatenate(src, -1)
            mask &= src[:, None, :] == src[:, :, None]
        return {"x": x, "rotary_coords": coords, "attention_mask": mask}

    def joint(self, inputs: dict[str, Array]) -> Array:
        return self.joint_transformer(
            inputs["x"], inputs["rotary_coords"], attention_mask=inputs["attention_mask"]
        )["seq"]


class ReservePretrainer(MerlotReserve):
    """The pretraining model: returns the inputs of the three contrastive heads.

    Batch (upstream's pretraining layout; S segments in G groups, A audio sub-segments per segment,
    T = audio.seq_length, L = lang_seq_len, N = seq_len, K text spans, every row one video):

        images                          [B, S * grid_h * grid_w, P*P*3]
        audio_clips                     [B, S * A * T, num_mels + 1]
        audio2text, .../audio_ptr, .../text_ptr    [B, G * num_audio2text_seqs, L]
            audio as input (AUDIOSPAN tokens, audio_ptr = sub-segment of each token), MASK tokens whose
            text_ptr names the text span they hide
        text2audio, .../audio_ptr, .../text_ptr    [B, G * num_text2audio_seqs, L]
            subtitles as input, MASKAUDIO tokens whose audio_ptr names the audio sub-segment they hide
        audio_text_matching, .../audio_ptr         [B, N]  audio of each segment followed by LTOVPOOL
        random_text, random_text/text_ptr          [B, num_text_seqs, N]  text-only sequences with MASKs
        text_spans                      [B, K, span.max_length]
        video_src_index                 [B, S]  source video of each segment

    Returns {"imgs_to_audio" | "text_to_audio" | "stuff_to_span": {"x", "y"[, "y_extra"]}}: unit vectors
    scaled by sqrt(exp(log_scale)), so x.y is a temperature-scaled cosine similarity (`contrastive_loss`).
    """

    def setup(self) -> None:
        super().setup()
        self.span_encoder = SpanEncoder(self.config)
        self.head = nn.Dense(self.config.hidden_size, dtype=_dtype(self.config), kernel_init=kernel_init)

    def _split_video_src(self, video_src_idx: Array, key: Array) -> Array:
        """Randomly cut some rows in two, so that later segments do not attend to earlier ones (upstream
        `_augment_video_src_idx`: short clips become common)."""
        b, length = video_src_idx.shape
        p = self.config.video_src_split_prob
        if length == 1 or p == 0.0:
            return video_src_idx
        probs = np.array([p / (length - 1)] * (length - 1) + [1.0 - p])
        start = 1 + jax.random.choice(key, length, shape=(b,), p=probs)
        return jnp.where(start[:, None] <= jnp.arange(length), video_src_idx + 4 * length, video_src_idx)

    def __call__(self, batch: dict[str, Array], augment: bool = True) -> dict[str, dict[str, Array]]:
        c, s, a = self.config, self.config.segments, self.config.audio
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        hidden = c.hidden_size
        groups, subs = s.num_segment_groups, a.num_subsegments
        if s.seq_len < c.pretrain_seq_len:
            raise ValueError(f"segments.seq_len ({s.seq_len}) must be >= {c.pretrain_seq_len}")
        bsz = batch["images"].shape[0]
        num_segments = batch["images"].shape[1] // c.vision.num_patches
        per_group = num_segments // groups
        num_audio_spans = num_segments * subs

        imgs = self.vision_encoder(batch["images"].reshape(bsz * num_segments, c.vision.num_patches, -1))
        imgs_seq = imgs["seq_attnpool"].reshape(bsz, groups, per_group * c.vision.tokens_per_frame, hidden)
        audio = self.audio_encoder(batch["audio_clips"].reshape(bsz * num_audio_spans, a.seq_length, -1))
        audio_seq = audio["seq_attnpool"].reshape(bsz, num_audio_spans, a.token_length, hidden)
        audio_cls = audio["cls"].reshape(bsz, num_audio_spans, hidden)

        b = {}
        for k in ("text2audio", "audio2text"):
            for suffix in ("", "/audio_ptr", "/text_ptr"):
                b[k + suffix] = batch[k + suffix].reshape(-1, s.lang_seq_len)
        for k in (
            "random_text",
            "random_text/text_ptr",
            "audio_text_matching",
            "audio_text_matching/audio_ptr",
        ):
            b[k] = batch[k].reshape(-1, s.seq_len)
        b["text_spans"] = batch["text_spans"].reshape(-1, batch["text_spans"].shape[-1])
        embs = self.token_encoder(
            {
                k: b[k]
                for k in ("text2audio", "audio2text", "audio_text_matching", "text_spans", "random_text")
            }
        )

        # Randomness comes from the data, as upstream, so the model needs no rng stream.
        seed = jnp.sum(b["audio2text/text_ptr"].astype(jnp.uint32))
        k_a2t, k_t2a, k_spans = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), seed), 3)
        video_src = batch["video_src_index"].reshape(bsz, groups, per_group)

        def with_video(name: str, copies: int, key: Array, audio_input: bool) -> dict[str, Array]:
            src = jnp.tile(video_src, (1, copies, 1)).reshape(-1, per_group)
            return self.prepare_multimodal_inputs(
                tokens=b[name],
                token_embs=embs[name],
                token_segment_idx=(b[f"{name}/audio_ptr"] // subs) % per_group,
                vision_input=jnp.tile(imgs_seq, (1, copies, 1, 1)).reshape(-1, imgs_seq.shape[-2], hidden),
                audio_spans=audio_seq.repeat(groups * copies, axis=0) if audio_input else None,
                audio_pointers=b[f"{name}/audio_ptr"] if audio_input else None,
                padding_len=s.seq_len,
                video_src_idx=self._split_video_src(src, key) if augment else src,
            )

        mm = {
            "audio2text": with_video("audio2text", s.num_audio2text_seqs, k_a2t, audio_input=True),
            "text2audio": with_video("text2audio", s.num_text2audio_seqs, k_t2a, audio_input=False),
            "audio_text_matching": self.prepare_multimodal_inputs(
                tokens=b["audio_text_matching"],
                token_embs=embs["audio_text_matching"],
                token_segment_idx=jnp.cumsum((b["audio_text_matching"] == LTOVPOOL).astype(jnp.int32), -1),
                audio_spans=audio_seq,
                audio_pointers=b["audio_text_matching/audio_ptr"],
                padding_len=s.seq_len,
            ),
            "random_text": self.prepare_multimodal_inputs(
                tokens=b["random_text"], token_embs=embs["random_text"], padding_len=s.seq_len
            ),
        }
        keys = sorted(mm)
        joint_in = {
            f: jnp.concatenate([mm[k][f] for k in keys]) for f in ("x", "rotary_coords", "attention_mask")
        }
        out = self.head(self.joint(joint_in))
        sizes = np.cumsum([mm[k]["x"].shape[0] for k in keys])[:-1]
        h = dict(zip(keys, jnp.split(out, sizes), strict=True))
        h["text2audio"] = h["text2audio"][:, : s.lang_seq_len]
        h["audio2text"] = h["audio2text"][:, : s.lang_seq_len]

        # Frames <-> audio: the LTOVPOOL token after each segment's audio predicts that frame's CLS.
        is_pool = b["audio_text_matching"] == LTOVPOOL
        a2v, _ = one_hot_pool(
            is_pool, jnp.cumsum(is_pool.astype(jnp.int32), -1) - 1, h["audio_text_matching"], num_segments
        )
        a2v = a2v.reshape(bsz * num_segments, hidden)

        # Subtitles -> audio: each MASKAUDIO predicts its audio sub-segment's CLS. The masked sub-segments
        # are the targets; the others serve as extra negatives.
        t2a, t2a_oh = one_hot_pool(
            b["text2audio"] == MASKAUDIO,
            b["text2audio/audio_ptr"],
            h["text2audio"],
            num_audio_spans,
            rows=bsz,
        )
        num_targets = int(num_audio_spans * s.mask_rate) * s.num_text2audio_seqs
        order = jnp.argsort(-t2a_oh.sum(1), -1)
        rows = jnp.arange(bsz)[:, None]
        chosen, rest = order[:, :num_targets], order[:, num_targets:]
        t2a_sel = t2a[rows, chosen].reshape(-1, hidden)
        a2t_sel = audio_cls[rows, chosen].reshape(-1, hidden)
        a2t_extra = audio_cls[rows, rest].reshape(-1, hidden)

        # Masked text spans, predicted from audio2text, text2audio and random_text sequences.
        num_spans = batch["text_spans"].shape[1]
        pooled, counts = {}, {}
        for k in ("audio2text", "text2audio", "random_text"):
            pooled[k], oh = one_hot_pool(b[k] == MASK, b[f"{k}/text_ptr"], h[k], num_spans, rows=bsz)
            counts[k] = oh.sum(1)
        t2sp = pooled["audio2text"] + pooled["text2audio"] + pooled["random_text"]
        total = counts["audio2text"] + counts["text2audio"] + counts["random_text"]
        source = (
            jnp.stack(
                [jnp.zeros_like(total), counts["text2audio"], counts["audio2text"], counts["random_text"]], -1
            ).argmax(-1)
            - 1
        )
        is_valid = (b["text_spans"] != PADDING).any(-1).reshape(bsz, num_spans) & (total > 0)
        # Sample num_text_spans_to_include spans per example (over the batch) without replacement with
        # the Gumbel top-k trick, valid spans first and multimodal ones preferred.
        logits = is_valid.astype(jnp.float32) * 1e6 + np.log(c.prefer_multimodal_spans) * (
            counts["text2audio"] + counts["audio2text"]
        )
        gumbel = -jnp.log(-jnp.log(jax.random.uniform(k_spans, (bsz, num_spans), minval=1e-12, maxval=1.0)))
        n_keep = s.num_text_spans_to_include * bsz
        if n_keep > bsz * num_spans:
            raise ValueError(
                f"segments.num_text_spans_to_include ({s.num_text_spans_to_include}) > text spans ({num_spans})"
            )
        best = jax.lax.top_k((logits + gumbel).reshape(-1), n_keep)[1]
        t2sp_sel = t2sp.reshape(-1, hidden)[best]
        spans = b["text_spans"][best]
        sp2t_sel = self.span_encoder(embs["text_spans"][best], spans != PADDING)

        log_scales = jnp.minimum(self.contrastive_scales.astype(jnp.float32), c.max_log_scale)
        heads = {
            "imgs_to_audio": {"x": a2v, "y": imgs["cls"]},
            "text_to_audio": {"x": t2a_sel, "y": a2t_sel, "y_extra": a2t_extra},
            "stuff_to_span": {"x": t2sp_sel, "y": sp2t_sel},
        }
        outputs = {}
        for i, (name, vecs) in enumerate(heads.items()):
            scale = jnp.exp(log_scales[i] / 2.0)
            outputs[name] = {k: (unit_normalize(v) * scale).astype(_dtype(c)) for k, v in vecs.items()}
        outputs["stuff_to_span"]["_sources"] = source.reshape(-1)[best]
        return outputs


def contrastive_loss(
    outputs: dict[str, dict[str, Array]], axis_name: str | None = None
) -> tuple[Array, dict[str, Array]]:
    """Symmetric InfoNCE of each head: x_i must pick y_i among all y (and y_extra) of the batch, and
    y_i pick x_i; with `axis_name` (inside pmap / shard_map) the candidates come from every device.

    Returns (sum over heads, per-head losses; keys starting with "_" are diagnostics: the span loss by
    the kind of sequence the span was predicted from).
    """
    info: dict[str, Array] = {}
    for name, d in outputs.items():
        positive = (d["x"].astype(jnp.float32) * d["y"].astype(jnp.float32)).sum(-1)
        info[name] = jnp.zeros((), jnp.float32)
        sources = d.get("_sources")
        for q, k in (("x", "y"), ("y", "x")):
            cands = d[k]
            if f"{k}_extra" in d:
                cands = jnp.concatenate([cands, d[f"{k}_extra"]])
            if axis_name is not None:
                cands = jax.lax.all_gather(cands, axis_name).reshape(-1, cands.shape[-1])
            logits = jnp.einsum("lh,vh->lv", d[q], cands).astype(jnp.float32)
            per_item = jax.nn.logsumexp(logits, -1) - positive
            info[name] += per_item.mean() / 2.0
            if sources is not None:
                for i, kind in enumerate(("text2audio", "audio2text", "random_text")):
                    match = (sources == i).astype(jnp.float32)
                    key = f"_{name}_from_{kind}"
                    info[key] = info.get(key, 0.0) + (per_item * match).sum() / (match.sum() + 1e-5) / 2.0
    loss = sum(v for k, v in info.items() if not k.startswith("_"))
    return loss, info


class ReserveQA(MerlotReserve):
    """Multiple-choice QA (TVQA, Social-IQ 2.0): each answer is a joint sequence holding one MASK token;
    `proj(h[MASK])` scores it. Each example is scored twice, with the audio as input (AUDIOSPAN tokens)
    and with the subtitles as input.

    Batch (upstream's finetuning layout; S segments, A audio sub-segments, C answers, L = lang_seq_len):

        images          [B, S, grid_h * grid_w, P*P*3]
        audio_clips     [B, S, A, audio.seq_length, num_mels + 1]
        audio_seqs      [B, C, L, 2]  (token, segment index) with AUDIOSPAN runs of audio.token_length
        textonly_seqs   [B, C, L, 2]  (token, segment index) with the subtitles as text
        labels          [B]           (only for `qa_loss`)

    Segment indices count from 1: upstream prepends an empty frame 0 and then drops it.
    Returns (logits_from_audio [B, C], logits_from_text [B, C]).
    """

    def setup(self) -> None:
        super().setup()
        self.proj = nn.Dense(
            1, use_bias=False, dtype=_dtype(self.config), kernel_init=nn.initializers.normal(0.02)
        )

    def __call__(self, batch: dict[str, Array]) -> tuple[Array, Array]:
        c = self.config
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        hidden = c.hidden_size
        bsz, frames, patches, pp3 = batch["images"].shape
        _, answers, length, _ = batch["textonly_seqs"].shape
        imgs = self.vision_encoder(batch["images"].reshape(bsz * frames, patches, pp3))["seq_attnpool"]
        imgs = imgs.reshape(bsz, frames * c.vision.tokens_per_frame, hidden).repeat(answers, axis=0)

        _, segments, subs, audio_len, features = batch["audio_clips"].shape
        audio = self.audio_encoder(batch["audio_clips"].reshape(-1, audio_len, features))["seq_attnpool"]
        num_spans = segments * subs
        audio = audio.reshape(bsz, num_spans, c.audio.token_length, hidden).repeat(answers, axis=0)

        text_toks = batch["textonly_seqs"][..., 0].reshape(bsz * answers, length)
        audio_toks = batch["audio_seqs"][..., 0].reshape(bsz * answers, length)
        # audio spans are consumed in order: the n-th run of AUDIOSPAN tokens is sub-segment n
        pointers = (jnp.cumsum((audio_toks == AUDIOSPAN).astype(jnp.int32), -1) - 1) // c.audio.token_length
        embs = self.token_encoder({"audio": audio_toks, "text": text_toks})
        inputs = [
            self.prepare_multimodal_inputs(
                tokens=audio_toks,
                token_embs=embs["audio"],
                token_segment_idx=batch["audio_seqs"][..., 1].reshape(bsz * answers, length),
                vision_input=imgs,
                vision_segment_offset=1,
                audio_spans=audio,
                audio_pointers=pointers % num_spans,
            ),
            self.prepare_multimodal_inputs(
                tokens=text_toks,
                token_embs=embs["text"],
                token_segment_idx=batch["textonly_seqs"][..., 1].reshape(bsz * answers, length),
                vision_input=imgs,
                vision_segment_offset=1,
            ),
        ]
        joint_in = {
            f: jnp.concatenate([i[f] for i in inputs]) for f in ("x", "rotary_coords", "attention_mask")
        }
        h = self.joint(joint_in)[:, :length]
        at_mask = jnp.argmax(jnp.concatenate([audio_toks, text_toks]) == MASK, axis=1)
        logits = self.proj(h[jnp.arange(h.shape[0]), at_mask])[:, 0].astype(jnp.float32)
        from_audio, from_text = jnp.split(logits, 2)
        return from_audio.reshape(bsz, answers), from_text.reshape(bsz, answers)


def qa_loss(
    logits_from_audio: Array, logits_from_text: Array, labels: Array
) -> tuple[Array, dict[str, Array]]:
    """CE(audio) + CE(text), as upstream; with accuracies of each variant and of the joint prediction."""
    ce_audio = -jnp.take_along_axis(jax.nn.log_softmax(logits_from_audio), labels[:, None], 1).mean()
    ce_text = -jnp.take_along_axis(jax.nn.log_softmax(logits_from_text), labels[:, None], 1).mean()
    preds = qa_predict(logits_from_audio, logits_from_text)
    info = {
        "loss_audio": ce_audio,
        "loss_text": ce_text,
        "acc_audio": (preds["audio"] == labels).mean(),
        "acc_text": (preds["text"] == labels).mean(),
        "acc_joint": (preds["joint"] == labels).mean(),
    }
    return ce_audio + ce_text, info


def qa_predict(logits_from_audio: Array, logits_from_text: Array) -> dict[str, Array]:
    """Answer indices from the audio variant, the text variant and "joint" (argmax of summed softmaxes)."""
    joint = jax.nn.softmax(logits_from_audio) + jax.nn.softmax(logits_from_text)
    return {
        "audio": logits_from_audio.argmax(-1),
        "text": logits_from_text.argmax(-1),
        "joint": joint.argmax(-1),
    }


def build_model(config: ReserveConfig) -> nn.Module:
    """`ReserveQA` when config.num_answers > 0 (finetuning), else `ReservePretrainer`."""
    return ReserveQA(config) if config.num_answers else ReservePretrainer(config)


__all__ = [
    "MerlotReserve",
    "ReservePretrainer",
    "ReserveQA",
    "apply_rotary",
    "build_model",
    "contrastive_loss",
    "example_pretrain_batch",
    "example_qa_batch",
    "qa_loss",
    "qa_predict",
    "rotary_sinusoids",
]


# ----------------------------------------------------------------------------------------------------
# Example batches (shapes and token layout of the real ones; random content). For tests and shape-only
# initialization; the data pipeline writes real ones.


def example_pretrain_batch(
    config: ReserveConfig, batch_size: int = 2, seed: int = 0
) -> dict[str, np.ndarray]:
    """A random pretraining batch in `ReservePretrainer`'s layout, with every kind of target present."""
    c, s, a = config, config.segments, config.audio
    rng = np.random.default_rng(seed)
    S, G, A, L, N = s.num_segments, s.num_segment_groups, a.num_subsegments, s.lang_seq_len, s.seq_len
    per_group, run = S // G, a.token_length
    num_spans = max(2 * s.num_text_spans_to_include, 4)
    first_word = LTOVPOOL + 4  # ids below are special tokens

    def words(n: int) -> list[int]:
        return rng.integers(first_word, c.vocab_size, n).tolist()

    def pad(rows: list[list[tuple[int, int, int]]], length: int) -> tuple[np.ndarray, ...]:
        out = np.zeros((len(rows), length, 3), np.int32)
        for i, row in enumerate(rows):
            row = row[:length]
            out[i, : len(row)] = row
        return out[..., 0], out[..., 1], out[..., 2]  # tokens, audio_ptr, text_ptr

    batch: dict[str, list] = {k: [] for k in ("a2t", "t2a", "atm", "rt", "spans")}
    num_targets = int(S * A * s.mask_rate) * s.num_text2audio_seqs
    for _ in range(batch_size):
        masked_audio = set(rng.choice(S * A, num_targets, replace=False).tolist())
        a2t, t2a = [], []
        for _copy in range(max(s.num_audio2text_seqs, s.num_text2audio_seqs)):
            for g in range(G):
                row_a2t, row_t2a = [], []
                for seg in range(g * per_group, (g + 1) * per_group):
                    for sub in range(A):
                        ptr = seg * A + sub
                        if rng.random() < 0.5:  # audio as input
                            row_a2t += [(AUDIOSPAN, ptr, 0)] * run
                        else:  # a masked text span, predicted from the audio around it
                            row_a2t.append((MASK, ptr, int(rng.integers(num_spans))))
                        if ptr in masked_audio:
                            row_t2a.append((MASKAUDIO, ptr, 0))
                        else:
                            row_t2a += [(w, ptr, 0) for w in words(1)]
                            row_t2a.append((MASK, ptr, int(rng.integers(num_spans))))
                a2t.append(row_a2t)
                t2a.append(row_t2a)
        batch["a2t"].append(pad(a2t[: G * s.num_audio2text_seqs], L))
        batch["t2a"].append(pad(t2a[: G * s.num_text2audio_seqs], L))
        atm = []
        for seg in range(S):
            for sub in range(A):
                atm += [(AUDIOSPAN, seg * A + sub, 0)] * run
            atm.append((LTOVPOOL, 0, 0))
        batch["atm"].append(pad([atm], N))
        rt = [
            [
                (MASK, 0, int(rng.integers(num_spans))) if rng.random() < 0.2 else (w, 0, 0)
                for w in words(N - 2)
            ]
            for _ in range(s.num_text_seqs)
        ]
        batch["rt"].append(pad(rt, N))
        spans = np.zeros((num_spans, c.span.max_length), np.int32)
        for i in range(num_spans):
            n = int(rng.integers(1, c.span.max_length + 1))
            spans[i, :n] = words(n)
        batch["spans"].append(spans)

    def stack(key: str, part: int) -> np.ndarray:
        return np.stack([x[part] for x in batch[key]])

    v = c.vision
    return {
        "images": rng.standard_normal((batch_size, S * v.num_patches, 3 * v.patch_size**2), np.float32),
        "audio_clips": rng.standard_normal((batch_size, S * A * a.seq_length, a.num_features), np.float32),
        "audio2text": stack("a2t", 0),
        "audio2text/audio_ptr": stack("a2t", 1),
        "audio2text/text_ptr": stack("a2t", 2),
        "text2audio": stack("t2a", 0),
        "text2audio/audio_ptr": stack("t2a", 1),
        "text2audio/text_ptr": stack("t2a", 2),
        "audio_text_matching": stack("atm", 0)[:, 0],
        "audio_text_matching/audio_ptr": stack("atm", 1)[:, 0],
        "random_text": stack("rt", 0),
        "random_text/text_ptr": stack("rt", 2),
        "text_spans": np.stack(batch["spans"]),
        "video_src_index": np.zeros((batch_size, S), np.int32),
    }


def example_qa_batch(config: ReserveConfig, batch_size: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A random QA batch in `ReserveQA`'s layout: question, MASK, answer, then per segment (indices from
    1) the audio (AUDIOSPAN runs) or the subtitles."""
    c, s, a = config, config.segments, config.audio
    rng = np.random.default_rng(seed)
    S, A, L, C = s.num_segments, a.num_subsegments, s.lang_seq_len, config.num_answers
    first_word = LTOVPOOL + 4

    def words(n: int) -> list[int]:
        return rng.integers(first_word, c.vocab_size, n).tolist()

    audio_seqs = np.zeros((batch_size, C, L, 2), np.int32)
    text_seqs = np.zeros((batch_size, C, L, 2), np.int32)
    for b in range(batch_size):
        question = words(3)
        subtitles = [words(2) for _ in range(S)]
        for k in range(C):
            prefix = [(w, 0) for w in question] + [(MASK, 0)] + [(w, 0) for w in words(2)]
            audio = prefix + [(AUDIOSPAN, seg + 1) for seg in range(S) for _ in range(A * a.token_length)]
            text = prefix + [(w, seg + 1) for seg in range(S) for w in subtitles[seg]]
            audio_seqs[b, k, : min(L, len(audio))] = audio[:L]
            text_seqs[b, k, : min(L, len(text))] = text[:L]
    v = c.vision
    return {
        "images": rng.standard_normal((batch_size, S, v.num_patches, 3 * v.patch_size**2), np.float32),
        "audio_clips": rng.standard_normal((batch_size, S, A, a.seq_length, a.num_features), np.float32),
        "audio_seqs": audio_seqs,
        "textonly_seqs": text_seqs,
        "labels": rng.integers(0, C, batch_size).astype(np.int32),
    }
