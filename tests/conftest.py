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

# `make test` runs the tests on pytest-xdist workers (`-n 2`). The files of one group below share
# something there is only one of, so one worker runs all their tests, one after the other; every other
# test goes to whichever worker is free.
#   slurm     the local Slurm cluster (one per machine, on fixed ports): its tests drain nodes,
#             preempt jobs and read the queue
#   tpu_vms   fake TPU VMs: every fake Cloud TPU API hands out the same loopback addresses
#             (127.0.0.2, ...), and some tests put their sshd workers on port 2222
# (xdist's own `--dist loadgroup` cannot do this with pytest 9: it renames node ids, which pytest 9
# no longer lets a plugin do, so the groups were silently ignored.)
_SERIAL_GROUPS = {
    "slurm": (
        "test_ctl_slurm.py",
        "test_local_slurm.py",
        "test_slurm_launch.py",
        "test_slurm_preemption.py",
        "test_tracking.py",
    ),
    "tpu_vms": ("test_tpu_cli.py", "test_tpu_pod.py", "test_tpu_staging.py", "test_tpu_workers.py"),
}


def _serial_group(nodeid: str) -> str | None:
    file = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return next((group for group, files in _SERIAL_GROUPS.items() if file in files), None)


def pytest_collection_modifyitems(config, items):
    for item in items:  # a test on the cluster in a file of no group would share it with another worker
        if item.get_closest_marker("slurm") and _serial_group(item.nodeid) != "slurm":
            raise pytest.UsageError(
                f"{item.nodeid} needs Slurm: add its file to _SERIAL_GROUPS['slurm'] in {__file__}"
            )


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SerialGroups(LoadScopeScheduling):
        """Each group of `_SERIAL_GROUPS` is one unit of work; every other test is a unit of its own."""

        def _split_scope(self, nodeid: str) -> str:
            return _serial_group(nodeid) or nodeid

    return SerialGroups(config, log)


@pytest.fixture(autouse=True, scope="session")
def _session_registry(tmp_path_factory):
    """Never the user's registry: also not for the module-scoped fixtures that copy os.environ before
    `_private_registry` runs (a launch from one of them used to record its sweep in ~/.local/share)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLAUNCH_REGISTRY", str(tmp_path_factory.mktemp("registry") / "registry.sqlite"))
        yield


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
