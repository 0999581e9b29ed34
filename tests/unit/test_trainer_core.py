"""The trainer core: where a process sits in the job, checkpoints that are complete or invisible,
and sampling that a resumed run repeats exactly."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.core import checkpoint, distributed
from trainers.core.distributed import DistEnv, expand_hostlist, from_environ, tasks_per_node
from trainers.core.sampling import ResumableSampler, SeededItems

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- distributed environment


@pytest.fixture
def slurm_dns(monkeypatch):
    """Node names resolve without DNS or scontrol (neither knows 'node1' on a test machine)."""
    table = {"node1": "10.1.0.1", "node2": "10.1.0.2"}

    def gethostbyname(name: str) -> str:
        if name not in table:
            raise OSError(f"unknown host {name}")
        return table[name]

    monkeypatch.setattr(distributed.socket, "gethostbyname", gethostbyname)
    return table


def slurm_vars(rank: int, job_id: str = "4242", **extra: str) -> dict[str, str]:
    """What srun sets for task `rank` of 4 tasks, 2 per node, on node1 and node2."""
    return {
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": str(rank % 2),
        "SLURM_NODEID": str(rank // 2),
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NTASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_ID": job_id,
        **extra,
    }


def test_torchrun_variables_give_rank_world_and_master():
    env = from_environ(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "23456",
        }
    )
    assert env == DistEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        master_addr="10.0.0.5",
        master_port=23456,
        source="torchrun",
    )
    assert env.distributed and not env.is_main


def test_torchrun_variables_win_over_the_slurm_allocation_around_them(slurm_dns):
    # torchrun started inside an sbatch allocation: its own ranks count, not the allocation's.
    env = from_environ({**slurm_vars(3), "RANK": "0", "WORLD_SIZE": "2"})
    assert (env.source, env.rank, env.world_size) == ("torchrun", 0, 2)


def test_slurm_variables_give_rank_world_local_rank_and_first_node_as_master(slurm_dns):
    env = from_environ(slurm_vars(3))
    assert env.source == "slurm"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.master_addr == slurm_dns["node1"]
    assert env.distributed and not env.is_main


def test_slurm_master_port_is_the_same_for_every_task_of_a_job_and_differs_between_jobs(slurm_dns):
    ports = {from_environ(slurm_vars(rank)).master_port for rank in range(4)}
    assert len(ports) == 1
    port = ports.pop()
    assert 1024 < port < 65536
    assert from_environ(slurm_vars(0)).master_port == port  # deterministic, not random per call
    assert from_environ(slurm_vars(0, job_id="4243")).master_port != port


def test_slurm_explicit_master_address_and_port_are_respected(slurm_dns):
    env = from_environ(slurm_vars(1, MASTER_ADDR="192.168.1.9", MASTER_PORT="31000"))
    assert (env.master_addr, env.master_port) == ("192.168.1.9", 31000)


def test_slurm_uneven_tasks_per_node_reads_this_nodes_count(slurm_dns):
    # 5 tasks on 3 nodes: 2, 2, 1. Without --ntasks-per-node srun only sets SLURM_TASKS_PER_NODE.
    def task(rank: int, node: int, local: int) -> DistEnv:
        environ = slurm_vars(rank, SLURM_NODEID=str(node), SLURM_TASKS_PER_NODE="2(x2),1")
        del environ["SLURM_NTASKS_PER_NODE"]
        environ.update(SLURM_NTASKS="5", SLURM_LOCALID=str(local), SLURM_JOB_NODELIST="node[1-3]")
        return from_environ(environ)

    assert (task(1, 0, 1).local_world_size, task(4, 2, 0).local_world_size) == (2, 1)
    assert task(4, 2, 0).master_addr == slurm_dns["node1"]


def test_no_launcher_variables_means_one_process():
    env = from_environ({"PATH": "/usr/bin", "HOME": "/root"})
    assert env == DistEnv()
    assert env.source == "single" and env.is_main and not env.distributed


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("gpu-[01-03,07],cpu1", ["gpu-01", "gpu-02", "gpu-03", "gpu-07", "cpu1"]),
        ("node1", ["node1"]),
        ("a[1-2]b", ["a1b", "a2b"]),
        ("node[1-2]", ["node1", "node2"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[1-2]-ib,login", ["n1-ib", "n2-ib", "login"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    ("spec", "counts"), [("2", [2]), ("2(x2)", [2, 2]), ("2(x2),1", [2, 2, 1]), ("4,3(x2)", [4, 3, 3])]
)
def test_tasks_per_node(spec, counts):
    assert tasks_per_node(spec) == counts


def test_tasks_per_node_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="expected e.g."):
        tasks_per_node("2(y3)")


# --------------------------------------------------------------------------- checkpoints


def state_at(step: int) -> dict:
    return {"global_step": step, "weights": torch.full((4,), float(step))}


def names(directory) -> list[str]:
    return [p.name for p in checkpoint.list_checkpoints(directory)]


def test_save_points_latest_at_the_new_checkpoint_and_keeps_the_newest_two(tmp_path):
    for step in (3, 6, 9):
        path = checkpoint.save(tmp_path, step, state_at(step), keep=2)
        assert checkpoint.latest(tmp_path) == path
    assert names(tmp_path) == ["ckpt_00000006.pth", "ckpt_00000009.pth"]
    loaded = checkpoint.load(checkpoint.latest(tmp_path))
    assert loaded["global_step"] == 9
    assert torch.equal(loaded["weights"], state_at(9)["weights"])


def test_checkpoints_sort_by_step_not_by_name(tmp_path):
    for step in (99, 100, 7):
        checkpoint.save(tmp_path, step, state_at(step), keep=0)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt_00000007.pth",
        "ckpt_00000099.pth",
        "ckpt_00000100.pth",
    ]


def test_an_empty_or_missing_directory_has_no_latest(tmp_path):
    assert checkpoint.latest(tmp_path / "nothing") is None
    assert checkpoint.latest(tmp_path) is None
    assert checkpoint.list_checkpoints(tmp_path) == []


def test_a_leftover_temporary_file_is_ignored(tmp_path):
    checkpoint.save(tmp_path, 3, state_at(3))
    # What a save killed outright leaves behind: a half-written temporary of a newer step.
    (tmp_path / ".ckpt_00000006.pth.tmp.12345").write_bytes(b"PK\x03\x04 half a zip")
    assert names(tmp_path) == ["ckpt_00000003.pth"]
    assert checkpoint.latest(tmp_path).name == "ckpt_00000003.pth"


def test_latest_naming_a_missing_file_falls_back_to_the_newest_complete_one(tmp_path):
    checkpoint.save(tmp_path, 3, state_at(3), keep=0)
    checkpoint.save(tmp_path, 6, state_at(6), keep=0)
    (tmp_path / checkpoint.LATEST).write_text("ckpt_00000009.pth")
    assert checkpoint.latest(tmp_path).name == "ckpt_00000006.pth"


@pytest.mark.parametrize("pointer", ["", "\n", "..", "../elsewhere.pth", "config.yaml"])
def test_latest_never_names_anything_but_a_checkpoint(tmp_path, pointer):
    checkpoint.save(tmp_path, 3, state_at(3))
    (tmp_path / "config.yaml").write_text("not a checkpoint")
    (tmp_path / checkpoint.LATEST).write_text(pointer)
    assert checkpoint.latest(tmp_path).name == "ckpt_00000003.pth"


def test_a_save_that_fails_mid_write_leaves_the_previous_latest_intact(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 3, state_at(3))
    real_save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * 1000)  # the start of a checkpoint, then the writer dies
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(
        checkpoint.CheckpointError, match="No space left.*ckpt_00000003.pth is still the latest"
    ):
        checkpoint.save(tmp_path, 6, state_at(6))
    monkeypatch.setattr(torch, "save", real_save)

    latest = checkpoint.latest(tmp_path)
    assert latest.name == "ckpt_00000003.pth"
    assert checkpoint.load(latest)["global_step"] == 3
    assert names(tmp_path) == ["ckpt_00000003.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000003.pth", "latest"]  # no debris


def test_a_checkpoint_the_filesystem_refuses_fails_in_one_line_that_says_why(tmp_path):
    # A real write error: past RLIMIT_FSIZE a write fails with EFBIG, as on a full disk with ENOSPC.
    # torch.save alone reports either as "unexpected pos 704 vs 598", which says nothing.
    script = f"""
