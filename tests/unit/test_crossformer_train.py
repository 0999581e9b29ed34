"""The crossformer trainer: config presets and checks, the csv format, fbank audio, the sample data,
max_train_samples, checkpoint round trip and the upstream-layout loaders, launcher composition."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainers.crossformer.config import TrainConfig, resolve

REPO = Path(__file__).resolve().parents[2]
SAMPLE = {"name": "vat", "task": "pretrain", "data_root": None}
SCALE = 0.1


# --------------------------------------------------------------------------------------- config


def test_auto_preset_is_tiny_on_sample_data_and_the_seed_recipe_on_real_data():
    tiny = resolve({"preset": "auto"}, SAMPLE)
    assert tiny.preset == "tiny" and tiny.model.video.image_size <= 64 and tiny.amp == "off"
    base = resolve({"preset": "auto"}, {**SAMPLE, "data_root": "/data/shorts"})
    assert base.preset == "base" and isinstance(base, TrainConfig)
    # the seed's train.py: lr 2e-5, 50 epochs, 4 per device, fp16, 10% warmup; its loss weights
    assert (base.optim.lr, base.epochs, base.batch_size, base.amp) == (2e-5, 50, 4, "fp16")
    assert base.optim.warmup_epochs == 5.0 and base.frame_sample_rate == 4
    w = base.model.loss_weight
    assert (w.audio_mae, w.text_mlm, w.video_mae, w.vtm, w.contrastive) == (0.1, 0.2, 1.0, 0.5, 1.5)
    assert (base.model.audio.num_mel_bins, base.model.audio.target_length) == (128, 992)


@pytest.mark.parametrize(
    ("trainer", "dataset", "message"),
    [
        ({"epoch": 3}, {}, "valid keys"),
        ({"model": {"video": {"frames": 3}}}, {}, "valid keys"),
        ({"preset": "huge"}, {}, "valid: auto"),
        ({"amp": "fp8"}, {}, "valid"),
        ({"frame_sample_rate": 0}, {}, "frame_sample_rate"),
        ({}, {"max_train_samples": 0}, "max_train_samples must be"),
        ({}, {"max_eval_samples": "all"}, "max_eval_samples must be"),
    ],
)
def test_bad_values_fail_naming_what_is_valid(trainer, dataset, message):
    with pytest.raises(ValueError, match=message):
        resolve(trainer, {**SAMPLE, **dataset})


def test_string_tuples_can_be_overridden_through_the_hydra_schema():
    from trainers.crossformer.config import optional_schema

    schema = optional_schema(TrainConfig)
    from omegaconf import OmegaConf

    node = OmegaConf.structured(schema)
    node.model.text.pos_att_type = ["c2p"]  # a list of strings, not floats
    cfg = resolve(OmegaConf.to_container(node), SAMPLE)
    assert cfg.model.text.pos_att_type == ("c2p",)


def _launch(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "launcher", "trainer=crossformer", *overrides, f"runs_root={tmp_path}", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_launcher_composes_crossformer_for_slurm_and_rejects_bad_input(tmp_path):
    ok = _launch(tmp_path, "dataset=vat", "backend=slurm", "trainer.model.video.mask_ratio=0.9",
                 "dataset.max_train_samples=4")  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "#SBATCH" in ok.stdout and "vl-crossformer" in ok.stdout
    typo = _launch(tmp_path, "dataset=vat", "trainer.model.video.frames=4")
    assert typo.returncode != 0 and "num_frames" in typo.stdout + typo.stderr
    wrong_task = _launch(tmp_path, "dataset=msrvtt")
    assert wrong_task.returncode != 0 and "pretrain" in wrong_task.stdout + wrong_task.stderr


# --------------------------------------------------------------------------------------- audio


def test_fbank_puts_a_tone_in_its_mel_bin_at_10_ms_frames():
    from trainers.crossformer.audio import fbank_image, kaldi_fbank, mel_banks

    rate, seconds, tone = 16000, 1.0, 1619.0
    t = np.arange(int(rate * seconds)) / rate
    fbank = kaldi_fbank(0.5 * np.sin(2 * np.pi * tone * t), rate, num_mel_bins=16)
    assert fbank.shape == (1 + (16000 - 400) // 160, 16)  # 25 ms windows every 10 ms (snip edges)
    banks = mel_banks(16, 256, rate)
    expected_bin = int(banks[:, round(tone / (rate / 512))].argmax())
    assert np.all(fbank.argmax(axis=1) == expected_bin)
    image = fbank_image(np.zeros(rate // 10), 16, 64, mean=-4.0, std=4.0)
    assert image.shape == (1, 16, 64)  # padded to target_length frames, mel bins as rows
    assert np.allclose(image[0, :, -1], (0.0 + 4.0) / 8.0)  # zero padding, then (x - mean) / (2 std)


def test_wav_is_read_back_at_16_khz(tmp_path):
    from trainers.crossformer.audio import read_audio
    from trainers.crossformer.sample_data import write_wav

    samples = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
    write_wav(tmp_path / "a.wav", samples, rate=8000)
    back = read_audio(tmp_path / "a.wav")
    assert back.shape == (16000,) and abs(float(np.abs(back).max()) - 0.5) < 0.01


# --------------------------------------------------------------------------------------- data


def _root():
    from trainers.core.sample_data import ensure_sample_data

    return ensure_sample_data("vat", scale=SCALE)


def test_sample_data_is_in_the_seed_csv_format_with_related_modalities():
    from trainers.crossformer.data import read_title

    root = _root()
    for split in ("train", "validation"):
        with open(root / f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and set(rows[0]) == {"video", "audio", "text"}
        for row in rows[:3]:
            for column in ("video", "audio", "text"):
                assert (root / "datasets" / column / row[column]).is_file()
    title = read_title(root / "datasets" / "text" / rows[0]["text"])
    assert "#" not in title and title  # hashtags cut, as the seed's LMDB builder does
    assert any(
        colour in title for colour in ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
    )


def test_a_csv_without_the_seed_columns_fails_naming_them(tmp_path):
    from trainers.crossformer.data import read_rows

    bad = tmp_path / "train.csv"
    bad.write_text("clip,sound\na.mp4,a.wav\n")
    with pytest.raises(ValueError, match="video, audio, text"):
        read_rows(bad)
    good = tmp_path / "ok.csv"
    good.write_text("text,video,audio\n" + "".join(f"t{i}.txt,v{i}.mp4,a{i}.wav\n" for i in range(5)))
    assert [r["video"] for r in read_rows(good, max_samples=2)] == ["v0.mp4", "v1.mp4"]


def _job(tmp_path, **dataset):
    ds = {"name": "vat", "task": "pretrain", "data_root": str(_root()),
          "anno": {"train": "train.csv", "validation": "validation.csv"}, "media_dir": "datasets",
          "video_root": "datasets/video", "audio_root": "datasets/audio", "text_root": "datasets/text",
          "tokenizer": None, "max_txt_l": 32, **dataset}  # fmt: skip
    trainer = {"family": "crossformer", "preset": "tiny", "batch_size": 2, "num_workers": 0}
    return {"trainer": trainer, "dataset": ds, "seed": 0, "job": {"run_dir": str(tmp_path)}}


def test_max_train_and_eval_samples_keep_the_first_rows(tmp_path):
    torch = pytest.importorskip("torch")
    from trainers.crossformer.train import CrossformerRecipe

    recipe = CrossformerRecipe(_job(tmp_path, max_train_samples=4, max_eval_samples=3), torch.device("cpu"))
    env = type("Env", (), {"rank": 0, "world_size": 1})()
    loader, sampler = recipe.train_data(seed=0, env=env)
    assert len(loader.dataset) == 4 and sampler.batches_per_epoch == 2
    seen = {int(i) for batch_keys in sampler for i in [batch_keys[0]]}
    assert seen == {0, 1, 2, 3}
    torch.manual_seed(0)
    result = recipe.evaluate(recipe.build_model(), torch.device("cpu"))
    assert result["num_clips"] == result["num_texts"] == 3
    assert set(result["headline"]) == {"R@1", "R@5", "R@10", "VTM acc"}


def test_a_batch_is_the_same_whenever_it_is_built_and_trains_every_objective(tmp_path):
    torch = pytest.importorskip("torch")
    from trainers.crossformer.train import CrossformerRecipe

    recipe = CrossformerRecipe(_job(tmp_path), torch.device("cpu"))
    env = type("Env", (), {"rank": 0, "world_size": 1})()
    first = next(iter(recipe.train_data(seed=3, env=env)[0]))
    torch.manual_seed(99)  # the global RNG must not matter
    again = next(iter(recipe.train_data(seed=3, env=env)[0]))
    for key, value in first.items():
        assert torch.equal(value, again[key]), key
    torch.manual_seed(0)
    model = recipe.build_model()
    losses = recipe.losses(model, first)
    assert set(losses) == {"audio_mae", "text_mlm", "video_mae", "vtm", "contrastive"}
    assert all(torch.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------------------------- weights


def test_state_dict_round_trip_and_the_upstream_layouts(tmp_path):
    torch = pytest.importorskip("torch")
    from trainers.core import checkpoint
    from trainers.crossformer.train import CrossformerRecipe
    from trainers.crossformer.weights import load_weights

    recipe = CrossformerRecipe(_job(tmp_path), torch.device("cpu"))
    torch.manual_seed(0)
    model = recipe.build_model()
    path = checkpoint.save(tmp_path / "ckpt", 5, {"model": model.state_dict(), "global_step": 5}, keep=2)

    def fresh():
        torch.manual_seed(1)
        return recipe.build_model()

    def same(a, b, prefix=""):
        return all(
            torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items() if k.startswith(prefix)
        )

    other = fresh()
    assert not same(model, other)
    other.load_state_dict(checkpoint.load(path)["model"])
    assert same(model, other)

    # Ours under DDP's prefix, through the loader.
    ddp_state = {f"module.{k}": v for k, v in model.state_dict().items()}
    other = fresh()
    report = load_weights(other, ddp_state)
    assert report.ok and same(model, other), str(report)

    # The seed's (inferred) HF Trainer layout: {text,audio,video,fusion}_model.* in a checkpoint folder.
    upstream = {}
    for key, value in model.state_dict().items():
        part, _, rest = key.partition(".")
        upstream[f"{part}_model.{rest}" if part in ("text", "audio", "video", "fusion") else key] = value
    (tmp_path / "checkpoint-10").mkdir()
    torch.save(upstream, tmp_path / "checkpoint-10" / "pytorch_model.bin")
    other = fresh()
    report = load_weights(other, tmp_path / "checkpoint-10")
    assert report.ok and same(model, other), str(report)
    assert any("renamed" in a for a in report.adapted)

    # One model card (a DeBERTa-v2 MLM state dict) loads into the text part only, and says so.
    card = {k[len("text.") :]: v for k, v in model.state_dict().items() if k.startswith("text.")}
    other = fresh()
    report = load_weights(other, card)
    assert same(model, other, "text.") and not same(model, other, "video.")
    assert report.ok and any("outside text" in h for h in report.hints), str(report)
