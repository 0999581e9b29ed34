"""ALPRO model and checkpoint loading, on tiny CPU models (the base model only on the meta device)."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from trainers.alpro.config import TASK_OVERRIDES, AlproConfig  # noqa: E402
from trainers.alpro.model import Alpro, AlproQA  # noqa: E402
from trainers.alpro.weights import load_weights, to_ours, to_upstream  # noqa: E402

VOCAB = 120  # above bert-base's special ids (pad 0, cls 101, sep 102, mask 103), which tiny keeps
CLS, SEP = 101, 102


def tiny(**changes) -> AlproConfig:
    return dataclasses.replace(AlproConfig.tiny(vocab_size=VOCAB), **changes)


def no_mlm(config: AlproConfig) -> AlproConfig:
    return dataclasses.replace(config, loss_weight=dataclasses.replace(config.loss_weight, mlm=0.0))


def make_text(n: int, length: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(104, VOCAB, (n, length), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # varied lengths, so padding is exercised
        end = length - (i % 3)
        ids[i, end - 1] = SEP
        ids[i, end:] = 0
        mask[i, end:] = 0
    return ids, mask


def make_video(n: int, config: AlproConfig, seed: int = 0) -> torch.Tensor:
    v = config.video
    return torch.randn(
        n, v.num_frames, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(seed)
    )


def grads_missing(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# --------------------------------------------------------------------------------------- upstream layout


def upstream_state_shapes(config: AlproConfig, *, qa: bool = False, frames: int | None = None) -> dict:
    """Names and shapes of an upstream checkpoint, written from upstream's modules (timesformer/vit.py
    VisionTransformer, xbert BertForMaskedLM / BertModel, alpro_models.py heads), not from our model."""
    v, t = config.video, config.text
    d, h, e = v.hidden_size, t.hidden_size, config.embed_dim
    n = (v.image_size // v.patch_size) ** 2
    vis = "visual_encoder.model."
    shapes = {
        vis + "cls_token": (1, 1, d),
        vis + "pos_embed": (1, n + 1, d),
        vis + "time_embed": (1, frames or v.num_frames, d),
        vis + "patch_embed.proj.weight": (d, 3, v.patch_size, v.patch_size),
        vis + "patch_embed.proj.bias": (d,),
        vis + "norm.weight": (d,),
        vis + "norm.bias": (d,),
        vis + "head.weight": (400, d),  # num_classes=400, never used
        vis + "head.bias": (400,),
    }
    for i in range(v.num_layers):
        block = f"{vis}blocks.{i}."
        for norm in ("norm1", "temporal_norm1", "norm2"):
            shapes.update({f"{block}{norm}.weight": (d,), f"{block}{norm}.bias": (d,)})
        for attn in ("attn", "temporal_attn"):
            shapes.update({f"{block}{attn}.qkv.weight": (3 * d, d), f"{block}{attn}.qkv.bias": (3 * d,)})
            shapes.update({f"{block}{attn}.proj.weight": (d, d), f"{block}{attn}.proj.bias": (d,)})
        shapes.update({f"{block}temporal_fc.weight": (d, d), f"{block}temporal_fc.bias": (d,)})
        shapes.update(
            {
                f"{block}mlp.fc1.weight": (v.intermediate_size, d),
                f"{block}mlp.fc1.bias": (v.intermediate_size,),
            }
        )
        shapes.update({f"{block}mlp.fc2.weight": (d, v.intermediate_size), f"{block}mlp.fc2.bias": (d,)})
    bert = "text_encoder." if qa else "text_encoder.bert."
    shapes.update(
        {
            bert + "embeddings.word_embeddings.weight": (t.vocab_size, h),
            bert + "embeddings.position_embeddings.weight": (t.max_position_embeddings, h),
            bert + "embeddings.token_type_embeddings.weight": (t.type_vocab_size, h),
            bert + "embeddings.LayerNorm.weight": (h,),
            bert + "embeddings.LayerNorm.bias": (h,),
            bert + "embeddings.position_ids": (1, t.max_position_embeddings),  # saved by transformers 4.11
        }
    )
    for i in range(t.num_layers):
        layer = f"{bert}encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            shapes.update(
                {f"{layer}attention.self.{proj}.weight": (h, h), f"{layer}attention.self.{proj}.bias": (h,)}
            )
        shapes.update(
            {f"{layer}attention.output.dense.weight": (h, h), f"{layer}attention.output.dense.bias": (h,)}
        )
        shapes.update({f"{layer}intermediate.dense.weight": (t.intermediate_size, h)})
        shapes.update({f"{layer}intermediate.dense.bias": (t.intermediate_size,)})
        shapes.update(
            {f"{layer}output.dense.weight": (h, t.intermediate_size), f"{layer}output.dense.bias": (h,)}
        )
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes.update({f"{layer}{ln}.weight": (h,), f"{layer}{ln}.bias": (h,)})
    if qa:
        shapes.update({"classifier.0.weight": (2 * h, h), "classifier.0.bias": (2 * h,)})
        shapes.update(
            {"classifier.2.weight": (config.num_labels, 2 * h), "classifier.2.bias": (config.num_labels,)}
        )
    else:
        mlm = "text_encoder.cls.predictions."
        shapes.update({mlm + "bias": (t.vocab_size,), mlm + "decoder.weight": (t.vocab_size, h)})
        shapes.update({mlm + "decoder.bias": (t.vocab_size,), mlm + "transform.dense.weight": (h, h)})
        shapes.update({mlm + "transform.dense.bias": (h,), mlm + "transform.LayerNorm.weight": (h,)})
        shapes.update({mlm + "transform.LayerNorm.bias": (h,)})
    # AlproBaseModel builds these for every task, QA included.
    shapes.update({"vision_proj.weight": (e, d), "vision_proj.bias": (e,), "text_proj.weight": (e, h)})
    shapes.update({"text_proj.bias": (e,), "temp": (), "itm_head.weight": (2, h), "itm_head.bias": (2,)})
    return shapes


def synthetic_checkpoint(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).expand(shape).clone()
        else:
            state[key] = torch.randn(shape, generator=g)
    decoder, words = (
        "text_encoder.cls.predictions.decoder.weight",
        "text_encoder.bert.embeddings.word_embeddings.weight",
    )
    if decoder in state:  # tied in upstream's BertForMaskedLM: the same values under both names
        state[decoder] = state[words]
    return state


def test_base_config_builds_on_meta_and_every_tensor_has_its_upstream_name_and_shape():
    config = AlproConfig.base()
    with torch.device("meta"):
        model = Alpro(config)
    ours = model.state_dict()
    expected = upstream_state_shapes(config)

    mapped = {to_upstream(k): tuple(v.shape) for k, v in ours.items()}
    never_in_ours = {k for k in expected if ".head." in k or k.endswith("position_ids")}
    assert set(mapped) == set(expected) - never_in_ours
    assert {k: s for k, s in mapped.items() if s != expected[k]} == {}
    assert all(to_ours(to_upstream(k)) == k for k in ours)
    assert sum(p.numel() for p in model.parameters()) > 200_000_000  # TimeSformer-B + BERT-base


def test_task_overrides_set_upstream_frames():
    assert AlproConfig.base("pretrain").video.num_frames == 4
    assert AlproConfig.base("msrvtt_ret").loss_weight.mlm == 0
    qa = AlproConfig.base("msvd_qa")
    assert (qa.video.num_frames, qa.video.gradient_checkpointing, qa.num_labels) == (16, True, 2423)
    assert set(TASK_OVERRIDES) == {"pretrain", "msrvtt_ret", "didemo_ret", "msrvtt_qa", "msvd_qa"}


def test_config_typos_and_inconsistencies_name_the_fix():
    with pytest.raises(ValueError, match="valid keys"):
        AlproConfig.from_dict({"video": {"frames": 4}})
    with pytest.raises(ValueError, match="must equal text.hidden_size"):
        AlproConfig.from_dict({"video": {"hidden_size": 512}})
    with pytest.raises(ValueError, match="fusion_layer"):
        AlproConfig.from_dict({"text": {"fusion_layer": 13}})


# -------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("mlm", [True, False], ids=["pretrain", "retrieval"])
def test_forward_backward_gives_finite_losses_and_gradients_everywhere(mlm):
    config = tiny() if mlm else no_mlm(tiny())
    torch.manual_seed(0)
    model = Alpro(config)
    ids, mask = make_text(4)
    losses = model(make_video(4, config), ids, mask)

    assert set(losses) == ({"vtc", "vtm", "mlm"} if mlm else {"vtc", "vtm"})
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert grads_missing(model) == []
    assert (model.text_encoder.cls is not None) == mlm


def test_qa_forward_backward_and_predict():
    config = tiny(num_labels=7)
    torch.manual_seed(0)
    model = AlproQA(config)
    ids, mask = make_text(3)
    video = make_video(3, config)
    loss = model(video, ids, mask, torch.tensor([0, 3, 6]))["qa"]
    assert torch.isfinite(loss)
    loss.backward()
    assert grads_missing(model) == []
    assert model.predict(video, ids, mask).shape == (3,)
    with pytest.raises(ValueError, match="num_labels"):
        AlproQA(tiny())


def test_same_seed_same_losses_and_eval_is_deterministic():
    config = tiny()
    ids, mask = make_text(4)
    video = make_video(4, config)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = Alpro(config)
        runs.append({k: v.item() for k, v in model(video, ids, mask).items()})  # dropout + sampling seeded
    assert runs[0] == runs[1]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_video(video), model.encode_video(video))
        assert torch.equal(
            model.fuse(model.encode_text(ids, mask), mask, model.encode_video(video)),
            model.fuse(model.encode_text(ids, mask), mask, model.encode_video(video)),
        )


def test_video_embeds_are_cls_plus_time_averaged_patches():
    config = tiny()
    model = Alpro(config).eval()
    video = make_video(2, config)
    with torch.no_grad():
        tokens = model.visual_encoder(pixel_values=video).last_hidden_state
        embeds = model.encode_video(video)
    grid = (config.video.image_size // config.video.patch_size) ** 2
    assert embeds.shape == (2, 1 + grid, config.video.hidden_size)
    # Tokens are ordered (patch, frame): patch p of frame f sits at 1 + p * T + f.
    t = config.video.num_frames
    assert torch.allclose(embeds[:, 1 + 3], tokens[:, 1 + 3 * t : 1 + 4 * t].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="num_frames"):
        model.encode_video(torch.randn(2, t + 1, 3, config.video.image_size, config.video.image_size))


def test_vtm_negatives_never_positive_and_video_ids_make_soft_targets():
    config = tiny(vtm_hard_negatives=True)
    model = Alpro(config)
    sim = torch.randn(4, 4)
    positives = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    for _ in range(20):
        picked = model._sample_negatives(sim, positives)
        assert not positives[torch.arange(4), picked].any()
    feats = torch.nn.functional.normalize(torch.randn(4, config.embed_dim), dim=-1)
    loss_ids, _, pos = model.vtc_loss(feats, feats, idx=torch.tensor([0, 0, 1, 2]))
    assert torch.equal(pos, positives)
    assert torch.isfinite(loss_ids)


def test_retrieval_scores_rerank_top_k_and_all_pairs():
    config = no_mlm(tiny())
    model = Alpro(config).eval()
    ids, mask = make_text(5)
    with torch.no_grad():
        video_embeds = model.encode_video(make_video(4, config))
        text_embeds = model.encode_text(ids, mask)
    full = model.retrieval_scores(video_embeds, text_embeds, mask, k=0)
    assert torch.equal(full["v2t"], full["t2v"]) and torch.isfinite(full["v2t"]).all()
    assert ((full["v2t"] >= 0) & (full["v2t"] <= 1)).all()
    top2 = model.retrieval_scores(video_embeds, text_embeds, mask, k=2)
    assert (torch.isfinite(top2["v2t"]).sum(1) == 2).all()
    assert (torch.isfinite(top2["t2v"]).sum(0) == 2).all()
    kept = torch.isfinite(top2["v2t"])
    assert torch.allclose(top2["v2t"][kept], full["v2t"][kept], atol=1e-6)
    # each video's kept texts are its VTC top 2
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, full["vtc"].topk(2, dim=1).indices, True))


# ------------------------------------------------------------------------------------------ weights


def test_upstream_pretraining_checkpoint_loads_completely_and_lands_where_upstream_had_it(tmp_path):
    config = tiny()
    state = synthetic_checkpoint(upstream_state_shapes(config))
    path = tmp_path / "alpro_pretrained_ckpt.pt"
    torch.save(state, path)
    model = Alpro(config)

    report = load_weights(model, path)

    assert report.ok, str(report)
    assert report.missing == report.unexpected == report.mismatched == []
    assert any("head" in a for a in report.adapted)  # the Kinetics classifier, dropped on purpose
    ours = model.state_dict()
    pairs = {
        "visual_encoder.model.blocks.1.temporal_fc.weight": "visual_encoder.encoder.layer.1.temporal_dense.weight",
        "visual_encoder.model.blocks.0.attn.proj.bias": "visual_encoder.encoder.layer.0.attention.output.dense.bias",
        "visual_encoder.model.pos_embed": "visual_encoder.embeddings.position_embeddings",
        "visual_encoder.model.norm.weight": "visual_encoder.layernorm.weight",
        "text_encoder.bert.encoder.layer.3.attention.self.key.weight": "text_encoder.bert.encoder.layer.3.attention.self.key.weight",
        "temp": "temp",
    }
    for upstream, mine in pairs.items():
        assert torch.equal(ours[mine], state[upstream]), upstream


def test_pretraining_checkpoint_into_qa_and_retrieval_models_adapts_layouts():
    config = tiny(num_labels=5)
    state = synthetic_checkpoint(upstream_state_shapes(config, frames=4))  # pretrained on 4 frames

    qa = AlproQA(config)
    report = load_weights(qa, state)
    assert report.missing == [
        "classifier.0.weight",
        "classifier.0.bias",
        "classifier.2.weight",
        "classifier.2.bias",
    ]
    assert report.unexpected == [] and report.mismatched == []
    assert any("text_encoder.bert.* -> text_encoder.*" in a for a in report.adapted)
    assert any("time embeddings 4 -> 2" in a for a in report.adapted)
    expected_time = state["visual_encoder.model.time_embed"][:, [0, 2]]  # nearest, as upstream
    assert torch.equal(qa.state_dict()["visual_encoder.embeddings.time_embeddings"], expected_time)

    retrieval = Alpro(no_mlm(config))
    report = load_weights(retrieval, state)
    assert report.ok, str(report)
    assert any("MLM head" in a for a in report.adapted)


def test_upstream_qa_checkpoint_loads_completely():
    config = tiny(num_labels=5)
    report = load_weights(AlproQA(config), synthetic_checkpoint(upstream_state_shapes(config, qa=True)))
    assert report.ok, str(report)


def test_our_own_state_dict_round_trips():
    config = tiny()
    torch.manual_seed(1)
    source = Alpro(config)
    torch.manual_seed(2)
    model = Alpro(config)
    report = load_weights(model, {"model": source.state_dict()})
    assert report.ok and report.adapted == []
    assert all(
        torch.equal(a, b)
        for a, b in zip(source.state_dict().values(), model.state_dict().values(), strict=True)
    )
