"""Emulated TPU workers (real sshd on loopback addresses) and the launcher's SSH fan-out to them.

The fake Cloud TPU API starts one sshd per worker host of a node on the node's network endpoints
(127.0.0.2, 127.0.0.3, ...) with the keys from the node's `ssh-keys` metadata. The launcher's real
TPU client creates the node; `FanOut` runs one command per worker over real ssh.
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import socket
import sys
import threading
import time

import pytest

from infra.fake_tpu.server import FakeTpuConfig, FakeTpuServer
from infra.fake_tpu.workers import SshdWorkers, parse_ssh_keys
from launcher.tpu.client import TpuClient, TpuSpec
from launcher.tpu.fanout import FanOut, SshConfig, ensure_keypair, ssh_keys_metadata

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/usr/sbin/sshd") and shutil.which("ssh") and sys.platform == "linux"),
    reason="needs openssh-server (/usr/sbin/sshd) and the ssh client on Linux",
)

PROJECT, ZONE, RUNTIME = "test-proj", "us-central2-b", "tpu-ubuntu2204-base"
USER = getpass.getuser()
PY = shlex.quote(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def accepts(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((ip, port)) == 0


class Lines:
    """Collects FanOut's lines by worker and lets a test wait for one."""

    def __init__(self):
        self.by_worker: dict[int, list[str]] = {}
        self._cond = threading.Condition()

    def __call__(self, index: int, line: str) -> None:
        with self._cond:
            self.by_worker.setdefault(index, []).append(line)
            self._cond.notify_all()

    def wait_for(self, text: str, workers: list[int], timeout_s: float = 20) -> None:
        def seen() -> bool:
            return all(any(text in line for line in self.by_worker.get(i, [])) for i in workers)

        with self._cond:
            assert self._cond.wait_for(seen, timeout_s), f"{text!r} not seen from {workers}: {self.by_worker}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("tpu-workers")
    key, public = ensure_keypair(scratch / "keys")
    port = free_port()
    workers = SshdWorkers(scratch / "workers", port=port, grace_s=5)
    config = FakeTpuConfig(create_delay_s=0.05, delete_delay_s=0.05)
    with FakeTpuServer(config, workers=workers) as fake:
        tpu = TpuClient(PROJECT, ZONE, endpoint=fake.url, poll_interval_s=0.02)
        yield {
            "fake": fake,
            "tpu": tpu,
            "workers": workers,
            "port": port,
            "ssh": SshConfig(USER, key, port=port, connect_timeout_s=5),
            "metadata": {"ssh-keys": ssh_keys_metadata(USER, public)},
            "scratch": scratch,
        }
    assert not any(workers.running(n) for n in list(workers._nodes)), "FakeTpuServer.stop() left sshds"


@pytest.fixture
def node(env, request):
    """A READY 2-worker spot node (v4-16) with the launcher's key; deleted afterwards."""
    node_id = request.node.name.replace("_", "-")[:40].strip("-").lower()
    tpu = env["tpu"]
    name = tpu.create_node(node_id, TpuSpec("v4-16", RUNTIME, capacity="spot", metadata=env["metadata"]))
    ready = tpu.wait_until(name, "READY", timeout_s=30)
    yield ready
    tpu.delete_node(node_id)


def test_ssh_keys_metadata_is_what_the_workers_install(tmp_path):
    key, public = ensure_keypair(tmp_path)
    assert (key.stat().st_mode & 0o777) == 0o600 and public.startswith("ssh-ed25519 ")
    assert ensure_keypair(tmp_path) == (key, public), "a second call must reuse the pair"
    value = ssh_keys_metadata("alice", public) + "\n" + ssh_keys_metadata("bob", public)
    assert parse_ssh_keys(value) == {"alice": [public], "bob": [public]}
    with pytest.raises(ValueError, match="ssh user"):
        ssh_keys_metadata("al ice", public)


