"""infra/create_tpu.sh and infra/delete_tpu.sh against the local fake Cloud TPU API.

The scripts run as a user runs them (a subprocess), through the project's TPU client and the real
google-cloud-tpu library, to a `FakeTpuServer` in this process. The install step goes over real ssh
to sshd "workers" on loopback addresses (`infra/fake_tpu/workers.py`) and fetches the staged code
from fake-gcs-server.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from infra.fake_tpu.server import FakeTpuConfig, FakeTpuServer
from launcher.tpu.client import TpuClient

REPO_ROOT = Path(__file__).resolve().parents[2]
CREATE, DELETE = REPO_ROOT / "infra" / "create_tpu.sh", REPO_ROOT / "infra" / "delete_tpu.sh"
TPU = REPO_ROOT / "infra" / "tpu.sh"
PROJECT, ZONE = "test-proj", "us-central2-b"
VENV_PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")  # has fsspec and gcsfs, as a worker would


@pytest.fixture
def fake():
    # CREATING lasts long enough that the progress line shows it even on a busy machine.
    config = FakeTpuConfig(create_delay_s=0.4, delete_delay_s=0.02, accept_delay_s=0.02)
    with FakeTpuServer(config) as server:
        yield server


def _run(script: Path, *args: str, fake: FakeTpuServer, timeout: float = 120) -> subprocess.CompletedProcess:
    where = ["--project", PROJECT, "--zone", ZONE, "--api-endpoint", fake.url, "--poll-interval", "0.02"]
    return subprocess.run(
        [str(script), *args, *where], capture_output=True, text=True, timeout=timeout, check=False
    )


def _tpu(fake: FakeTpuServer) -> TpuClient:
    return TpuClient(PROJECT, ZONE, endpoint=fake.url, poll_interval_s=0.02)


def test_help_lists_every_parameter():
    out = subprocess.run([str(CREATE), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in (
        "--project", "--zone", "--accelerator-type", "--runtime-version", "--capacity", "--reservation",
        "--queued", "--network", "--subnetwork", "--service-account", "--label", "--metadata",
        "--api-endpoint", "--timeout", "--bucket", "--ssh-user", "--ssh-key-dir", "--ssh-port",
        "--python", "--install-command", "--no-install",
    ):  # fmt: skip
        assert flag in out, flag
    for capacity in ("on_demand", "spot", "preemptible", "guaranteed", "reserved"):
        assert capacity in out
    assert "exit codes" in out
    assert "--queued" in subprocess.run([str(DELETE), "--help"], capture_output=True, text=True).stdout


def test_create_then_delete_a_node(fake, tmp_path):
    created = _run(
        CREATE, "n1", "--accelerator-type", "v4-16", "--capacity", "spot", "--label", "team=vl",
        "--no-install", "--ssh-key-dir", str(tmp_path / "keys"), "--ssh-user", "alice", fake=fake,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "CREATING" in created.stderr and "READY" in created.stderr  # progress while waiting
    node = _tpu(fake).get_node("n1")
    assert node.state == "READY" and node.capacity == "spot" and node.labels == {"team": "vl"}
    public_key = (tmp_path / "keys").glob("*.pub")
    assert node.metadata["ssh-keys"].startswith("alice:ssh-")
    assert any(p.read_text().split()[1] in node.metadata["ssh-keys"] for p in public_key)

    again = _run(
        CREATE,
        "n1",
        "--accelerator-type",
        "v4-16",
        "--no-install",
        "--ssh-key-dir",
        str(tmp_path / "keys"),
        fake=fake,
    )
    assert again.returncode == 0 and "reusing the existing TPU 'n1'" in again.stderr
    assert [r["method"] for r in fake.requests() if r["method"] == "POST"] == ["POST"]  # created once

    deleted = _run(DELETE, "n1", fake=fake)
    assert deleted.returncode == 0, deleted.stderr
    assert _tpu(fake).list_nodes() == []


def test_create_then_delete_a_queued_resource(fake, tmp_path):
    created = _run(
        CREATE, "qr1", "--queued", "--accelerator-type", "v4-8", "--capacity", "spot", "--no-install",
        "--ssh-key-dir", str(tmp_path / "keys"), fake=fake,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "ACTIVE" in created.stderr
    tpu = _tpu(fake)
    assert tpu.get_queued_resource("qr1").state == "ACTIVE"

    deleted = _run(DELETE, "qr1", fake=fake)
    assert deleted.returncode == 0, deleted.stderr
    assert tpu.list_queued_resources() == [] and tpu.list_nodes() == []


def test_quota_failure_is_one_line_and_leaves_no_queued_resource(fake, tmp_path):
    fake.set_quota(8)
    result = _run(
        CREATE, "big", "--queued", "--accelerator-type", "v4-32", "--capacity", "spot", "--no-install",
        "--ssh-key-dir", str(tmp_path / "keys"), fake=fake,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "RESOURCE_EXHAUSTED" in errors[0] and "quota" in errors[0]
    assert "Traceback" not in result.stderr
    assert _tpu(fake).list_queued_resources() == []


def test_deleting_what_does_not_exist_says_so(fake):
    result = _run(DELETE, "ghost", fake=fake)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1].startswith("error: no TPU or queued resource named 'ghost'")


def test_bad_input_is_one_line(fake, tmp_path):
    no_bucket = _run(CREATE, "n2", "--accelerator-type", "v4-8", fake=fake)
    assert no_bucket.returncode == 2 and "--bucket is needed" in no_bucket.stderr
    bad_name = _run(
        CREATE,
        "Bad_Name",
        "--accelerator-type",
        "v4-8",
        "--no-install",
        "--ssh-key-dir",
        str(tmp_path / "k"),
        fake=fake,
    )
    assert bad_name.returncode == 2 and "invalid TPU name 'Bad_Name'" in bad_name.stderr
    assert "Traceback" not in no_bucket.stderr + bad_name.stderr


def test_a_type_or_version_the_zone_does_not_offer_is_refused_and_nothing_created(fake, tmp_path):
    keys = ["--no-install", "--ssh-key-dir", str(tmp_path / "k")]
    bad_type = _run(CREATE, "n4", "--accelerator-type", "v4-12", *keys, fake=fake)
    bad_version = _run(
        CREATE,
        "n4",
        "--accelerator-type",
        "v4-8",
        "--runtime-version",
        "tpu-ubuntu2204-bse",
        *keys,
        fake=fake,
    )
    assert bad_type.returncode == 2, bad_type.stderr
    assert f"error: accelerator type v4-12 is not offered in zone {ZONE} (v4 types offered there: v4-8," in (
        bad_type.stderr
    )
    assert bad_version.returncode == 2, bad_version.stderr
    assert "runtime version tpu-ubuntu2204-bse is not offered" in bad_version.stderr
    assert len((bad_type.stderr + bad_version.stderr).strip().splitlines()) == 2  # one line each
    assert not [r for r in fake.requests() if r["method"] != "GET"]


def test_offered_lists_the_zones_types_and_versions(fake):
    fake.config.runtime_versions = ["v2-alpha-tpuv6e", "tpu-ubuntu2204-base"]
    fake.config.workers = {"v4-16": 2, "v4-8": 1, "v6e-8": 1}
    result = _run(TPU, "offered", fake=fake)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "accelerator types (3):", "  v4-8", "  v4-16", "  v6e-8",
        "runtime versions (2):", "  tpu-ubuntu2204-base", "  v2-alpha-tpuv6e",
    ]  # fmt: skip


def test_the_runtime_version_defaults_to_the_generations_and_a_mismatch_is_noted(fake, tmp_path):
    keys = ["--no-install", "--ssh-key-dir", str(tmp_path / "k")]
    v5e = _run(CREATE, "lite", "--accelerator-type", "v5litepod-8", *keys, fake=fake)
    assert v5e.returncode == 0, v5e.stderr
    assert _tpu(fake).get_node("lite").runtime_version == "v2-alpha-tpuv5-lite"
    v6e = _run(
        CREATE,
        "six",
        "--accelerator-type",
        "v6e-8",
        "--runtime-version",
        "tpu-ubuntu2204-base",
        *keys,
        fake=fake,
    )
    assert v6e.returncode == 0, v6e.stderr
    assert "note: runtime version tpu-ubuntu2204-base is not the one Google documents for v6e TPUs" in (
        v6e.stdout + v6e.stderr
    )
    assert _tpu(fake).get_node("six").runtime_version == "tpu-ubuntu2204-base"  # the user's choice stands


def test_dry_run_prints_the_request_and_creates_nothing(fake):
    result = _run(
        CREATE, "n3", "--accelerator-type", "v4-8", "--bucket", "gs://vl-test", "--dry-run", fake=fake
    )
    assert result.returncode == 0, result.stderr
    assert f"POST {fake.url}/v2/projects/{PROJECT}/locations/{ZONE}/nodes?nodeId=n3" in result.stdout
    assert "gs://vl-test/vlaunch/code/" in result.stdout
    assert fake.requests() == []


def _sshd_available() -> bool:
    return Path("/usr/sbin/sshd").exists() and shutil.which("ssh") is not None


@pytest.mark.skipif(not _sshd_available(), reason="needs openssh-server and ssh (infra/ensure_sshd.sh)")
def test_create_installs_the_project_on_every_worker(fake_gcs, tmp_path):
    pytest.importorskip("launcher.tpu.fanout")
    from infra.fake_tpu.workers import SshdWorkers

    config = FakeTpuConfig(create_delay_s=0.05, delete_delay_s=0.02)
    workers = SshdWorkers(tmp_path / "vms", port=2222)
    with FakeTpuServer(config, workers=workers) as server:
        markers = tmp_path / "markers"
        markers.mkdir()
        install = f"ls pyproject.toml launcher/tpu/agent.py > {markers}/worker-$VLAUNCH_WORKER_INDEX"
        result = _run(
            CREATE, "pod", "--accelerator-type", "v4-32", "--bucket", "gs://vl-test/cli",
            "--ssh-user", getpass.getuser(), "--ssh-key-dir", str(tmp_path / "keys"), "--ssh-port", "2222",
            "--python", VENV_PYTHON,
            "--workdir", str(tmp_path / "workdir"), "--install-command", install,
            fake=server, timeout=180,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert sorted(p.name for p in markers.iterdir()) == [f"worker-{i}" for i in range(4)]
        assert "pyproject.toml" in (markers / "worker-3").read_text()  # ran inside the staged code
        assert "installed on all 4 worker(s)" in result.stderr

        failing = _run(
            CREATE, "pod", "--accelerator-type", "v4-32", "--bucket", "gs://vl-test/cli",
            "--ssh-user", getpass.getuser(), "--ssh-key-dir", str(tmp_path / "keys"), "--ssh-port", "2222",
            "--python", VENV_PYTHON,
            "--workdir", str(tmp_path / "workdir"), "--install-command", "exit 5",
            fake=server, timeout=180,
        )  # fmt: skip
        assert failing.returncode == 4, failing.stderr
        assert "reusing the existing TPU 'pod'" in failing.stderr and "exit 5" in failing.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_ctrl_c_or_kill_while_waiting_deletes_the_queued_resource(tmp_path, sig):
    config = FakeTpuConfig(accept_delay_s=300)  # stays ACCEPTED: the command waits
    with FakeTpuServer(config) as fake:
        where = ["--project", PROJECT, "--zone", ZONE, "--api-endpoint", fake.url, "--poll-interval", "0.05"]
        proc = subprocess.Popen(
            [
                str(CREATE),
                "slow",
                "--queued",
                "--accelerator-type",
                "v4-8",
                "--capacity",
                "spot",
                "--no-install",
            ]
            + ["--ssh-key-dir", str(tmp_path / "keys"), *where],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for line in proc.stderr:
                if "ACCEPTED" in line:  # it is waiting now
                    break
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 128 + sig, err
        assert ("interrupted" if sig == signal.SIGINT else "stopped by SIGTERM") in err
        assert "deleting queued resource 'slow'" in err
        assert _tpu(fake).list_queued_resources() == []
