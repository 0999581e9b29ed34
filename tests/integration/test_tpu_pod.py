"""`python -m launcher trainer=reserve backend=tpu_pod` end to end, with nothing faked but the TPU API.

The launcher talks to the fake Cloud TPU API (infra/fake_tpu) through the real google-cloud-tpu client;
the fake starts a real sshd per worker host on 127.0.0.2, 127.0.0.3; GCS is fake-gcs-server. On the
hosts, the agent fetches the staged code and config and runs the Reserve trainer: two JAX processes
on CPU with real cross-process collectives and Orbax checkpoints on the emulated gs://.
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from infra.fake_tpu.server import FakeTpuConfig, FakeTpuServer
from infra.fake_tpu.workers import SshdWorkers
from trainers.core import storage

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420
PROJECT, ZONE = "test-proj", "us-central2-b"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"), reason="needs openssh-server (make sshd)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pod(tmp_path_factory, fake_gcs_server):
    scratch = tmp_path_factory.mktemp("tpu-pod")
    port = free_port()
    workers = SshdWorkers(scratch / "workers", port=port, grace_s=60)
    with (
        pytest.MonkeyPatch.context() as patch,
        FakeTpuServer(FakeTpuConfig(create_delay_s=0.2, delete_delay_s=0.1), workers=workers) as fake,
    ):
        for name, value in fake_gcs_server.env().items():
            patch.setenv(name, value)  # this process reads the bucket too
        env = dict(os.environ)
        env["VLAUNCH_DATA_CACHE"] = str(scratch / "cache")  # shared by the hosts: prepared once
        env["VLAUNCH_REGISTRY"] = str(scratch / "registry.sqlite")
        # JAX's persistent compilation cache, handed to the hosts: later runs skip the compile.
        env["JAX_COMPILATION_CACHE_DIR"] = str(scratch / "jax-cache")
        yield {"fake": fake, "port": port, "env": env, "scratch": scratch}


@pytest.fixture(autouse=True)
def _nothing_left_for_the_next_test(pod):
    """Delete what a failed test kept: each test asserts that its own launches leave no TPU, and a TPU left
    by an earlier failure would fail it as well, hiding which test broke."""
    yield
    from launcher.tpu.client import TpuClient

    client = TpuClient(PROJECT, ZONE, endpoint=pod["fake"].url, poll_interval_s=0.1)
    where = f"/v2/projects/{PROJECT}/locations/{ZONE}"
    for queued in _get(pod["fake"], f"{where}/queuedResources").get("queuedResources", []):
        client.delete_queued_resource(queued["name"])
    for node in _get(pod["fake"], f"{where}/nodes").get("nodes", []):
        client.delete_node(node["name"])


def launch(pod, *overrides: str) -> subprocess.Popen:
    bucket = f"gs://vl-test/pod-{uuid.uuid4().hex[:8]}"
    args = [
        sys.executable, "-m", "launcher", "trainer=reserve", "backend=tpu_pod",
        f"backend.project={PROJECT}", f"backend.zone={ZONE}", f"backend.bucket={bucket}",
        f"backend.api_endpoint={pod['fake'].url}", "backend.emulated=true",
        f"backend.ssh_user={getpass.getuser()}", f"backend.ssh_port={pod['port']}",
        f"backend.python={sys.executable}", "backend.poll_s=0.5", "backend.stop_grace_s=60",
        f"backend.workdir={pod['scratch'] / 'hosts'}", "backend.capacity=spot",
        "trainer.epochs=1", "trainer.log_every=1", "trainer.save_every=4", "trainer.eval_split=none",
        f"runs_root={pod['scratch'] / 'runs'}",
        f"+backend.worker_env.JAX_COMPILATION_CACHE_DIR={pod['env']['JAX_COMPILATION_CACHE_DIR']}",
        *overrides,
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=REPO, env=pod["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    proc.bucket = bucket
    proc.lines = []
    return proc


def read_until(proc: subprocess.Popen, done, timeout_s: float = TIMEOUT_S) -> None:
    """Read the launcher's output until `done()` is true (checked after every line) or it exits."""
    deadline = time.monotonic() + timeout_s
    while not done():
        line = proc.stdout.readline()
        if not line:
            return
        proc.lines.append(line)
        assert time.monotonic() < deadline, "".join(proc.lines[-50:])


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    read_until(proc, lambda: False)
    return proc.wait(timeout=60), "".join(proc.lines)


