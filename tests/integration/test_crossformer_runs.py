"""The crossformer end to end: a 2-process DDP step equals one process on the global batch, and a
launcher run on the sample data learns retrieval above chance."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
GLOBAL_BATCH = 8
SCALE = 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe():
    from trainers.core.sample_data import ensure_sample_data
    from trainers.crossformer.train import CrossformerRecipe

    dataset = {
        "name": "vat", "task": "pretrain", "data_root": str(ensure_sample_data("vat", scale=SCALE)),
        "anno": {"train": "train.csv", "validation": "validation.csv"}, "media_dir": "datasets",
        "video_root": "datasets/video", "audio_root": "datasets/audio", "text_root": "datasets/text",
        "tokenizer": None, "max_txt_l": 32,
    }  # fmt: skip
    # Every objective on, the seed's default of contrastive features read after fusion.
    trainer = {"family": "crossformer", "preset": "tiny", "num_workers": 0, "batch_size": GLOBAL_BATCH // WORLD,
               "model": {"contrastive_loss_before_fusion": False}}  # fmt: skip
    return CrossformerRecipe({"trainer": trainer, "dataset": dataset}, torch.device("cpu"))


def _shard(recipe, rank: int) -> dict:
    """Rank `rank`'s first batch. Its masks, MLM draws and VTM shuffle come from the batch's item seeds
    (TrainCollate), so this is the batch that rank draws in the DDP run too."""
    env = type("Env", (), {"rank": rank, "world_size": WORLD})()
    loader, _ = recipe.train_data(seed=0, env=env)
    batch = next(iter(loader))
    # MLM averages over the masked tokens of a process; with as many in every row (positions 1 and 2)
    # the mean of the per-process means is the global mean. (Random MLM positions would differ in count.)
    labels = torch.full_like(batch["text_ids"], -100)
    labels[:, 1:3] = batch["text_ids"][:, 1:3]
    batch["mlm_labels"] = labels
    batch["text_ids"] = batch["text_ids"].clone()
    batch["text_ids"][:, 1:3] = recipe.tokenizer.mask_token_id
    return batch


def _global_batch(shards: list[dict]) -> dict:
    """The shards stacked in rank order, as one process would see them: VTM pairs stay inside their
    shard (the shuffle indices are offset by the rows before), text padded to the longest."""
    width = max(s["text_ids"].shape[1] for s in shards)
    out: dict[str, list] = {}
    offset = 0
    for s in shards:
        for key, value in s.items():
            if key in ("text_ids", "text_mask", "mlm_labels"):
                fill = {"text_ids": 0, "text_mask": 0, "mlm_labels": -100}[key]
                value = torch.nn.functional.pad(value, (0, width - value.shape[1]), value=fill)
            if key == "video_order":
                value = value + offset
            out.setdefault(key, []).append(value)
        offset += s["video_order"].shape[0]
    return {k: torch.cat(v) for k, v in out.items()}


def _step(recipe, batch: dict, wrap=None):
    """Loss and gradients of one step (float64, dropout off) on `batch`."""
    torch.manual_seed(0)
    model = recipe.build_model().double().eval()
    net = wrap(model) if wrap else model
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    losses = net(**inputs)
    loss = sum(losses.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, set(losses)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from trainers.core import distributed

    distributed.setup(timeout_s=60)  # gloo on CPU, as the loop's processes
    try:
        recipe = _recipe()
        ddp = lambda m: torch.nn.parallel.DistributedDataParallel(m, find_unused_parameters=True)  # noqa: E731
        loss, grads, _ = _step(recipe, _shard(recipe, rank), wrap=ddp)
        dist.all_reduce(loss)
        torch.save({"loss": loss / WORLD, "grads": grads}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.teardown()


@pytest.mark.slow
def test_two_process_ddp_step_has_the_gradients_of_one_process_on_the_global_batch(tmp_path):
    recipe = _recipe()
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    batch = _global_batch([_shard(recipe, r) for r in range(WORLD)])
    assert (batch["video_order"] != torch.arange(GLOBAL_BATCH)).any(), "the batch has VTM negatives"
    loss, expected, objectives = _step(recipe, batch)

    assert objectives == {"audio_mae", "text_mlm", "video_mae", "vtm", "contrastive"}
    assert "logit_scale" in expected and any(n.startswith("fusion.") for n in expected)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(result["loss"], loss, rtol=1e-10, atol=0)
        assert set(result["grads"]) == set(expected)
        for name, grad in expected.items():
            assert torch.allclose(result["grads"][name], grad, rtol=1e-7, atol=1e-12), name


@pytest.mark.slow
def test_launcher_run_on_the_sample_data_learns_retrieval_above_chance(tmp_path):
    env = dict(os.environ, VLAUNCH_RUNS=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "trainer=crossformer", "dataset=vat", "sweep_id=cf"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "COMPLETED" in proc.stdout and "R@10" in proc.stdout  # the results table
    metrics = json.loads((tmp_path / "cf" / "jobs" / "0" / "metrics.json").read_text())
    assert metrics["task"] == "pretrain" and metrics["split"] == "validation"
    assert metrics["num_clips"] == 40 and metrics["train_steps"] > 0
    assert {"vid_r1", "txt_r10", "vtm_accuracy"} <= set(metrics["metrics"])
    # Chance R@10 is 25% of 40 clips; a model that learned nothing stays near it.
    assert metrics["headline"]["R@10"] >= metrics["chance"]["R@10"] + 15, metrics["headline"]
