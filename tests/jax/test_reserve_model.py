"""MERLOT Reserve model (JAX/Flax) on tiny CPU models; base and large only as shapes (jax.eval_shape)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers.reserve.config import ReserveConfig
from trainers.reserve.model import (
    ReservePretrainer,
    ReserveQA,
    apply_rotary,
    contrastive_loss,
    example_pretrain_batch,
    example_qa_batch,
    qa_loss,
    qa_predict,
    rotary_sinusoids,
)
from trainers.reserve.weights import load_params, save_params

TINY = ReserveConfig.preset("tiny")
TINY_QA = ReserveConfig.from_dict(
    {"num_answers": 3, "segments": {"num_segments": 2, "num_segment_groups": 1, "lang_seq_len": 24}}, TINY
)
# Built by ReserveQA but unused by its forward pass (kept so upstream's finetuned checkpoints load).
QA_UNUSED = {
    "contrastive_scales",
    "vision_encoder/transformer/cls_proj/kernel",
    "vision_encoder/transformer/cls_proj/bias",
    "audio_encoder/transformer/cls_proj/kernel",
    "audio_encoder/transformer/cls_proj/bias",
}


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    """These tests are dominated by XLA compile time on CPU; unoptimized code halves it."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def flat(tree) -> dict[str, jax.Array]:
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.fixture(scope="module")
def pretrain():
    model = ReservePretrainer(TINY)
    batch = example_pretrain_batch(TINY, batch_size=2)
    init = jax.jit(model.init)
    params = init(jax.random.PRNGKey(0), batch)["params"]

    def loss_fn(p, b):
        return contrastive_loss(model.apply({"params": p}, b))

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    return jax.jit(model.apply), batch, init, params, grad_fn


@pytest.fixture(scope="module")
def qa():
    model = ReserveQA(TINY_QA)
    batch = example_qa_batch(TINY_QA, batch_size=2)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]

    def loss_fn(p, b):
        return qa_loss(*model.apply({"params": p}, b), b["labels"])

    return jax.jit(model.apply), batch, params, jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def test_pretraining_loss_is_finite_and_every_parameter_learns(pretrain):
    _, batch, _, params, grad_fn = pretrain
    (loss, info), grads = grad_fn(params, batch)
    assert np.isfinite(float(loss))
    assert set(info) >= {"imgs_to_audio", "text_to_audio", "stuff_to_span"}
    # the InfoNCE of a head is at most log(#candidates) + the scale spread; at init it is near log(n)
    assert all(0.0 < float(info[k]) < 10.0 for k in ("imgs_to_audio", "text_to_audio", "stuff_to_span"))
    bad = [k for k, g in flat(grads).items() if not (np.all(np.isfinite(g)) and np.any(g != 0))]
    assert bad == []


def test_pretraining_heads_pair_what_upstream_pairs(pretrain):
    apply, batch, _, params, _ = pretrain
    out = apply({"params": params}, batch)
    s, a = TINY.segments, TINY.audio
    n_frames = 2 * s.num_segments
    assert out["imgs_to_audio"]["x"].shape == out["imgs_to_audio"]["y"].shape == (n_frames, TINY.hidden_size)
    targets = 2 * int(s.num_segments * a.num_subsegments * s.mask_rate)
    assert out["text_to_audio"]["x"].shape == (targets, TINY.hidden_size)
    assert out["text_to_audio"]["y_extra"].shape[0] == 2 * s.num_segments * a.num_subsegments - targets
    assert out["stuff_to_span"]["x"].shape == (2 * s.num_text_spans_to_include, TINY.hidden_size)
    # vectors are unit norm times sqrt(exp(log_scale)), log_scale initialized to 1
    norms = jnp.linalg.norm(out["stuff_to_span"]["y"], axis=-1)
    np.testing.assert_allclose(norms, np.exp(0.5), rtol=1e-3)


def test_qa_model_scores_every_answer_twice_and_learns(qa):
    apply, batch, params, grad_fn = qa
    assert set(params) == {"vision_encoder", "audio_encoder", "token_encoder", "joint_transformer"} | {
        "proj",
        "contrastive_scales",
    }
    from_audio, from_text = apply({"params": params}, batch)
    assert from_audio.shape == from_text.shape == (2, TINY_QA.num_answers)
    assert not np.allclose(from_audio, from_text)  # the audio and subtitle variants differ
    (loss, info), grads = grad_fn(params, batch)
    np.testing.assert_allclose(loss, info["loss_audio"] + info["loss_text"], rtol=1e-6)
    assert np.isfinite(float(loss))
    bad = [k for k, g in flat(grads).items() if not (np.all(np.isfinite(g)) and np.any(g != 0))]
    assert set(bad) == QA_UNUSED