def output_of(proc: subprocess.Popen) -> str:
    """The job's output URL in the bucket (sweep ids are made by the launcher)."""
    (sweep,) = [e for e in storage.listdir(proc.bucket) if e != "code"]
    return f"{proc.bucket}/{sweep}/jobs/0"


def digest(url: str) -> str:
    return storage.read_text(f"{url}/status/params.rank0.sha256").strip()


def until_checkpoint_4(proc: subprocess.Popen) -> str:
    """Read the launcher's output until its TPU is READY and step 4's checkpoint is committed in the
    bucket; return the TPU's name."""
    seen_node: list[str] = []

    def committed() -> bool:
        if not seen_node:
            seen_node.extend(
                line.split("TPU ", 1)[1].split(" ", 1)[0] for line in proc.lines if "is READY" in line
            )
            return False
        return any("checkpoint step 4 started" in line for line in proc.lines) and storage.exists(
            f"{output_of(proc)}/checkpoints/4/commit_success.txt"
        )

    read_until(proc, committed)
    assert seen_node, "".join(proc.lines[-50:])
    return seen_node[0]


@pytest.fixture(scope="module")
def uninterrupted(pod):
    """The digest of the final parameters of a run nobody interrupts."""
    straight = launch(pod)
    code, text = finish(straight)
    assert code == 0, text[-4000:]
    assert "[job 0 w0]" in text and "[job 0 w1]" in text  # both hosts' logs, prefixed
    assert "COMPLETED" in text and "0 recreation(s)" in text
    assert not _get(pod["fake"], f"/v2/projects/{PROJECT}/locations/{ZONE}/nodes").get(
        "nodes"
    )  # deleted after
    return digest(output_of(straight))


@pytest.mark.parametrize(
    ("queued", "gone"),
    [(False, "PREEMPTED"), (True, "SUSPENDED")],  # a spot node; a spot queued resource (its node goes too)
    ids=["node", "queued-resource"],
)
def test_a_preempted_pod_is_recreated_and_resumes_to_the_parameters_of_an_uninterrupted_run(
    pod, uninterrupted, queued, gone
):
    fake = pod["fake"]
    runs_before = len(list((pod["scratch"] / "runs").glob("*/jobs/0/metrics.json")))
    # The same run, preempted through the API once a checkpoint is committed.
    fake.clear_requests()
    proc = launch(pod, f"backend.queued={str(queued).lower()}")
    seen_node = [until_checkpoint_4(proc)]
    fake.preempt(seen_node[0], PROJECT, ZONE)
    code, text = finish(proc)
    assert code == 0, text[-4000:]
    assert f"is {gone}" in text and "recreating the TPU (retry 1/3)" in text, text[-4000:]
    assert "1 recreation(s)" in text
    # The second start resumed from a committed checkpoint rather than from scratch.
    assert "(own checkpoint step" in text, text[-4000:]
    assert digest(output_of(proc)) == uninterrupted
    kind = "queuedResources" if queued else "nodes"
    creates = [r for r in fake.requests() if r["method"] == "POST" and r["path"].endswith(f"/{kind}")]
    assert len(creates) == 2  # created, preempted, deleted, created again
    # teardown=delete: nothing is left running, billed or holding quota.
    for listing in ("nodes", "queuedResources"):
        assert not _get(fake, f"/v2/projects/{PROJECT}/locations/{ZONE}/{listing}").get(listing)
    # The registry has the run, and the run dir the trainer's metrics.
    runs = list((pod["scratch"] / "runs").glob("*/jobs/0/metrics.json"))
    assert len(runs) == runs_before + 1
    from launcher.registry import Registry

    reg = Registry(Path(pod["env"]["VLAUNCH_REGISTRY"]))
    sweep = reg.resolve("latest")
    (job,) = reg.jobs(sweep.id)
    assert (job.state, job.exit_code, job.handle) == ("COMPLETED", 0, seen_node[0])
    assert job.checkpoint == f"{output_of(proc)}/checkpoints/10" and job.checkpoint_step == 10
    assert job.requeues == 1  # the recreation, as `vlaunch-ctl status` shows it
    (requeue,) = [e for e in reg.events(sweep.id, 0) if e.kind == "requeue"]
    assert requeue.detail == f"preempted, TPU {seen_node[0]}"


