"""The agent every TPU worker runs: fetch the staged code and config, run one program, stream its output.

The launcher sends this file's source inline through ssh (`agent_command`), because our code is not
on the worker yet. So this module is self-contained: the standard library, plus fsspec/gcsfs
imported only when a `gs://` URL is fetched (they are in the worker's Python environment). It also
runs on the workers' own Python (3.8 or newer): no syntax newer than that.

What it does, in order:

1. makes the work dir; fetches the code archive into `<workdir>/code/<sha256>` unless that directory
   is already there (extracted to a temporary name, then renamed, so a directory that exists is
   complete and a restart on the same VM skips the download), and the config into
   `<workdir>/config/`. Each download is checked three ways: the object's `md5Hash` must equal the
   MD5 the launcher recorded when it staged it (else the object was replaced: exit 90), and the bytes
   received must match it (else retried, with the other transient errors, a few times: exit 91);
2. if a program an earlier run of the agent started in this work dir is still running (its launcher
   lost the connection, and the agent of that run is still stopping it, or was killed), sends it
   SIGTERM, waits `grace_s` for it to save and exit, then SIGKILLs what is left: on a TPU host the
   old program would hold the TPU. The program's process group is kept in `<workdir>/program.pid`;
3. prints `vlaunch-agent: worker started`, then runs the program (`argv`, with `{config}` replaced by
   the local config path and `{workdir}` by the work dir) with its working directory at the code,
   PYTHONPATH starting there, `env` added, stdin from /dev/null, in a process group of its own;
4. streams the program's stdout and stderr, merged, line by line to its own stdout, flushed per line;
5. when its stdin reaches end of file (the launcher closed the ssh session), when its stdout is gone,
   or on SIGTERM, SIGHUP or SIGINT, it sends SIGTERM to the program's process group and SIGKILL after
   `grace_s` seconds;
6. exits with the program's exit code, or 128 + the signal that ended it.

Exit codes of its own (the program's codes pass through unchanged):

    2   bad arguments to the agent
    90  checksum mismatch: the object in the bucket is not the one that was staged (stage again)
    91  a download failed after retries (missing object, no access, network)
    92  the program could not be started (not found, not executable)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

STARTED = "vlaunch-agent: worker started"
EXIT_USAGE = 2
EXIT_CHECKSUM = 90
EXIT_DOWNLOAD = 91
EXIT_START = 92

DOWNLOAD_ATTEMPTS = 4


class AgentFailure(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def _say(text):
    try:
        sys.stdout.buffer.write(("vlaunch-agent: " + text + "\n").encode("utf-8", "replace"))
        sys.stdout.buffer.flush()
    except (BrokenPipeError, OSError):
        pass


# ------------------------------------------------------------------------------------- fetching


def _md5_b64(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return base64.b64encode(h.digest()).decode()


def _is_remote(url):
    return "://" in url and not url.startswith("file://")


def _fetch_once(url, target):
    """Copy `url` to `target`; returns the MD5 the store reports for the object (None if it keeps none)."""
    if not _is_remote(url):
        shutil.copyfile(url[len("file://") :] if url.startswith("file://") else url, target)
        return None
    if url.startswith(("gs://", "gcs://")):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec.core

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)
    stored = fs.info(path).get("md5Hash")
    fs.get_file(path, target)
    return stored


def fetch(url, target, expected_md5):
    """Download `url` to `target` (via a temporary name), verified; raises AgentFailure."""
    tmp = f"{target}.{os.getpid()}.part"
    last = ""
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(min(8.0, 0.5 * 2**attempt))
        try:
            stored = _fetch_once(url, tmp)
            got = _md5_b64(tmp)
        except FileNotFoundError:
            raise AgentFailure(f"{url}: no such object (stage it again)", EXIT_DOWNLOAD) from None
        except ImportError as e:
            raise AgentFailure(
                f"cannot fetch {url}: {e} in {sys.executable} (install fsspec and gcsfs there, or run "
                "the agent with a Python that has them)",
                EXIT_DOWNLOAD,
            ) from None
        except Exception as e:  # noqa: BLE001 - network and auth errors of any client library
            last = " ".join(str(e).split()) or type(e).__name__
            _say(f"download of {url} failed (attempt {attempt + 1}): {last}")
            continue
        if stored is not None and expected_md5 and stored != expected_md5:
            _remove(tmp)
            raise AgentFailure(
                f"checksum mismatch: {url} has MD5 {stored} in the bucket, but {expected_md5} was staged; it was replaced "
                "after staging (stage the code again)",
                EXIT_CHECKSUM,
            )
        if (stored is not None and got != stored) or (expected_md5 and got != expected_md5):
            last = f"received bytes have MD5 {got}, expected {expected_md5 or stored}"
            _say(f"download of {url} damaged (attempt {attempt + 1}): {last}")
            continue
        os.replace(tmp, target)
        return
    _remove(tmp)
    if last.startswith("received bytes"):
        raise AgentFailure(f"checksum mismatch: {url}: {last}", EXIT_CHECKSUM)
    raise AgentFailure(f"could not download {url} after {DOWNLOAD_ATTEMPTS} attempts: {last}", EXIT_DOWNLOAD)


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _code_key(code_url, code_md5):
    stem = code_url.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    if re.fullmatch(r"[0-9a-f]{16,64}", stem):
        return stem
    return base64.b64decode(code_md5).hex() if code_md5 else hashlib.sha256(code_url.encode()).hexdigest()


def _extract(archive, target):
    with tarfile.open(archive, "r:gz") as tar:
        data_filter = getattr(tarfile, "data_filter", None)
        if data_filter is not None:
            tar.extractall(target, filter=data_filter)
            return
        for member in tar.getmembers():  # Python < 3.11.4: refuse paths that leave the target
            name = os.path.normpath(member.name)
            if name.startswith(("/", "..")) or member.isdev():
                raise AgentFailure(f"unsafe path in the code archive: {member.name}", EXIT_CHECKSUM)
        tar.extractall(target)


def prepare_code(workdir, code_url, code_md5):
    """The directory holding the code, fetched and extracted unless it is already there."""
    target = os.path.join(workdir, "code", _code_key(code_url, code_md5))
    if os.path.isdir(target):
        _say(f"code {os.path.basename(target)} already here")
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = f"{target}.{os.getpid()}.tmp"
    archive = staging + ".tar.gz"
    try:
        fetch(code_url, archive, code_md5)
        _extract(archive, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.isdir(target):  # not another agent on this VM that got there first
                raise
    finally:
        _remove(archive)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def prepare_config(workdir, config_url, config_md5):
    if not config_url:
        return ""
    directory = os.path.join(workdir, "config")
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, config_url.rstrip("/").rsplit("/", 1)[-1] or "config")
    fetch(config_url, target, config_md5)
    return target


# ------------------------------------------------------------------------------------- running


PID_FILE = "program.pid"


def _group_alive(pgid, workdir):
    """Is process group `pgid` alive and a program of this work dir (not a recycled pid)?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's: not ours
    try:
        with open(f"/proc/{pgid}/environ", "rb") as f:
            return f"VLAUNCH_WORKDIR={workdir}".encode() in f.read().split(b"\0")
    except OSError:
        return True  # no /proc to tell: the group exists