import resource, signal, torch
from trainers.core import checkpoint
checkpoint.save({str(tmp_path)!r}, 3, {{"w": torch.zeros(10)}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the signal killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    checkpoint.save({str(tmp_path)!r}, 6, {{"w": torch.zeros(1_000_000)}})
except checkpoint.CheckpointError as e:
    print(e)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        f"cannot write checkpoint {tmp_path / 'ckpt_00000006.pth'}: File too large, "
    ), out
    assert "ckpt_00000003.pth is still the latest" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000003.pth", "latest"]  # no debris
    assert checkpoint.load_latest(tmp_path)[0].name == "ckpt_00000003.pth"


def test_pruning_never_removes_the_checkpoint_just_saved(tmp_path):
    # A stray higher step (e.g. copied in by hand) must not make `latest` dangle.
    checkpoint.save(tmp_path, 9, state_at(9), keep=0)
    path = checkpoint.save(tmp_path, 6, state_at(6), keep=1)
    assert path.exists()
    assert checkpoint.latest(tmp_path) == path


def test_weights_sources_a_run_dir_its_latest_checkpoint_a_url_a_checked_local_copy(tmp_path, fake_gcs):
    from trainers.core import storage
    from trainers.core.weights import local_source

    run = tmp_path / "run"
    checkpoint.save(run / "checkpoints", 3, {"model": {"w": torch.ones(2)}})
    newest = checkpoint.save(run / "checkpoints", 7, {"model": {"w": torch.zeros(2)}})
    assert local_source(str(run), tmp_path / "dl") == str(newest)
    assert local_source(str(run / "checkpoints"), tmp_path / "dl") == str(newest)
    upstream = tmp_path / "upstream.pth"  # a file, or a folder without our checkpoints: as given
    upstream.write_bytes(b"weights")
    assert local_source(str(upstream), tmp_path / "dl") == str(upstream)

    url = "gs://vl-test/weights/upstream.pth"
    storage.upload(upstream, url)
    local = local_source(url, tmp_path / "dl")
    assert local == str(tmp_path / "dl" / "upstream.pth") and Path(local).read_bytes() == b"weights"
    assert local_source(str(tmp_path / "dl"), tmp_path / "x") == str(tmp_path / "dl")  # no checkpoints in it


def test_rng_state_round_trip_repeats_every_stream():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2]
    assert torch.equal(first[2], again[2])


