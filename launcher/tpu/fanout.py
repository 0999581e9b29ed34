"""Run one command on every TPU worker at once over ssh, and stream what they print.

The launcher reaches each worker at its network endpoint (`TpuNode.worker_ips`) with its own key,
which it puts into the node's `ssh-keys` metadata when it creates the node (the guest agent on a TPU
VM installs those keys; see `ssh_keys_metadata`). One `ssh` client process runs per worker, all
started together; their output is streamed line by line, prefixed with the worker index.

Stopping: `FanOut.stop()` closes each ssh client's stdin. The remote program must treat end of file
on its stdin as "stop": send SIGTERM to what it runs, wait for it, and exit with its code. The agent
the launcher runs on every worker (`launcher/tpu/agent.py`) does exactly that. ssh clients still
running `grace_s` later are killed; a remote program that ignores its stdin may then keep running on
the worker, since a session without a terminal gets no SIGHUP when its connection drops.

Exit codes are the remote program's, or 255 when ssh itself failed (no connection, key refused,
connection lost). Stdlib only; the launcher never imports torch or jax.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SSH_FAILED = 255  # what ssh exits with when it, not the remote command, failed

# ssh's own messages when the worker's sshd is not (yet) accepting connections: worth a retry.
_NOT_LISTENING = (
    "Connection refused",
    "Connection reset by peer",
    "kex_exchange_identification",
    "Connection closed by remote host",
)


# What ssh prints when an established connection dies under the remote program (the host went away,
# its sshd was killed, the network dropped, ServerAlive gave up): the program may still be running.
_CONNECTION_LOST = (
    "closed by remote host",
    "not responding",
    "Broken pipe",
    "Connection reset by peer",
    "ssh_dispatch_run_fatal",
    "client_loop: ",
)


def ensure_keypair(directory: Path) -> tuple[Path, str]:
    """The launcher's ed25519 key pair in `directory` (made once with ssh-keygen, private key 0600).

    Returns (private key path, public key line "ssh-ed25519 AAAA... comment").
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / "id_ed25519"
    public = directory / "id_ed25519.pub"
    if not (private.exists() and public.exists()):
        # ssh-keygen asks before overwriting half a pair; an unpaired file is of no use anyway.
        private.unlink(missing_ok=True)
        public.unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vlaunch", "-f", str(private)],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    os.chmod(private, 0o600)
    return private, public.read_text().strip()


