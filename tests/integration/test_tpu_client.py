"""The launcher's TPU client, through the real google-cloud-tpu library (REST), against the local fake.

Every call here crosses real HTTP: `TpuClient` -> `tpu_v2.TpuClient` (REST transport, anonymous
credentials) -> the fake Cloud TPU API on a free loopback port.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infra.fake_tpu.server import FakeTpuConfig, FakeTpuServer
from launcher.errors import LaunchError
from launcher.tpu.client import TpuClient, TpuError, TpuSpec, build_requests, render_requests

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT, ZONE = "test-proj", "us-central2-b"
RUNTIME = "tpu-ubuntu2204-base"


@pytest.fixture
def fake():
    config = FakeTpuConfig(create_delay_s=0.03, delete_delay_s=0.02, accept_delay_s=0.02)
    with FakeTpuServer(config) as server:
        yield server


@pytest.fixture
def tpu(fake) -> TpuClient:
    return TpuClient(PROJECT, ZONE, endpoint=fake.url, poll_interval_s=0.01)


def test_create_node_waits_until_ready_with_an_endpoint_per_worker():
    # CREATING lasts 0.5 s here (0.03 s in the other tests), so even a busy machine's first poll sees it.
    with FakeTpuServer(FakeTpuConfig(create_delay_s=0.5)) as server:
        _create_node_and_wait(TpuClient(PROJECT, ZONE, endpoint=server.url, poll_interval_s=0.01))


def _create_node_and_wait(tpu: TpuClient) -> None:
    progress = []
    name = tpu.create_node("pod", TpuSpec("v4-32", RUNTIME, capacity="spot", metadata={"ssh-keys": "me:key"}))
    assert name == f"projects/{PROJECT}/locations/{ZONE}/nodes/pod"

    node = tpu.wait_until(name, "READY", timeout_s=10, on_progress=lambda r, t: progress.append(r.state))
    assert node.state == "READY" and node.health == "HEALTHY"
    assert node.worker_ips == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    assert node.capacity == "spot" and node.metadata == {"ssh-keys": "me:key"}
    assert progress[0] == "CREATING" and progress[-1] == "READY"


@pytest.mark.parametrize(("accelerator", "workers"), [("v4-8", 1), ("v4-16", 2), ("v5litepod-16", 4)])
def test_worker_count_follows_the_accelerator_type(tpu, accelerator, workers):
    node = tpu.wait_until(tpu.create_node("n", TpuSpec(accelerator, RUNTIME)), "READY", timeout_s=10)
    assert len(node.worker_ips) == workers


def test_list_then_delete_leaves_not_found(tpu):
    for node_id in ("a", "b"):
        tpu.wait_until(tpu.create_node(node_id, TpuSpec("v4-8", RUNTIME)), "READY", timeout_s=10)
    assert [(n.node_id, n.state) for n in tpu.list_nodes()] == [("a", "READY"), ("b", "READY")]

    tpu.delete_node("a")
    assert [n.node_id for n in tpu.list_nodes()] == ["b"]
    with pytest.raises(TpuError) as caught:
        tpu.get_node("a")
    assert caught.value.status == "NOT_FOUND"
    assert "\n" not in str(caught.value)


def test_creating_twice_is_one_clear_line(tpu):
    tpu.create_node("n1", TpuSpec("v4-8", RUNTIME))
    with pytest.raises(TpuError) as caught:
        tpu.create_node("n1", TpuSpec("v4-8", RUNTIME))
    message = str(caught.value)
    assert caught.value.status == "ALREADY_EXISTS"
    assert isinstance(caught.value, LaunchError)
    assert message.startswith(
        "Cloud TPU API: cannot create TPU 'n1' (project test-proj, zone us-central2-b): "
    )
    assert "ALREADY_EXISTS" in message and "already exists" in message and "\n" not in message


def test_quota_exhausted_fails_the_wait_with_the_quota_message(fake, tpu):
    fake.set_quota(8)
    name = tpu.create_node("big", TpuSpec("v4-16", RUNTIME))
    with pytest.raises(TpuError) as caught:
        tpu.wait_until(name, "READY", timeout_s=10)
    message = str(caught.value)
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    assert message.startswith(
        "creating TPU 'big' (project test-proj, zone us-central2-b) failed: RESOURCE_EXHAUSTED: "
    )
    assert (
        "Quota limit 'TPUCoresPerProjectPerZone' has been exceeded. Limit: 8 in zone us-central2-b."
        in message
    )
    assert "\n" not in message


def test_quota_refused_at_the_request_is_the_same_clear_line(fake, tpu):
    fake.set_quota(8, reject_at="request")
    with pytest.raises(TpuError) as caught:
        tpu.create_node("big", TpuSpec("v4-16", RUNTIME))
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    assert "Limit: 8 in zone us-central2-b" in str(caught.value)


def test_queued_resource_over_quota_goes_failed_with_the_reason(fake, tpu):
    fake.set_quota(8)
    name = tpu.create_queued_resource("qr", TpuSpec("v4-16", RUNTIME, capacity="spot"))
    with pytest.raises(TpuError) as caught:
        tpu.wait_until(name, "ACTIVE", timeout_s=10)
    assert caught.value.status == "FAILED"
    assert "is FAILED, so it will not become ACTIVE: RESOURCE_EXHAUSTED: Quota limit" in str(caught.value)
    assert tpu.get_queued_resource("qr").error.startswith("RESOURCE_EXHAUSTED: ")


def test_spot_queued_resource_becomes_active_with_its_node():
    # ACCEPTED lasts 0.5 s here, so even a busy machine's first poll sees it.
    with FakeTpuServer(FakeTpuConfig(create_delay_s=0.03, accept_delay_s=0.5)) as server:
        _queued_resource_becomes_active(TpuClient(PROJECT, ZONE, endpoint=server.url, poll_interval_s=0.01))


def _queued_resource_becomes_active(tpu: TpuClient) -> None:
    name = tpu.create_queued_resource("qr", TpuSpec("v4-16", RUNTIME, capacity="spot"), node_id="qr-node")
    states = []
    queued = tpu.wait_until(name, "ACTIVE", timeout_s=10, on_progress=lambda r, t: states.append(r.state))
    assert queued.tier == "spot" and queued.node_ids == ["qr-node"]
    assert states[0] == "ACCEPTED" and states[-1] == "ACTIVE"

    node = tpu.get_node("qr-node")
    assert node.state == "READY" and node.queued_resource == name
    assert node.worker_ips == ["127.0.0.2", "127.0.0.3"]
    assert [q.queued_resource_id for q in tpu.list_queued_resources()] == ["qr"]

    tpu.delete_queued_resource("qr")  # force: its node goes with it
    assert tpu.list_queued_resources() == [] and tpu.list_nodes() == []


def test_guaranteed_and_reserved_queued_resources(tpu):
    tpu.wait_until(
        tpu.create_queued_resource("g", TpuSpec("v4-8", RUNTIME, capacity="guaranteed")), "ACTIVE", 10
    )
    assert tpu.get_queued_resource("g").tier == "guaranteed"

    spec = TpuSpec("v4-8", RUNTIME, capacity="reserved", reservation="my-reservation")
    reserved = tpu.wait_until(tpu.create_queued_resource("r", spec), "ACTIVE", timeout_s=10)
    assert reserved.tier == "guaranteed"
    assert reserved.reservation == f"projects/{PROJECT}/locations/{ZONE}/reservations/my-reservation"
    assert tpu.get_node("r").capacity == "reserved"


def test_preemption_shows_as_preempted_and_suspended(fake, tpu):
    name = tpu.create_queued_resource("qr", TpuSpec("v4-16", RUNTIME, capacity="spot"))
    tpu.wait_until(name, "ACTIVE", timeout_s=10)

    fake.preempt("qr")
    assert tpu.get_node("qr").state == "PREEMPTED"
    queued = tpu.get_queued_resource("qr")
    assert (queued.state, queued.state_initiator) == ("SUSPENDED", "SERVICE")
    with pytest.raises(TpuError) as caught:
        tpu.wait_until(name, "ACTIVE", timeout_s=10)
    assert caught.value.status == "SUSPENDED" and "create it again" in str(caught.value)

    # Recreate after preemption: the new node gets the same worker addresses.
    tpu.delete_queued_resource("qr")
    tpu.wait_until(tpu.create_queued_resource("qr", TpuSpec("v4-16", RUNTIME, capacity="spot")), "ACTIVE", 10)
    assert tpu.get_node("qr").worker_ips == ["127.0.0.2", "127.0.0.3"]


def test_wait_times_out_with_the_last_state():
    with FakeTpuServer(FakeTpuConfig(create_delay_s=30)) as fake:
        tpu = TpuClient(PROJECT, ZONE, endpoint=fake.url, poll_interval_s=0.01)
        name = tpu.create_node("slow", TpuSpec("v4-8", RUNTIME))
        with pytest.raises(TpuError) as caught:
            tpu.wait_until(name, "READY", timeout_s=0.1)
    assert caught.value.status == "TIMEOUT"
    assert "timed out after 0.1s waiting for TPU 'slow'" in str(caught.value) and "(it is CREATING)" in str(
        caught.value
    )


def test_unreachable_endpoint_is_one_line():
    tpu = TpuClient(PROJECT, ZONE, endpoint="http://127.0.0.1:9", call_timeout_s=2)
    with pytest.raises(TpuError) as caught:
        tpu.list_nodes()
    assert caught.value.status == "UNREACHABLE" and "\n" not in str(caught.value)


def test_bad_settings_fail_before_any_call(fake, tpu):
    with pytest.raises(TpuError, match="unknown capacity 'cheap'; choose one of: on_demand, spot"):
        tpu.create_node("n", TpuSpec("v4-8", RUNTIME, capacity="cheap"))
    with pytest.raises(
        TpuError, match="capacity 'guaranteed' is not available for a node; use a queued resource"
    ):
        tpu.create_node("n", TpuSpec("v4-8", RUNTIME, capacity="guaranteed"))
    with pytest.raises(TpuError, match="invalid TPU name 'My_TPU'"):
        tpu.create_node("My_TPU", TpuSpec("v4-8", RUNTIME))
    assert fake.requests() == []


def test_the_zone_lists_its_accelerator_types_and_runtime_versions_page_by_page(fake, tpu):
    fake.config.runtime_versions = ["tpu-ubuntu2204-base", "v2-alpha-tpuv5-lite", "v2-alpha-tpuv6e"]
    assert tpu.list_runtime_versions() == ["tpu-ubuntu2204-base", "v2-alpha-tpuv5-lite", "v2-alpha-tpuv6e"]
    assert {"v4-8", "v4-16", "v5litepod-16", "v6e-8"} <= set(tpu.list_accelerator_types())
    # The library follows nextPageToken: two per page still gives all of them, in three requests.
    fake.clear_requests()
    pager = tpu._api.list_runtime_versions(request={"parent": tpu.parent, "page_size": 2})
    assert [r.version for r in pager] == ["tpu-ubuntu2204-base", "v2-alpha-tpuv5-lite", "v2-alpha-tpuv6e"]
    assert [r["query"].get("pageToken") for r in fake.requests()] == [None, "2"]
    one = tpu._api.get_accelerator_type(name=f"{tpu.parent}/acceleratorTypes/v5litepod-16")
    assert one.type_ == "v5litepod-16" and one.accelerator_configs[0].type_.name == "V5LITE_POD"


def test_a_type_or_version_the_zone_does_not_offer_is_refused_before_creating(fake, tpu):
    tpu.check_offered([TpuSpec("v4-16", RUNTIME), TpuSpec("v6e-8", "v2-alpha-tpuv6e")])  # offered: no error
    with pytest.raises(TpuError) as caught:
        tpu.check_offered([TpuSpec("v5p-64", "v2-alpha-tpuv5")])
    assert caught.value.status == "INVALID_ARGUMENT"
    assert str(caught.value) == (
        f"accelerator type v5p-64 is not offered in zone {ZONE} (v5p types offered there: v5p-8, v5p-16, "
        "v5p-32); pick one of those or another zone"
    )
    with pytest.raises(TpuError, match=r"runtime version tpu-ubuntu2204-bse is not offered in zone .*"
                       r"\(offered there: tpu-ubuntu2204-base, .*\); Google documents tpu-ubuntu2204-base "
                       r"for v4 TPUs"):  # fmt: skip
        tpu.check_offered([TpuSpec("v4-16", "tpu-ubuntu2204-bse")])
    assert not [r for r in fake.requests() if r["method"] != "GET"]
    # The fake itself refuses such a create, as the API does, so a caller that skips the check
    # still gets one line from the create call.
    with pytest.raises(TpuError, match="INVALID_ARGUMENT: Runtime version 'tpu-ubuntu2204-bse' is not"):
        tpu.wait_until(tpu.create_node("n", TpuSpec("v4-16", "tpu-ubuntu2204-bse")), "READY", 10)


def test_the_default_runtime_version_is_the_one_google_documents_for_the_generation():
    from launcher.tpu.client import default_runtime_version, runtime_mismatch

    assert [default_runtime_version(t) for t in ("v2-8", "v3-8", "v4-16", "v5litepod-16", "v5p-8", "v6e-8")] == [
        "tpu-ubuntu2204-base", "tpu-ubuntu2204-base", "tpu-ubuntu2204-base",
        "v2-alpha-tpuv5-lite", "v2-alpha-tpuv5", "v2-alpha-tpuv6e",
    ]  # fmt: skip
    assert runtime_mismatch("v6e-8", "tpu-ubuntu2204-base") == (
        "runtime version tpu-ubuntu2204-base is not the one Google documents for v6e TPUs (v2-alpha-tpuv6e)"
    )
    assert runtime_mismatch("v6e-8", "v2-alpha-tpuv6e") is None
    assert runtime_mismatch("v4-8", "tpu-vm-tf-2.16.1-pjrt") is None  # an image we know nothing of


# ----------------------------------------------------------------------------- dry-run rendering


def test_dry_run_renders_exactly_what_the_client_sends(fake, tpu):
    specs = {
        ("node", False): TpuSpec(
            "v5litepod-16",
            "v2-alpha-tpuv5-lite",
            capacity="spot",
            network="my-net",
            service_account="sa@test-proj.iam.gserviceaccount.com",
            labels={"sweep": "s1"},
            metadata={"ssh-keys": "me:ssh-ed25519 AAAA me"},
        ),
        ("qr", True): TpuSpec("v4-16", RUNTIME, capacity="reserved", reservation="r1", valid_until_s=3600),
    }
    for (name, queued), spec in specs.items():
        rendered = build_requests(PROJECT, ZONE, name, spec, queued=queued, endpoint=fake.url)
        fake.clear_requests()
        if queued:
            tpu.create_queued_resource(name, spec)
        else:
            tpu.create_node(name, spec)
        sent = fake.requests()[0]
        assert len(rendered) == 1
        assert rendered[0].method == sent["method"] == "POST"
        assert rendered[0].url.split("?")[0] == fake.url + sent["path"]
        assert rendered[0].url.split("?")[1] == "&".join(
            f"{k}={v}" for k, v in sent["query"].items() if k != "$alt"
        )
        assert rendered[0].body == sent["body"]


def test_dry_run_node_request_has_the_api_field_names():
    spec = TpuSpec(
        "v4-16",
        RUNTIME,
        capacity="preemptible",
        subnetwork="sub",
        enable_external_ips=True,
        tags=["tpu"],
        metadata={"startup-script": "#!/bin/bash\necho hi"},
    )
    [request] = build_requests(PROJECT, ZONE, "n1", spec)
    assert request.method == "POST"
    assert request.url == f"https://tpu.googleapis.com/v2/projects/{PROJECT}/locations/{ZONE}/nodes?nodeId=n1"
    assert request.body == {
        "acceleratorType": "v4-16",
        "runtimeVersion": RUNTIME,
        "networkConfig": {"subnetwork": "sub", "enableExternalIps": True},
        "schedulingConfig": {"preemptible": True},
        "metadata": {"startup-script": "#!/bin/bash\necho hi"},
        "tags": ["tpu"],
    }


def test_dry_run_queued_resource_tiers():
    spot = build_requests(PROJECT, ZONE, "q", TpuSpec("v4-8", RUNTIME, capacity="spot"), queued=True)[0]
    assert spot.url.endswith("/queuedResources?queuedResourceId=q")
    assert spot.body == {
        "tpu": {
            "nodeSpec": [
                {
                    "parent": f"projects/{PROJECT}/locations/{ZONE}",
                    "nodeId": "q",
                    "node": {"acceleratorType": "v4-8", "runtimeVersion": RUNTIME},
                }
            ]
        },
        "spot": {},
    }
    guaranteed = build_requests(
        PROJECT, ZONE, "q", TpuSpec("v4-8", RUNTIME, capacity="guaranteed"), queued=True
    )
    assert guaranteed[0].body["guaranteed"] == {} and "spot" not in guaranteed[0].body

    text = render_requests(
        PROJECT, ZONE, "q", TpuSpec("v4-8", RUNTIME, capacity="reserved", reservation="r"), True
    )
    first_line, body = text.split("\n", 1)
    assert first_line == (
        f"POST https://tpu.googleapis.com/v2/projects/{PROJECT}/locations/{ZONE}/queuedResources?queuedResourceId=q"
    )
    assert '"reservationName": "projects/test-proj/locations/us-central2-b/reservations/r"' in body
    assert '"schedulingConfig": {\n' in body and "accelerator_type" not in body


def test_client_module_imports_without_the_cloud_sdk():
    code = (
        "import sys, launcher.tpu.client; "
        "print(sorted(m for m in sys.modules if m.startswith(('google', 'grpc', 'requests'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