def test_qa_joint_prediction_sums_softmaxes():
    audio = jnp.array([[2.0, 0.0, 0.0]])  # audio sure of 0
    text = jnp.array([[0.0, 1.0, 1.1]])  # text unsure between 1 and 2
    preds = qa_predict(audio, text)
    assert (int(preds["audio"][0]), int(preds["text"][0]), int(preds["joint"][0])) == (0, 2, 0)


def test_standard_rotary_depends_only_on_relative_position():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 16)).astype(np.float32)  # [L=1, heads=1, d=16]

    def score(pq, pk):
        coords = jnp.array([[pq], [pk]], jnp.float32)  # two positions on one axis
        sin = rotary_sinusoids(coords, rotary_hsize=8)
        qr = apply_rotary(jnp.asarray(q), sin[:, :1], "standard")
        kr = apply_rotary(jnp.asarray(k), sin[:, 1:], "standard")
        return float((qr * kr).sum())

    for shift in (0.37, 1.0, -2.5):
        np.testing.assert_allclose(score(0.3, 0.1), score(0.3 + shift, 0.1 + shift), rtol=1e-5, atol=1e-5)
    assert abs(score(0.3, 0.1) - score(0.3, 0.6)) > 1e-3  # but it does depend on the offset
    # dims past rotary_hsize pass through; a 2-axis coordinate works the same way
    sin = rotary_sinusoids(jnp.array([[0.2, -0.4]]), rotary_hsize=8)
    out = apply_rotary(jnp.asarray(q), sin, "standard")
    np.testing.assert_array_equal(out[..., 8:], q[..., 8:])
    np.testing.assert_allclose(jnp.linalg.norm(out), np.linalg.norm(q), rtol=1e-5)  # a rotation


def test_upstream_rotary_reproduces_upstream_formula():
    """mreserve.modeling.apply_rotary scales x_2i by (sin - cos) and x_2i+1 by (sin + cos)."""
    x = jnp.arange(1.0, 9.0).reshape(1, 1, 8)
    sin = rotary_sinusoids(jnp.array([[0.25]]), rotary_hsize=4)
    cos_t, sin_t = np.asarray(sin[0, 0]), np.asarray(sin[1, 0])
    out = np.asarray(apply_rotary(x, sin, "upstream"))[0, 0]
    expect = np.asarray(x[0, 0]).copy()
    expect[0:4:2] *= sin_t[0:4:2] - cos_t[0:4:2]
    expect[1:4:2] *= sin_t[1:4:2] + cos_t[1:4:2]
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)


def test_same_key_same_model_other_key_other_model(pretrain):
    apply, batch, init, params, _ = pretrain
    again = init(jax.random.PRNGKey(0), batch)["params"]
    other = init(jax.random.PRNGKey(1), batch)["params"]
    a, b, o = flat(params), flat(again), flat(other)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head/kernel"], o["head/kernel"])
    out1 = apply({"params": params}, batch)["stuff_to_span"]["x"]
    out2 = apply({"params": params}, batch)["stuff_to_span"]["x"]
    np.testing.assert_array_equal(out1, out2)


def _shapes(config: ReserveConfig) -> dict[str, tuple[int, ...]]:
    if config.num_answers:
        model, batch = ReserveQA(config), example_qa_batch(config, batch_size=1)
    else:
        model, batch = ReservePretrainer(config), example_pretrain_batch(config, batch_size=1)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"]
    return {k: tuple(v.shape) for k, v in flat(shapes).items()}


