"""Singularity model, checkpoint loading and evaluation, on tiny CPU models."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from trainers.singularity.evaluation import (  # noqa: E402
    evaluate_qa,
    evaluate_retrieval,
    gt_ranks,
    retrieval_metrics,
)
from trainers.singularity.model import Singularity, SingularityConfig, SingularityQA  # noqa: E402
from trainers.singularity.weights import load_weights, resize_rel_pos_table  # noqa: E402

VOCAB = 120  # above bert-base's special ids (pad 0, cls 101, sep 102, mask 103), which tiny keeps
CLS, SEP = 101, 102


def tiny(**changes) -> SingularityConfig:
    return dataclasses.replace(SingularityConfig.tiny(vocab_size=VOCAB), **changes)


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


def make_frames(n: int, t: int, res: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, t, 3, res, res, generator=torch.Generator().manual_seed(seed))


def grads_missing(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize(
    "changes, frames",
    [
        (dict(mlm=True), 1),
        (
            dict(
                num_frames=2,
                add_temporal_embed=True,
                temporal_vision_encoder=dataclasses.replace(
                    SingularityConfig().temporal_vision_encoder, enable=True
                ),
            ),
            2,
        ),
    ],
    ids=["pretrain-mlm", "temporal"],
)
def test_forward_backward_gives_finite_losses_and_gradients_everywhere(changes, frames):
    torch.manual_seed(0)
    model = Singularity(tiny(**changes))
    ids, mask = make_text(4)
    losses = model(make_frames(4, frames), ids, mask, torch.tensor([0, 1, 1, 2]))

    assert set(losses) == ({"itc", "itm", "mlm"} if model.config.mlm else {"itc", "itm"})
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert grads_missing(model) == []
    assert model.temporal_embeddings.requires_grad == model.config.add_temporal_embed


def test_unused_temporal_embeddings_are_frozen_so_ddp_sees_no_unused_parameter():
    model = Singularity(tiny())
    assert not model.temporal_embeddings.requires_grad
    ids, mask = make_text(3)
    sum(model(make_frames(3, 1), ids, mask, torch.arange(3)).values()).backward()
    assert grads_missing(model) == []


def test_same_seed_gives_identical_losses():
    def run(seed):
        torch.manual_seed(seed)
        model = Singularity(tiny(mlm=True))
        ids, mask = make_text(4)
        return {k: v.item() for k, v in model(make_frames(4, 1), ids, mask, torch.arange(4)).items()}

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_text_encoder_is_bidirectional_and_ignores_padding():
    # The fusion layers are HF decoder layers (the only kind with cross-attention); they must not
    # apply a causal mask, and padded tokens must not leak into [CLS].
    model = Singularity(tiny()).eval()
    ids, mask = make_text(3)  # row 0 unpadded; row 2 padded from position 6
    vision = model.encode_vision(make_frames(3, 1))[0]
    with torch.no_grad():
        text = model.encode_text(ids, mask)[0]
        cls = model.fuse(text, mask, vision)[:, 0]

        later_id = ids.clone()
        later_id[0, 5] = 104 if ids[0, 5] != 104 else 105
        assert not torch.allclose(model.encode_text(later_id, mask)[0][0, 0], text[0, 0])  # text layers
        later_state = text.clone()
        later_state[0, 5] += 1.0
        assert not torch.allclose(model.fuse(later_state, mask, vision)[0, 0], cls[0])  # fusion layers

        padded = ids.clone()
        padded[2, 6:] = 110
        fused = model.fuse(model.encode_text(padded, mask)[0], mask, vision)
        assert torch.allclose(fused[2, 0], cls[2], atol=1e-6)


def test_losses_under_bf16_autocast():
    model = Singularity(tiny(mlm=True))
    ids, mask = make_text(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(make_frames(4, 1), ids, mask, torch.arange(4))
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())


def test_clamp_temp_keeps_temperature_in_upstream_range():
    model = Singularity(tiny())
    with torch.no_grad():
        model.temp.fill_(3.0)
    model.clamp_temp()
    assert model.temp.item() == pytest.approx(0.5)
    with torch.no_grad():
        model.temp.fill_(-1.0)
    model.clamp_temp()
    assert model.temp.item() == pytest.approx(0.001)


def test_hard_negatives_are_never_positives():
    model = Singularity(tiny())
    idx = torch.tensor([0, 0, 1, 1, 2, 3])
    positives = idx[:, None] == idx[None, :]
    for _ in range(20):
        neg = model._sample_negatives(torch.randn(6, 6), positives)
        assert not positives[torch.arange(6), neg].any()


def test_mlm_masking_follows_bert_recipe():
    torch.manual_seed(0)
    model = Singularity(tiny(mlm=True))
    ids, _ = make_text(400, length=32)
    masked, labels = model.mask_tokens(ids)
    chosen = labels != -100
    eligible = (ids != 0) & (ids != CLS)
    assert not (chosen & ~eligible).any()  # never [PAD] or [CLS]
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert chosen.sum() / eligible.sum() == pytest.approx(0.5, abs=0.03)
    assert (masked[chosen] == 103).float().mean() == pytest.approx(0.8, abs=0.03)


def test_more_test_frames_than_temporal_embeddings_interpolates():
    model = Singularity(tiny(num_frames=2, add_temporal_embed=True))
    with torch.no_grad():
        model.temporal_embeddings.copy_(
            torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand_as(model.temporal_embeddings)
        )
    stretched = model.temporal_embeddings_for(5)
    assert stretched.shape == (1, 5, 1, 64)
    assert stretched[0, :, 0, 0].tolist() == sorted(stretched[0, :, 0, 0].tolist())  # monotone 0 -> 1
    embeds, pooled = model.encode_vision(make_frames(2, 5))
    assert embeds.shape == (2, 5, 17, 64) and pooled.shape == (2, 5, 64)


def test_base_config_has_upstream_parameter_names():
    # Names read from upstream's models/model_retrieval_base.py, model_vqa.py, xbert.py and
    # tasks/shared_utils.py (jayleicn/singularity). The meta device builds the 200M-parameter
    # models without allocating them.
    with torch.device("meta"):
        retrieval = Singularity(SingularityConfig.base()).state_dict()
        pretrain = Singularity(dataclasses.replace(SingularityConfig.base(), mlm=True)).state_dict()
        qa = SingularityQA(SingularityConfig.base()).state_dict()

    for key in [
        "vision_encoder.embeddings.cls_token",
        "vision_encoder.embeddings.patch_embeddings.projection.weight",
        "vision_encoder.encoder.layer.0.attention.attention.query.weight",
        "vision_encoder.encoder.layer.0.attention.attention.query.bias",
        "vision_encoder.encoder.layer.11.attention.attention.key.weight",
        "vision_encoder.encoder.layer.11.attention.attention.relative_position_bias.relative_position_bias_table",
        "vision_encoder.encoder.layer.11.lambda_1",
        "vision_encoder.encoder.layer.11.layernorm_after.weight",
        "vision_encoder.pooler.layernorm.weight",
        "vision_layernorm.weight",
        "temporal_embeddings",
        "text_encoder.embeddings.word_embeddings.weight",
        "text_encoder.embeddings.LayerNorm.weight",
        "text_encoder.encoder.layer.0.attention.self.query.weight",
        "text_encoder.encoder.layer.9.crossattention.self.key.weight",
        "text_encoder.encoder.layer.11.crossattention.output.LayerNorm.bias",
        "text_encoder.encoder.layer.11.output.dense.weight",
        "vision_proj.weight",
        "text_proj.bias",
        "temp",
        "itm_head.weight",
    ]:
        assert key in retrieval, key
    assert "vision_encoder.encoder.layer.0.attention.attention.key.bias" not in retrieval  # BEiT: no k bias
    assert not any(".layer.8.crossattention." in k for k in retrieval)
    assert not any(k.startswith("text_encoder.bert.") or "pooler.dense" in k for k in retrieval)
    assert retrieval["temporal_embeddings"].shape == (1, 1, 1, 768)
    table = "vision_encoder.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"
    assert retrieval[table].shape == (27 * 27 + 3, 12)

    for key in [
        "text_encoder.bert.embeddings.word_embeddings.weight",
        "text_encoder.bert.encoder.layer.9.crossattention.self.query.weight",
        "text_encoder.cls.predictions.bias",
        "text_encoder.cls.predictions.transform.dense.weight",
        "text_encoder.cls.predictions.transform.LayerNorm.weight",
        "text_encoder.cls.predictions.decoder.weight",
    ]:
        assert key in pretrain, key
    assert not any(k.startswith("text_encoder.encoder.") for k in pretrain)

    for key in [
        "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight",
        "text_decoder.bert.encoder.layer.2.output.LayerNorm.weight",
        "text_decoder.cls.predictions.transform.dense.weight",
        "text_decoder.cls.predictions.decoder.weight",
        "text_encoder.encoder.layer.9.crossattention.self.key.weight",
        "temporal_embeddings",
    ]:
        assert key in qa, key
    assert not any(k.startswith("text_decoder.bert.encoder.layer.3.") for k in qa)
    assert "temp" not in qa
    for gone in ("vision_proj.", "text_proj.", "itm_head.", "vision_encoder.pooler."):
        assert not any(k.startswith(gone) for k in qa), gone


def test_temporal_encoder_parameter_names():
    config = tiny(
        temporal_vision_encoder=dataclasses.replace(SingularityConfig().temporal_vision_encoder, enable=True)
    )
    keys = Singularity(config).state_dict()
    assert "temporal_vision_encoder.layer.1.attention.self.query.weight" in keys
    assert "temporal_vision_encoder.layer.1.output.LayerNorm.weight" in keys
    assert not any(k.startswith("temporal_vision_encoder.layer.2.") for k in keys)
    assert not any("temporal_vision_encoder" in k and "crossattention" in k for k in keys)


# --------------------------------------------------------------------------------------------- config


def test_from_dict_builds_nested_config_and_rejects_unknown_keys():
    config = SingularityConfig.from_dict({"embed_dim": 128, "text": {"fusion_layer": 6}, "num_frames": 4})
    assert (config.embed_dim, config.text.fusion_layer, config.num_frames) == (128, 6, 4)
    assert config.vision == SingularityConfig.base().vision

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['embed_dims'\].*valid keys: .*'embed_dim'"):
        SingularityConfig.from_dict({"embed_dims": 128})
    with pytest.raises(ValueError, match=r"\['fusion'\] in 'text'.*'fusion_layer'"):
        SingularityConfig.from_dict({"text": {"fusion": 6}})


def test_invalid_configs_fail_with_the_valid_choice():
    with pytest.raises(ValueError, match=r"valid: \['concat', 'mean', 'max', 'lse'\]"):
        SingularityConfig.from_dict({"eval_frame_ensemble": "avg"})
    with pytest.raises(ValueError, match="late fusion"):
        SingularityConfig.from_dict({"eval_frame_ensemble": "mean", "num_frames": 4})
    with pytest.raises(ValueError, match="must equal"):
        SingularityConfig.from_dict({"text": {"hidden_size": 512, "num_heads": 8}})


# ---------------------------------------------------------------------------------------- load_weights


@pytest.fixture(scope="module")
def pretrain_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return Singularity(tiny(mlm=True)).state_dict()


def test_pretrain_checkpoint_loads_into_retrieval_model(pretrain_state, tmp_path):
    path = tmp_path / "ckpt_09.pth"
    torch.save({"model": pretrain_state, "epoch": 9, "config": {"mlm_prob": 0.5}}, path)
    model = Singularity(tiny())
    report = load_weights(model, path)

    assert report.ok and report.missing == [] and report.unexpected == [], str(report)
    assert any("text_encoder.bert.* -> text_encoder.*" in a for a in report.adapted)
    assert any("text_encoder.cls" in a for a in report.adapted)
    assert torch.equal(
        model.text_encoder.encoder.layer[3].crossattention.self.key.weight,
        pretrain_state["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"],
    )
    assert torch.equal(model.temp, pretrain_state["temp"])
    assert str(path) in str(report)


def test_pretrain_checkpoint_keeps_mlm_head_for_mlm_model(pretrain_state):
    model = Singularity(tiny(mlm=True))
    report = load_weights(model, pretrain_state)
    assert report.ok and report.adapted == [], str(report)
    assert torch.equal(
        model.text_encoder.cls.predictions.bias, pretrain_state["text_encoder.cls.predictions.bias"]
    )


def test_qa_decoder_is_initialised_from_the_fusion_layers(pretrain_state):
    model = SingularityQA(tiny())
    report = load_weights(model, pretrain_state)

    assert report.ok, str(report)
    assert any("text_decoder initialised from text_encoder layers 2..3" in a for a in report.adapted)
    fusion = 2  # tiny: 4 text layers, fusion_layer 2, 2 decoder layers
    for i in range(2):
        assert torch.equal(
            model.text_decoder.bert.encoder.layer[i].crossattention.self.query.weight,
            pretrain_state[f"text_encoder.bert.encoder.layer.{fusion + i}.crossattention.self.query.weight"],
        )
    assert torch.equal(
        model.text_decoder.cls.predictions.transform.dense.weight,
        pretrain_state["text_encoder.cls.predictions.transform.dense.weight"],
    )
    assert torch.equal(
        model.text_encoder.embeddings.word_embeddings.weight,
        pretrain_state["text_encoder.bert.embeddings.word_embeddings.weight"],
    )


def test_unknown_keys_are_reported_and_old_transformers_buffers_ignored(pretrain_state):
    state = dict(pretrain_state)
    state["bogus.weight"] = torch.zeros(3)
    state[
        "vision_encoder.encoder.layer.0.attention.attention.relative_position_bias.relative_position_index"
    ] = torch.zeros(17, 17, dtype=torch.long)
    state["text_encoder.bert.embeddings.position_ids"] = torch.arange(64)[None]
    report = load_weights(Singularity(tiny()), state)

    assert report.unexpected == ["bogus.weight"] and not report.ok
    assert len(report.ignored) == 2 and report.missing == []
    assert "unexpected (1): bogus.weight" in str(report)


def test_shape_mismatches_are_skipped_and_reported_once(pretrain_state):
    model = Singularity(tiny(text=dataclasses.replace(tiny().text, vocab_size=VOCAB + 10)))
    report = load_weights(model, pretrain_state)
    assert report.mismatched == ["text_encoder.embeddings.word_embeddings.weight: (120, 64) vs (130, 64)"]
    assert report.missing == [] and not report.ok
    assert report.loaded == report.total - 1


def test_temporal_checkpoint_without_temporal_flags_gets_a_hint():
    config = tiny(
        num_frames=2,
        add_temporal_embed=True,
        temporal_vision_encoder=dataclasses.replace(SingularityConfig().temporal_vision_encoder, enable=True),
    )
    source = Singularity(config).state_dict()
    source["temporal_embeddings"] = torch.randn_like(source["temporal_embeddings"])
    report = load_weights(Singularity(tiny()), source)
    assert any(k.startswith("temporal_vision_encoder.layer.1.") for k in report.unexpected)
    assert "temporal_vision_encoder.enable=True, num_layers=2" in str(report)
    assert "add_temporal_embed is False" in str(report)


def test_relative_position_bias_is_interpolated_for_another_image_size(pretrain_state):
    model = Singularity(tiny(vision=dataclasses.replace(tiny().vision, image_res=96)))  # 8x8 -> 12x12 patches
    report = load_weights(model, pretrain_state)

    key = "vision_encoder.encoder.layer.1.attention.attention.relative_position_bias.relative_position_bias_table"
    assert report.ok, str(report)
    assert any("relative position tables from 228 to 532 rows" in a for a in report.adapted)
    loaded = model.state_dict()[key]
    assert loaded.shape == (532, 2)
    assert torch.equal(loaded[-3:], pretrain_state[key][-3:])  # [CLS] rows are not spatial
    ids, mask = make_text(2)
    assert torch.isfinite(model(make_frames(2, 1, res=48), ids, mask, torch.arange(2))["itc"])


def test_resize_rel_pos_table_is_identity_at_same_size_and_keeps_constants():
    table = torch.randn(7 * 7 + 3, 4)
    assert torch.equal(resize_rel_pos_table(table, 52), table)
    flat = torch.full((7 * 7 + 3, 2), 0.25)
    assert torch.allclose(resize_rel_pos_table(flat, 11 * 11 + 3), torch.full((124, 2), 0.25))


def test_temporal_embeddings_of_another_frame_count_are_padded_or_truncated():
    source = Singularity(tiny(num_frames=2, add_temporal_embed=True)).state_dict()
    source["temporal_embeddings"] = torch.randn_like(source["temporal_embeddings"])

    longer = Singularity(tiny(num_frames=4, add_temporal_embed=True))
    report = load_weights(longer, source)
    assert report.ok and any("2 -> 4 frames (zero-padded)" in a for a in report.adapted), str(report)
    assert torch.equal(longer.temporal_embeddings[:, :2], source["temporal_embeddings"])
    assert not longer.temporal_embeddings[:, 2:].any()

    shorter = Singularity(tiny(num_frames=1, add_temporal_embed=True))
    assert load_weights(shorter, source).ok
    assert torch.equal(shorter.temporal_embeddings, source["temporal_embeddings"][:, :1])


def test_retrieval_checkpoint_into_pretraining_model_reports_only_the_untied_mlm_head():
    source = Singularity(tiny()).state_dict()
    report = load_weights(Singularity(tiny(mlm=True)), source)
    # decoder.weight is tied to the (loaded) word embeddings, decoder.bias to cls.predictions.bias.
    assert sorted(report.missing) == [
        "text_encoder.cls.predictions.bias",
        "text_encoder.cls.predictions.decoder.bias",
        "text_encoder.cls.predictions.transform.LayerNorm.bias",
        "text_encoder.cls.predictions.transform.LayerNorm.weight",
        "text_encoder.cls.predictions.transform.dense.bias",
        "text_encoder.cls.predictions.transform.dense.weight",
    ]
    assert report.unexpected == []


# ------------------------------------------------------------------------------------------ evaluation


def test_retrieval_metrics_on_a_known_matrix():
    # 3 videos, 4 texts; texts 0,1 -> video 0, text 2 -> video 1, text 3 -> video 2.
    txt2vid = [0, 0, 1, 2]
    vid2txt = [[0, 1], [2], [3]]
    v2t = torch.tensor(
        [
            [0.1, 0.9, 0.2, 0.0],  # video 0: its text 1 is first -> rank 0
            [0.8, 0.7, 0.6, 0.5],  # video 1: its text 2 is third -> rank 2
            [0.0, 0.1, 0.2, 0.3],  # video 2: its text 3 is first -> rank 0
        ]
    )
    metrics = retrieval_metrics(v2t, v2t.t(), txt2vid, vid2txt)
    assert metrics["txt_r1"] == pytest.approx(200 / 3)
    assert metrics["txt_r5"] == metrics["txt_r10"] == 100.0
    # text-to-video ranks: text 0 -> video 1 beats video 0 (0.8 > 0.1): rank 1; text 1: rank 0;
    # text 2: video 1 (0.6) beats 0.2 and 0.2: rank 0; text 3: video 2 (0.3) vs 0.0, 0.5: rank 1.
    assert gt_ranks(v2t.t(), txt2vid).tolist() == [1, 0, 0, 1]
    assert metrics["vid_r1"] == 50.0 and metrics["vid_r5"] == 100.0
    assert metrics["vid_r_mean"] == pytest.approx((50 + 100 + 100) / 3)
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["vid_r_mean"]) / 2)


def test_ties_and_unranked_pairs_count_against_the_query():
    scores = torch.tensor([[-100.0, -100.0, 5.0, -100.0]])
    # One wrong candidate scores higher, two tie with the unranked ground truth: all three rank above it.
    assert gt_ranks(scores, [[0]]).tolist() == [3]


def video_batches(frames: torch.Tensor, order: list[int], batch: int = 2):
    for s in range(0, len(order), batch):
        index = torch.tensor(order[s : s + batch])
        yield frames[index], index


def test_evaluate_retrieval_returns_percentages():
    torch.manual_seed(0)
    model = Singularity(tiny())
    frames = make_frames(5, 2)
    ids, mask = make_text(7)
    txt2vid = [0, 1, 2, 3, 4, 0, 1]
    vid2txt = [[0, 5], [1, 6], [2], [3], [4]]
    results = evaluate_retrieval(
        model, video_batches(frames, [3, 0, 4, 1, 2]), ids, mask, txt2vid, vid2txt, 3, "cpu"
    )
    for prefix in ("", "emb_"):
        for key in (
            "txt_r1",
            "txt_r5",
            "txt_r10",
            "txt_r_mean",
            "vid_r1",
            "vid_r5",
            "vid_r10",
            "vid_r_mean",
            "r_mean",
        ):
            assert 0.0 <= results[prefix + key] <= 100.0, prefix + key
    assert model.training  # restored


def test_perfect_cross_encoder_gives_full_recall_whatever_itc_says(monkeypatch):
    torch.manual_seed(0)
    model = Singularity(tiny()).eval()
    frames = make_frames(6, 2)
    ids, mask = make_text(9, seed=3)
    txt2vid = [0, 1, 2, 3, 4, 5, 0, 2, 4]
    vid2txt = [[j for j, v in enumerate(txt2vid) if v == i] for i in range(6)]
    with torch.no_grad():
        text_cls = model.encode_text(ids, mask)[1]
        video_tok = model.encode_vision(frames)[0][:, 0, 0]

    def oracle(text_embeds, text_mask, vision_embeds):
        # Identify each pair by nearest precomputed feature; score 1 for true pairs.
        texts = torch.cdist(text_embeds[:, 0], text_cls).argmin(1)
        videos = torch.cdist(vision_embeds[:, 0, 0], video_tok).argmin(1)
        return (torch.tensor(txt2vid)[texts] == videos).float()

    monkeypatch.setattr(model, "itm_scores", oracle)
    results = evaluate_retrieval(
        model, video_batches(frames, [5, 4, 3, 2, 1, 0]), ids, mask, txt2vid, vid2txt, 9, "cpu"
    )
    assert results["txt_r1"] == 100.0 and results["vid_r1"] == 100.0 and results["r_mean"] == 100.0


def test_late_frame_ensemble_evaluates():
    for how in ("mean", "max", "lse"):
        model = Singularity(tiny(eval_frame_ensemble=how))
        ids, mask = make_text(4)
        results = evaluate_retrieval(
            model,
            video_batches(make_frames(4, 3), [0, 1, 2, 3]),
            ids,
            mask,
            [0, 1, 2, 3],
            [[0], [1], [2], [3]],
            2,
            "cpu",
        )
        assert 0.0 <= results["r_mean"] <= 100.0


# ------------------------------------------------------------------------------------------------- QA


def answers(n: int, length: int = 6, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = make_text(n, length, seed)
    return ids, mask


def test_qa_forward_loss_is_finite_and_weighted():
    torch.manual_seed(0)
    model = SingularityQA(tiny())
    q_ids, q_mask = make_text(3)
    a_ids, a_mask = answers(5)
    n = [2, 1, 2]
    loss = model(make_frames(3, 2), q_ids, q_mask, a_ids, a_mask, torch.full((5,), 0.5), n)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert grads_missing(model) == []
    model.eval()
    zero = model(make_frames(3, 2), q_ids, q_mask, a_ids, a_mask, torch.zeros(5), n)
    assert zero.item() == 0.0


def test_qa_ranking_matches_brute_force_sequence_scores():
    torch.manual_seed(0)
    model = SingularityQA(tiny()).eval()
    q_ids, q_mask = make_text(3)
    a_ids, a_mask = answers(6)
    frames = make_frames(3, 2)
    with torch.no_grad():
        (states,) = model.encode_question(frames, q_ids, q_mask)
        ranked, probs = model.rank_answers([states], q_mask, a_ids, a_mask, k=6)
        first = model._first_token_probs(a_ids, states, q_mask)[:, a_ids[:, 1]]
        brute = torch.stack(
            [
                torch.stack(
                    [
                        first[b, a].log()
                        - model._answer_nll(
                            a_ids[a : a + 1], a_mask[a : a + 1], states[b : b + 1], q_mask[b : b + 1]
                        )[0]
                        for a in range(6)
                    ]
                )
                for b in range(3)
            ]
        )
    assert torch.equal(ranked[:, 0], brute.argmax(1))
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert torch.equal(model.predict(frames, q_ids, q_mask, a_ids, a_mask, k=6), brute.argmax(1))


@pytest.mark.parametrize("how", ["concat", "mean"])
def test_qa_predict_and_evaluate_give_valid_answers(how):
    model = SingularityQA(tiny(eval_frame_ensemble=how)).eval()
    q_ids, q_mask = make_text(4)
    a_ids, a_mask = answers(5)
    pred = model.predict(make_frames(4, 3), q_ids, q_mask, a_ids, a_mask, k=3)
    assert pred.shape == (4,) and ((pred >= 0) & (pred < 5)).all()

    batches = [
        (make_frames(4, 3), q_ids, q_mask, pred),
        (make_frames(2, 3), q_ids[:2], q_mask[:2], torch.tensor([-1, -1])),
    ]
    result = evaluate_qa(model, batches, a_ids, a_mask, k=3, device="cpu")
    assert result == {"accuracy": pytest.approx(100.0 * 4 / 6)}