def _kill_session_sshd(fake, node_id: str, worker: int) -> None:
    """Cut one worker's ssh connection as a network failure or a dying host would: kill the sshd
    process that serves the launcher's session (the worker's listening sshd stays up)."""
    workers = fake.state.workers
    node = next(n for name, n in workers._nodes.items() if name.endswith(f"/nodes/{node_id}"))
    listener = node.workers[worker].process.pid
    children = [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(int(d)) == listener]
    assert children, "no ssh session on that worker"
    for pid in children:
        os.kill(pid, signal.SIGKILL)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_lost_connection_runs_the_hosts_again_on_the_same_tpu_to_the_uninterrupted_parameters(
    pod, uninterrupted
):
    """A worker's ssh session dies mid-run with the TPU still READY (its sshd killed): the other host
    is stopped and saves, the launcher runs both hosts again on the same TPU (no delete, no create),
    and they resume from the committed checkpoint to the parameters of an uninterrupted run."""
    fake = pod["fake"]
    fake.clear_requests()
    proc = launch(pod)
    seen_node = [until_checkpoint_4(proc)]
    _kill_session_sshd(fake, seen_node[0], worker=1)
    code, text = finish(proc)
    assert code == 0, text[-4000:]
    assert "lost the connection to w1; running again on TPU" in text, text[-4000:]
    assert "0 recreation(s), 1 rerun(s) after a lost connection" in text, text[-4000:]
    assert "(own checkpoint step" in text, text[-4000:]
    assert digest(output_of(proc)) == uninterrupted
    changes = [r for r in fake.requests() if r["method"] in ("POST", "DELETE")]
    assert [r["method"] for r in changes] == ["POST", "DELETE"]  # created once, deleted at the end
    from launcher.registry import Registry

    reg = Registry(Path(pod["env"]["VLAUNCH_REGISTRY"]))
    sweep = reg.resolve("latest")
    (job,) = reg.jobs(sweep.id)
    assert (job.state, job.requeues) == ("COMPLETED", 1)
    (requeue,) = [e for e in reg.events(sweep.id, 0) if e.kind == "requeue"]
    assert requeue.detail == f"lost the connection to w1, TPU {seen_node[0]}"


def test_a_reused_tpu_runs_a_failing_trainer_once_and_is_kept(pod):
    """backend.tpu_name reuses a READY TPU (no create call), whatever runtime version the config names
    (the zone may no longer offer the one it was made with); a trainer failure is not retried; a TPU
    named by the user is kept after the job."""
    from launcher.tpu.client import TpuClient, TpuSpec
    from launcher.tpu.fanout import ensure_keypair, ssh_keys_metadata

    fake = pod["fake"]
    _key, public = ensure_keypair(pod["scratch"] / "runs" / ".ssh")  # the launcher's key (runs_root/.ssh)
    client = TpuClient(PROJECT, ZONE, endpoint=fake.url, poll_interval_s=0.1)
    metadata = {"ssh-keys": ssh_keys_metadata(getpass.getuser(), public)}
    name = client.create_node("mine", TpuSpec("v4-16", "tpu-ubuntu2204-base", metadata=metadata))
    client.wait_until(name, "READY", 60)
    fake.clear_requests()
    proc = launch(
        pod,
        "backend.tpu_name=mine",
        "backend.runtime_version=tpu-vm-v4-base-retired",
        "trainer.resume_from=gs://vl-test/no-such-checkpoint",
    )
    code, text = finish(proc)
    assert code == 1, text[-4000:]
    assert "reusing TPU mine" in text and "FAILED" in text and "recreating" not in text, text[-4000:]
    assert "no-such-checkpoint" in text  # the trainer's own reason, from the hosts' logs
    assert not [r for r in fake.requests() if r["method"] in ("POST", "DELETE")]  # no create, no delete
    assert client.get_node("mine").state == "READY"
    client.delete_node("mine")