def test_each_worker_runs_its_command_and_streams_prefixed_lines(env, node, tmp_path):
    assert node.worker_ips == ["127.0.0.2", "127.0.0.3"]
    lines = Lines()
    commands = [f'echo "worker {i} via $SSH_CONNECTION"; echo done {i}; exit {3 * i}' for i in range(2)]
    fanout = FanOut(
        node.worker_ips, commands, env["ssh"], on_line=lines, log_dir=tmp_path, stop_on_failure=False
    )
    codes = fanout.start().wait(timeout_s=30)

    assert codes == [0, 3]
    for i, ip in enumerate(node.worker_ips):
        # SSH_CONNECTION = "client-ip client-port server-ip server-port": each worker's own sshd.
        assert (
            lines.by_worker[i][0].startswith(f"worker {i} via ")
            and f" {ip} {env['port']}" in lines.by_worker[i][0]
        )
        assert lines.by_worker[i][1] == f"done {i}"
        assert (tmp_path / f"worker{i}.log").read_text().splitlines() == lines.by_worker[i]
    assert all(s is not None for s in fanout.started_s)
    assert fanout.first_failure == 1


def test_connections_use_p256_and_ecdsa_host_keys_unless_the_user_says_otherwise(env, node, tmp_path):
    """The launcher asks for the key exchange and host key type that OpenSSL does fast (a third less
    CPU per connection than curve25519 in OpenSSH's own code, benchmarks/fanout.py); a user's
    `HostKeyAlgorithms` in SshConfig.options wins. The per-run known_hosts shows what was used."""
    from dataclasses import replace

    for options, key_type in [
        ((), "ecdsa-sha2-nistp256"),
        (("HostKeyAlgorithms=ssh-ed25519",), "ssh-ed25519"),
    ]:
        known_hosts = tmp_path / f"known_hosts-{key_type}"
        ssh = replace(env["ssh"], known_hosts=known_hosts, options=options)
        assert FanOut(node.worker_ips, ["true", "true"], ssh, on_line=lambda i, line: None).start().wait(
            30
        ) == [
            0,
            0,
        ]
        types = {line.split()[1] for line in known_hosts.read_text().splitlines()}
        assert types == {key_type}, known_hosts.read_text()


def test_a_program_exiting_255_is_a_failure_not_a_lost_connection(env, node):
    """ssh exits 255 for its own failures too; only its connection-lost message after the program's
    output marks a worker as cut off (the launcher reruns those, never a program's own failure)."""
    commands = ['echo working; echo "Connection refused by nothing"; exit 255', "echo fine"]
    fanout = FanOut(node.worker_ips, commands, env["ssh"], on_line=Lines(), stop_on_failure=False)
    assert fanout.start().wait(timeout_s=30) == [255, 0]
    assert fanout.lost == [False, False]


def test_default_output_is_prefixed_with_the_worker_index(env, node, capfd):
    FanOut(node.worker_ips, ["echo hello", "echo world"], env["ssh"]).start().wait(timeout_s=30)
    out = capfd.readouterr().out.splitlines()
    assert sorted(out) == ["[w0] hello", "[w1] world"]


def test_a_failing_worker_stops_the_others(env, node):
    # Worker 1 runs what the launcher's agent does: a child, SIGTERMed when stdin reaches EOF.
    agent_like = (
        "import subprocess, sys\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        "print('child started', flush=True)\n"
        "sys.stdin.read()\n"
        "child.terminate()\n"
        "print('child stopped by signal', -child.wait(), flush=True)\n"
        "sys.exit(143)\n"
    )
    commands = ["sleep 0.5; echo failing; exit 7", f"exec {PY} -c {shlex.quote(agent_like)}"]
    lines = Lines()
    fanout = FanOut(node.worker_ips, commands, env["ssh"], on_line=lines).start()
    codes = fanout.wait(timeout_s=30)

    assert codes == [7, 143]
    assert fanout.first_failure == 0
    assert "child stopped by signal 15" in lines.by_worker[1]
    assert env["workers"].session_pids(node.name) == [], "the remote sleep must be gone"