def test_base_parameter_tree_matches_upstream_names():
    shapes = _shapes(ReserveConfig.preset("base"))
    assert {k.split("/")[0] for k in shapes} == {
        "vision_encoder",
        "audio_encoder",
        "token_encoder",
        "span_encoder",
        "joint_transformer",
        "head",
        "contrastive_scales",
    }
    expected = {
        "vision_encoder/embedding/kernel": (768, 768),
        "vision_encoder/transformer/cls": (768,),
        "vision_encoder/transformer/pre_ln/scale": (768,),
        "vision_encoder/transformer/layer_11/attention_layer/qkv/kernel": (768, 36, 64),
        "vision_encoder/transformer/layer_11/attention_layer/attn_proj/kernel": (12, 64, 768),
        "vision_encoder/transformer/layer_00/pre_mlp_ln/bias": (768,),
        "vision_encoder/transformer/layer_00/mlp_layer/intermediate/kernel": (768, 3072),
        "vision_encoder/transformer/layer_00/mlp_layer/out/kernel": (3072, 768),
        "vision_encoder/transformer/final_ln/scale": (768,),
        "vision_encoder/transformer/cls_proj/kernel": (768, 768),
        "vision_encoder/seq_attnpool/query/kernel": (768, 12, 64),
        "vision_encoder/seq_attnpool/out/kernel": (12, 64, 768),
        "audio_encoder/embedding/kernel": (2, 65, 768),
        "audio_encoder/transformer/layer_11/pre_attn_ln/scale": (768,),
        "token_encoder/Embed_0/embedding": (32768, 768),
        "span_encoder/transformer/layer_03/attention_layer/qkv/bias": (36, 64),
        "joint_transformer/layer_11/mlp_layer/intermediate/bias": (3072,),
        "joint_transformer/final_ln/bias": (768,),
        "head/kernel": (768, 768),
        "contrastive_scales": (3,),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    # no bias where upstream has none; no 12th vision layer index past 11; no position table (rotary)
    assert "vision_encoder/transformer/layer_00/mlp_layer/out/bias" not in shapes
    assert "vision_encoder/transformer/layer_00/attention_layer/attn_proj/bias" not in shapes
    assert not any("layer_12" in k or k.endswith("/pe") for k in shapes)
    assert not any(k.startswith("joint_transformer/cls") for k in shapes)


def test_large_and_finetuning_trees():
    large = _shapes(ReserveConfig.preset("large"))
    assert large["joint_transformer/layer_23/attention_layer/qkv/kernel"] == (1024, 48, 64)
    assert large["vision_encoder/transformer/layer_23/pre_mlp_ln/scale"] == (1024,)
    assert "audio_encoder/transformer/layer_11/pre_ln/scale" not in large  # audio keeps 12 layers
    assert "audio_encoder/transformer/layer_12/pre_attn_ln/scale" not in large
    siq2 = _shapes(ReserveConfig.preset("base", task="siq2"))
    tops = {k.split("/")[0] for k in siq2}
    assert "head" not in tops and "span_encoder" not in tops
    assert siq2["proj/kernel"] == (768, 1) and "proj/bias" not in siq2


def test_fp16_checkpoint_loads_into_float32_model(tmp_path, pretrain):
    _, _, _, params, _ = pretrain
    path = tmp_path / "ckpt_7"
    save_params(path, jax.device_get(params))  # float16 on disk, as upstream
    fresh = jax.tree_util.tree_map(jnp.zeros_like, params)
    loaded, report = load_params(tmp_path, fresh)  # a directory: newest ckpt_<step>
    assert report.ok, str(report)
    assert report.loaded == report.total == len(flat(params))
    for k, v in flat(loaded).items():
        assert v.dtype == jnp.float32
        np.testing.assert_array_equal(v, np.asarray(flat(params)[k]).astype(np.float16).astype(np.float32))


def test_pretrained_tree_into_qa_model_drops_pretraining_parts(pretrain, qa):
    _, _, _, pre_params, _ = pretrain
    _, _, qa_params, _ = qa
    # same encoders apart from the frame count, which no parameter depends on
    loaded, report = load_params({"params": jax.device_get(pre_params)}, qa_params)
    assert report.ok, str(report)
    assert any("dropped head" in a for a in report.adapted)
    assert any("dropped span_encoder" in a for a in report.adapted)
    assert any(a.startswith("proj/kernel") for a in report.adapted)
    np.testing.assert_array_equal(loaded["proj"]["kernel"], qa_params["proj"]["kernel"])


def test_bogus_missing_and_misshapen_leaves_are_reported(pretrain):
    _, _, _, params, _ = pretrain
    tree = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    tree = {**tree, "joint_transformer": dict(tree["joint_transformer"])}
    tree["joint_transformer"]["bogus"] = {"kernel": np.zeros((2, 2), np.float16)}
    tree["head"] = {"kernel": tree["head"]["kernel"], "bias": np.zeros(7, np.float16)}  # wrong shape
    del tree["contrastive_scales"]
    loaded, report = load_params(tree, params)
    assert not report.ok
    assert report.unexpected == ["joint_transformer/bogus/kernel"]
    assert report.missing == ["contrastive_scales"]
    assert report.mismatched == ["head/bias: checkpoint (7,) vs model (32,)"]
    assert report.loaded == report.total - 2
    np.testing.assert_array_equal(loaded["head"]["bias"], params["head"]["bias"])  # kept the model's
    assert "bogus" in str(report) or "unexpected" in str(report)
