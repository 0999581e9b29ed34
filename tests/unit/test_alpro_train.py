"""The ALPRO trainer: config presets and checks, data formats, the recipe's losses, checkpoint round trip."""

from __future__ import annotations

import json

import pytest

from trainers.alpro.config import BASE_BY_DATASET, TrainConfig, resolve

SAMPLE = {"name": "msrvtt", "task": "retrieval", "data_root": None}
REAL = {"name": "msrvtt_qa", "task": "qa", "data_root": "/data/msrvtt_qa"}


# --------------------------------------------------------------------------------------- config


def test_auto_preset_is_tiny_on_sample_data_and_upstream_on_real_data():
    tiny = resolve({"preset": "auto"}, SAMPLE)
    assert tiny.preset == "tiny" and tiny.model.video.image_size <= 64 and tiny.model.video.num_frames <= 4
    assert tiny.model.loss_weight.mlm == 0  # retrieval fine-tuning: VTC + VTM

    qa = resolve({"preset": "auto"}, REAL)
    assert qa.preset == "base"
    # config_release/msrvtt_qa.json: 16 frames with gradient checkpointing, lr 5e-5, 10 epochs, 224 crops
    assert qa.model.video.num_frames == 16 and qa.model.video.gradient_checkpointing
    assert (qa.optim.lr, qa.epochs, qa.model.video.image_size) == (5e-5, 10, 224)
    assert qa.optim.betas == (0.9, 0.98) and qa.optim.weight_decay == 1e-3

    ret = resolve({"preset": "base"}, {"name": "msrvtt", "task": "retrieval", "data_root": "/d"})
    assert (ret.model.video.num_frames, ret.optim.lr, ret.batch_size, ret.epochs) == (8, 2.5e-5, 8, 5)
    assert ret.optim.max_grad_norm == 5.0 and ret.model.text.fusion_layer == 6
    didemo = resolve({"preset": "base"}, {"name": "didemo", "task": "retrieval", "data_root": "/d"})
    assert (didemo.optim.lr, didemo.epochs, didemo.batch_size) == (4e-5, 10, 12)
    assert set(BASE_BY_DATASET) >= {"msrvtt", "didemo", "msrvtt_qa", "msvd_qa"}


def test_explicit_values_win_over_the_preset_and_null_keeps_it():
    cfg = resolve(
        {"preset": "tiny", "epochs": 3, "optim": {"lr": 1e-4, "betas": [0.8, 0.9], "weight_decay": None},
         "model": {"video": {"num_frames": 4}}},
        SAMPLE,
    )  # fmt: skip
    tiny = resolve({"preset": "tiny"}, SAMPLE)
    assert cfg.epochs == 3 and cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.weight_decay == tiny.optim.weight_decay
    assert cfg.model.video.num_frames == 4 and cfg.model.video.hidden_size == tiny.model.video.hidden_size
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"epoch": 3}, "valid keys"),
        ({"model": {"video": {"frames": 3}}}, "valid keys"),
        ({"preset": "huge"}, "valid: auto"),
        ({"sample": "middle"}, "headtail"),
        ({"amp": "fp8"}, "valid"),
        ({"resize_size": 16}, "resize_size"),
        ({"model": {"text": {"fusion_layer": 9}}}, "fusion_layer"),
    ],
)
def test_bad_trainer_values_fail_naming_what_is_valid(trainer, message):
    with pytest.raises(ValueError, match=message):
        resolve(trainer, SAMPLE)


def test_the_hydra_schema_has_every_key_unset_so_the_preset_decides():
    from trainers.alpro.config import optional_schema

    schema = optional_schema(TrainConfig, "OptionalAlproTrainConfig")()
    assert schema.model.video.num_frames is None and schema.optim.lr is None and schema.sample is None


