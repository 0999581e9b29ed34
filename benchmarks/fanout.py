"""Fan-out: time from READY to all workers running, for 1, 4 and 16 emulated TPU workers.

For each size, a node is created through the launcher's TPU client against the fake Cloud TPU API
with real sshd workers on loopback (`infra.fake_tpu.workers.SshdWorkers`). The clock starts when
the client sees READY and stops when every worker's command has printed its first line through
`launcher.tpu.fanout.FanOut`. Target: 16 workers within 1.5x of 1 worker.

Variants (rows of the table):
  fanout        FanOut as the launcher uses it (it prefers P-256 key exchange and ECDSA host keys)
  curve25519    the same with curve25519 key exchange and ed25519 host keys (what the launcher
                asked for before), done by OpenSSH's own portable code on both ends
  sntrup761     the same with OpenSSH 9's default key exchange, the post-quantum sntrup761 hybrid,
                whose client side costs several times the CPU of curve25519
  sequential    FanOut's ssh command line, one worker after the other (what a plain loop does)

Note: here the launcher and all N "VMs" share this machine's cores, so every handshake's server
side competes with the client; on a real pod each worker has its own CPUs.

Usage: python benchmarks/fanout.py [--sizes 1 4 16] [--repeats 5] [--port 0]
"""

from __future__ import annotations

import argparse
import getpass
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.fake_tpu.server import FakeTpuConfig, FakeTpuServer  # noqa: E402
from infra.fake_tpu.workers import SshdWorkers  # noqa: E402
from launcher.tpu.client import TpuClient, TpuSpec  # noqa: E402
from launcher.tpu.fanout import FanOut, SshConfig, ensure_keypair, ssh_command, ssh_keys_metadata  # noqa: E402

ACCELERATORS = {1: "v4-8", 4: "v4-32", 16: "v4-128"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def one_run(tpu: TpuClient, node_id: str, size: int, ssh: SshConfig, metadata: str, variant: str) -> float:
    name = tpu.create_node(node_id, TpuSpec(ACCELERATORS[size], "tpu-ubuntu2204-base", metadata=metadata))
    node = tpu.wait_until(name, "READY", timeout_s=60)
    ready = time.monotonic()
    commands = [f"echo worker {i} running" for i in range(size)]
    try:
        if variant == "sequential":
            known_hosts = Path(tempfile.mkdtemp()) / "known_hosts"
            for host, command in zip(node.worker_ips, commands, strict=True):
                out = subprocess.run(ssh_command(ssh, host, command, known_hosts), capture_output=True)
                assert out.returncode == 0, out.stdout + out.stderr
            return time.monotonic() - ready
        fanout = FanOut(node.worker_ips, commands, ssh, on_line=lambda i, line: None)
        started = time.monotonic()
        fanout.start()
        codes = fanout.wait(60)
        assert codes == [0] * size, codes
        return started - ready + max(fanout.started_s)
    finally:
        tpu.delete_node(node_id)


def connection_cost(
    tpu: TpuClient, workers_dir: Path, ssh: SshConfig, metadata: str, count: int, label: str
) -> None:
    """One connection's wall time and CPU, client and server apart: `count` ssh runs, one after the
    other, to a 1-host node. The server's CPU is what its sshd's reaped children used (privilege
    separation and session processes, the remote shell included)."""
    name = tpu.create_node("bench-cost", TpuSpec(ACCELERATORS[1], "tpu-ubuntu2204-base", metadata=metadata))
    node = tpu.wait_until(name, "READY", timeout_s=60)
    try:
        (pid_file,) = [p for p in workers_dir.rglob("sshd.pid") if "bench-cost" in str(p)]
        sshd = int(pid_file.read_text())

        def server_cpu() -> float:  # utime + stime + cutime + cstime of the listening sshd
            fields = Path(f"/proc/{sshd}/stat").read_text().rsplit(")", 1)[1].split()
            return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

        argv = ssh_command(ssh, node.worker_ips[0], "echo running", Path(tempfile.mkdtemp()) / "known_hosts")
        subprocess.run(argv, capture_output=True, check=True)  # known_hosts written, caches warm
        before, server_before, start = (
            resource.getrusage(resource.RUSAGE_CHILDREN),
            server_cpu(),
            time.perf_counter(),
        )
        for _ in range(count):
            subprocess.run(argv, capture_output=True, check=True)
        wall = time.perf_counter() - start
        after, server_after = resource.getrusage(resource.RUSAGE_CHILDREN), server_cpu()
        client = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        ms = lambda t: f"{1000 * t / count:.1f} ms"  # noqa: E731
        print(
            f"{label:<12} one connection ({count} in a row): wall {ms(wall)}, CPU: ssh client {ms(client)}, "
            f"sshd side {ms(server_after - server_before)}; the rest of the wall time is waiting"
        )
    finally:
        tpu.delete_node("bench-cost")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=0, help="the workers' sshd port (0: a free one)")
    parser.add_argument("--variants", nargs="+", default=["fanout", "curve25519", "sntrup761", "sequential"])
    parser.add_argument(
        "--cost", type=int, default=20, help="connections for the per-connection cost (0: skip)"
    )
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    key, public = ensure_keypair(scratch / "keys")
    user = getpass.getuser()
    metadata = {"ssh-keys": ssh_keys_metadata(user, public)}
    port = args.port or free_port()
    config = FakeTpuConfig(workers={ACCELERATORS[n]: n for n in {1, *args.sizes}})
    base = SshConfig(user, key, port=port)
    variants = {
        "fanout": base,
        "curve25519": SshConfig(
            user,
            key,
            port=port,
            options=("KexAlgorithms=curve25519-sha256", "HostKeyAlgorithms=ssh-ed25519"),
        ),
        "sntrup761": SshConfig(
            user, key, port=port, options=("KexAlgorithms=sntrup761x25519-sha512@openssh.com",)
        ),
        "sequential": base,
    }
    results: dict[tuple[str, int], list[float]] = {}
    with FakeTpuServer(config, workers=SshdWorkers(scratch / "workers", port=port)) as fake:
        tpu = TpuClient("bench", "us-central2-b", endpoint=fake.url, poll_interval_s=0.01)
        run = 0
        for variant in args.variants:
            for size in args.sizes:
                times = results.setdefault((variant, size), [])
                for _ in range(args.repeats):
                    run += 1
                    times.append(one_run(tpu, f"bench-{run}", size, variants[variant], metadata, variant))
                print(
                    f"  {variant:<12} {size:>2} workers: " + " ".join(f"{t:.3f}" for t in times), flush=True
                )
        if args.cost:
            for variant in ("fanout", "curve25519"):
                connection_cost(tpu, scratch / "workers", variants[variant], metadata, args.cost, variant)

    print()
    print(f"READY -> all workers running (s), {args.repeats} runs each, sshd on 127.0.0.x:{port}")
    header = f"{'variant':<12}" + "".join(f"{f'{n} workers':>22}" for n in args.sizes)
    if 1 in args.sizes:
        header += f"{'max/1 (median)':>16}"
    print(header)
    for variant in args.variants:
        row = f"{variant:<12}"
        for size in args.sizes:
            times = results[(variant, size)]
            row += f"{statistics.median(times):>10.3f} [{min(times):.3f}-{max(times):.3f}]"
        if 1 in args.sizes:
            one = statistics.median(results[(variant, 1)])
            row += f"{max(statistics.median(results[(variant, n)]) for n in args.sizes) / one:>15.2f}x"
        print(row)


if __name__ == "__main__":
    main()
