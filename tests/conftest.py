"""Shared fixtures: a private experiment registry for every test, and fake-gcs-server on demand."""

import os
import signal

# gcsfs reads this when it is imported: against any emulator it must be off (see infra/fake_gcs.py).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Tests send SIGINT to the launchers they start and expect what Ctrl-C does. A shell that starts
# `make test` in the background without job control (`(cmd &)` in a script) hands SIGINT down ignored,
# and an ignored signal stays ignored across exec, so those launchers would never see it. A handler
# (unlike SIG_IGN) is reset to the default in the programs this process starts.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_registry(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLAUNCH_REGISTRY", str(tmp_path_factory.mktemp("registry") / "registry.sqlite"))


@pytest.fixture(scope="session")
def fake_gcs_server():
    """fake-gcs-server on loopback for the whole test session (in memory), with bucket `vl-test`."""
    from infra.fake_gcs import FakeGcs

    with FakeGcs(buckets=("vl-test",)) as server:
        yield server


@pytest.fixture
def fake_gcs(fake_gcs_server, monkeypatch):
    """The session's fake-gcs-server, with this test's process environment pointed at it."""
    for name, value in fake_gcs_server.env().items():
        monkeypatch.setenv(name, value)
    return fake_gcs_server
