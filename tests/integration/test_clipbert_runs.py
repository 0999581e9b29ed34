"""ClipBERT end to end: a 2-process DDP step equals one process on the global batch, and a launcher run
on the custom jsonl QA sample learns above the majority answer, answers size and colour questions from
the pixels (above their chance level), and prints a results table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
GLOBAL_BATCH = 4  # videos; 4 questions each
SCALE = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe():
    from trainers.clipbert.train import ClipBertRecipe
    from trainers.core.sample_data import ensure_sample_data

    dataset = {
        "name": "msrvtt_qa", "task": "qa", "data_root": str(ensure_sample_data("msrvtt_qa", scale=SCALE)),
        "anno": {"train": "anno/msrvtt_qa_train.json", "test": "anno/msrvtt_qa_test.json",
                 "answer_list": "anno/msrvtt_qa_answer_list.json"},
        "media_dir": "videos", "tokenizer": None, "max_txt_l": 32, "paragraph": False,
    }  # fmt: skip
    # The QA head: retrieval's ITM draws its negative captions inside each process's batch (as upstream),
    # so its 2-process loss is a different loss from the 1-process one and equality cannot hold. QA's
    # cross-entropy is a mean over questions, and every sample video has 4 questions, so each process
    # holds as many and the mean of the per-process means is the global mean.
    trainer = {"family": "clipbert", "preset": "tiny", "num_workers": 0, "batch_size": GLOBAL_BATCH}
    return ClipBertRecipe({"trainer": trainer, "dataset": dataset}, torch.device("cpu"))


def _step(recipe, rank: int, world_size: int, wrap=None):
    """Loss and gradients of one step on this rank's shard of the first global batch, in float64 and eval
    mode: no dropout, and BatchNorm normalises with its running statistics, not per-process batch ones."""
    recipe.cfg.batch_size = GLOBAL_BATCH // world_size
    torch.manual_seed(0)
    model = recipe.build_model().double().eval()
    env = type("Env", (), {"rank": rank, "world_size": world_size})()
    loader, _ = recipe.train_data(seed=0, env=env)
    batch = next(iter(loader))
    net = wrap(model) if wrap else model
    loss = net(batch["frames"].double(), batch["text_input_ids"], batch["text_attention_mask"], batch["labels"],
               text_to_video=batch["text_to_video"])["loss"]  # fmt: skip
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, batch["video_ids"]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from trainers.core import distributed

    distributed.setup(timeout_s=60)  # gloo on CPU, as the loop's processes
    try:
        ddp = lambda m: torch.nn.parallel.DistributedDataParallel(m, find_unused_parameters=True)  # noqa: E731
        loss, grads, videos = _step(_recipe(), rank, WORLD, wrap=ddp)
        dist.all_reduce(loss)
        torch.save(
            {"loss": loss / WORLD, "grads": grads, "videos": videos}, os.path.join(out, f"rank{rank}.pt")
        )
    finally:
        distributed.teardown()


@pytest.mark.slow
def test_two_process_ddp_step_has_the_gradients_of_one_process_on_the_global_batch(tmp_path):
    recipe = _recipe()
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    loss, expected, videos = _step(recipe, 0, 1)

    assert any(n.startswith("cnn.backbone.") for n in expected) and "cnn.grid_encoder.0.weight" in expected
    assert "transformer.classifier.2.weight" in expected
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    # The two shards are the global batch, split.
    assert sorted(torch.cat([r["videos"] for r in results]).tolist()) == sorted(videos.tolist())
    for result in results:
        # The model computes its cross-entropy in float32 (as under autocast), so float32 tolerances; a
        # loss-scaling or all-reduce bug is off by a factor, far outside them.
        assert torch.allclose(result["loss"], loss, rtol=1e-6, atol=0)
        assert set(result["grads"]) == set(expected)
        for name, grad in expected.items():
            assert torch.allclose(result["grads"][name], grad, rtol=1e-4, atol=1e-9), name


def _launch(*args: str, runs: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLAUNCH_RUNS=str(runs), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_launcher_run_on_custom_jsonl_qa_learns_above_the_majority_answer(tmp_path):
    from trainers.clipbert.data import read_qa
    from trainers.core.sample_data import ensure_sample_data

    scale = 1.0  # the demo's size: 400 training videos, 6 epochs of the tiny preset
    proc = _launch("trainer=clipbert", "dataset=custom_qa", f"dataset.sample_scale={scale}", "sweep_id=cq",
                   runs=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "accuracy (chance)" in proc.stdout and "COMPLETED" in proc.stdout  # the results table
    metrics = json.loads((tmp_path / "cq" / "jobs" / "0" / "metrics.json").read_text())
    assert metrics["task"] == "qa" and metrics["train_steps"] > 0
    assert {"accuracy_colour", "accuracy_shape", "accuracy_direction", "accuracy_size"} <= set(
        metrics["metrics"]
    )

    test = read_qa(ensure_sample_data("custom_qa", scale=scale) / "anno" / "custom_qa_test.jsonl")
    majority = 100.0 * Counter(i["answers"][0] for i in test).most_common(1)[0][1] / len(test)
    assert metrics["headline"]["accuracy"] > 1.5 * majority, (metrics["metrics"], majority)
    # The answers must come from the pixels, not the question-type prior: a size question never names
    # the size (chance 50%, and what a text-only model got: 47-53%; this run: ~96%), nor a colour
    # question the colour (chance 1/8; text-only 10-19% on 100 questions; this run: ~21%).
    by_type = metrics["metrics"]
    assert by_type["accuracy_size"] >= 75.0, by_type
    assert by_type["accuracy_colour"] > 1.25 * 100.0 / 8, by_type


@pytest.mark.slow
def test_launcher_run_on_msrvtt_sample_retrieval_beats_chance(tmp_path):
    # The tiny preset's retrieval: ITM trained from scratch on the sample data's 400 training videos. It
    # must rank the matching video clearly above chance (a model stuck at the ITM loss of a constant
    # prediction ranks at chance).
    proc = _launch("trainer=clipbert", "dataset=msrvtt", "sweep_id=ret", runs=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ret" / "jobs" / "0" / "metrics.json").read_text())
    assert metrics["task"] == "retrieval" and metrics["train_steps"] > 0
    headline, chance = metrics["headline"], metrics["chance"]
    # Seen (seeds 42, 0): R@5 36 and 30, R@10 62 and 56 (chance 5 and 10); ~100 s on CPU.
    assert headline["R@5"] >= 3 * chance["R@5"] and headline["R@10"] >= 3 * chance["R@10"], (headline, chance)
