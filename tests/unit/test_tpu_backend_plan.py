"""The TPU backends' pure side: settings checked on the laptop, names, host counts, worker env."""

from __future__ import annotations

import pytest

from launcher.backends import tpu
from launcher.errors import LaunchError
from launcher.plan import effective_backend


def resources(**over):
    cfg = {"name": "tpu_pod", "project": "p", "zone": "us-central2-b", "bucket": "gs://b/vl"}
    cfg.update(over)
    return effective_backend(cfg, {})


def test_fallbacks_fill_a_runnable_pod():
    r = resources()
    assert r["accelerator_type"] == "v4-16"
    assert r["capacity"] == "on_demand" and r["queued"] is False
    assert r["teardown"] == "delete" and r["max_retries"] == 3


def test_a_named_tpu_is_kept_by_default_and_a_made_one_deleted():
    assert resources(tpu_name="mine")["teardown"] == "keep"
    assert resources(tpu_name="mine", teardown="delete")["teardown"] == "delete"


@pytest.mark.parametrize(
    "accelerator, runtime",
    [("v4-16", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-16", "v2-alpha-tpuv5"),
     ("v6e-16", "v2-alpha-tpuv6e")],
)  # fmt: skip
def test_the_runtime_version_follows_the_accelerator_unless_set(accelerator, runtime):
    """A v5e/v5p/v6e booted with v4's image fails without naming the version: the default is the
    generation's documented image, and a version given on the command line or by a site wins."""
    assert resources(accelerator_type=accelerator)["runtime_version"] == runtime
    assert resources(accelerator_type=accelerator, runtime_version="mine")["runtime_version"] == "mine"
    site = {"tpu": {"project": "p", "zone": "z", "bucket": "gs://b", "runtime_version": "site-image"}}
    assert effective_backend({"name": "tpu_pod", "accelerator_type": accelerator}, site)[
        "runtime_version"
    ] == ("site-image")


def test_dry_run_shows_the_runtime_version_and_a_note_when_it_is_another_generations(capsys):
    import sys

    from launcher.__main__ import main

    common = ["launcher", "trainer=reserve", "backend=tpu_pod", "backend.project=p", "backend.zone=z",
              "backend.bucket=gs://b/x", "backend.accelerator_type=v6e-16", "--dry-run"]  # fmt: skip
    for extra, runtime, note in [
        ([], "v2-alpha-tpuv6e", False),
        (["backend.runtime_version=tpu-ubuntu2204-base"], "tpu-ubuntu2204-base", True),
    ]:
        monkey = pytest.MonkeyPatch()
        monkey.setattr(sys, "argv", common + extra)
        try:
            with pytest.raises(SystemExit) as e:
                main()
        finally:
            monkey.undo()
        out = capsys.readouterr().out
        assert e.value.code == 0, out
        assert f'"runtimeVersion": "{runtime}"' in out
        line = "# note: runtime version tpu-ubuntu2204-base is not the one Google documents for v6e TPUs"
        assert (line in out) == note, out


def test_site_profile_tpu_key_applies_to_both_tpu_backends():
    site = {"tpu": {"project": "site-p", "zone": "z", "bucket": "gs://s"}, "tpu_vm": {"zone": "vm-zone"}}
    vm = effective_backend({"name": "tpu_vm"}, site)
    pod = effective_backend({"name": "tpu_pod"}, site)
    assert (vm["project"], vm["zone"]) == ("site-p", "vm-zone")
    assert (pod["project"], pod["zone"], pod["bucket"]) == ("site-p", "z", "gs://s")


@pytest.mark.parametrize(
    "over, words",
    [
        ({"project": None}, "backend.project is not set"),
        ({"bucket": "/local/dir"}, "must be a gs:// URL"),
        ({"capacity": "cheap"}, "choose one of: on_demand, spot"),
        ({"capacity": "guaranteed"}, "backend.queued=true"),
        ({"teardown": "sometimes"}, "choose one of: delete, keep"),
        ({"max_retries": -1}, "0 or more"),
        ({"name": "tpu_vm", "accelerator_type": "v4-32"}, "backend=tpu_vm is one host, but v4-32 has 4"),
        ({"max_parallel": 0}, "backend.max_parallel must be a whole number of jobs, 1 or more, got 0"),
        ({"max_parallel": 2, "tpu_name": "mine"}, "tpu_name=mine is one TPU, so a sweep's jobs take turns"),
    ],
)
def test_bad_settings_fail_with_one_line(over, words):
    with pytest.raises(LaunchError) as e:
        resources(**over)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "accelerator, hosts",
    [
        ("v4-8", 1),
        ("v4-16", 2),
        ("v4-32", 4),
        ("v5p-16", 2),
        ("v5litepod-8", 1),
        ("v5litepod-16", 4),
        ("v6e-16", 4),
    ],
)
def test_hosts_of_known_slices(accelerator, hosts):
    assert tpu.hosts_of(accelerator) == hosts