def test_launcher_composes_alpro_and_rejects_an_unknown_trainer_key(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]

    def launch(*overrides):
        return subprocess.run(
            [sys.executable, "-m", "launcher", "trainer=alpro", *overrides, f"runs_root={tmp_path}", "--dry-run"],
            cwd=repo, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    ok = launch("dataset=msrvtt_qa", "trainer.model.video.num_frames=4")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "trainers.alpro" in ok.stdout
    bad = launch("trainer.model.video.frames=4")
    assert bad.returncode != 0
    assert "num_frames" in bad.stdout + bad.stderr  # the valid keys are listed


# --------------------------------------------------------------------------------------- data formats


def test_both_annotation_formats_are_read(tmp_path):
    from trainers.alpro.data import load_ans2label, qa_items, read_annotations, retrieval_pairs

    ours = tmp_path / "ret.json"
    ours.write_text(json.dumps([{"video": "a.mp4", "caption": "A cat runs."}]))
    alpro = tmp_path / "ret.jsonl"
    alpro.write_text(
        '{"caption": "A dog, jumping", "clip_name": "video7"}\n{"caption": "x", "clip_name": "v8"}\n'
    )
    assert retrieval_pairs(read_annotations(ours), ours, False) == [("a.mp4", "a cat runs")]
    assert retrieval_pairs(read_annotations(alpro), alpro, False)[0] == ("video7.mp4", "a dog jumping")

    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        '{"question": "what is it?", "answer": "cat", "video_id": "video3", "answer_type": "what"}\n'
    )
    (item,) = qa_items(read_annotations(qa), qa)
    assert item["video"] == "video3.mp4" and item["answers"] == ["cat"] and item["answer_type"] == "what"

    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["dog", "cat"]))
    ans2label = tmp_path / "train_ans2label.json"
    ans2label.write_text(json.dumps({"cat": 0, "dog": 1}))
    assert load_ans2label(answers) == {"dog": 0, "cat": 1}
    assert load_ans2label(ans2label) == {"cat": 0, "dog": 1}


# --------------------------------------------------------------------------------------- the recipe


def _job(tmp_path, name: str, task: str, **trainer):
    from trainers.core.sample_data import ensure_sample_data

    root = ensure_sample_data(name, scale=0.05)
    anno = {
        "msrvtt": {"train": "anno/msrvtt_ret_train7k.json", "test": "anno/msrvtt_ret_test1k.json"},
        "msrvtt_qa": {"train": "anno/msrvtt_qa_train.json", "test": "anno/msrvtt_qa_test.json",
                      "answer_list": "anno/msrvtt_qa_answer_list.json"},
    }[name]  # fmt: skip
    dataset = {"name": name, "task": task, "data_root": str(root), "anno": anno, "media_dir": "videos",
               "tokenizer": None, "max_txt_l": 32, "paragraph": False}  # fmt: skip
    trainer = {"family": "alpro", "preset": "tiny", "batch_size": 4, "num_workers": 0, **trainer}
    return {"trainer": trainer, "dataset": dataset, "seed": 0, "job": {"run_dir": str(tmp_path)}}


@pytest.mark.parametrize(
    ("name", "task", "expected"), [("msrvtt", "retrieval", {"vtc", "vtm"}), ("msrvtt_qa", "qa", {"qa"})]
)
def test_recipe_losses_on_a_tiny_batch_are_finite_and_reach_every_parameter(tmp_path, name, task, expected):
    torch = pytest.importorskip("torch")
    from trainers.alpro.train import AlproRecipe
    from trainers.core.distributed import DistEnv  # noqa: F401 - the env the loop hands over

    recipe = AlproRecipe(_job(tmp_path, name, task), torch.device("cpu"))
    torch.manual_seed(0)
    model = recipe.build_model()
    env = type("Env", (), {"rank": 0, "world_size": 1})()
    loader, sampler = recipe.train_data(seed=0, env=env)
    batch = next(iter(loader))
    video = recipe.cfg.model.video
    assert batch["frames"].shape == (4, video.num_frames, 3, video.image_size, video.image_size)
    losses = recipe.losses(model, batch)
    assert set(losses) == expected
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad


def test_state_dict_round_trip_through_the_checkpoint_module(tmp_path):
    torch = pytest.importorskip("torch")
    from trainers.alpro.train import AlproRecipe
    from trainers.core import checkpoint

    recipe = AlproRecipe(_job(tmp_path, "msrvtt_qa", "qa"), torch.device("cpu"))
    torch.manual_seed(0)
    model = recipe.build_model()
    path = checkpoint.save(tmp_path / "ckpt", 7, {"model": model.state_dict(), "global_step": 7}, keep=2)
    assert checkpoint.latest(tmp_path / "ckpt") == path

    torch.manual_seed(1)
    other = recipe.build_model()
    assert not all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    state = checkpoint.load(path)
    assert state["global_step"] == 7
    other.load_state_dict(state["model"])
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # Same predictions after the round trip.
    model.eval(), other.eval()
    video = recipe.cfg.model.video
    frames = torch.randn(2, video.num_frames, 3, video.image_size, video.image_size)
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    mask = (ids != 0).long()
    assert torch.equal(model.logits(frames, ids, mask), other.logits(frames, ids, mask))
