"""The fake Cloud TPU API's "VMs": one real sshd per worker host, on the node's loopback addresses.

`FakeTpuServer(config, workers=SshdWorkers(state_dir))` calls three hooks:

    node_ready(node_name, worker_ips, metadata)   before the node is reported READY
    node_gone(node_name, "deleted")               when its delete finishes: everything is killed now
    node_gone(node_name, "preempted")             at the preempt hook: returns at once, see below

On a real TPU, READY means the worker VMs are booted, so the fake starts (and waits for) every sshd
before it answers READY: a launcher that connects right after READY gets in, as on a real pod.

Each worker's sshd listens on `<worker ip>:<port>` (default 2222, never 22, so a real sshd on the
host is never in the way) and takes public keys only, from the node's `ssh-keys` metadata, which
holds lines `user:ssh-ed25519 AAAA... comment` (what the guest agent installs on a real TPU VM).
Unlike the guest agent, the fake creates no accounts: the user must exist on this machine (tests
log in as the current user); sessions get `HOME=state_dir/<node>/worker<i>/home`, a home of that
worker's own. Host keys, configs, pid files and logs live under `state_dir/<node>/worker<i>/`; a node gets fresh host keys every time it becomes READY, as a
recreated TPU VM does. Nothing in /etc/ssh or ~/.ssh is read or written; the one system-wide
effect is creating sshd's compiled-in privilege separation directory (/run/sshd) when it is missing.

A preemption is what a spot VM going away looks like from inside: every process in the workers'
ssh sessions gets SIGTERM, then `grace_s` seconds (for the trainer to save a checkpoint), then
SIGKILL, and the sshds stop. This runs in a background thread so the API answers at once; the
session sshds stay up during the grace period, so a process that exits in time still reports its
exit status to its ssh client. Note that every session process gets the signal, including a shell
wrapped around the trainer; a launcher should learn of a preemption from the node state, not from
exit codes alone.

Session processes are found through /proc, two ways that back each other up: every process that
descends from a worker's sshd and is not an sshd itself, and every process whose environment holds
this worker's marker (`FAKE_TPU_SESSION=<token>`, set by sshd's `SetEnv` in every session and
inherited by everything the session starts, so a process that double-forks away from sshd is still
found). Linux only; stdlib only.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_MARKER = "FAKE_TPU_SESSION"
_SSHD_NAMES = frozenset({"sshd", "sshd-session", "sshd-auth"})
# Host keys of every worker, new each time its node becomes READY. A TPU VM's image has these two (and
# an RSA key, left out: generating one costs a tenth of a second per worker).
_HOST_KEY_TYPES = ("ed25519", "ecdsa")


def parse_ssh_keys(value: str) -> dict[str, list[str]]:
    """The `ssh-keys` metadata value -> {user: [public key line, ...]}; malformed lines are skipped."""
    keys: dict[str, list[str]] = {}
    for line in value.splitlines():
        user, sep, key = line.strip().partition(":")
        if sep and user and key.strip() and not re.search(r"\s", user):
            keys.setdefault(user, []).append(key.strip())
    return keys


def _proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    return head.partition("(")[2], fields[0], int(fields[1])


def _process_table() -> dict[int, tuple[str, str, int]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    return table


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


@dataclass
class _Worker:
    index: int
    ip: str
    directory: Path
    token: str
    process: subprocess.Popen | None = None


@dataclass
class _Node:
    name: str
    workers: list[_Worker]
    cut_grace: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class SshdWorkers:
    """One sshd per worker host of every READY node of a `FakeTpuServer` (see the module docstring).

    state_dir  scratch folder for host keys, sshd configs, pid files and sshd logs
    port       the port every worker's sshd listens on, at the worker's own IP (never 22)
    grace_s    seconds between SIGTERM and SIGKILL when a node is preempted
    """

    def __init__(
        self,
        state_dir: str | Path,
        port: int = 2222,
        grace_s: float = 10.0,
        sshd: str = "/usr/sbin/sshd",
        start_timeout_s: float = 10.0,
    ):
        if port == 22:
            raise ValueError("SshdWorkers must not listen on port 22 (the host's own sshd); pick another.")
        if not os.path.isabs(sshd):
            raise ValueError(f"sshd must be an absolute path (sshd re-executes itself), got {sshd!r}.")
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.grace_s = grace_s
        self.sshd = sshd
        self.start_timeout_s = start_timeout_s
        self._lock = threading.RLock()
        self._nodes: dict[str, _Node] = {}
        self._dying: list[_Node] = []

    # ---------------------------------------------------------------- hooks

    def node_ready(self, node_name: str, worker_ips: list[str], metadata: dict[str, str]) -> None:
        """Start one sshd per worker and return once all of them accept connections."""
        with self._lock:
            self._retire_overlapping(node_name, worker_ips)
            node_dir = self.state_dir / _safe(node_name)
            shutil.rmtree(node_dir, ignore_errors=True)
            keys = parse_ssh_keys(metadata.get("ssh-keys", ""))
            node = _Node(
                node_name,
                [
                    _Worker(i, ip, node_dir / f"worker{i}", secrets.token_hex(8))
                    for i, ip in enumerate(worker_ips)
                ],
            )
            self._nodes[node_name] = node
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            try:
                # All host keys first (ssh-keygen runs in parallel), then all sshds, then one wait.
                keygens = [k for w in node.workers for k in self._write_worker_files(w, keys)]
                for keygen in keygens:
                    if keygen.wait() != 0:
                        raise RuntimeError(f"ssh-keygen failed: {keygen.stderr.read().decode().strip()}")
                for worker in node.workers:
                    worker.process = self._spawn_sshd(worker)
                self._wait_listening(node)
            except BaseException:
                self._stop_node(node, grace_s=0)
                del self._nodes[node_name]
                raise

    def node_gone(self, node_name: str, reason: str) -> None:
        """`deleted`: kill every session process and stop the sshds now. `preempted`: the same after
        SIGTERM and a grace period, in a background thread (returns at once). Unknown nodes: no-op."""
        if reason not in ("deleted", "preempted"):
            raise ValueError(f"reason must be 'deleted' or 'preempted', got {reason!r}.")
        with self._lock:
            node = self._nodes.pop(node_name, None)
            if reason == "deleted":
                # A delete ends any preemption grace period of this node at once.
                for dying in [d for d in self._dying if d.name == node_name]:
                    dying.cut_grace.set()
                    self._join_dying(dying)
                if node is not None:
                    self._stop_node(node, grace_s=0)
                return
            if node is None:
                return
            node.thread = threading.Thread(
                target=self._stop_node, args=(node, self.grace_s), name=f"preempt-{_safe(node_name)}"
            )
            self._dying.append(node)
            node.thread.start()

    # ---------------------------------------------------------------- inspection and teardown

    def running(self, node_name: str) -> bool:
        """True while any sshd of this node (live or still in a preemption grace period) runs."""
        with self._lock:
            nodes = [n for n in [self._nodes.get(node_name), *self._dying] if n and n.name == node_name]
        return any(w.process and w.process.poll() is None for n in nodes for w in n.workers)

    def session_pids(self, node_name: str) -> list[int]:
        """Pids of the processes running in this node's workers' ssh sessions (sshds excluded)."""
        with self._lock:
            nodes = [n for n in [self._nodes.get(node_name), *self._dying] if n and n.name == node_name]
        table = _process_table()
        return sorted({pid for n in nodes for w in n.workers for pid in self._session_pids(w, table)})

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for preemptions in progress to finish; False if some still run after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for node in list(self._dying):
            if node.thread is not None:
                node.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._dying = [n for n in self._dying if n.thread is not None and n.thread.is_alive()]
            return not self._dying

    def close(self) -> None:
        """Stop everything at once: every node's sessions and sshds, preemption grace periods cut short."""
        with self._lock:
            for name in list(self._nodes):
                self.node_gone(name, "deleted")
            for dying in list(self._dying):
                dying.cut_grace.set()
                self._join_dying(dying)

    def __enter__(self) -> SshdWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _retire_overlapping(self, node_name: str, worker_ips: list[str]) -> None:
        """A node that is recreated reuses its name and IPs: the old incarnation's sshds must be gone."""
        for dying in [
            d for d in self._dying if d.name == node_name or {w.ip for w in d.workers} & set(worker_ips)
        ]:
            dying.cut_grace.set()
            self._join_dying(dying)
        if node_name in self._nodes:
            self._stop_node(self._nodes.pop(node_name), grace_s=0)

    def _join_dying(self, node: _Node) -> None:
        if node.thread is not None:
            node.thread.join()
        if node in self._dying:
            self._dying.remove(node)

    def _write_worker_files(self, worker: _Worker, keys: dict[str, list[str]]) -> list[subprocess.Popen]:
        d = worker.directory
        (d / "authorized_keys").mkdir(parents=True)
        (d / "home").mkdir()
        for user, lines in keys.items():
            (d / "authorized_keys" / user).write_text("".join(line + "\n" for line in lines))
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    f"ListenAddress {worker.ip}:{self.port}",
                    *(f"HostKey {d / f'ssh_host_{kind}_key'}" for kind in _HOST_KEY_TYPES),
                    f"PidFile {d / 'sshd.pid'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}/%u",
                    "AuthenticationMethods publickey",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    # No PAM: its session modules would touch the host's login records.
                    "UsePAM no",
                    # The key files sit under a scratch dir, maybe below world-writable /tmp.
                    "StrictModes no",
                    "UseDNS no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "X11Forwarding no",
                    "MaxStartups 200",
                    "MaxSessions 100",
                    # HOME: each "VM" has a home of its own (the shell starts in the account's real
                    # home all the same). It also keeps this host's ~/.bashrc, which Debian's bash
                    # sources for every ssh command, out of the workers.
                    f"SetEnv {_MARKER}={worker.token} HOME={d / 'home'}",
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        return [
            subprocess.Popen(
                ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"fake-tpu-worker{worker.index}"]
                + ["-f", str(d / f"ssh_host_{kind}_key")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for kind in _HOST_KEY_TYPES
        ]

    def _spawn_sshd(self, worker: _Worker) -> subprocess.Popen:
        with open(worker.directory / "sshd.log", "ab") as log:
            # -D: stay in the foreground (our child, so we can wait for it); -e: log to the file;
            # -r: no re-exec per connection (all "VMs" share this machine's cores: a 16-host fan-out
            # spent a good part of its time re-loading sshd).
            # Its own session, so a Ctrl-C meant for the test process does not reach the "VM".
            return subprocess.Popen(
                [self.sshd, "-D", "-e", "-r", "-f", str(worker.directory / "sshd_config")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def _wait_listening(self, node: _Node) -> None:
        """Wait for every sshd's "Server listening" log line (no probe connections in its log)."""
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(node.workers)
        while pending:
            for worker in list(pending):
                log = (worker.directory / "sshd.log").read_text(errors="replace")
                if "Server listening on" in log:
                    pending.remove(worker)
                elif worker.process.poll() is not None or time.monotonic() > deadline:
                    tail = " | ".join(log.strip().splitlines()[-3:]) or "no output"
                    raise RuntimeError(
                        f"sshd for worker {worker.index} of {node.name} on {worker.ip}:{self.port} "
                        f"did not start: {tail} (log: {worker.directory / 'sshd.log'})"
                    )
            if pending:
                time.sleep(0.005)

    def _session_pids(self, worker: _Worker, table: dict[int, tuple[str, str, int]]) -> set[int]:
        if worker.process is None:
            return set()
        children: dict[int, list[int]] = {}
        for pid, (_, _, ppid) in table.items():
            children.setdefault(ppid, []).append(pid)
        found, stack = set(), [worker.process.pid]
        while stack:
            for child in children.get(stack.pop(), []):
                stack.append(child)
                comm, state = table[child][:2]
                if comm not in _SSHD_NAMES and state != "Z":
                    found.add(child)
        marker = f"{_MARKER}={worker.token}".encode()
        found |= {pid for pid, (_, state, _) in table.items() if state != "Z" and _has_marker(pid, marker)}
        return found

    def _tree_pids(self, worker: _Worker, table: dict[int, tuple[str, str, int]]) -> set[int]:
        """The sshd's descendants of every kind (session sshds included)."""
        if worker.process is None:
            return set()
        found, stack = set(), [worker.process.pid]
        while stack:
            parent = stack.pop()
            kids = [pid for pid, (_, state, ppid) in table.items() if ppid == parent and state != "Z"]
            found.update(kids)
            stack.extend(kids)
        return found

    def _stop_node(self, node: _Node, grace_s: float) -> None:
        if grace_s > 0:
            table = _process_table()
            for worker in node.workers:
                _signal_all(self._session_pids(worker, table), signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and not node.cut_grace.is_set():
                # Done when the session sshds are gone too: they still have to send each exit
                # status to its client, and the client to hang up.
                table = _process_table()
                if not any(self._session_pids(w, table) | self._tree_pids(w, table) for w in node.workers):
                    break
                node.cut_grace.wait(0.05)
        # The listener goes first so that it forks no new session; the snapshot taken before keeps
        # its descendants in view after they are reparented.
        table = _process_table()
        doomed = set()
        for worker in node.workers:
            doomed |= self._tree_pids(worker, table) | self._session_pids(worker, table)
        for worker in node.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
        _signal_all(doomed, signal.SIGKILL)
        for _ in range(20):  # stragglers forked while we were killing (found by their marker)
            table = _process_table()
            left = set().union(*(self._session_pids(w, table) for w in node.workers))
            if not left:
                break
            _signal_all(left, signal.SIGKILL)
            time.sleep(0.01)
        for worker in node.workers:
            if worker.process is not None:
                worker.process.wait()


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _safe(name: str) -> str:
    """A node's resource name as a folder name: projects/p/locations/z/nodes/n -> p_z_n."""
    parts = name.split("/")
    if len(parts) == 6 and parts[0] == "projects":
        name = f"{parts[1]}_{parts[3]}_{parts[5]}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
