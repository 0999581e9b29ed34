"""ClipBERT model and checkpoint loading, on tiny CPU models (the base model only on the meta device)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from trainers.clipbert.config import ClipBertConfig  # noqa: E402
from trainers.clipbert.model import (  # noqa: E402
    ClipBertForQA,
    ClipBertForRetrieval,
    aggregate_clip_logits,
    build_model,
    normalize_frames,
    sample_itm_negatives,
)
from trainers.clipbert.weights import (  # noqa: E402
    load_weights,
    ours_to_upstream,
    to_upstream_state_dict,
    upstream_to_ours,
)

VOCAB = 120
CLS, SEP = 101, 102
RES = 128  # the tiny preset's max_img_size: a 2x2 grid


def tiny(**head) -> ClipBertConfig:
    return ClipBertConfig.tiny(vocab_size=VOCAB, **head)


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


def make_frames(b: int, clips: int = 2, frames: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, clips, frames, 3, RES, RES, generator=g) * 50


def grads_missing(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# ---------------------------------------------------------------------------------------- aggregation


def test_clip_aggregation_on_a_hand_case():
    clip_logits = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # 1 text, 2 clips, 2 classes
    assert aggregate_clip_logits(clip_logits, "mean").tolist() == [[2.0, 1.0]]
    assert aggregate_clip_logits(clip_logits, "max").tolist() == [[3.0, 2.0]]
    lse = aggregate_clip_logits(clip_logits, "lse")
    expected = [math.log(math.e**1 + math.e**3), math.log(math.e**2 + 1.0)]
    assert torch.allclose(lse, torch.tensor([expected]))
    with pytest.raises(ValueError, match="valid"):
        aggregate_clip_logits(clip_logits, "median")


def test_lse_cross_entropy_equals_upstream_lse_loss():
    # Upstream (run_video_retrieval.py): loss = lse(all clips and classes) - lse(clips of each class),
    # taken at the label. Ours: cross-entropy on the per-class log-sum-exp over clips.
    clip_logits = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1, 0])
    upstream = torch.logsumexp(clip_logits.flatten(1), dim=-1, keepdim=True) - torch.logsumexp(
        clip_logits, dim=1
    )
    upstream = upstream.gather(1, labels.view(-1, 1)).mean()
    ours = torch.nn.functional.cross_entropy(aggregate_clip_logits(clip_logits, "lse"), labels)
    assert torch.allclose(ours, upstream, atol=1e-6)


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("task", ["retrieval", "qa", "mc", "pretrain"])
def test_forward_backward_is_finite_and_every_parameter_gets_a_gradient(task):
    torch.manual_seed(0)
    model = build_model(tiny(task=task, num_labels=7, num_choices=3))
    if task == "retrieval":
        ids, mask = make_text(3)
        ids, mask, labels, to_video = sample_itm_negatives(ids, mask, neg_size=1)
        out = model(make_frames(3), ids, mask, labels=labels, text_to_video=to_video)
        loss = out["loss"]
        assert out["clip_logits"].shape == (6, 2, 2) and out["logits"].shape == (6, 2)
    elif task == "qa":
        ids, mask = make_text(4)
        out = model(make_frames(2), ids, mask, labels=torch.tensor([0, 6, 3, 1]), text_to_video=[0, 0, 1, 1])
        loss = out["loss"]
        assert out["clip_logits"].shape == (4, 2, 7) and out["logits"].shape == (4, 7)
    elif task == "mc":
        ids, mask = make_text(2 * 3)
        out = model(make_frames(2), ids, mask, labels=torch.tensor([2, 0]))
        loss = out["loss"]
        assert out["clip_logits"].shape == (2, 2, 3) and out["logits"].shape == (2, 3)
    else:
        ids, mask = make_text(4)
        mlm_labels = torch.full_like(ids, -100)
        mlm_labels[:, 1] = ids[:, 1]
        out = model(
            make_frames(4, clips=1, frames=1),
            ids,
            mask,
            mlm_labels=mlm_labels,
            itm_labels=torch.tensor([1, 0, 1, 0]),
        )
        loss = out["mlm_loss"] + out["itm_loss"]
        assert out["mlm_scores"].shape == (4, 8, VOCAB) and out["itm_scores"].shape == (4, 2)
    assert torch.isfinite(loss)
    loss.backward()
    assert grads_missing(model) == []
    # Upstream's never-used 1-D visual position embeddings load but do not train.
    assert not model.transformer.bert.visual_embeddings.position_embeddings.weight.requires_grad


def test_same_seed_gives_identical_outputs_and_eval_is_deterministic():
    ids, mask = make_text(2)
    frames = make_frames(2)
    labels = torch.tensor([1, 0])

    def run():
        torch.manual_seed(0)
        model = ClipBertForRetrieval(tiny())
        return model, model(frames, ids, mask, labels=labels)["loss"]  # train mode: dropout on

    (model_a, loss_a), (_, loss_b) = run(), run()
    assert torch.equal(loss_a, loss_b)
    model_a.eval()
    assert torch.equal(model_a.score(frames, ids, mask), model_a.score(frames, ids, mask))


def test_clips_are_scored_separately_and_text_padding_is_ignored():
    torch.manual_seed(0)
    model = ClipBertForQA(tiny(task="qa", num_labels=5)).eval()
    ids, mask = make_text(3)
    ids, mask = ids[2:], mask[2:]  # two padded positions
    frames = make_frames(1, clips=3)
    clip_logits = model(frames, ids, mask)["clip_logits"]
    # Clip 1 alone gives the same logits as inside the 3-clip batch (BN uses running stats in eval).
    alone = model(frames[:, 1:2], ids, mask)["clip_logits"]
    assert torch.allclose(clip_logits[:, 1:2], alone, atol=1e-5)
    # Changing a padded token changes nothing.
    assert mask[0, -1] == 0
    padded = ids.clone()
    padded[0, -1] = 110
    assert torch.allclose(model(frames, padded, mask)["clip_logits"], clip_logits, atol=1e-5)


def test_bce_qa_loss_and_lse_is_refused_with_bce():
    torch.manual_seed(0)
    model = ClipBertForQA(_bce_config())
    ids, mask = make_text(2)
    targets = torch.tensor([[0.0, 1.0, 0.3, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = model(make_frames(2), ids, mask, labels=targets)
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="lse"):
        tiny(task="qa", qa_loss="bce")


def _bce_config() -> ClipBertConfig:
    return ClipBertConfig.from_dict(
        {"head": {"task": "qa", "num_labels": 4, "qa_loss": "bce"}, "clips": {"score_agg": "mean"}},
        defaults=tiny(),
    )


def test_pixel_random_sampling_keeps_that_many_visual_tokens_in_training_only():
    config = ClipBertConfig.from_dict(
        {"vision": {"pixel_random_sampling_size": 2}}, defaults=tiny(task="pretrain")
    )
    model = build_model(config)
    ids, mask = make_text(2)
    frames = make_frames(2, clips=1, frames=1)
    seq, _ = model.pooled_per_clip(frames, ids, mask)
    assert seq.shape[2] == ids.shape[1] + 2
    model.eval()
    seq, _ = model.pooled_per_clip(frames, ids, mask)
    assert seq.shape[2] == ids.shape[1] + 4  # the whole 2x2 grid


def test_itm_negatives_never_pair_a_video_with_its_own_caption():
    ids = torch.arange(4).view(4, 1).repeat(1, 3)
    mask = torch.ones_like(ids)
    g = torch.Generator().manual_seed(0)
    out_ids, _, labels, to_video = sample_itm_negatives(
        ids, mask, neg_size=2, video_ids=["a", "b", "a", "c"], generator=g
    )
    assert labels.tolist() == [1, 0, 0] * 4 and to_video.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    video_of_caption = {0: "a", 1: "b", 2: "a", 3: "c"}
    for row, (caption, video, label) in enumerate(
        zip(out_ids[:, 0].tolist(), to_video.tolist(), labels.tolist(), strict=True)
    ):
        same = video_of_caption[caption] == video_of_caption[video]
        assert same == bool(label), row


def test_frames_are_normalised_like_upstream_and_flipped_to_bgr():
    vision = tiny().vision
    white = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    assert normalize_frames(white, vision)[:, 0, 0].tolist() == pytest.approx([131.325, 138.72, 151.47])
    model = build_model(tiny()).eval()
    conv = model.cnn.backbone.embedder.embedder.convolution
    seen = []
    handle = conv.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    frames = make_frames(1, clips=1, frames=1)
    model.encode_frames(frames)
    handle.remove()
    assert torch.equal(seen[0][0], frames[0, 0, 0].flip(0))


def test_invalid_configs_fail_with_the_valid_choices():
    with pytest.raises(ValueError, match="valid"):
        ClipBertConfig.from_dict({"clips": {"score_agg": "median"}})
    with pytest.raises(ValueError, match="valid keys"):
        ClipBertConfig.from_dict({"vision": {"depth": 50}})
    with pytest.raises(ValueError, match="task"):
        ClipBertForQA(tiny())  # a retrieval config
    assert ClipBertConfig.from_dict({"vision": {"depths": [1, 1, 1, 1]}}).vision.depths == (1, 1, 1, 1)


# ------------------------------------------------------------------------------- upstream names, base


# Exact names read from jayleicn/ClipBERT (e2e_model.py, grid_feat.py, modeling.py, transformers.py) and
# detectron2's ResNet (stem.conv1, res{2..5}.{block}.conv{1..3} / shortcut, each with .norm).
UPSTREAM_NAMES = {
    "cnn.feature.backbone.stem.conv1.weight": (64, 3, 7, 7),
    "cnn.feature.backbone.stem.conv1.norm.running_var": (64,),
    "cnn.feature.backbone.res2.0.shortcut.weight": (256, 64, 1, 1),
    "cnn.feature.backbone.res2.0.shortcut.norm.bias": (256,),
    "cnn.feature.backbone.res2.0.conv1.weight": (64, 64, 1, 1),
    "cnn.feature.backbone.res3.0.conv1.weight": (128, 256, 1, 1),
    "cnn.feature.backbone.res4.5.conv2.weight": (256, 256, 3, 3),
    "cnn.feature.backbone.res5.2.conv3.weight": (2048, 512, 1, 1),
    "cnn.feature.backbone.res5.2.conv3.norm.running_mean": (2048,),
    "cnn.grid_encoder.0.weight": (768, 2048, 3, 3),
    "transformer.bert.embeddings.word_embeddings.weight": (30522, 768),
    "transformer.bert.embeddings.position_embeddings.weight": (512, 768),
    "transformer.bert.embeddings.token_type_embeddings.weight": (2, 768),
    "transformer.bert.embeddings.LayerNorm.weight": (768,),
    "transformer.bert.visual_embeddings.position_embeddings.weight": (512, 768),
    "transformer.bert.visual_embeddings.row_position_embeddings.weight": (100, 768),
    "transformer.bert.visual_embeddings.col_position_embeddings.weight": (100, 768),
    "transformer.bert.visual_embeddings.token_type_embeddings.weight": (1, 768),
    "transformer.bert.visual_embeddings.LayerNorm.bias": (768,),
    "transformer.bert.encoder.layer.0.attention.self.query.weight": (768, 768),
    "transformer.bert.encoder.layer.11.attention.output.LayerNorm.weight": (768,),
    "transformer.bert.encoder.layer.11.intermediate.dense.weight": (3072, 768),
    "transformer.bert.encoder.layer.11.output.dense.bias": (768,),
    "transformer.bert.pooler.dense.weight": (768, 768),
}
PRETRAIN_HEADS = {
    "transformer.cls.predictions.bias": (30522,),
    "transformer.cls.predictions.transform.dense.weight": (768, 768),
    "transformer.cls.predictions.transform.LayerNorm.weight": (768,),
    "transformer.cls.predictions.decoder.weight": (30522, 768),
    "transformer.cls.predictions.decoder.bias": (30522,),
    "transformer.cls.seq_relationship.weight": (2, 768),
}
QA_HEAD = {"transformer.classifier.0.weight": (1536, 768), "transformer.classifier.2.weight": (1500, 1536)}


@pytest.mark.parametrize("task, heads", [("pretrain", PRETRAIN_HEADS), ("qa", QA_HEAD)])
def test_base_config_has_upstream_parameter_names_and_a_7x7_grid(task, heads):
    with torch.device("meta"):
        model = build_model(ClipBertConfig.base(task=task))
        grid = model.encode_frames(torch.empty(1, 1, 2, 3, 448, 448))
    upstream = {k: tuple(v.shape) for k, v in to_upstream_state_dict(model.state_dict()).items()}
    expected = {**UPSTREAM_NAMES, **heads}
    assert {k: upstream.get(k) for k in expected} == expected
    # 265 detectron2 R-50 backbone tensors: stem 5, 16 blocks x 3 convs x 5, 4 shortcuts x 5.
    assert sum(k.startswith("cnn.feature.backbone.") for k in upstream) == 265
    assert all(k.startswith(("cnn.feature.backbone.", "cnn.grid_encoder.", "transformer.")) for k in upstream)
    assert grid.shape == (1, 1, 2, 7, 7, 768)
    # detectron2 MSRA R-50: the stride sits in the first 1x1 conv; FrozenBN; stem and res2 frozen.
    first = model.cnn.backbone.encoder.stages[1].layers[0]
    assert first.layer[0].convolution.stride == (2, 2) and first.layer[1].convolution.stride == (1, 1)
    assert not any(p.requires_grad for p in model.cnn.backbone.encoder.stages[0].parameters())
    assert all(p.requires_grad for p in model.cnn.backbone.encoder.stages[1].parameters())


def test_name_mapping_round_trips():
    for name in UPSTREAM_NAMES:
        assert ours_to_upstream(upstream_to_ours(name)) == name
    assert upstream_to_ours("cnn.feature.roi_heads.box_head.fc1.weight") is None
    assert upstream_to_ours("cnn.feature.backbone.res3.1.conv2.norm.weight") == (
        "cnn.backbone.encoder.stages.1.layers.1.layer.1.normalization.weight"
    )


# ------------------------------------------------------------------------------------ load_weights


def _upstream_state(task: str = "pretrain", frozen_bn: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint in upstream's layout, made by renaming a tiny model's own state dict, plus the
    detectron2 parts upstream saves and never runs."""
    config = ClipBertConfig.from_dict({"vision": {"frozen_batchnorm": frozen_bn}}, defaults=tiny(task=task))
    torch.manual_seed(1)
    state = to_upstream_state_dict(build_model(config).state_dict())
    state["cnn.feature.roi_heads.box_head.fc1.weight"] = torch.zeros(4, 4)
    state["cnn.feature.proposal_generator.rpn_head.conv.weight"] = torch.zeros(4, 4, 3, 3)
    state["cnn.feature.pixel_mean"] = torch.zeros(3, 1, 1)
    return state