def test_a_runtime_version_the_zone_does_not_offer_stops_the_launch_before_anything_happens(pod):
    """A typo in backend.runtime_version is found by asking the API what the zone offers: one line,
    exit 2, no TPU asked for and nothing staged to the bucket."""
    fake = pod["fake"]
    fake.clear_requests()
    proc = launch(pod, "backend.runtime_version=tpu-ubuntu2204-bse")
    code, text = finish(proc)
    assert code == 2, text
    assert (
        f"error: runtime version tpu-ubuntu2204-bse is not offered in zone {ZONE} (offered there: "
        "tpu-ubuntu2204-base," in text
    ), text
    assert "Traceback" not in text
    assert not [r for r in fake.requests() if r["method"] != "GET"]  # nothing created
    assert not storage.exists(proc.bucket)  # nothing staged


def test_ctrl_c_stops_the_hosts_and_deletes_the_queued_resource(pod):
    fake = pod["fake"]
    proc = launch(pod, "backend.queued=true", "backend.teardown=keep")
    read_until(proc, lambda: any("starting at step" in line for line in proc.lines))
    proc.send_signal(signal.SIGINT)
    code, text = finish(proc)
    assert code == 130 and "interrupted; continue the unfinished jobs with: vlaunch-ctl resume" in text, text[
        -4000:
    ]
    assert "stopping the trainer on 2 host(s)" in text, text[-4000:]
    # Even with teardown=keep, an interrupted queued resource must not keep holding quota.
    assert "deleting queued resource" in text, text[-4000:]
    assert not _get(fake, f"/v2/projects/{PROJECT}/locations/{ZONE}/queuedResources").get("queuedResources")

    # `vlaunch-ctl resume` creates the TPU again: new host keys at the same IPs (the job's known_hosts
    # from the first run refused them: "Host key verification failed"), and it goes on from the
    # checkpoint the hosts saved when interrupted.
    resume = subprocess.run(
        [sys.executable, "-m", "launcher.ctl", "resume", "latest"],
        cwd=REPO, env=pod["env"], capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    text = resume.stdout + resume.stderr
    assert resume.returncode == 0 and "(own checkpoint step" in text, text[-4000:]
    from launcher.registry import Registry

    reg = Registry(Path(pod["env"]["VLAUNCH_REGISTRY"]))
    assert [j.state for j in reg.jobs(reg.resolve("latest").id)] == ["COMPLETED"]
    # This time it succeeded, so teardown=keep keeps it.
    (kept,) = _get(fake, f"/v2/projects/{PROJECT}/locations/{ZONE}/queuedResources")["queuedResources"]
    from launcher.tpu.client import TpuClient

    TpuClient(PROJECT, ZONE, endpoint=fake.url, poll_interval_s=0.1).delete_queued_resource(kept["name"])


def test_an_interrupted_job_whose_tpu_cannot_be_deleted_is_recorded_cancelled(pod):
    """The API is down when Ctrl-C comes (every delete answers UNAVAILABLE). Before, the teardown's error
    came before the job's end was recorded, and the registry kept it RUNNING for good."""
    fake = pod["fake"]
    proc = launch(pod)
    read_until(proc, lambda: any("starting at step" in line for line in proc.lines))
    _post(fake, "/_fake/config", {"refuse_deletes": "UNAVAILABLE"})
    try:
        proc.send_signal(signal.SIGINT)
        code, text = finish(proc)
    finally:
        _post(fake, "/_fake/config", {"refuse_deletes": None})
    assert code == 2, text[-4000:]
    assert re.search(r"error: Cloud TPU API: cannot delete TPU .+: UNAVAILABLE: ", text), text[-4000:]
    from launcher.registry import Registry

    reg = Registry(Path(pod["env"]["VLAUNCH_REGISTRY"]))
    assert [j.state for j in reg.jobs(reg.resolve("latest").id)] == ["CANCELLED"]
    # The TPU is still there, as the error says (the autouse fixture deletes it).
    assert _get(fake, f"/v2/projects/{PROJECT}/locations/{ZONE}/nodes").get("nodes")


def test_kill_stops_every_job_of_a_parallel_sweep_and_deletes_their_tpus(pod):
    """backend.max_parallel=2: both jobs train at once, each on its own TPU (one host each here); kill
    stops both at a checkpoint and deletes both TPUs. (The scheduling itself: test_tpu_parallel.py.)"""
    fake = pod["fake"]
    proc = launch(pod, "-m", "seed=1,2", "backend.max_parallel=2", "backend.accelerator_type=v4-8")
    started = set()

    def both_training() -> bool:
        started.update(line[:7] for line in proc.lines if "starting at step" in line)
        return len(started) == 2

    read_until(proc, both_training)
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc)
    assert code == 128 + signal.SIGTERM, text[-4000:]
    assert "2 job(s) on tpu_pod, 2 at once, each on its own TPU" in text, text[-4000:]
    assert "stopped by SIGTERM; continue the unfinished jobs with: vlaunch-ctl resume" in text, text[-4000:]
    assert text.count("stopping the trainer on 1 host(s)") == 2, text[-4000:]
    assert not _get(fake, f"/v2/projects/{PROJECT}/locations/{ZONE}/nodes").get("nodes")
    from launcher.registry import Registry

    reg = Registry(Path(pod["env"]["VLAUNCH_REGISTRY"]))
    jobs = reg.jobs(reg.resolve("latest").id)
    assert [(j.num, j.state) for j in jobs] == [(0, "CANCELLED"), (1, "CANCELLED")]