def ssh_keys_metadata(user: str, public_key: str) -> str:
    """The value of a TPU node's `ssh-keys` metadata entry that lets `user` log in with `public_key`."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError(f"ssh user must be a non-empty name without ':' or spaces, got {user!r}.")
    key = public_key.strip()
    if not key or "\n" in key or len(key.split()) < 2:
        raise ValueError("public_key must be one line 'TYPE BASE64 [comment]', e.g. from ensure_keypair().")
    return f"{user}:{key}"


@dataclass(frozen=True)
class SshConfig:
    """How to reach the workers. `known_hosts` None: a fresh file per fan-out (see `ssh_command`)."""

    user: str
    key_file: Path
    port: int = 22
    connect_timeout_s: float = 30
    known_hosts: Path | None = None
    options: tuple[str, ...] = ()  # extra `-o Key=Value` words; they win over ours (ssh takes the first)
    retry_s: float = 10.0  # keep retrying a worker whose sshd is not accepting connections yet


def ssh_command(ssh: SshConfig, host: str, command: str, known_hosts: Path) -> list[str]:
    """The argv of the ssh client that runs `command` (one remote shell line) on `host`."""
    options = [
        f"User={ssh.user}",
        f"Port={ssh.port}",
        f"IdentityFile={ssh.key_file}",
        "IdentitiesOnly=yes",  # not every key of a running ssh-agent, one refusal each
        "BatchMode=yes",  # never prompt: a fan-out has no one to answer
        "PreferredAuthentications=publickey",
        "GSSAPIAuthentication=no",  # saves a Kerberos round trip (and DNS lookups) per connection
        f"ConnectTimeout={max(1, round(ssh.connect_timeout_s))}",
        # A TPU VM's host key is new every time the TPU is (re)created, and the name behind an IP
        # changes between runs, so a long-lived known_hosts would refuse the next run's workers.
        # A per-run file with accept-new still pins each worker's key for the rest of the run.
        "StrictHostKeyChecking=accept-new",
        f"UserKnownHostsFile={known_hosts}",
        "GlobalKnownHostsFile=/dev/null",
        "CheckHostIP=no",
        "UpdateHostKeys=no",  # no extra host-key round trip after login
        "HashKnownHosts=no",
        # Distinct hosts gain nothing from a shared connection; a user's ControlMaster=auto would
        # only make all workers wait for one master socket.
        "ControlMaster=no",
        "ControlPath=none",
        "RequestTTY=no",  # stdin stays a pipe: closing it is how `stop()` reaches the remote program
        "ForwardAgent=no",
        "ForwardX11=no",
        "ServerAliveInterval=15",  # notice a worker that vanished (a preempted VM sends no FIN)
        "ServerAliveCountMax=4",
        "LogLevel=ERROR",  # keeps "Permanently added ..." out of the worker's log
        *_kex_preference(),
    ]
    argv = ["ssh"]
    for option in (*ssh.options, *options):
        argv += ["-o", option]
    return [*argv, "--", host, command]


@functools.cache
def _kex_preference() -> tuple[str, ...]:
    """Prefer NIST P-256 key exchange and ECDSA host keys on OpenSSH 8.2 or newer.

    OpenSSH does curve25519 and ed25519 with its own portable C code, and P-256 with OpenSSL's
    optimised one. Per connection here (benchmarks/fanout.py, OpenSSH 9.2): the client's CPU is
    ~12 ms with curve25519 and an ed25519 host key, ~8.5 ms with ecdh-sha2-nistp256 and an ECDSA
    host key, and the worker's sshd saves ~3 ms more; OpenSSH 9's default, the post-quantum hybrid
    sntrup761x25519, costs the client ~65 ms. With a pod's worth of hosts that is the launcher's CPU
    before the last worker starts. `^` only moves these to the head of the default lists, so a
    server without them still gets the default; put `KexAlgorithms=...` or `HostKeyAlgorithms=...`
    into `SshConfig.options` to choose otherwise (`^` needs OpenSSH 8.2).
    """
    try:
        out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
    if match and (int(match.group(1)), int(match.group(2))) >= (8, 2):
        return ("KexAlgorithms=^ecdh-sha2-nistp256", "HostKeyAlgorithms=^ecdsa-sha2-nistp256")
    return ()


def _print_line(index: int, line: str) -> None:
    print(f"[w{index}] {line}", flush=True)


class FanOut:
    """One remote command per worker, all started at once; output streamed as `on_line(i, line)`.

    hosts[i] runs commands[i] (a remote shell command line, quoted by the caller). Lines also go to
    `log_dir/worker{i}.log`. With `stop_on_failure`, the first worker to exit non-zero (recorded in
    `first_failure`) makes the others `stop(stop_grace_s)`. `started_s[i]` is the time from `start()` to worker
    i's first line of output. `lost[i]` is true when worker i's connection died after it had printed
    something (ssh exited 255 with one of its connection-lost messages last): the remote program did
    not fail, it was cut off. `on_line` is called from reader threads, one call at a time.
    """

    def __init__(
        self,
        hosts: list[str],
        commands: list[str],
        ssh: SshConfig,
        on_line: Callable[[int, str], None] | None = None,
        log_dir: Path | None = None,
        stop_on_failure: bool = True,
        stop_grace_s: float = 30,
    ):
        if len(hosts) != len(commands):
            raise ValueError(f"{len(hosts)} hosts but {len(commands)} commands: give one command per host.")
        if not hosts:
            raise ValueError("no hosts to run on.")
        self.hosts = list(hosts)
        self.commands = list(commands)
        self.ssh = ssh
        self.on_line = on_line or _print_line
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.stop_on_failure = stop_on_failure
        self.stop_grace_s = stop_grace_s
        self.first_failure: int | None = None
        self.started_s: list[float | None] = [None] * len(hosts)
        self.lost: list[bool] = [False] * len(hosts)
        self._codes: list[int | None] = [None] * len(hosts)
        self._procs: list[subprocess.Popen | None] = [None] * len(hosts)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards the state below
        self._emit_lock = threading.Lock()  # one on_line call at a time (it may call stop())
        self._stopping = False
        self._t0 = 0.0
        self._scratch: str | None = None
        self._known_hosts: Path | None = None

    # ---------------------------------------------------------------- public

    def start(self) -> FanOut:
        """Start every worker's ssh client now; returns at once."""
        if self._threads:
            raise RuntimeError("FanOut.start() was already called.")
        if shutil.which("ssh") is None:
            raise RuntimeError("the ssh client is not installed (apt-get install openssh-client).")
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self._known_hosts = self.ssh.known_hosts
        if self._known_hosts is None:
            self._scratch = tempfile.mkdtemp(prefix="vlaunch-ssh-")
            self._known_hosts = Path(self._scratch) / "known_hosts"
        self._t0 = time.monotonic()
        self._threads = [
            threading.Thread(target=self._run_worker, args=(i,), name=f"fanout-w{i}", daemon=True)
            for i in range(len(self.hosts))
        ]
        for thread in self._threads:
            thread.start()
        return self

    def poll(self) -> list[int | None]:
        """Exit code by worker; None while it runs (output is drained before a code appears)."""
        with self._lock:
            return list(self._codes)

    def wait(self, timeout_s: float | None = None) -> list[int]:
        """Exit codes by worker once all have finished; TimeoutError after `timeout_s` (they keep running)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                running = [i for i, c in enumerate(self.poll()) if c is None]
                raise TimeoutError(f"workers {running} still running after {timeout_s} s.")
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        return [SSH_FAILED if c is None else c for c in self.poll()]

    def stop(self, grace_s: float = 30) -> None:
        """Ask every worker to stop (close ssh's stdin: the remote program gets EOF and SIGTERMs what it
        runs), then kill the ssh clients still running after `grace_s`. Blocks until then."""
        with self._lock:
            self._stopping = True
            procs = [p for p in self._procs if p is not None]
        for proc in procs:
            _close_quietly(proc)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """Kill every ssh client now (the remote programs may go on running; prefer `stop`)."""
        with self._lock:
            self._stopping = True
            procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    # ---------------------------------------------------------------- internals

    def _emit(self, index: int, line: str, log) -> None:
        with self._emit_lock:
            if self.started_s[index] is None:
                self.started_s[index] = time.monotonic() - self._t0
            if log is not None:
                log.write(line + "\n")
                log.flush()
            self.on_line(index, line)

    def _run_worker(self, index: int) -> None:
        log = None
        if self.log_dir is not None:
            log = open(self.log_dir / f"worker{index}.log", "a", encoding="utf-8")
        argv = ssh_command(self.ssh, self.hosts[index], self.commands[index], self._known_hosts)
        retry_until = time.monotonic() + self.ssh.retry_s
        code = SSH_FAILED
        try:
            while True:
                # stdin is a pipe we never write to: closing it is the stop signal.
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
                with self._lock:
                    self._procs[index] = proc
                    if self._stopping:  # stop() ran while this one was being spawned
                        _close_quietly(proc)
                held, first, last, lines = None, True, "", 0
                for raw in proc.stdout:
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if first and _not_listening(line):
                        held, first = line, False  # shown only if no retry hides it
                        continue
                    first = False
                    if held is not None:
                        self._emit(index, held, log)
                        held = None
                    self._emit(index, line, log)
                    last, lines = line, lines + 1
                code = proc.wait()
                proc.stdout.close()
                _close_quietly(proc)
                # `held` is still set only when ssh's "not listening" message was all it printed.
                if held is not None and code == SSH_FAILED:
                    if time.monotonic() < retry_until and not self._stopping:
                        time.sleep(0.2)
                        continue
                if held is not None:
                    self._emit(index, held, log)
                self.lost[index] = code == SSH_FAILED and lines > 1 and _connection_lost(last)
                break
        except BaseException as e:  # a reader thread must never die silently with the code unset
            self._emit(index, f"fanout: {type(e).__name__}: {e}", log)
            code = SSH_FAILED
        finally:
            if log is not None:
                log.close()
        self._finish(index, code)

    def _finish(self, index: int, code: int) -> None:
        with self._lock:
            self._codes[index] = code
            first = code != 0 and self.first_failure is None and not self._stopping
            if first:
                self.first_failure = index
            others_running = any(c is None for c in self._codes)
        if first and self.stop_on_failure and others_running:
            threading.Thread(
                target=self.stop, args=(self.stop_grace_s,), name="fanout-stop", daemon=True
            ).start()


def _not_listening(line: str) -> bool:
    return any(text in line for text in _NOT_LISTENING)


def _connection_lost(line: str) -> bool:
    return any(text in line for text in _CONNECTION_LOST)


def _close_quietly(proc: subprocess.Popen) -> None:
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:
            pass
