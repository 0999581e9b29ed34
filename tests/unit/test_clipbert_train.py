"""The ClipBERT trainer: config presets and checks, the custom jsonl QA format, the LMDB video store,
the recipe's losses, a checkpoint round trip and config composition through the launcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainers.clipbert.config import TrainConfig, resolve

REPO = Path(__file__).resolve().parents[2]
SAMPLE_QA = {"name": "msrvtt_qa", "task": "qa", "data_root": None}
SCALE = 0.05

# --------------------------------------------------------------------------------------- config


def test_auto_preset_is_tiny_on_sample_data_and_upstream_on_real_data():
    tiny = resolve({"preset": "auto"}, SAMPLE_QA)
    assert tiny.preset == "tiny" and tiny.model.vision.max_img_size <= 128 and tiny.model.head.task == "qa"

    qa = resolve({"preset": "auto"}, {"name": "msrvtt_qa", "task": "qa", "data_root": "/data/msrvtt_qa"})
    # src/configs/msrvtt_qa_base_resnet50.json: 8 clips x 2 frames at 2 fps, lse, 448 px, lr 5e-5, 10 epochs
    assert qa.preset == "base" and qa.model.head.task == "qa"
    c = qa.model.clips
    assert (c.num_clips, c.frames_per_clip, c.num_clips_test, c.score_agg) == (8, 2, 16, "lse")
    assert (qa.model.vision.max_img_size, qa.target_fps, qa.optim.lr, qa.epochs, qa.batch_size) == (
        448, 2.0, 5e-5, 10, 16)  # fmt: skip
    assert qa.optim.betas == (0.9, 0.98) and qa.optim.weight_decay == 1e-3 and qa.optim.max_grad_norm == 5.0
    ret = resolve({"preset": "base"}, {"name": "msrvtt", "task": "retrieval", "data_root": "/d"})
    assert (ret.epochs, ret.model.head.task, ret.model.head.itm_neg_size) == (20, "retrieval", 1)


def test_explicit_values_win_and_list_typed_ints_come_back_as_ints():
    cfg = resolve(
        {"preset": "tiny", "model": {"clips": {"score_agg": "max"}, "vision": {"depths": [1.0, 1.0, 2.0, 1.0]}},
         "optim": {"lr": 1e-4, "weight_decay": None}},
        SAMPLE_QA,
    )  # fmt: skip
    assert cfg.model.clips.score_agg == "max" and cfg.optim.lr == 1e-4
    assert cfg.model.vision.depths == (1, 1, 2, 1) and all(
        isinstance(d, int) for d in cfg.model.vision.depths
    )
    assert cfg.optim.weight_decay == resolve({"preset": "tiny"}, SAMPLE_QA).optim.weight_decay
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"epoch": 3}, "valid keys"),
        ({"model": {"clips": {"score_agg": "median"}}}, "lse"),
        ({"video_store": "hdf5"}, "files, lmdb"),
        ({"preset": "huge"}, "valid: auto"),
        ({"model": {"head": {"task": "retrieval"}}}, "follows the dataset"),
        ({"max_n_example_per_group": 0}, ">= 1"),
    ],
)
def test_bad_trainer_values_fail_naming_what_is_valid(trainer, message):
    with pytest.raises(ValueError, match=message):
        resolve(trainer, SAMPLE_QA)


def _launch(*args, runs):
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args, f"runs_root={runs}", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_launcher_composes_clipbert_with_alpro_and_on_slurm_and_rejects_a_bad_key(tmp_path):
    ok = _launch("-m", "trainer=clipbert,alpro", "dataset=msrvtt_qa", runs=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "trainers.clipbert" in ok.stdout and "trainers.alpro" in ok.stdout
    slurm = _launch("trainer=clipbert", "dataset=custom_qa", "backend=slurm", "trainer.model.clips.num_clips=4",
                    runs=tmp_path)  # fmt: skip
    assert slurm.returncode == 0, slurm.stdout + slurm.stderr
    assert "#SBATCH" in slurm.stdout and "vl-clipbert" in slurm.stdout
    bad = _launch("trainer=clipbert", "trainer.model.clips.clips=4", runs=tmp_path)
    assert bad.returncode != 0 and "num_clips" in bad.stdout + bad.stderr  # the valid keys are listed
    agg = _launch("trainer=clipbert", "trainer.model.clips.score_agg=median", runs=tmp_path)
    assert agg.returncode != 0 and "lse" in agg.stdout + agg.stderr


# --------------------------------------------------------------------------------------- custom jsonl


def test_custom_jsonl_reads_both_video_spellings_and_builds_the_vocabulary(tmp_path):
    from trainers.clipbert.data import answer_vocabulary, read_qa

    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"video_id": "clip1", "question": "What is shown?", "answer": "cat", "answer_type": "what"}\n'
        "\n"
        '{"video": "sub/clip2.avi", "question": "Who runs", "answer": ["dog", "dog", "cat"]}\n'
        '{"video_id": "clip3", "question": "Color?", "answer": "dog", "question_id": 9}\n'
    )
    items = read_qa(path)
    assert [i["video"] for i in items] == ["clip1.mp4", "sub/clip2.avi", "clip3.mp4"]
    assert items[0]["question"] == "what is shown" and items[0]["answer_type"] == "what"
    assert items[1]["answers"] == ["dog", "dog", "cat"] and items[2]["question_id"] == 9
    assert answer_vocabulary(None, items) == {"dog": 0, "cat": 1}  # most frequent first


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"video_id": "v", "question": "q?", "answer": "a"',
            "50: not valid JSON \\(Expecting ',' delimiter\\)",
        ),
        ('{"question": "q?", "answer": "a"}', " missing video_id \\(or video\\)"),
        ('{"video_id": "v", "answer": "a"}', " missing question"),
        ('["v", "q", "a"]', " expected a JSON object"),
        ('{"video_id": "v", "question": "q", "answer": 3}', " question must be a string"),
    ],
)
def test_a_malformed_custom_line_is_reported_with_file_and_line(tmp_path, line, message):
    from trainers.clipbert.data import read_qa
    from trainers.core.inputs import DataError

    path = tmp_path / "test.jsonl"
    path.write_text('{"video_id": "v0", "question": "fine?", "answer": "yes"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"{path}:2:{message}"):
        read_qa(path)


# --------------------------------------------------------------------------------------- the recipe


ANNO = {
    "msrvtt": {"train": "anno/msrvtt_ret_train7k.json", "test": "anno/msrvtt_ret_test1k.json"},
    "msrvtt_qa": {"train": "anno/msrvtt_qa_train.json", "test": "anno/msrvtt_qa_test.json",
                  "answer_list": "anno/msrvtt_qa_answer_list.json"},
    "custom_qa": {"train": "anno/custom_qa_train.jsonl", "test": "anno/custom_qa_test.jsonl"},
}  # fmt: skip


def _job(name: str, task: str, root=None, **trainer):
    from trainers.core.sample_data import ensure_sample_data

    dataset = {"name": name, "task": task, "data_root": str(root or ensure_sample_data(name, scale=SCALE)),
               "anno": ANNO[name], "media_dir": "videos", "tokenizer": None, "max_txt_l": 32,
               "paragraph": False}  # fmt: skip
    trainer = {"family": "clipbert", "preset": "tiny", "batch_size": 4, "num_workers": 0, **trainer}
    return {"trainer": trainer, "dataset": dataset, "seed": 0}


ENV = type("Env", (), {"rank": 0, "world_size": 1})()


@pytest.mark.parametrize(
    ("name", "task", "loss"),
    [("msrvtt", "retrieval", "itm"), ("custom_qa", "qa", "qa"), ("msrvtt_qa", "qa", "qa")],
)
def test_recipe_losses_on_a_tiny_batch_are_finite_and_reach_every_trainable_parameter(name, task, loss):
    torch = pytest.importorskip("torch")
    from trainers.clipbert.train import ClipBertRecipe

    recipe = ClipBertRecipe(_job(name, task), torch.device("cpu"))
    torch.manual_seed(0)
    model = recipe.build_model()
    batch = next(iter(recipe.train_data(seed=0, env=ENV)[0]))
    c, v = recipe.cfg.model.clips, recipe.cfg.model.vision
    assert batch["frames"].shape == (4, c.num_clips, c.frames_per_clip, 3, v.max_img_size, v.max_img_size)
    if task == "qa":  # the 4 questions of each sample video share its decoded clips
        assert batch["text_input_ids"].shape[0] == 16 and batch["text_to_video"].tolist() == sorted(
            batch["text_to_video"].tolist())  # fmt: skip
    losses = recipe.losses(model, batch)
    assert set(losses) == {loss} and torch.isfinite(losses[loss])
    losses[loss].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad


def test_state_dict_round_trip_through_the_checkpoint_module(tmp_path):
    torch = pytest.importorskip("torch")
    from trainers.clipbert.train import ClipBertRecipe
    from trainers.core import checkpoint

    recipe = ClipBertRecipe(_job("msrvtt_qa", "qa"), torch.device("cpu"))
    torch.manual_seed(0)
    model = recipe.build_model()
    path = checkpoint.save(tmp_path / "ckpt", 7, {"model": model.state_dict(), "global_step": 7}, keep=2)
    torch.manual_seed(1)
    other = recipe.build_model()
    assert not torch.equal(model.transformer.classifier[0].weight, other.transformer.classifier[0].weight)
    state = checkpoint.load(path)
    assert state["global_step"] == 7
    other.load_state_dict(state["model"])
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    model.eval(), other.eval()
    batch = next(iter(recipe.train_data(seed=0, env=ENV)[0]))
    args = (batch["frames"], batch["text_input_ids"], batch["text_attention_mask"])
    kw = {"text_to_video": batch["text_to_video"]}
    assert torch.equal(model(*args, **kw)["logits"], other(*args, **kw)["logits"])


# --------------------------------------------------------------------------------------- LMDB store


def test_lmdb_store_gives_the_same_frames_as_the_files_and_the_recipe_reads_it(tmp_path):
    torch = pytest.importorskip("torch")
    from trainers.clipbert.lmdb_pack import LmdbVideoStore
    from trainers.clipbert.train import ClipBertRecipe
    from trainers.core.clip_sampling import clipbert_indices, read_sampled
    from trainers.core.sample_data import ensure_sample_data

    root = ensure_sample_data("msrvtt_qa", scale=SCALE)
    out = tmp_path / "videos.lmdb"
    proc = subprocess.run([sys.executable, "-m", "trainers.clipbert.lmdb_pack", str(root / "videos"), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    videos = sorted(p.name for p in (root / "videos").iterdir())
    assert (
        f"packed {len(videos)} videos" in proc.stdout and f"{len(videos)}/{len(videos)} videos" in proc.stdout
    )
    store = LmdbVideoStore(out)
    assert sorted(store.keys()) == sorted(Path(v).stem for v in videos)
    sampler = lambda vlen, fps, rng: clipbert_indices(vlen, fps, rng, num_clips=3, frames_per_clip=2,  # noqa: E731
                                                     target_fps=4.0, training=False)  # fmt: skip
    for video in videos[:3]:
        from_files = read_sampled(root / "videos" / video, sampler)
        from_lmdb = read_sampled(store.get(video), sampler)
        assert from_files[1] == from_lmdb[1] and (from_files[0] == from_lmdb[0]).all()
    with pytest.raises(KeyError, match="not in the LMDB store"):
        store.get("no_such_video.mp4")

    files = ClipBertRecipe(_job("msrvtt_qa", "qa"), torch.device("cpu"))
    lmdb = ClipBertRecipe(
        _job("msrvtt_qa", "qa", video_store="lmdb", video_lmdb=str(out)), torch.device("cpu")
    )
    a, b = (next(iter(r.train_data(seed=0, env=ENV)[0]))["frames"] for r in (files, lmdb))
    assert torch.equal(a, b)  # same items, same seeds, same pixels


def test_a_missing_lmdb_store_says_how_to_build_it(tmp_path):
    torch = pytest.importorskip("torch")
    from trainers.clipbert.train import ClipBertRecipe

    job = _job("msrvtt_qa", "qa", video_store="lmdb", video_lmdb=str(tmp_path / "none.lmdb"))
    with pytest.raises(FileNotFoundError, match="python -m trainers.clipbert.lmdb_pack"):
        ClipBertRecipe(job, torch.device("cpu"))