# --------------------------------------------------------------------------- sampling


def drawn(sampler: ResumableSampler) -> list[tuple[int, int]]:
    return list(sampler)


def test_same_seed_and_epoch_give_the_same_order_and_item_seeds():
    a, b = ResumableSampler(50, 4, seed=7), ResumableSampler(50, 4, seed=7)
    a.set_position(3)
    b.set_position(3)
    assert drawn(a) == drawn(b)
    b.set_position(4)
    assert [i for i, _ in drawn(a)] != [i for i, _ in drawn(b)]  # a new shuffle each epoch
    other_seed = ResumableSampler(50, 4, seed=8)
    other_seed.set_position(3)
    assert [i for i, _ in drawn(a)] != [i for i, _ in drawn(other_seed)]


def test_full_epoch_covers_whole_batches_without_repeats():
    sampler = ResumableSampler(50, 4, seed=7)  # 12 full batches, the last 2 items dropped
    items = drawn(sampler)
    assert sampler.batches_per_epoch == 12
    assert len(items) == len(sampler) == 48
    assert len({i for i, _ in items}) == 48
    assert all(0 <= i < 50 for i, _ in items)


@pytest.mark.parametrize("start_batch", [0, 1, 5, 11])
def test_starting_at_batch_k_yields_exactly_the_tail_of_the_epoch(start_batch):
    sampler = ResumableSampler(50, 4, seed=7, rank=1, world_size=2)
    sampler.set_position(2)
    full = drawn(sampler)
    sampler.set_position(2, start_batch)
    tail = drawn(sampler)
    assert tail == full[start_batch * 4 :]
    assert len(sampler) == len(tail)


def test_two_ranks_get_disjoint_shards_of_equal_length():
    shards = []
    for rank in range(2):
        sampler = ResumableSampler(51, 4, seed=7, rank=rank, world_size=2)
        sampler.set_position(1)
        shards.append([i for i, _ in drawn(sampler)])
    assert len(shards[0]) == len(shards[1]) == 24  # 25 each, in 6 whole batches
    assert not set(shards[0]) & set(shards[1])


def test_fewer_items_than_a_batch_still_give_one_batch():
    sampler = ResumableSampler(3, 8, seed=0)
    assert sampler.batches_per_epoch == 1
    assert len(drawn(sampler)) == len(sampler) == 3


def test_more_processes_than_items_is_an_error():
    with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
        ResumableSampler(3, 1, seed=0, rank=0, world_size=4)


class RandomItems(torch.utils.data.Dataset):
    """Items made only of random draws from every global RNG, as augmentations are."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        drawn = (index, random.random(), float(np.random.rand()), float(torch.rand(())))
        if self.fail:
            raise RuntimeError("unreadable video")
        return drawn


def rng_snapshot():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def assert_same_rng(before, after):
    assert before[0] == after[0]
    assert all(np.array_equal(x, y) for x, y in zip(before[1], after[1], strict=True))
    assert torch.equal(before[2], after[2])


def test_seeded_items_leave_the_callers_rng_untouched():
    items = SeededItems(RandomItems())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = rng_snapshot()
    items[(3, 123)]
    assert_same_rng(before, rng_snapshot())


def test_seeded_items_leave_the_callers_rng_untouched_when_loading_fails():
    items = SeededItems(RandomItems(fail=True))
    before = rng_snapshot()
    with pytest.raises(RuntimeError, match="unreadable"):
        items[(3, 123)]
    assert_same_rng(before, rng_snapshot())


def test_seeded_items_give_the_same_item_for_the_same_seed_whatever_the_rng_before():
    items = SeededItems(RandomItems())
    torch.manual_seed(0)
    random.seed(0)
    first = items[(3, 123)]
    torch.rand(100)
    random.random()
    np.random.rand(7)
    assert items[(3, 123)] == first
    assert items[(3, 124)] != first


def test_seeded_items_through_a_loader_with_workers_match_the_main_process():
    sampler = ResumableSampler(10, 2, seed=3)
    sampler.set_position(1)
    in_process = list(torch.utils.data.DataLoader(SeededItems(RandomItems()), batch_size=2, sampler=sampler))
    in_workers = list(
        torch.utils.data.DataLoader(SeededItems(RandomItems()), batch_size=2, sampler=sampler, num_workers=2)
    )
    assert len(in_process) == 5
    for a, b in zip(in_process, in_workers, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
