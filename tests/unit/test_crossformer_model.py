"""The crossformer model on its tiny config (CPU, a few seconds in all)."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.models.vit_mae.modeling_vit_mae import get_2d_sincos_pos_embed  # noqa: E402

from trainers.crossformer.config import (  # noqa: E402
    MODEL_PRESETS,
    UPSTREAM_LOSS_WEIGHTS,
    CrossformerConfig,
    LossWeights,
)
from trainers.crossformer.model import (  # noqa: E402
    Crossformer,
    sincos_2d,
    tube_mask,
    tube_num_masked,
    vtm_shuffle,
)

B, L = 4, 12


def _model(seed: int = 0, **overrides) -> Crossformer:
    torch.manual_seed(seed)
    return Crossformer(CrossformerConfig.preset("tiny", **overrides))


def _batch(cfg: CrossformerConfig, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, a, v = cfg.text, cfg.audio, cfg.video
    ids = torch.randint(5, t.vocab_size, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = t.cls_token_id, t.sep_token_id
    mask = torch.ones(B, L, dtype=torch.long)
    ids[0, 8:], mask[0, 8:] = t.pad_token_id, 0  # one padded caption
    return {
        "text_ids": ids,
        "text_mask": mask,
        "audio": torch.randn(B, a.num_channels, a.num_mel_bins, a.target_length, generator=g),
        "video": torch.randn(B, v.num_frames, 3, v.image_size, v.image_size, generator=g),
    }


def _fixed_inputs(model: Crossformer, batch: dict, seed: int = 2) -> dict:
    """Masks, MLM labels and shuffle drawn once, so two forwards see the same ones."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = model.mask_tokens(batch["text_ids"], batch["text_mask"], generator=g)
    order, _ = vtm_shuffle(B, model.config.vt_match_ratio, generator=g)
    return {
        **batch,
        "text_ids": ids,
        "mlm_labels": labels,
        "video_mask": model.make_video_mask(B, generator=g),
        "audio_mask": model.make_audio_mask(B, generator=g),
        "video_order": order,
    }


def _assert_every_parameter_learns(model: Crossformer, losses: dict) -> None:
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, missing


def test_tiny_model_is_small() -> None:
    n = sum(p.numel() for p in _model().parameters())
    assert n < 2_000_000, n


def test_forward_backward_gives_every_parameter_a_gradient() -> None:
    model = _model()
    losses = model(**_batch(model.config))
    assert set(losses) == {"audio_mae", "text_mlm", "video_mae", "vtm", "contrastive"}
    _assert_every_parameter_learns(model, losses)


@pytest.mark.parametrize(
    "overrides",
    [
        {"contrastive_loss_before_fusion": True},
        {"use_t_cls_to_vt_m": False},
        {"video": {"mask_same_for_batch": True}},
        {"text": {"hidden_size": 48, "num_heads": 2}},  # widths differ: projections to and from fusion
    ],
    ids=["contrastive-before-fusion", "fusion-cls", "one-video-mask", "projections"],
)
def test_variants_train_every_parameter(overrides: dict) -> None:
    model = _model(**overrides)
    _assert_every_parameter_learns(model, model(**_batch(model.config)))


def test_a_zero_weight_drops_its_loss_and_head() -> None:
    model = _model(loss_weight={"audio_mae": 0.0, "vtm": 0.0})
    assert model.audio.decoder is None and model.vtm_head is None and "audio" not in model.from_fusion
    losses = model(**_batch(model.config))
    assert set(losses) == {"text_mlm", "video_mae", "contrastive"}
    _assert_every_parameter_learns(model, losses)