def test_hosts_of_unknown_type_is_unknown():
    assert tpu.hosts_of("v9-1000x") is None


def test_emulated_hosts_get_an_explicit_coordinator_and_the_emulator_settings(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    r = resources(emulated=True, cpu_devices_per_host=2, worker_env={"A": 1})
    env = tpu.worker_env(r, 1, ["127.0.0.2", "127.0.0.3"], 4321)
    assert env["VL_JAX_COORDINATOR"] == "127.0.0.2:4321"
    assert (env["VL_JAX_NUM_PROCESSES"], env["VL_JAX_PROCESS_ID"], env["VL_JAX_CPU_DEVICES"]) == (
        "2",
        "1",
        "2",
    )
    assert env["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:9" and env["A"] == "1"


def test_real_hosts_find_their_coordinator_themselves(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    env = tpu.worker_env(resources(), 0, ["10.0.0.2", "10.0.0.3"], 8476)
    assert not any(k.startswith("VL_JAX_") for k in env)
    assert "STORAGE_EMULATOR_HOST" not in env


def test_pytorch_trainers_are_refused_on_tpu(capsys):
    import sys

    from launcher.__main__ import main

    argv = ["launcher", "trainer=alpro", "dataset=msrvtt", "backend=tpu_pod", "--dry-run"]
    monkey = pytest.MonkeyPatch()
    monkey.setattr(sys, "argv", argv)
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        monkey.undo()
    assert e.value.code == 2
    assert "is a PyTorch trainer" in capsys.readouterr().err


def test_an_emulator_endpoint_that_does_not_answer_is_one_line_at_once():
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        tpu._check_answers(f"http://127.0.0.1:{port}", "backend.gcs_endpoint")  # answers: no error
    with pytest.raises(LaunchError) as raised:  # the same port, closed now
        tpu._check_answers(f"http://127.0.0.1:{port}", "backend.gcs_endpoint")
    message = str(raised.value)
    assert message.startswith(f"nothing answers at http://127.0.0.1:{port} (backend.gcs_endpoint: ")
    assert "infra/local_tpu.sh up" in message and "\n" not in message


def test_google_endpoints_out_of_reach_are_one_line_at_once(monkeypatch):
    """Offline, a real-GCS launch spent 49 s in gcsfs retries before its error; now Google's storage
    and TPU endpoints are probed first (not through a proxy; an emulator named by env is probed instead)."""
    import socket

    probed = []

    def no_network(address, timeout=None):
        probed.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(tpu.socket, "create_connection", no_network)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LaunchError) as raised:
        tpu._check_endpoints({"gcs_endpoint": None, "api_endpoint": None})
    assert probed == [("storage.googleapis.com", 443)]
    assert str(raised.value) == (
        "cannot reach Google Cloud Storage at https://storage.googleapis.com (Name or service not known); "
        "check this machine's network, or try it on the emulated TPU cloud: infra/local_tpu.sh up, "
        "then add site=local_tpu"
    )

    probed.clear()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:4443")
    with pytest.raises(
        LaunchError, match=r"^nothing answers at http://127.0.0.1:4443 \(\$STORAGE_EMULATOR_HOST"
    ):
        tpu._check_endpoints({})
    assert probed == [("127.0.0.1", 4443)]

    probed.clear()
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    tpu._check_endpoints({})  # the proxy may reach what we cannot: nothing probed, nothing refused
    assert probed == []
