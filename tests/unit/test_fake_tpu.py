"""The fake Cloud TPU API speaks the real API's REST wire format: checked here over plain HTTP.

(`tests/integration/test_tpu_client.py` drives it through the real google-cloud-tpu client.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra.fake_tpu.server import FakeTpuConfig, FakeTpuServer

REPO_ROOT = Path(__file__).resolve().parents[2]
PARENT = "projects/test-proj/locations/us-central2-b"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
NODE = {"acceleratorType": "v4-16", "runtimeVersion": "tpu-ubuntu2204-base"}


def call(base: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Api:
    """Requests to one fake server: `api("GET", path)` -> (HTTP status, JSON body)."""

    def __init__(self, url: str):
        self.url = url

    def __call__(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        return call(self.url, method, path, body)


@pytest.fixture
def api():
    with FakeTpuServer(FakeTpuConfig()) as server:
        yield Api(server.url)


def wait_for_operation(api: Api, op: dict) -> dict:
    for _ in range(100):
        status, op = api("GET", f"/v2/{op['name']}")
        assert status == 200
        if op["done"]:
            return op
        time.sleep(0.01)
    raise AssertionError(f"operation never finished: {op}")


def google_error(status: int, body: dict, http: int, name: str) -> str:
    """Assert Google's error body shape; return the message."""
    assert status == http, body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "status"}, body
    assert body["error"]["code"] == http and body["error"]["status"] == name
    return body["error"]["message"]


def test_create_node_is_an_operation_that_finishes_with_the_ready_node(api):
    status, op = api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", NODE)
    assert status == 200
    assert op["name"].startswith(f"{PARENT}/operations/operation-")
    assert op["done"] is False
    assert op["metadata"]["@type"] == "type.googleapis.com/google.cloud.tpu.v2.OperationMetadata"
    assert op["metadata"]["target"] == f"{PARENT}/nodes/n1" and op["metadata"]["verb"] == "create"
    assert RFC3339.match(op["metadata"]["createTime"])

    done = wait_for_operation(api, op)
    node = done["response"]
    assert node["@type"] == "type.googleapis.com/google.cloud.tpu.v2.Node"
    assert node["name"] == f"{PARENT}/nodes/n1"
    assert node["state"] == "READY" and node["health"] == "HEALTHY"
    assert node["acceleratorType"] == "v4-16" and node["runtimeVersion"] == "tpu-ubuntu2204-base"
    assert node["networkEndpoints"] == [
        {"ipAddress": "127.0.0.2", "port": 8470},
        {"ipAddress": "127.0.0.3", "port": 8470},
    ]
    assert RFC3339.match(node["createTime"]) and RFC3339.match(done["metadata"]["endTime"])
    assert isinstance(node["id"], str) and node["id"].isdigit()  # int64 travels as a string

    status, got = api("GET", f"/v2/{PARENT}/nodes/n1")
    assert status == 200 and got["state"] == "READY"
    assert "@type" not in got


@pytest.mark.parametrize(("accelerator", "workers"), [("v4-8", 1), ("v4-32", 4), ("v5litepod-16", 4)])
def test_one_network_endpoint_per_worker_host(api, accelerator, workers):
    _, op = api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", {**NODE, "acceleratorType": accelerator})
    endpoints = wait_for_operation(api, op)["response"]["networkEndpoints"]
    assert [e["ipAddress"] for e in endpoints] == [f"127.0.0.{2 + i}" for i in range(workers)]


def test_worker_addresses_are_per_node_and_come_back_after_delete():
    config = FakeTpuConfig(worker_ips=["127.0.0.10", "127.0.0.11", "127.0.0.12"])
    with FakeTpuServer(config) as fake:
        api = Api(fake.url)
        _, op1 = api("POST", f"/v2/{PARENT}/nodes?nodeId=a", NODE)
        _, op2 = api("POST", f"/v2/{PARENT}/nodes?nodeId=b", {**NODE, "acceleratorType": "v4-8"})
        a = wait_for_operation(api, op1)["response"]
        b = wait_for_operation(api, op2)["response"]
        assert [e["ipAddress"] for e in a["networkEndpoints"]] == ["127.0.0.10", "127.0.0.11"]
        assert [e["ipAddress"] for e in b["networkEndpoints"]] == ["127.0.0.12"]
        wait_for_operation(api, api("DELETE", f"/v2/{PARENT}/nodes/a")[1])
        _, op3 = api("POST", f"/v2/{PARENT}/nodes?nodeId=c", NODE)
        c = wait_for_operation(api, op3)["response"]
        assert [e["ipAddress"] for e in c["networkEndpoints"]] == ["127.0.0.10", "127.0.0.11"]


