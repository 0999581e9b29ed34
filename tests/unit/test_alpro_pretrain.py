"""ALPRO pretraining: the prompter, its entity prompts, PEM regions and loss, the stage configs, the
pretraining corpus readers, and checkpoint names of the pretraining model."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from trainers.alpro import data as adata  # noqa: E402
from trainers.alpro.config import AlproConfig, LossWeights, resolve  # noqa: E402
from trainers.alpro.model import Alpro, AlproPrompter, prompter_config  # noqa: E402
from trainers.alpro.weights import load_prompter, load_weights, to_upstream  # noqa: E402

VOCAB = 120
ENTITIES = 5


def pretrain_config(**changes) -> AlproConfig:
    config = AlproConfig.tiny(vocab_size=VOCAB)
    weights = LossWeights(vtc=1.0, vtm=1.0, mlm=1.0, pem=1.0)
    return dataclasses.replace(config, loss_weight=weights, num_entities=ENTITIES, **changes)


def text(n: int, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(104, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, -1] = 101, 102
    return ids, torch.ones_like(ids)


def video(n: int, config: AlproConfig, seed: int = 0) -> torch.Tensor:
    v = config.video
    shape = (n, v.num_frames, 3, v.image_size, v.image_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- regions


def test_regions_are_rectangles_of_30_to_50_percent_on_the_patch_grid_and_the_rest_is_black():
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(64, 2, 3, 32, 32, generator=gen)
    region, region_video = adata.random_regions(frames, 8, generator=gen)
    assert region.shape == (64, 4, 4) and region.dtype == torch.bool
    black = (-torch.tensor(adata.PIXEL_MEAN) / torch.tensor(adata.PIXEL_STD)).view(3, 1, 1)
    for r, vid, orig in zip(region, region_video, frames, strict=True):
        rows, cols = r.any(1).nonzero().view(-1), r.any(0).nonzero().view(-1)
        # one filled rectangle
        assert r[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all() and r.sum() >= 1
        inside = r.repeat_interleave(8, 0).repeat_interleave(8, 1)
        assert torch.equal(vid[:, :, inside], orig[:, :, inside])
        assert torch.allclose(vid[:, :, ~inside], black.view(1, 3, 1).expand_as(vid[:, :, ~inside]))
    # On a 14x14 grid (upstream's 224 / 16) the area stays within about 30-50% after rounding down.
    big = adata.sample_regions(200, 14, 14, torch.Generator().manual_seed(1))
    fraction = big.flatten(1).float().mean(1)
    assert fraction.min() >= 0.15 and fraction.max() <= 0.5
    assert 0.25 <= fraction.mean() <= 0.45


# --------------------------------------------------------------------------------------- prompter


def test_prompts_are_the_template_mean_of_normalised_text_features():
    torch.manual_seed(0)
    prompter = AlproPrompter(prompter_config(pretrain_config())).eval()
    templates = 3
    ids, mask = text(templates * ENTITIES, seed=2)
    prompter.build_prompts(ids, mask, templates, "video")
    feats = prompter.text_features(prompter.encode_text(ids, mask)).view(templates, ENTITIES, -1)
    assert torch.allclose(prompter.video_prompt_feat, feats.mean(0), atol=1e-6)
    assert not torch.allclose(prompter.image_prompt_feat, prompter.video_prompt_feat)
    with pytest.raises(ValueError, match="prompts for 5 entities x 2 templates"):
        prompter.build_prompts(ids, mask, 2, "video")


def test_pseudo_labels_are_a_softmax_over_entities_and_the_threshold_reads_the_probability():
    torch.manual_seed(0)
    prompter = AlproPrompter(prompter_config(pretrain_config(pem_threshold=0.5))).eval()
    clips = video(4, prompter.config)
    feats = prompter.video_features(prompter.encode_video(clips))
    # Entity 0's prompt is video 0's own feature: video 0 is sure of it, the others less so.
    prompts = torch.nn.functional.normalize(torch.randn(ENTITIES, feats.shape[1]), dim=1)
    prompts[0] = feats[0]
    prompter.video_prompt_feat.copy_(prompts)
    with torch.no_grad():
        prompter.temp.fill_(0.01)
    probs, keep = prompter.pseudo_labels(clips)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-6)
    assert probs[0].argmax() == 0 and probs[0, 0] > 0.5 and keep[0]
    assert torch.equal(keep, probs.max(1).values >= 0.5)
    # Upstream compares the top entity's index with 0.2, so it ignored exactly the regions of entity 0.
    with torch.no_grad():
        prompter.temp.fill_(10.0)  # flat distributions: nothing reaches 0.5
    assert not prompter.pseudo_labels(clips)[1].any()


def test_pem_loss_counts_only_confident_regions_and_never_trains_the_prompter():
    torch.manual_seed(0)
    config = pretrain_config(pem_threshold=0.3)
    model = Alpro(config).train()
    assert not model.prompter.training, "the prompter stays in eval mode"
    assert all(not p.requires_grad for p in model.prompter.parameters())
    clips, (ids, mask) = video(4, config), text(4)
    region, region_video = adata.random_regions(
        clips, config.video.patch_size, torch.Generator().manual_seed(0)
    )
    fused = model.fuse(model.encode_text(ids, mask), mask, model.encode_video(clips))

    probs, _ = model.prompter.pseudo_labels(region_video)
    # Make exactly regions 0 and 2 confident (probability of the top entity above the threshold).
    sure = torch.tensor([True, False, True, False])
    model.prompter.pseudo_labels = lambda v: (probs, sure)  # the teacher is tested above
    loss = model.pem_loss(fused, ids.shape[1], region, region_video)
    patches = fused[:, ids.shape[1] + 1 :]
    w = region.flatten(1).float()
    pooled = (patches * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    per_region = -(torch.log_softmax(model.mpm_head(pooled), 1) * probs).sum(1)
    assert torch.allclose(loss, per_region[sure].mean())
    loss.backward()
    assert model.mpm_head[0].weight.grad is not None
    model.prompter.pseudo_labels = lambda v: (probs, torch.zeros(4, dtype=torch.bool))
    assert model.pem_loss(fused, ids.shape[1], region, region_video).item() == 0.0  # not NaN


def test_pretraining_forward_gives_every_loss_and_gradients_to_every_trained_parameter():
    torch.manual_seed(0)
    config = pretrain_config()
    model = Alpro(config)
    clips, (ids, mask) = video(3, config), text(3)
    with pytest.raises(ValueError, match="needs region"):
        model(clips, ids, mask)
    region, region_video = adata.random_regions(clips, config.video.patch_size)
    losses = model(clips, ids, mask, region=region, region_video=region_video)
    assert set(losses) == {"vtc", "vtm", "mlm", "pem"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_pretraining_checkpoint_names_are_upstreams_and_load_back_from_upstream_layout():
    torch.manual_seed(0)
    model = Alpro(pretrain_config())
    names = set(model.state_dict())
    assert {"prompter.video_prompt_feat", "prompter.image_prompt_feat", "mpm_head.0.weight", "mpm_head.2.bias",
            "prompter.temp", "prompter.text_proj.weight"} <= names  # fmt: skip
    up = {to_upstream(k): v for k, v in model.state_dict().items()}
    assert "prompter.visual_encoder.model.blocks.0.temporal_fc.weight" in up
    # Upstream's prompter is a BertForMaskedLM with a (never used) MLM head: dropped on load.
    up["prompter.text_encoder.cls.predictions.bias"] = torch.zeros(VOCAB)
    torch.manual_seed(1)
    other = Alpro(pretrain_config())
    report = load_weights(other, up)
    assert report.ok and not report.missing
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name


def test_load_prompter_keeps_the_prompts_to_be_rebuilt_and_finds_a_runs_latest_checkpoint(tmp_path):
    from trainers.core import checkpoint

    torch.manual_seed(0)
    trained = AlproPrompter(prompter_config(pretrain_config()))
    trained.video_prompt_feat.fill_(7.0)
    checkpoint.save(tmp_path / "run" / "checkpoints", 3, {"model": trained.state_dict()})
    torch.manual_seed(1)
    model = Alpro(pretrain_config())
    report = load_prompter(model.prompter, tmp_path / "run")
    assert report.ok and not report.missing
    assert torch.equal(model.prompter.text_proj.weight, trained.text_proj.weight)
    assert not torch.equal(model.prompter.video_prompt_feat, trained.video_prompt_feat)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_prompter(model.prompter, tmp_path)


# --------------------------------------------------------------------------------------- configs


WEBVID = {"name": "webvid", "task": "pretrain_captions", "data_root": None, "entities": "anno/unigrams.txt",
          "anno": {"train": "anno/webvid_train.csv", "val": "anno/webvid_val.csv"}}  # fmt: skip


def test_stages_set_upstreams_losses_and_the_tiny_alpro_stage_starts_from_the_prompter(tmp_path):
    prompter = resolve({"stage": "prompter"}, WEBVID)
    assert dataclasses.asdict(prompter.model.loss_weight) == {"vtc": 1.0, "vtm": 0.0, "mlm": 0.0, "pem": 0.0}
    assert prompter.sample == "headtail" and prompter.epochs == 20
    (tmp_path / "p.pt").write_bytes(b"")
    alpro = resolve({"prompter": str(tmp_path / "p.pt")}, WEBVID)
    assert dataclasses.asdict(alpro.model.loss_weight) == {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0, "pem": 1.0}
    assert alpro.stage == "alpro" and alpro.init_from_prompter
    base = resolve({"prompter": str(tmp_path / "p.pt")}, {**WEBVID, "data_root": str(tmp_path)})
    assert base.model.video.num_frames == 4 and base.optim.lr == 1e-4 and not base.init_from_prompter


@pytest.mark.parametrize(
    ("trainer", "dataset", "message"),
    [
        ({}, WEBVID, "first run trainer.stage=prompter"),
        ({"stage": "teacher"}, WEBVID, "trainer.stage='teacher'; valid: prompter, alpro"),
        ({"prompter": "/nowhere/p.pt"}, WEBVID, "trainer.prompter=/nowhere/p.pt does not exist"),
        ({"stage": "prompter", "model": {"loss_weight": {"pem": 1.0}}}, WEBVID, "VTC alone"),
        ({"model": {"loss_weight": {"pem": 1.0}}}, {"name": "msrvtt", "task": "retrieval"}, "pretraining dataset"),
        ({"pretrained": "x.pt"}, {**WEBVID, "entities": None}, "needs an entity list"),
    ],
)  # fmt: skip
def test_pretraining_misconfigurations_say_what_to_do(trainer, dataset, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(trainer, dataset)


# --------------------------------------------------------------------------------------- corpus files


def test_webvid_csv_and_entity_file_are_read(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text(
        'videoid,contentUrl,duration,page_dir,name\n31353427,http://x,PT00H00M15S,d,"A dog, running."\n'
    )
    assert adata.read_annotations(csv) == [{"clip_name": "31353427", "caption": "A dog, running."}]
    assert adata.retrieval_pairs(adata.read_annotations(csv), csv, False) == [
        ("31353427.mp4", "a dog running")
    ]
    other = tmp_path / "other.csv"
    other.write_text("video_id,text\nv1,a cat\n")
    assert adata.read_annotations(other) == [{"clip_name": "v1", "caption": "a cat"}]

    entities = tmp_path / "unigrams.txt"
    entities.write_text("man 41392\nwoman 30000\n\ndog 12\ncat 3\n")
    assert adata.read_entities(entities, 3) == ["man", "woman", "dog"]
    prompts = adata.prompt_texts(["man", "dog"], adata.VIDEO_PROMPT_TEMPLATES[:2])
    assert prompts == [
        "A footage of a man.",
        "A footage of a dog.",
        "A footage of the man.",
        "A footage of the dog.",
    ]
    assert len(adata.VIDEO_PROMPT_TEMPLATES) == len(adata.IMAGE_PROMPT_TEMPLATES) == 12


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", "id,caption\n1,x\n", "expected WebVid's videoid\\+name or video_id\\+text"),
        ("short.csv", "videoid,name\n1,ok\n2\n", "short.csv:3: a row without videoid or name"),
        ("twice.txt", "dog 3\ncat 2\ndog 1\n", "twice.txt:3: entity 'dog' listed twice"),
        ("empty.txt", "\n\n", "lists no entity"),
    ],
)
def test_malformed_corpus_files_are_reported_with_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        adata.read_entities(path, 10) if name.endswith(".txt") else adata.read_annotations(path)