def test_a_detached_tpu_sweep_is_cancelled_job_by_job_and_resume_leaves_it_alone(pod):
    """--detach: the launch returns at once and a background launcher runs the sweep. From another
    terminal, `resume` must not start a second copy of its jobs, and `cancel <sweep> 0` stops job 0
    through that launcher (hosts save, TPU deleted) while the sweep goes on to job 1, which a second
    `cancel` stops too."""
    fake = pod["fake"]
    proc = launch(pod, "-m", "seed=1,2", "backend.accelerator_type=v4-8", "--detach")
    code, text = finish(proc)
    assert code == 0 and "2 job(s) on tpu_pod, run in the background by pid" in text, text[-4000:]
    from launcher import registry
    from launcher.registry import Registry

    reg = Registry(Path(pod["env"]["VLAUNCH_REGISTRY"]))
    sweep = reg.resolve("latest")
    log = Path(sweep.runs_dir) / "launcher.log"
    background = int(text.split("run in the background by pid ")[1].split()[0])

    def said(what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while what not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launcher.ctl", *args],
            cwd=REPO, env=pod["env"], capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip

    said("starting at step")
    resume = ctl("resume", "latest")
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert "2 job(s) still queued or running, left alone: [0, 1]" in resume.stdout, resume.stdout
    assert "nothing to resume" in resume.stdout, resume.stdout

    cancel = ctl("cancel", "latest", "0")
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert f"asked the launcher (pid {background}) to stop job(s) 0" in cancel.stdout, cancel.stdout
    assert "cancelled 1 job(s): 0" in cancel.stdout, cancel.stdout
    said("job 1 (seed=2): TPU")
    cancel = ctl("cancel", "latest")
    assert cancel.returncode == 0 and "cancelled 1 job(s): 1" in cancel.stdout, cancel.stdout + cancel.stderr

    deadline = time.monotonic() + 60
    while registry.watcher(reg.jobs(sweep.id)[0].run_dir)[0] == "alive":  # it ends with its jobs
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    text = log.read_text()
    assert "job 0: cancelled (vlaunch-ctl cancel)" in text, text[-4000:]
    assert "(empty log)" not in text, text[-4000:]  # cancelled on purpose: no failure report
    assert "stopping the trainer on 1 host(s)" in text, text[-4000:]
    assert not _get(fake, f"/v2/projects/{PROJECT}/locations/{ZONE}/nodes").get("nodes")
    assert [(j.num, j.state) for j in reg.jobs(sweep.id)] == [(0, "CANCELLED"), (1, "CANCELLED")]
    assert not list(Path(sweep.runs_dir).glob("jobs/*/launcher.json"))  # nobody watches them now


def _get(fake, path: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(fake.url + path, timeout=10) as r:
        return json.load(r)


def _post(fake, path: str, body: dict) -> dict:
    import json
    import urllib.request

    request = urllib.request.Request(
        fake.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)