def test_enums_are_numbers_when_the_request_asks_for_them(api):
    wait_for_operation(api, api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", NODE)[1])
    _, node = api("GET", f"/v2/{PARENT}/nodes/n1?$alt=json;enum-encoding=int")
    assert node["state"] == 2 and node["health"] == 1 and node["apiVersion"] == 4
    _, listed = api("GET", f"/v2/{PARENT}/nodes?$alt=json;enum-encoding=int")
    assert listed["nodes"][0]["state"] == 2


def test_refusals_are_google_error_bodies(api):
    status, body = api("GET", f"/v2/{PARENT}/nodes/missing")
    assert "projects/test-proj/locations/us-central2-b/nodes/missing" in google_error(
        status, body, 404, "NOT_FOUND"
    )

    wait_for_operation(api, api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", NODE)[1])
    status, body = api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", NODE)
    assert "already exists" in google_error(status, body, 409, "ALREADY_EXISTS")

    status, body = api("POST", f"/v2/{PARENT}/nodes?nodeId=Bad_Name", NODE)
    google_error(status, body, 400, "INVALID_ARGUMENT")
    status, body = api("POST", f"/v2/{PARENT}/nodes", NODE)
    google_error(status, body, 400, "INVALID_ARGUMENT")
    status, body = api("POST", f"/v2/{PARENT}/nodes?nodeId=n2", {**NODE, "acceleratorType": "v9-8"})
    assert "v9-8" in google_error(status, body, 400, "INVALID_ARGUMENT")
    status, body = api("POST", f"/v2/{PARENT}/nodes?nodeId=n2", {"runtimeVersion": "x"})
    assert "accelerator_type" in google_error(status, body, 400, "INVALID_ARGUMENT")


def test_unknown_fields_are_refused_and_proto_names_accepted_as_google_does(api):
    status, body = api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", {**NODE, "schedulingConfig": {"spott": True}})
    message = google_error(status, body, 400, "INVALID_ARGUMENT")
    assert message == (
        "Invalid JSON payload received. Unknown name \"spott\" at 'node.scheduling_config': Cannot find field."
    )

    snake = {
        "accelerator_type": "v4-8",
        "runtime_version": "tpu-ubuntu2204-base",
        "scheduling_config": {"spot": True},
    }
    node = wait_for_operation(api, api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", snake)[1])["response"]
    assert node["acceleratorType"] == "v4-8" and node["schedulingConfig"] == {"spot": True}
    assert "accelerator_type" not in node


def test_state_transitions_take_the_configured_delays():
    # Windows of 0.5 s: the states seen right after a call must outlast a busy machine's pause.
    with FakeTpuServer(FakeTpuConfig(create_delay_s=0.5, delete_delay_s=0.5)) as fake:
        api = Api(fake.url)
        api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", NODE)
        assert api("GET", f"/v2/{PARENT}/nodes/n1")[1]["state"] == "CREATING"
        time.sleep(0.55)
        assert api("GET", f"/v2/{PARENT}/nodes/n1")[1]["state"] == "READY"
        _, op = api("DELETE", f"/v2/{PARENT}/nodes/n1")
        assert api("GET", f"/v2/{PARENT}/nodes/n1")[1]["state"] == "DELETING"
        assert api("GET", f"/v2/{op['name']}")[1]["done"] is False
        time.sleep(0.55)
        assert api("GET", f"/v2/{PARENT}/nodes/n1")[0] == 404
        done = api("GET", f"/v2/{op['name']}")[1]
        assert done["done"] is True
        assert done["response"] == {"@type": "type.googleapis.com/google.protobuf.Empty"}


def test_lists_are_paged_with_next_page_token(api):
    for name in ("a", "b", "c"):
        api("POST", f"/v2/{PARENT}/nodes?nodeId={name}", NODE)
    _, first = api("GET", f"/v2/{PARENT}/nodes?pageSize=2")
    assert [n["name"].rsplit("/", 1)[1] for n in first["nodes"]] == ["a", "b"]
    _, second = api("GET", f"/v2/{PARENT}/nodes?pageSize=2&pageToken={first['nextPageToken']}")
    assert [n["name"].rsplit("/", 1)[1] for n in second["nodes"]] == ["c"]
    assert "nextPageToken" not in second
    _, other_zone = api("GET", "/v2/projects/test-proj/locations/europe-west4-a/nodes")
    assert other_zone == {"nodes": []}


def queued_body(tier: dict | None = None, **extra) -> dict:
    body = {"tpu": {"nodeSpec": [{"parent": PARENT, "nodeId": "qn", "node": {**NODE}}]}, **extra}
    return {**body, **(tier or {})}


def test_queued_resource_goes_accepted_provisioning_active_and_creates_its_node():
    # Windows of 1 s: each state is checked just after it begins, so a pause of up to 1 s is harmless.
    with FakeTpuServer(FakeTpuConfig(accept_delay_s=1.0, create_delay_s=1.0)) as fake:
        api = Api(fake.url)
        status, op = api(
            "POST", f"/v2/{PARENT}/queuedResources?queuedResourceId=q1", queued_body({"spot": {}})
        )
        assert status == 200 and op["metadata"]["target"] == f"{PARENT}/queuedResources/q1"
        _, qr = api("GET", f"/v2/{PARENT}/queuedResources/q1")
        assert qr["state"] == {"state": "ACCEPTED", "acceptedData": {}}
        assert qr["spot"] == {} and qr["tpu"]["nodeSpec"][0]["nodeId"] == "qn"
        assert RFC3339.match(qr["createTime"])
        done = api("GET", f"/v2/{op['name']}")[1]
        assert (
            done["done"]
            and done["response"]["@type"] == "type.googleapis.com/google.cloud.tpu.v2.QueuedResource"
        )

        time.sleep(1.0)
        assert api("GET", f"/v2/{PARENT}/queuedResources/q1")[1]["state"]["state"] == "PROVISIONING"
        node = api("GET", f"/v2/{PARENT}/nodes/qn")[1]
        assert node["state"] == "CREATING" and node["queuedResource"] == f"{PARENT}/queuedResources/q1"
        assert node["schedulingConfig"] == {"spot": True}
        time.sleep(1.0)
        assert api("GET", f"/v2/{PARENT}/queuedResources/q1")[1]["state"] == {
            "state": "ACTIVE",
            "activeData": {},
        }
        _, ints = api("GET", f"/v2/{PARENT}/queuedResources/q1?$alt=json;enum-encoding=int")
        assert ints["state"]["state"] == 6
        assert api("GET", f"/v2/{PARENT}/queuedResources")[1]["queuedResources"][0]["name"].endswith("/q1")


def test_queued_resource_tiers_and_reservation_as_the_api_has_them(api):
    reservation = f"{PARENT}/reservations/r1"
    body = queued_body({"guaranteed": {}}, reservationName=reservation)
    wait_for_operation(api, api("POST", f"/v2/{PARENT}/queuedResources?queuedResourceId=q1", body)[1])
    _, qr = api("GET", f"/v2/{PARENT}/queuedResources/q1")
    assert qr["guaranteed"] == {} and qr["reservationName"] == reservation

    status, body = api(
        "POST",
        f"/v2/{PARENT}/queuedResources?queuedResourceId=q2",
        queued_body({"spot": {}, "guaranteed": {}}),
    )
    google_error(status, body, 400, "INVALID_ARGUMENT")
    status, body = api(
        "POST", f"/v2/{PARENT}/queuedResources?queuedResourceId=q2", queued_body(reservationName="r1")
    )
    assert "reservation" in google_error(status, body, 400, "INVALID_ARGUMENT")


def test_deleting_an_active_queued_resource_needs_force(api):
    wait_for_operation(
        api, api("POST", f"/v2/{PARENT}/queuedResources?queuedResourceId=q1", queued_body())[1]
    )
    api("GET", f"/v2/{PARENT}/queuedResources/q1")
    assert api("GET", f"/v2/{PARENT}/queuedResources/q1")[1]["state"]["state"] == "ACTIVE"
    status, body = api("DELETE", f"/v2/{PARENT}/queuedResources/q1")
    assert "force" in google_error(status, body, 400, "FAILED_PRECONDITION")

    status, op = api("DELETE", f"/v2/{PARENT}/queuedResources/q1?force=true")
    assert status == 200
    assert wait_for_operation(api, op)["response"]["@type"] == "type.googleapis.com/google.protobuf.Empty"
    assert api("GET", f"/v2/{PARENT}/queuedResources/q1")[0] == 404
    assert api("GET", f"/v2/{PARENT}/nodes/qn")[0] == 404


def test_quota_fails_the_operation_or_the_queued_resource(api):
    status, quota = api("POST", "/_fake/quota", {"cores": 8})
    assert quota == {"cores": 8, "reject_at": "operation"}
    status, op = api("POST", f"/v2/{PARENT}/nodes?nodeId=big", NODE)  # v4-16: 16 cores
    assert status == 200
    done = wait_for_operation(api, op)
    assert done["error"]["code"] == 8 and "Quota limit" in done["error"]["message"]
    assert "response" not in done
    assert api("GET", f"/v2/{PARENT}/nodes/big")[0] == 404

    wait_for_operation(
        api, api("POST", f"/v2/{PARENT}/queuedResources?queuedResourceId=q1", queued_body())[1]
    )
    _, qr = api("GET", f"/v2/{PARENT}/queuedResources/q1")
    assert qr["state"]["state"] == "FAILED"
    assert qr["state"]["failedData"]["error"]["code"] == 8

    api("POST", "/_fake/quota", {"cores": 8, "reject_at": "request"})
    status, body = api("POST", f"/v2/{PARENT}/nodes?nodeId=big", NODE)
    assert "Limit: 8 in zone us-central2-b" in google_error(status, body, 429, "RESOURCE_EXHAUSTED")
    api("POST", "/_fake/quota", {"cores": None})
    assert api("POST", f"/v2/{PARENT}/nodes?nodeId=big", NODE)[0] == 200


def test_preempt_hook_preempts_a_spot_node_and_suspends_its_queued_resource(api):
    wait_for_operation(
        api, api("POST", f"/v2/{PARENT}/queuedResources?queuedResourceId=q1", queued_body({"spot": {}}))[1]
    )
    api("GET", f"/v2/{PARENT}/nodes/qn")
    assert api("GET", f"/v2/{PARENT}/nodes/qn")[1]["state"] == "READY"
    status, node = api("POST", "/_fake/nodes/qn:preempt")
    assert status == 200 and node["state"] == "PREEMPTED"
    assert api("GET", f"/v2/{PARENT}/nodes/qn")[1]["state"] == "PREEMPTED"
    assert api("GET", f"/v2/{PARENT}/queuedResources/q1")[1]["state"] == {
        "state": "SUSPENDED",
        "suspendedData": {},
        "stateInitiator": "SERVICE",
    }

    wait_for_operation(api, api("POST", f"/v2/{PARENT}/nodes?nodeId=ondemand", NODE)[1])
    status, body = api("POST", f"/_fake/{PARENT}/nodes/ondemand:preempt")
    assert "neither spot nor preemptible" in google_error(status, body, 400, "FAILED_PRECONDITION")


def test_request_log_lists_api_requests_in_order(api):
    api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", NODE)
    api("GET", f"/v2/{PARENT}/nodes/n1")
    api("GET", "/_fake/config")
    _, log = api("GET", "/_fake/requests")
    assert log["requests"] == [
        {"method": "POST", "path": f"/v2/{PARENT}/nodes", "query": {"nodeId": "n1"}, "body": NODE},
        {"method": "GET", "path": f"/v2/{PARENT}/nodes/n1", "query": {}, "body": None},
    ]
    api("DELETE", "/_fake/requests")
    assert api("GET", "/_fake/requests")[1] == {"requests": []}


def test_config_hook_changes_delays_and_refuses_unknown_keys(api):
    status, config = api("POST", "/_fake/config", {"create_delay_s": 5.0, "workers": {"v4-8": 1}})
    assert status == 200 and config["create_delay_s"] == 5.0
    api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", {**NODE, "acceleratorType": "v4-8"})
    assert api("GET", f"/v2/{PARENT}/nodes/n1")[1]["state"] == "CREATING"
    status, body = api("POST", "/_fake/config", {"create_delay": 1})
    assert "create_delay_s" in google_error(status, body, 400, "INVALID_ARGUMENT")


def test_state_file_keeps_resources_across_restarts(tmp_path):
    state_file = tmp_path / "tpu.json"
    with FakeTpuServer(FakeTpuConfig(), state_file=state_file) as fake:
        api = Api(fake.url)
        wait_for_operation(api, api("POST", f"/v2/{PARENT}/nodes?nodeId=n1", NODE)[1])
    with FakeTpuServer(FakeTpuConfig(), state_file=state_file) as fake:
        status, node = call(fake.url, "GET", f"/v2/{PARENT}/nodes/n1")
        assert status == 200 and node["state"] == "READY"
        assert len(node["networkEndpoints"]) == 2


def test_command_line_server_prints_its_url_and_serves(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.fake_tpu.server", "--port", "0", "--workers", "v4-8=3"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        status, op = call(url, "POST", f"/v2/{PARENT}/nodes?nodeId=n1", {**NODE, "acceleratorType": "v4-8"})
        assert status == 200
        time.sleep(0.01)
        _, node = call(url, "GET", f"/v2/{PARENT}/nodes/n1")
        assert len(node["networkEndpoints"]) == 3
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
