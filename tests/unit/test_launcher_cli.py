"""The launcher's command line: composition, plans (golden sbatch scripts), and its errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
TRAINERS = sorted(p.stem for p in (REPO / "conf" / "trainer").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (REPO / "conf" / "dataset").glob("*.yaml"))


def datasets_by_task() -> dict[str, list[str]]:
    import yaml

    tasks: dict[str, list[str]] = {}
    for name in DATASETS:
        task = yaml.safe_load((REPO / "conf" / "dataset" / f"{name}.yaml").read_text())["task"]
        tasks.setdefault(task, []).append(name)
    return tasks


def launcher(*args: str, runs: Path, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLAUNCH_RUNS=str(runs))
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def normalise(text: str, runs: Path) -> str:
    """Machine-specific paths out, so the plan text can be compared with a golden file."""
    return text.replace(str(runs), "<RUNS>").replace(sys.executable, "<PYTHON>").replace(str(REPO), "<REPO>")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.write_text(text)
        if not os.environ.get("UPDATE_GOLDEN"):
            pytest.fail(f"golden file {path} was missing and has been written; check it and rerun")
    assert text == path.read_text(), f"plan differs from {path}; rerun with UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_every_trainer_plans_every_dataset_of_its_tasks(tmp_path, backend):
    from trainers.registry import FAMILIES

    assert sorted(FAMILIES) == TRAINERS, "every trainer family has a conf/trainer entry"
    for task, datasets in datasets_by_task().items():
        trainers = [name for name, family in FAMILIES.items() if task in family.tasks]
        assert trainers, f"no trainer trains the {task} datasets {datasets}"
        if task == "qa":  # custom_qa has no answer list: only clipbert, which builds one, takes it
            datasets = [d for d in datasets if d != "custom_qa"]
            launcher(
                "trainer=clipbert",
                "dataset=custom_qa",
                f"backend={backend}",
                "--dry-run",
                runs=tmp_path,
                check=True,
            )
            for family in ("singularity", "alpro"):
                refused = launcher(f"trainer={family}", "dataset=custom_qa", "--dry-run", runs=tmp_path)
                assert refused.returncode == 2 and "has no answer list" in refused.stderr
        # ALPRO's pretraining starts with its first stage, the prompter (the second needs a trained one).
        stage = ["trainer.stage=prompter"] if task == "pretrain_captions" else []
        if stage:
            refused = launcher("trainer=alpro", "dataset=webvid", "--dry-run", runs=tmp_path)
            assert refused.returncode == 2 and "first run trainer.stage=prompter" in refused.stderr
        proc = launcher(
            "-m",
            f"trainer={','.join(trainers)}",
            f"dataset={','.join(datasets)}",
            f"backend={backend}",
            *stage,
            "--dry-run",
            runs=tmp_path,
            check=True,
        )
        assert f"{len(trainers) * len(datasets)} job(s) on {backend}" in proc.stdout
        for dataset in datasets:
            assert f"dataset={dataset}" in proc.stdout
    assert not any(tmp_path.iterdir()), "a dry run must not write run directories"


def test_golden_sbatch_for_a_sweep(tmp_path):
    proc = launcher(
        "-m",
        "trainer=singularity",
        "dataset=didemo,msrvtt",
        "hydra/launcher=slurm",
        "site=local_slurm",
        "sweep_id=golden",
        "--dry-run",
        runs=tmp_path,
        check=True,
    )
    text = normalise(proc.stdout, tmp_path)
    assert "#SBATCH --array=0-1%2" in text
    check_golden("slurm_sweep.txt", text)


def test_golden_sbatch_for_a_two_node_job_with_every_resource(tmp_path):
    proc = launcher(
        "trainer=singularity",
        "dataset=msrvtt",
        "backend=slurm",
        "backend.partition=gpu",
        "backend.account=vl-project",
        "backend.qos=high",
        "backend.nodes=2",
        "backend.tasks_per_node=4",
        "backend.gpus_per_node=4",
        "backend.cpus_per_task=8",
        "backend.mem_gb=256",
        "backend.time_min=720",
        "backend.constraint=a100",
        "backend.exclude='gpu[07-08]'",
        "backend.signal_delay_s=300",
        "backend.setup=['module load cuda/12.4','export NCCL_DEBUG=WARN']",
        "backend.srun_args=['--cpu-bind=none']",
        "sweep_id=golden2",
        "--dry-run",
        runs=tmp_path,
        check=True,
    )
    text = normalise(proc.stdout, tmp_path)
    assert "--array" not in text, "a single run is one job, not an array"
    check_golden("slurm_two_nodes.txt", text)


def test_zero_memory_and_time_ask_slurm_for_all_memory_and_no_limit(tmp_path):
    # Slurm's own meanings of 0: --mem=0 is all of each node's memory, --time=0 no time limit.
    proc = launcher(
        "backend=slurm", "backend.mem_gb=0", "backend.time_min=0", "--dry-run", runs=tmp_path, check=True
    )
    assert "#SBATCH --mem=0GB" in proc.stdout.splitlines() and "#SBATCH --time=0" in proc.stdout.splitlines()


def test_unknown_key_fails_with_the_valid_keys(tmp_path):
    proc = launcher("-m", "dataset=didemo,msrvtt", "backend=slurm", "backend.partitio=gpu", runs=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown key 'backend.partitio'" in lines[0]
    assert "partition" in lines[0] and "tasks_per_node" in lines[0]
    assert not any(tmp_path.iterdir())


def test_unknown_choice_lists_the_options(tmp_path):
    proc = launcher("dataset=msrvt", runs=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown dataset 'msrvt'; choose one of: " + ", ".join(DATASETS)


def test_wrong_type_is_one_line(tmp_path):
    proc = launcher("backend=slurm", "backend.nodes=two", runs=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "backend.nodes=two" in proc.stderr


def test_backend_and_hydra_launcher_are_one_choice(tmp_path):
    via_launcher = launcher("hydra/launcher=slurm", "sweep_id=a", "--dry-run", runs=tmp_path, check=True)
    via_backend = launcher("backend=slurm", "sweep_id=a", "--dry-run", runs=tmp_path, check=True)
    script = lambda out: out.split("# --- sbatch", 1)[1]  # noqa: E731
    assert script(via_launcher.stdout) == script(via_backend.stdout)
    clash = launcher("backend=slurm", "hydra/launcher=local", runs=tmp_path)
    assert clash.returncode == 2 and "disagree" in clash.stderr


def test_detach_with_wait_is_one_line_and_nothing_is_recorded(tmp_path):
    proc = launcher("trainer=singularity", "--detach", "--wait", runs=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--detach and --wait contradict each other" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_detach_checks_the_tpu_endpoints_first_and_fails_on_the_terminal(tmp_path):
    """An unreachable endpoint is the one-line error on the terminal, not a background failure in a log."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = dict(os.environ, VLAUNCH_RUNS=str(tmp_path / "runs"), VLAUNCH_REGISTRY=str(tmp_path / "reg.sqlite"))
    proc = subprocess.run(
        [
            sys.executable, "-m", "launcher", "trainer=reserve", "backend=tpu_pod", "backend.project=p",
            "backend.zone=us-central2-b", "backend.bucket=gs://b/x", f"backend.api_endpoint={closed}",
            f"backend.gcs_endpoint={closed}", "--detach",
        ],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"nothing answers at {closed} (backend.gcs_endpoint" in proc.stderr
    assert "in the background" not in proc.stdout
    assert not list((tmp_path / "runs").glob("*/launcher.log"))
    from launcher.registry import Registry

    with Registry(tmp_path / "reg.sqlite") as r:
        assert [j.state for j in r.jobs(r.resolve("latest").id)] == ["FAILED_TO_SUBMIT"]


def test_site_profile_fills_unset_fields_and_the_command_line_wins(tmp_path):
    site = launcher("backend=slurm", "site=local_slurm", "--dry-run", runs=tmp_path, check=True)
    assert "#SBATCH --partition=debug" in site.stdout
    assert "#SBATCH --time=20" in site.stdout
    explicit = launcher(
        "backend=slurm", "site=local_slurm", "backend.partition=long", "--dry-run", runs=tmp_path, check=True
    )
    assert "#SBATCH --partition=long" in explicit.stdout


def test_missing_real_dataset_names_the_file(tmp_path):
    data = tmp_path / "msrvtt"
    (data / "anno").mkdir(parents=True)
    proc = launcher("dataset=msrvtt", f"dataset.data_root={data}", "--dry-run", runs=tmp_path / "runs")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert str(data / "anno" / "msrvtt_ret_train7k.json") in proc.stderr
    assert "data_root" in proc.stderr


def test_missing_pretrained_weights_stop_the_launch_before_submitting(tmp_path):
    missing = tmp_path / "nope" / "ckpt_best.pth"
    for trainer in ("singularity", "alpro"):
        proc = launcher(f"trainer={trainer}", "backend=slurm", f"trainer.pretrained={missing}", runs=tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip() == (
            f"error: trainer.pretrained={missing} does not exist; give a checkpoint file, a run directory "
            "(runs/<sweep>/jobs/<n>: its latest checkpoint) or a gs:// URL"
        )
    assert not any(tmp_path.iterdir()), "nothing is recorded or submitted"
    # A URL is read where the job runs: it plans. So is a path on a real TPU VM's disks (not this
    # machine's to check); on emulated TPU hosts (this machine) it is checked again.
    launcher("trainer.pretrained=gs://bucket/ckpt.pth", "--dry-run", runs=tmp_path, check=True)
    tpu = [
        "trainer=reserve",
        "backend=tpu_pod",
        "backend.project=p",
        "backend.zone=z",
        "backend.bucket=gs://b",
    ]
    launcher(*tpu, f"trainer.pretrained={missing}", "--dry-run", runs=tmp_path, check=True)
    emulated = launcher(
        *tpu, "backend.emulated=true", f"trainer.pretrained={missing}", "--dry-run", runs=tmp_path
    )
    assert emulated.returncode == 2 and "does not exist" in emulated.stderr


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs the Slurm client (make test installs it)")
def test_slurm_without_a_reachable_cluster_says_how_to_reach_one(tmp_path, monkeypatch):
    # A slurm.conf that names no cluster: sbatch refuses at once, and the line says what to do.
    conf = tmp_path / "slurm.conf"
    conf.touch()
    monkeypatch.setenv("SLURM_CONF", str(conf))
    proc = launcher("backend=slurm", runs=tmp_path / "runs")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: sbatch refused the sweep: ")
    assert f"SLURM_CONF={conf}" in lines[0] and "infra/local_slurm.sh up" in lines[0]
    # A SLURM_CONF that does not exist is caught before sbatch (which would retry for a minute).
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nowhere.conf"))
    proc = launcher("backend=slurm", runs=tmp_path / "runs")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: SLURM_CONF={tmp_path / 'nowhere.conf'} does not exist; point it at your cluster's slurm.conf "
        '(on this machine: infra/local_slurm.sh up, then eval "$(infra/local_slurm.sh env)")'
    )


def test_flags_work_wherever_they_are_typed(tmp_path):
    first = launcher("-m", "dataset=didemo,msrvtt", "seed=3", "--dry-run", runs=tmp_path, check=True)
    later = launcher("dataset=didemo,msrvtt", "--dry-run", "seed=3", "-m", runs=tmp_path, check=True)
    jobs = lambda out: [line for line in out.splitlines() if line.startswith("# job")]  # noqa: E731
    assert jobs(first.stdout) == jobs(later.stdout) == ["# job 0: dataset=didemo", "# job 1: dataset=msrvtt"]
    cfg = launcher("dataset=msrvtt", "--cfg", "job", runs=tmp_path, check=True)
    assert "name: msrvtt" in cfg.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["seed=abc"], "error: seed=abc must be a whole number"),
        (["dataset.sample_scale=0"], "error: dataset.sample_scale=0 must be a number > 0"),
        (  # a real TPU's paths are not checked here, its sample size is
            [
                "trainer=reserve",
                "backend=tpu_pod",
                "backend.project=p",
                "backend.zone=z",
                "backend.bucket=gs://b",
                "dataset.sample_scale=-1",
            ],
            "error: dataset.sample_scale=-1 must be a number > 0",
        ),  # fmt: skip
        (["trainer.num_workers=-2"], "error: trainer=singularity: trainer.num_workers must be >= 0"),
        (
            ["trainer=clipbert", "trainer.batch_size_test=0"],
            "error: trainer=clipbert: trainer.batch_size_test must be >= 1",
        ),
        (  # sbatch takes --array=0-1%-2 as written
            ["-m", "seed=1,2", "backend=slurm", "backend.array_parallelism=-2"],
            "error: backend.array_parallelism must be 0 or more, got -2",
        ),
        (["backend=slurm", "backend.time_min=-5"], "error: backend.time_min must be 0 or more, got -5"),
        (
            ["trainer.optim.lr=-1e-4"],
            "error: trainer=singularity: trainer.optim.lr must be >= 0, got -0.0001",
        ),
        (
            ["trainer=reserve", "trainer.optim.betas=[0.9,1.5]"],
            "error: trainer=reserve: trainer.optim.betas must be two numbers in [0, 1), got [0.9, 1.5]",
        ),
    ],
)
def test_values_a_job_cannot_run_with_are_refused_at_plan_time(tmp_path, args, expected):
    proc = launcher(*args, "--dry-run", runs=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(expected) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_machine_without_slurm_config_uses_the_running_local_cluster(tmp_path, monkeypatch):
    from launcher.backends import slurm

    state = tmp_path / "state"
    (state / "etc").mkdir(parents=True)
    (state / "run").mkdir()
    conf = state / "etc" / "slurm.conf"
    conf.write_text("ClusterName=vlaunch\n")
    monkeypatch.setattr(slurm, "SYSTEM_SLURM_CONF", tmp_path / "no-system-slurm.conf")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.setenv("VLAUNCH_SLURM_STATE", str(state))
    assert slurm.adopt_local_cluster() is None and "SLURM_CONF" not in os.environ  # not running
    (state / "run" / "slurmctld.pid").write_text(f"{os.getpid()}\n")
    assert slurm.adopt_local_cluster() == str(conf) and os.environ["SLURM_CONF"] == str(conf)
    # The user's SLURM_CONF, or a config of the machine's own, always wins.
    monkeypatch.setenv("SLURM_CONF", "/cluster/slurm.conf")
    assert slurm.adopt_local_cluster() is None and os.environ["SLURM_CONF"] == "/cluster/slurm.conf"
    monkeypatch.delenv("SLURM_CONF")
    monkeypatch.setattr(slurm, "SYSTEM_SLURM_CONF", conf)
    assert slurm.adopt_local_cluster() is None and "SLURM_CONF" not in os.environ


def test_local_cannot_span_nodes(tmp_path):
    proc = launcher("backend.nodes=2", runs=tmp_path)
    assert proc.returncode == 2 and "backend=slurm" in proc.stderr


def test_submitting_side_never_imports_the_training_stacks(tmp_path):
    code = (
        "import runpy, sys\n"
        "sys.argv = ['launcher', '-m', 'dataset=didemo,msrvtt', 'backend=slurm', '--dry-run']\n"
        "try:\n    runpy.run_module('launcher', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'jax', 'flax', 'transformers') if m in sys.modules)\n"
        "print('HEAVY:', heavy)\n"
    )
    env = dict(os.environ, VLAUNCH_RUNS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert "HEAVY: []" in out.stdout, out.stdout + out.stderr


def test_a_refused_launch_writes_nothing_over_an_earlier_sweep(tmp_path, monkeypatch):
    """A sweep id used before (in these runs, or in the registry) and a registry file that is not one are
    refused in one line before a run dir is written; before, the refused launch had already rewritten
    the earlier sweep's sweep.json and job configs with its own."""
    reg, runs = tmp_path / "registry.sqlite", tmp_path / "runs"
    old = runs / "dup"
    (old / "jobs" / "0").mkdir(parents=True)
    files = {old / "sweep.json": '{"sweep_id": "dup"}', old / "jobs" / "0" / "config.yaml": "seed: 1\n"}
    for path, text in files.items():
        path.write_text(text)
    for args in (["sweep_id=dup"], ["-m", "dataset=didemo,msrvtt", "sweep_id=dup"]):
        proc = launcher(*args, f"registry={reg}", runs=runs)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {old} already holds a sweep"), (
            proc.stderr
        )
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert {path: path.read_text() for path in files} == files

    # Recorded in the registry (Slurm refused it), then the same id under other runs: refused, no dir.
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))
    proc = launcher("backend=slurm", "sweep_id=taken", f"registry={reg}", runs=runs)
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
    other = tmp_path / "other-runs"
    proc = launcher("sweep_id=taken", f"registry={reg}", runs=other)
    assert proc.returncode == 2 and "sweep taken is already in the registry" in proc.stderr, proc.stderr
    assert not (other / "taken").exists()

    # A registry file that is not one: one line that says what to do, the file untouched, no sweep dir.
    bad = tmp_path / "not-a-registry"
    bad.write_text("notes\n")
    proc = launcher(f"registry={bad}", runs=other)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(
        f"error: cannot use the registry {bad}: file is not a database; name another"
    )
    assert bad.read_text() == "notes\n" and [p.name for p in other.iterdir()] == [".code"]


def test_a_code_snapshot_the_disk_cannot_hold_is_one_line_and_leaves_nothing(tmp_path):
    # A real write error: past RLIMIT_FSIZE a write fails with EFBIG, as on a full disk with ENOSPC
    # (Python ignores SIGXFSZ). Before, copying the checkout under runs_root ended in a traceback.
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, resource.RLIM_INFINITY))

    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", f"registry={tmp_path / 'registry.sqlite'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, VLAUNCH_RUNS=str(runs)),
        timeout=120,
        preexec_fn=small_files,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot snapshot the code under {runs}: File too large ("), (
        proc.stderr
    )
    assert "nothing was submitted: free some space there or set runs_root=" in proc.stderr
    assert [p.name for p in runs.iterdir()] == [".code"] and not list((runs / ".code").iterdir())