def test_outputs_named_by_the_seed() -> None:
    model = _model().eval()
    cfg = model.config
    out = model(**_fixed_inputs(model, _batch(cfg)), return_outputs=True)
    n_audio = (cfg.audio.num_mel_bins // 8) * (cfg.audio.target_length // 8)
    n_video_masked = (cfg.video.num_frames // cfg.video.tubelet_size) * tube_num_masked(16, 0.8)
    assert out.mask_logits["audio"].shape == (B, n_audio, 8 * 8 * 1)
    assert out.mask_logits["text"].shape == (B, L, cfg.text.vocab_size)
    assert out.mask_logits["video"].shape == (B, n_video_masked, 2 * 8 * 8 * 3)
    assert out.vt_cls_token.shape == (B, cfg.fusion.hidden_size)
    assert out.vtm_logits.shape == (B, 2)


def test_same_seed_same_model_and_losses() -> None:
    a, b = _model(seed=3), _model(seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    batch = _batch(a.config)
    torch.manual_seed(7)
    first = a(**batch)
    torch.manual_seed(7)
    second = b(**batch)
    assert {k: v.item() for k, v in first.items()} == {k: v.item() for k, v in second.items()}
    assert not torch.equal(
        _model(seed=4).fusion.modality_embeddings.weight, a.fusion.modality_embeddings.weight
    )


@torch.no_grad()
def test_mlm_loss_is_zero_when_no_token_is_masked() -> None:
    model = _model().eval()
    inputs = _fixed_inputs(model, _batch(model.config))
    assert (inputs["mlm_labels"] != -100).any()
    assert float(model(**inputs)["text_mlm"]) > 0
    inputs["mlm_labels"] = torch.full_like(inputs["mlm_labels"], -100)
    assert float(model(**inputs)["text_mlm"]) == 0.0


def test_mask_tokens_never_masks_special_or_padding_tokens() -> None:
    model = _model()
    batch = _batch(model.config)
    g = torch.Generator().manual_seed(0)
    _, labels = model.mask_tokens(
        batch["text_ids"].repeat(50, 1), batch["text_mask"].repeat(50, 1), generator=g
    )
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS], [SEP]
    assert not chosen[0::B, 8:].any()  # the padded caption's padding
    assert 0.2 < chosen[:, 1:-1].float().mean() < 0.4  # mlm_probability 0.3


@torch.no_grad()
def test_reconstruction_losses_follow_their_targets() -> None:
    """Changing only the MASKED pixels leaves what the encoders see unchanged and moves the loss."""
    model = _model().eval()
    inputs = _fixed_inputs(model, _batch(model.config))
    before = model(**inputs)

    video = inputs["video"].clone()  # (B, T, C, H, W); token = tubelet * 16 + row * 4 + col
    mask = inputs["video_mask"][:, :16].reshape(B, 4, 4)
    pixels = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None, None]  # (B, 1, 1, H, W)
    video = torch.where(pixels, video * 3.0 + 1.0, video)
    moved = model(**{**inputs, "video": video})
    assert float(moved["video_mae"]) != pytest.approx(float(before["video_mae"]))
    assert float(moved["audio_mae"]) == pytest.approx(float(before["audio_mae"]))
    assert float(moved["text_mlm"]) == pytest.approx(float(before["text_mlm"]))

    audio = inputs["audio"].clone()  # (B, 1, 16, 64): 2 x 8 patches of 8 x 8
    mask = inputs["audio_mask"].reshape(B, 2, 8)
    pixels = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    audio = torch.where(pixels, audio + 5.0, audio)
    moved = model(**{**inputs, "audio": audio})
    assert float(moved["audio_mae"]) > float(before["audio_mae"])
    assert float(moved["video_mae"]) == pytest.approx(float(before["video_mae"]))


@torch.no_grad()
def test_vtm_labels_follow_the_shuffle() -> None:
    model = _model().eval()
    inputs = _fixed_inputs(model, _batch(model.config))
    order = torch.tensor([0, 2, 1, 3])
    out = model(**{**inputs, "video_order": order}, return_outputs=True)
    assert out.vtm_labels.tolist() == [1, 0, 0, 1]
    assert torch.equal(out.video_order, order)
    # the fused video rows are the shuffled videos: their masks travel with them
    assert torch.equal(out.video_mask, inputs["video_mask"][order])
    aligned = model(**{**inputs, "video_order": torch.arange(B)}, return_outputs=True)
    assert aligned.vtm_labels.tolist() == [1, 1, 1, 1]
    assert float(aligned.losses["vtm"]) != pytest.approx(float(out.losses["vtm"]))


@pytest.mark.parametrize(
    ("batch", "ratio", "negatives"), [(4, 0.5, 2), (8, 0.5, 4), (5, 0.0, 5), (4, 1.0, 0)]
)
def test_vtm_shuffle_makes_the_configured_number_of_negatives(
    batch: int, ratio: float, negatives: int
) -> None:
    for seed in range(20):
        order, labels = vtm_shuffle(batch, ratio, generator=torch.Generator().manual_seed(seed))
        assert sorted(order.tolist()) == list(range(batch))  # a permutation of the batch
        assert torch.equal(labels, (order == torch.arange(batch)).long())
        assert int((labels == 0).sum()) == negatives


@torch.no_grad()
def test_contrastive_loss_uses_the_shuffled_pairs() -> None:
    model = _model()
    feats = torch.nn.functional.normalize(torch.randn(B, 16), dim=-1)
    order = torch.tensor([1, 0, 2, 3])
    # video row i belongs to text order[i]: aligned features give a low loss, misaligned ones a high one
    low = model.contrastive_loss(feats, feats[order], order)
    high = model.contrastive_loss(feats, feats, order)
    assert float(low) < float(high)
    scale = model.logit_scale.exp()
    expected = (
        torch.nn.functional.cross_entropy(scale * feats @ feats[order].t(), order)
        + torch.nn.functional.cross_entropy(scale * feats[order] @ feats.t(), torch.tensor([1, 0, 2, 3]))
    ) / 2
    assert float(low) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("same_for_batch", [False, True])
def test_tube_mask_hides_the_same_patches_in_every_tubelet(same_for_batch: bool) -> None:
    g = torch.Generator().manual_seed(0)
    mask = tube_mask(
        8, num_frames=16, tubelet_size=2, grid=14, ratio=0.8, same_for_batch=same_for_batch, generator=g
    )
    assert mask.shape == (8, 8 * 196) and mask.dtype == torch.bool
    per_tubelet = mask.reshape(8, 8, 196)
    assert (per_tubelet == per_tubelet[:, :1]).all()  # a tube: same mask over time
    assert (per_tubelet.sum(-1) == int(0.8 * 196)).all()  # VideoMAE's count, 156 of 196
    rows_equal = (mask == mask[:1]).all(1)
    assert rows_equal.all() if same_for_batch else not rows_equal[1:].all()


def test_audio_mask_must_match_the_ratio() -> None:
    model = _model()
    batch = _batch(model.config)
    bad = torch.zeros(B, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly 5 of 16"):
        model(**batch, audio_mask=bad)


def test_wrong_input_shape_names_the_expected_one() -> None:
    model = _model()
    batch = _batch(model.config)
    with pytest.raises(ValueError, match=r"\(B, 4, 3, 32, 32\)"):
        model(**{**batch, "video": batch["video"][:, :2]})


@pytest.mark.parametrize(("h", "w"), [(4, 4), (14, 14)])
def test_sincos_table_equals_hf_on_square_grids(h: int, w: int) -> None:
    hf = torch.from_numpy(get_2d_sincos_pos_embed(32, h, add_cls_token=True)).float()[None]
    assert torch.allclose(sincos_2d(32, h, w), hf, atol=1e-6)


def test_audio_encoder_runs_on_the_seed_fbank_grid() -> None:
    model = _model(audio={"num_mel_bins": 128, "target_length": 992, "patch_size": 16})
    assert model.audio.vit.embeddings.position_embeddings.shape == (1, 1 + 8 * 62, 32)
    assert not model.audio.vit.embeddings.position_embeddings.requires_grad
    cfg = model.config
    losses = model(**{**_batch(cfg), "audio": torch.randn(B, 1, 128, 992)})
    assert torch.isfinite(losses["audio_mae"])


# --- config --------------------------------------------------------------------------------------


def test_config_typo_names_the_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['mask_ration'\] in 'video'.*mask_ratio"):
        CrossformerConfig.from_dict({"video": {"mask_ration": 0.9}})
    with pytest.raises(ValueError, match="valid keys.*vt_match_ratio"):
        CrossformerConfig.from_dict({"vt_match_ration": 0.5})
    with pytest.raises(ValueError, match="preset='huge'; valid"):
        CrossformerConfig.preset("huge")


def test_config_validation_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="target_length"):
        CrossformerConfig.from_dict({"audio": {"target_length": 1000}})
    with pytest.raises(ValueError, match="video.mask_ratio"):
        CrossformerConfig.from_dict({"video": {"mask_ratio": 1.0}})


def test_base_config_has_the_seed_values() -> None:
    cfg = CrossformerConfig.base()
    assert (cfg.audio.num_channels, cfg.audio.num_mel_bins, cfg.audio.target_length) == (1, 128, 992)
    assert cfg.audio.mask_ratio == 0.3 and cfg.video.mask_ratio == 0.8 and cfg.text.mlm_probability == 0.3
    assert (cfg.video.num_frames, cfg.video.tubelet_size, cfg.video.patch_size, cfg.video.image_size) == (
        16,
        2,
        16,
        224,
    )
    assert cfg.contrastive_dim == 768 and cfg.vt_match_ratio == 0.5 and cfg.use_t_cls_to_vt_m
    assert not cfg.contrastive_loss_before_fusion
    assert dataclasses.asdict(cfg.loss_weight) == dataclasses.asdict(
        LossWeights.from_upstream(alpha=0.1, beta=0.2, gama=1.0, delte=0.5, theta=1.5)
    )
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.vocab_size) == (
        1536,
        24,
        128100,
    )  # deberta-v2-xlarge
    assert set(MODEL_PRESETS) == {"base", "small", "tiny"}
    assert set(UPSTREAM_LOSS_WEIGHTS.values()) == {f.name for f in dataclasses.fields(LossWeights)}
    with pytest.raises(ValueError, match="valid"):
        LossWeights.from_upstream(delta=0.5)


def test_config_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, trainers.crossformer.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