def stop_earlier_program(workdir, grace_s):
    """Stop the program an earlier agent started here if it still runs (see the module docstring)."""
    try:
        with open(os.path.join(workdir, PID_FILE)) as f:
            pgid = int(f.read().strip())
    except (OSError, ValueError):
        return
    if pgid <= 1 or not _group_alive(pgid, workdir):
        return
    _say(
        f"a program of an earlier run is still running here (process group {pgid}): SIGTERM, "
        f"SIGKILL after {grace_s:g}s"
    )
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _group_alive(pgid, workdir):
                return
            time.sleep(0.1)


class Runner:
    """One program in its own process group, its output pumped to our stdout, stopped on request."""

    def __init__(self, argv, cwd, env, grace_s):
        self.grace_s = grace_s
        self.stop = threading.Event()
        self.reason = ""
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise AgentFailure(f"cannot start {argv[0]}: {e.strerror or e}", EXIT_START) from None
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def request_stop(self, reason):
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()

    def _pump(self):
        out = sys.stdout.buffer
        broken = False
        for line in iter(self.proc.stdout.readline, b""):
            if broken:
                continue  # keep draining so the program never blocks on a full pipe
            try:
                out.write(line if line.endswith(b"\n") else line + b"\n")
                out.flush()
            except (BrokenPipeError, OSError):
                broken = True
                self.request_stop("the launcher's connection is gone")

    def _signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self):
        """Run to the end (stopping it if asked); the exit code, 128 + signal when killed."""
        while self.proc.poll() is None and not self.stop.wait(0.1):
            pass
        if self.proc.poll() is None:
            _say(f"stopping the program ({self.reason}): SIGTERM, SIGKILL after {self.grace_s:g}s")
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
        # Whatever the program left behind in its group ends with it (it would hold the TPU).
        self._signal_group(signal.SIGKILL)
        self.pump.join(timeout=5)
        code = self.proc.returncode
        return 128 - code if code < 0 else code