@pytest.mark.parametrize("frozen_bn", [True, False])
def test_upstream_layout_loads_with_nothing_missing_or_unexpected(frozen_bn, tmp_path):
    state = _upstream_state(frozen_bn=True)
    path = tmp_path / "clipbert_pretrained.pt"
    torch.save(state, path)
    config = ClipBertConfig.from_dict(
        {"vision": {"frozen_batchnorm": frozen_bn}}, defaults=tiny(task="pretrain")
    )
    model = build_model(config)
    report = load_weights(model, path)
    assert report.ok, report
    assert report.missing == [] and report.unexpected == [] and report.loaded == report.total
    assert any("never runs" in a for a in report.adapted)
    ours = model.state_dict()
    for key, value in state.items():
        mapped = upstream_to_ours(key)
        if mapped is not None:
            assert torch.equal(ours[mapped], value), key


def test_pretrained_checkpoint_into_a_task_model_drops_pretraining_heads():
    model = build_model(tiny(task="qa", num_labels=5))
    report = load_weights(model, _upstream_state("pretrain"))
    assert report.unexpected == []
    assert sorted(report.missing) == sorted(
        k for k in model.state_dict() if k.startswith("transformer.classifier.")
    )
    assert any("transformer.cls" in a for a in report.adapted)
    assert "task head" in " ".join(report.hints)


def test_bogus_keys_and_shape_mismatches_are_reported():
    state = _upstream_state("qa")
    state["transformer.bert.bogus.weight"] = torch.zeros(3)
    state["module_typo.cnn.grid_encoder.0.weight"] = torch.zeros(3)
    model = build_model(tiny(task="qa", num_labels=9))  # the checkpoint has 1500 labels
    report = load_weights(model, state)
    assert not report.ok
    assert sorted(report.unexpected) == [
        "module_typo.cnn.grid_encoder.0.weight",
        "transformer.bert.bogus.weight",
    ]
    assert [m.split(":")[0] for m in report.mismatched] == [
        "transformer.classifier.2.weight",
        "transformer.classifier.2.bias",
    ]
    assert "transformer.bert.*" in str(report)


def test_our_own_ddp_checkpoint_round_trips():
    torch.manual_seed(0)
    source = build_model(tiny())
    state = {"module." + k: v for k, v in source.state_dict().items()}
    target = build_model(tiny())
    report = load_weights(target, {"model": state})
    assert report.ok, report
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