def test_preemption_sigterms_remote_processes_then_stops_sshd(env, node):
    script = "trap 'echo worker {i} got SIGTERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done"
    lines = Lines()
    fanout = FanOut(node.worker_ips, [script.format(i=i) for i in range(2)], env["ssh"], on_line=lines)
    fanout.start()
    lines.wait_for("ready", [0, 1])

    env["fake"].preempt(node.node_id)

    assert env["tpu"].get_node(node.node_id).state == "PREEMPTED"
    # The sessions outlive the signal by the grace period, so the trap's exit code comes back.
    assert fanout.wait(timeout_s=30) == [42, 42]
    for i in range(2):  # bash may first report its sleep as "Terminated"
        assert f"worker {i} got SIGTERM" in lines.by_worker[i], lines.by_worker[i]
    assert env["workers"].join(timeout_s=30)
    assert not env["workers"].running(node.name)
    assert not any(accepts(ip, env["port"]) for ip in node.worker_ips)


def test_preemption_kills_what_ignores_sigterm_after_the_grace_period(env, node):
    workers = env["workers"]
    lines = Lines()
    # Ignored signals stay ignored across exec: the sleep ignores SIGTERM too.
    commands = ["trap '' TERM; echo ready; sleep 300"] * 2
    fanout = FanOut(node.worker_ips, commands, env["ssh"], on_line=lines, stop_on_failure=False).start()
    lines.wait_for("ready", [0, 1])
    assert len(workers.session_pids(node.name)) >= 2
    workers.grace_s = 0.5
    try:
        env["fake"].preempt(node.node_id)
        assert workers.join(timeout_s=30)
    finally:
        workers.grace_s = 5
    assert workers.session_pids(node.name) == []
    assert fanout.wait(timeout_s=30) == [255, 255], "the connection dies with the VM"


def test_a_key_not_in_the_metadata_is_refused(env, node, tmp_path):
    other_key, _ = ensure_keypair(tmp_path / "other")
    lines = Lines()
    ssh = SshConfig(USER, other_key, port=env["port"], connect_timeout_s=5)
    codes = (
        FanOut(node.worker_ips, ["echo in"] * 2, ssh, on_line=lines, stop_on_failure=False).start().wait(30)
    )
    assert codes == [255, 255]
    assert all("Permission denied" in " ".join(lines.by_worker[i]) for i in range(2)), lines.by_worker
    assert not any("in" == line for i in range(2) for line in lines.by_worker[i])


def test_deleting_the_node_stops_its_sshds_and_sessions(env):
    tpu, workers = env["tpu"], env["workers"]
    name = tpu.create_node("doomed", TpuSpec("v4-16", RUNTIME, metadata=env["metadata"]))
    node = tpu.wait_until(name, "READY", timeout_s=30)
    assert all(accepts(ip, env["port"]) for ip in node.worker_ips), "READY means the workers accept ssh"
    lines = Lines()
    fanout = FanOut(node.worker_ips, ["echo up; exec sleep 300"] * 2, env["ssh"], on_line=lines).start()
    lines.wait_for("up", [0, 1])

    tpu.delete_node("doomed")

    assert not workers.running(name) and workers.session_pids(name) == []
    assert not any(accepts(ip, env["port"]) for ip in node.worker_ips)
    assert fanout.wait(timeout_s=30) == [255, 255]


def test_a_refused_connection_is_retried_until_sshd_listens(env, tmp_path):
    """sshd may still be starting when the launcher connects: FanOut retries instead of failing."""
    workers = SshdWorkers(tmp_path / "late", port=env["port"])
    ip, name = "127.0.0.250", "projects/p/locations/z/nodes/late"
    assert not accepts(ip, env["port"])
    fanout = FanOut([ip], ["echo made it"], env["ssh"], on_line=Lines()).start()
    time.sleep(0.5)  # let the first attempt be refused
    try:
        workers.node_ready(name, [ip], env["metadata"])
        assert fanout.wait(timeout_s=30) == [0]
    finally:
        workers.close()
    assert fanout.on_line.by_worker[0] == ["made it"]