def _watch_stdin(runner):
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    runner.request_stop("stdin closed")


def _substitute(argv, config, workdir):
    return [a.replace("{config}", config).replace("{workdir}", workdir) for a in argv]


def run(args):
    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    env = dict(os.environ)
    env.update(args.env)
    os.environ.update(args.env)  # the downloads too (e.g. STORAGE_EMULATOR_HOST)
    os.makedirs(workdir, exist_ok=True)
    code_dir = prepare_code(workdir, args.code_url, args.code_md5)
    config = prepare_config(workdir, args.config_url, args.config_md5)
    env["PYTHONPATH"] = code_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["VLAUNCH_WORKDIR"] = workdir
    stop_earlier_program(workdir, args.grace_s)
    _say("worker started")
    runner = Runner(_substitute(args.argv, config, workdir), code_dir, env, args.grace_s)
    with open(os.path.join(workdir, PID_FILE), "w") as f:
        f.write(f"{runner.proc.pid}\n")
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda number, frame: runner.request_stop(signal.Signals(number).name))
    if args.watch_stdin:
        threading.Thread(target=_watch_stdin, args=(runner,), daemon=True).start()
    return runner.wait()


def _env_item(text):
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vlaunch-agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--code-url", required=True)
    parser.add_argument("--code-md5", default="")
    parser.add_argument("--config-url", default="")
    parser.add_argument("--config-md5", default="")
    parser.add_argument("--env", type=_env_item, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--grace-s", type=float, default=30.0)
    parser.add_argument("--no-watch-stdin", dest="watch_stdin", action="store_false")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    args = parser.parse_args(argv)
    if args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    if not args.argv:
        parser.error("no program to run: give it after --")
    args.env = dict(args.env)
    try:
        return run(args)
    except AgentFailure as e:
        _say(f"error: {e}")
        return e.code


# ------------------------------------------------------------------------------------- launcher side


def agent_source() -> str:
    """This file's source: what `python -c` runs on the worker."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        return f.read()


def agent_command(
    *,
    python: str,
    workdir: str,
    code_url: str,
    code_md5: str,
    config_url: str,
    config_md5: str,
    env: dict[str, str],
    argv: list[str],
    grace_s: float = 30,
    watch_stdin: bool = True,
) -> str:
    """The remote shell command line that runs the agent (this file, inline) on a worker; every part
    quoted. `config_url=""` runs without a config. Values of `env` are visible in the worker's process
    list: pass no secrets there."""
    if not argv:
        raise ValueError("agent_command: argv is empty; give the program to run on the workers")
    words = [python, "-c", agent_source(), "--workdir", workdir, "--code-url", code_url]
    words += ["--code-md5", code_md5, "--config-url", config_url, "--config-md5", config_md5]
    for name, value in sorted(env.items()):
        words += ["--env", f"{name}={value}"]
    words += ["--grace-s", f"{grace_s:g}"]
    if not watch_stdin:
        words.append("--no-watch-stdin")
    return " ".join(shlex.quote(w) for w in words + ["--", *argv])


if __name__ == "__main__":
    sys.exit(main())
