"""A local stand-in for the Cloud TPU API v2 (REST), faithful to the wire format of the calls we make.

No emulator of the Cloud TPU API exists, so tests (and `make demo`-style runs without a cloud) point
the real `google-cloud-tpu` client at this server instead:

    tpu_v2.TpuClient(credentials=AnonymousCredentials(), transport="rest",
                     client_options=ClientOptions(api_endpoint="http://127.0.0.1:PORT"))

What it serves, in the real API's shapes (camelCase JSON, RFC 3339 timestamps, int64 as strings,
enums as names, or as numbers when the request says `$alt=json;enum-encoding=int` as the Python
client does):

    POST   /v2/projects/{p}/locations/{z}/nodes?nodeId=N              -> Operation
    GET    /v2/projects/{p}/locations/{z}/nodes[?pageSize&pageToken]  -> {nodes, nextPageToken}
    GET    /v2/projects/{p}/locations/{z}/nodes/{n}                   -> Node
    DELETE /v2/projects/{p}/locations/{z}/nodes/{n}                   -> Operation
    POST   /v2/projects/{p}/locations/{z}/queuedResources?queuedResourceId=Q
    GET    /v2/projects/{p}/locations/{z}/queuedResources[/{q}]
    DELETE /v2/projects/{p}/locations/{z}/queuedResources/{q}[?force=true]
    GET    /v2/projects/{p}/locations/{z}/operations/{o}              -> Operation (done, response|error)
    GET    /v2/projects/{p}/locations/{z}/acceleratorTypes[/{t}]      -> {acceleratorTypes, nextPageToken}
    GET    /v2/projects/{p}/locations/{z}/runtimeVersions[/{v}]       -> {runtimeVersions, nextPageToken}

The accelerator types offered are the keys of `FakeTpuConfig.workers`, the runtime versions
`FakeTpuConfig.runtime_versions`, in every zone; creating a node (or queued resource) with a type or
version not offered is refused with INVALID_ARGUMENT (the wording of those two messages is ours).

Errors are Google's JSON error bodies, `{"error": {"code": 409, "message": ..., "status":
"ALREADY_EXISTS"}}`; unknown fields in a request body are refused the way Google's front end
refuses them (`Invalid JSON payload received. Unknown name ...`).

Lifecycle (delays configurable, see `FakeTpuConfig`):

    node            CREATING --create_delay_s--> READY (one networkEndpoint per worker host)
                    DELETING --delete_delay_s--> gone
    queued resource ACCEPTED --accept_delay_s--> PROVISIONING (its nodes are created)
                    --its nodes READY--> ACTIVE; FAILED when over quota
                    delete: DELETING --its nodes gone--> gone (`force` needed while nodes are live)

Transitions happen lazily, when a request arrives after their due time, so a delay of 0 means "on
the next request" (a create answers CREATING / `done: false`, the client's first poll sees READY).

The quota (`quota_cores`, the number in the accelerator type summed over live nodes of a project
and zone) makes a node's create operation finish with RESOURCE_EXHAUSTED (or, with
`quota_reject_at="request"`, the create request itself answer HTTP 429), and a queued resource go
FAILED with the same error in `state.failedData.error`.

Worker IPs come from a pool of loopback addresses (127.0.0.2, 127.0.0.3, ... by default); each node
takes the lowest free ones, one per worker host, and gives them back when it is gone. So a node
recreated after a preemption gets the same addresses, where the test's sshd "workers" listen.

Test hooks, not part of the real API (all JSON):

    POST   /_fake/nodes/{n}:preempt      (or /_fake/projects/{p}/locations/{z}/nodes/{n}:preempt)
           a spot/preemptible node -> PREEMPTED, its queued resource -> SUSPENDED (initiator SERVICE)
    POST   /_fake/quota   {"cores": 16 | null, "reject_at": "operation" | "request"}
    GET    /_fake/config; POST /_fake/config {any FakeTpuConfig field: value} (refuse_deletes: an outage)
    GET    /_fake/requests  -> {"requests": [{method, path, query, body}, ...]} API requests in order
    DELETE /_fake/requests; POST /_fake/reset (forget all resources and requests)

Worker VMs (optional): `FakeTpuServer(config, workers=SshdWorkers(state_dir, port=2222))` runs a
real sshd per worker host on the node's addresses (see `infra.fake_tpu.workers`). The server calls
`workers.node_ready(name, ips, metadata)` on the READY transition, before READY is reported (on a
real TPU, READY means the VMs are up), `workers.node_gone(name, "deleted")` when a delete finishes
and `workers.node_gone(name, "preempted")` at the preempt hook; `stop()` calls `workers.close()`.

Run it on its own with `python -m infra.fake_tpu.server --port 8470 [--state-file PATH]
[--sshd-port 2222 --state-dir DIR]`, or in a test process with
`FakeTpuServer(FakeTpuConfig(...)).start()`. Stdlib only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import ipaddress
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Worker hosts per accelerator type (one networkEndpoint each). Single-host slices have one.
DEFAULT_WORKERS: dict[str, int] = {
    "v2-8": 1,
    "v3-8": 1,
    "v4-8": 1,
    "v4-16": 2,
    "v4-32": 4,
    "v4-64": 8,
    "v5litepod-1": 1,
    "v5litepod-4": 1,
    "v5litepod-8": 1,
    "v5litepod-16": 4,
    "v5litepod-32": 8,
    "v5p-8": 1,
    "v5p-16": 2,
    "v5p-32": 4,
    "v6e-8": 1,
    "v6e-16": 4,
}


# TPU software versions the fake offers: the ones Google documents for JAX and PyTorch per generation
# (cloud.google.com/tpu/docs/runtimes), the older TPU VM base image and a TensorFlow one.
DEFAULT_RUNTIME_VERSIONS = (
    "tpu-ubuntu2204-base",
    "tpu-vm-base",
    "v2-alpha-tpuv5",
    "v2-alpha-tpuv5-lite",
    "v2-alpha-tpuv6e",
    "tpu-vm-tf-2.16.1-pjrt",
)
# AcceleratorConfig.Type by generation: (name, number) (google/cloud/tpu/v2/cloud_tpu.proto).
_ACCELERATOR_CONFIG_TYPE = {
    "v2": ("V2", 2),
    "v3": ("V3", 4),
    "v4": ("V4", 7),
    "v5litepod": ("V5LITE_POD", 9),
    "v5p": ("V5P", 10),
    "v6e": ("V6E", 11),
}


def _loopback_pool(first: str = "127.0.0.2", last: str = "127.0.0.254") -> list[str]:
    lo, hi = int(ipaddress.IPv4Address(first)), int(ipaddress.IPv4Address(last))
    return [str(ipaddress.IPv4Address(i)) for i in range(lo, hi + 1)]


@dataclass
class FakeTpuConfig:
    """How the fake behaves. Every field can be changed at run time through `POST /_fake/config`."""

    create_delay_s: float = 0.0  # node CREATING -> READY
    delete_delay_s: float = 0.0  # node DELETING -> gone
    accept_delay_s: float = 0.0  # queued resource ACCEPTED -> PROVISIONING
    workers: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_WORKERS))
    worker_ips: list[str] = field(default_factory=_loopback_pool)
    endpoint_port: int = 8470  # the port the real API reports on every networkEndpoint
    quota_cores: int | None = None  # None: unlimited
    quota_reject_at: str = "operation"  # or "request": refuse the create call itself with HTTP 429
    # A canonical code (e.g. "UNAVAILABLE") every delete call is answered with, as in an outage; None: none.
    refuse_deletes: str | None = None
    runtime_versions: list[str] = field(default_factory=lambda: list(DEFAULT_RUNTIME_VERSIONS))


# Google's canonical codes: name -> (HTTP status, google.rpc.Code number).
_CODES = {
    "INVALID_ARGUMENT": (400, 3),
    "FAILED_PRECONDITION": (400, 9),
    "NOT_FOUND": (404, 5),
    "ALREADY_EXISTS": (409, 6),
    "RESOURCE_EXHAUSTED": (429, 8),
    "UNIMPLEMENTED": (501, 12),
    "UNAVAILABLE": (503, 14),
}

# Enum fields we emit, name -> number (as in google/cloud/tpu/v2/cloud_tpu.proto).
_NODE_STATE = {"CREATING": 1, "READY": 2, "DELETING": 5, "PREEMPTED": 11, "TERMINATED": 12}
_NODE_HEALTH = {"HEALTHY": 1, "UNHEALTHY_MAINTENANCE": 5}
_API_VERSION = {"V2": 4}
_QR_STATE = {
    "CREATING": 1,
    "ACCEPTED": 2,
    "PROVISIONING": 3,
    "FAILED": 4,
    "DELETING": 5,
    "ACTIVE": 6,
    "SUSPENDING": 7,
    "SUSPENDED": 8,
    "WAITING_FOR_RESOURCES": 9,
}
_QR_INITIATOR = {"USER": 1, "SERVICE": 2}

_TYPE_PREFIX = "type.googleapis.com/"
_NODE_TYPE = _TYPE_PREFIX + "google.cloud.tpu.v2.Node"
_QR_TYPE = _TYPE_PREFIX + "google.cloud.tpu.v2.QueuedResource"
_EMPTY_TYPE = _TYPE_PREFIX + "google.protobuf.Empty"
_OP_METADATA_TYPE = _TYPE_PREFIX + "google.cloud.tpu.v2.OperationMetadata"

_RESOURCE_ID = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_API_PATH = re.compile(
    r"^/v2/projects/(?P<project>[^/]+)/locations/(?P<zone>[^/]+)"
    r"/(?P<collection>nodes|queuedResources|operations|acceleratorTypes|runtimeVersions)"
    r"(?:/(?P<id>[^/:]+))?$"
)
_PREEMPT_PATH = re.compile(
    r"^/_fake/(?:projects/(?P<project>[^/]+)/locations/(?P<zone>[^/]+)/)?nodes/(?P<id>[^/:]+):preempt$"
)
_RESERVATION = re.compile(r"^projects/[^/]+/locations/[^/]+/reservations/[^/]+$")

# Request-body schemas: a dict is a message (its known fields), a one-element list a repeated
# message, MAP a string map, None any scalar. Used to refuse unknown fields as Google does, and
# to accept the proto field names (snake_case) as well as the JSON names, as Google does.
MAP = "map"
_SCHEDULING = {"preemptible": None, "reserved": None, "spot": None}
_NETWORK = {
    "network": None,
    "subnetwork": None,
    "enableExternalIps": None,
    "canIpForward": None,
    "queueCount": None,
}
_NODE_SCHEMA: dict[str, Any] = {
    "name": None,
    "description": None,
    "acceleratorType": None,
    "state": None,
    "healthDescription": None,
    "runtimeVersion": None,
    "networkConfig": _NETWORK,
    "networkConfigs": [_NETWORK],
    "cidrBlock": None,
    "serviceAccount": {"email": None, "scope": None},
    "createTime": None,
    "schedulingConfig": _SCHEDULING,
    "networkEndpoints": None,
    "health": None,
    "labels": MAP,
    "metadata": MAP,
    "tags": None,
    "id": None,
    "dataDisks": [{"sourceDisk": None, "mode": None}],
    "apiVersion": None,
    "symptoms": None,
    "shieldedInstanceConfig": {"enableSecureBoot": None},
    "acceleratorConfig": {"type": None, "topology": None},
    "queuedResource": None,
    "multisliceNode": None,
}
_QR_SCHEMA: dict[str, Any] = {
    "name": None,
    "createTime": None,
    "tpu": {
        "nodeSpec": [
            {
                "parent": None,
                "nodeId": None,
                "multisliceParams": {"nodeCount": None, "nodeIdPrefix": None},
                "node": _NODE_SCHEMA,
            }
        ]
    },
    "spot": {},
    "guaranteed": {"minDuration": None},
    "queueingPolicy": {
        "validUntilDuration": None,
        "validUntilTime": None,
        "validAfterDuration": None,
        "validAfterTime": None,
        "validInterval": {"startTime": None, "endTime": None},
    },
    "state": None,
    "reservationName": None,
}


class ApiError(Exception):
    """An error the server answers with Google's JSON error body."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def http_code(self) -> int:
        return _CODES[self.status][0]

    def body(self) -> dict:
        return {"error": {"code": self.http_code, "message": self.message, "status": self.status}}

    def rpc_status(self) -> dict:
        """As a google.rpc.Status, the shape of `Operation.error` and `failedData.error`."""
        return {"code": _CODES[self.status][1], "message": self.message}


def _now_rfc3339(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _check_body(value: Any, schema: Any, where: str) -> Any:
    """`value` with field names in their JSON (camelCase) form; ApiError on an unknown field."""
    if schema is None or schema == MAP:
        return value
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{where}', expected a list.")
        return [_check_body(item, schema[0], where) for item in value]
    if not isinstance(value, dict):
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{where}', expected an object.")
    out = {}
    for key, item in value.items():
        name = _camel(key)
        if name not in schema:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': Cannot find field.",
            )
        out[name] = _check_body(item, schema[name], f"{where}.{_snake(name)}")
    return out


def _cores(accelerator_type: str) -> int:
    return int(accelerator_type.rsplit("-", 1)[1])


def _as_ints(resource: dict) -> dict:
    """A copy of a Node or QueuedResource view with enums as numbers (`enum-encoding=int`)."""
    out = copy.deepcopy(resource)
    for key, table in (("state", _NODE_STATE), ("health", _NODE_HEALTH), ("apiVersion", _API_VERSION)):
        if isinstance(out.get(key), str):
            out[key] = table[out[key]]
    state = out.get("state")
    if isinstance(state, dict):
        state["state"] = _QR_STATE[state["state"]]
        if "stateInitiator" in state:
            state["stateInitiator"] = _QR_INITIATOR[state["stateInitiator"]]
    return out


class FakeTpuState:
    """Every resource of the fake and the rules that move them. All methods hold `self.lock`.

    Records are plain JSON-able dicts so that the whole state can be saved to a file:
      nodes[name]      {"resource": Node JSON, "due": t|None, "next": "READY"|"GONE"|None,
                        "op": create/delete operation name|None, "ips": [...]}
      qrs[name]        {"resource": QueuedResource JSON, "due", "next": "PROVISIONING"|None,
                        "op": delete operation name|None}
      operations[name] {"resource": Operation JSON, "due": t|None, "error": rpc Status|None}
    An operation with a `due` time finishes by itself then; the others are finished by the
    transition of their node or queued resource.
    """

    def __init__(self, config: FakeTpuConfig, state_file: Path | None = None):
        self.config = config
        self.state_file = state_file
        self.lock = threading.RLock()
        self.nodes: dict[str, dict] = {}
        self.qrs: dict[str, dict] = {}
        self.operations: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.workers: Any = None  # an optional SshdWorkers (see the module docstring)
        if state_file is not None and state_file.exists():
            saved = json.loads(state_file.read_text())
            self.nodes, self.qrs, self.operations = saved["nodes"], saved["qrs"], saved["operations"]
            self.config.quota_cores = saved.get("quota_cores", self.config.quota_cores)

    # ---------------------------------------------------------------- persistence

    def save(self) -> None:
        if self.state_file is None:
            return
        data = {
            "nodes": self.nodes,
            "qrs": self.qrs,
            "operations": self.operations,
            "quota_cores": self.config.quota_cores,
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.state_file)

    def reset(self) -> None:
        for name in list(self.nodes):
            self._notify_workers("node_gone", name, "deleted")
        self.nodes.clear()
        self.qrs.clear()
        self.operations.clear()
        self.requests.clear()

    # ---------------------------------------------------------------- operations

    def _new_operation(self, parent: str, target: str, verb: str, now: float) -> dict:
        op_id = f"operation-{int(now * 1000)}-{random.getrandbits(64):016x}"
        name = f"{parent}/operations/{op_id}"
        record = {
            "resource": {
                "name": name,
                "metadata": {
                    "@type": _OP_METADATA_TYPE,
                    "createTime": _now_rfc3339(now),
                    "target": target,
                    "verb": verb,
                    "cancelRequested": False,
                    "apiVersion": "v2",
                },
                "done": False,
            },
            "due": None,
            "error": None,
        }
        self.operations[name] = record
        return record

    def _finish_operation(self, name: str | None, now: float, response: dict | None, error=None) -> None:
        record = self.operations.get(name or "")
        if record is None or record["resource"]["done"]:
            return
        op = record["resource"]
        op["done"] = True
        op["metadata"]["endTime"] = _now_rfc3339(now)
        if error is not None:
            op["error"] = error
        else:
            op["response"] = response
        record["due"] = None

    def operation_view(self, name: str, int_enums: bool) -> dict:
        record = self.operations.get(name)
        if record is None:
            raise ApiError("NOT_FOUND", f"Resource '{name}' was not found")
        op = copy.deepcopy(record["resource"])
        if int_enums and "response" in op and op["response"]["@type"] != _EMPTY_TYPE:
            op["response"] = _as_ints(op["response"])
        return op

    # ---------------------------------------------------------------- time

    def advance(self, now: float) -> bool:
        """Apply every transition due by `now`, oldest first. True when something changed."""
        changed = False
        while True:
            due = [(r["due"], "node", n) for n, r in self.nodes.items() if r["due"] is not None]
            due += [(r["due"], "qr", n) for n, r in self.qrs.items() if r["due"] is not None]
            due += [(r["due"], "op", n) for n, r in self.operations.items() if r["due"] is not None]
            due = [d for d in due if d[0] <= now]
            if not due:
                break
            _, kind, name = min(due)
            {"node": self._node_transition, "qr": self._qr_transition, "op": self._op_transition}[kind](
                name, now
            )
            changed = True
        return self._settle_queued_resources(now) or changed

    def _op_transition(self, name: str, now: float) -> None:
        record = self.operations[name]
        target = record["resource"]["metadata"]["target"]
        response = None
        if record["error"] is None:
            response = self._view_for_operation(target)
        self._finish_operation(name, now, response, record["error"])

    def _view_for_operation(self, target: str) -> dict:
        if target in self.nodes:
            return {"@type": _NODE_TYPE, **copy.deepcopy(self.nodes[target]["resource"])}
        if target in self.qrs:
            return {"@type": _QR_TYPE, **copy.deepcopy(self.qrs[target]["resource"])}
        return {"@type": _EMPTY_TYPE}

    # ---------------------------------------------------------------- nodes

    def _node_usage(self, project: str, zone: str) -> int:
        prefix = f"projects/{project}/locations/{zone}/nodes/"
        return sum(
            _cores(r["resource"]["acceleratorType"])
            for n, r in self.nodes.items()
            if n.startswith(prefix) and r["resource"]["state"] not in ("PREEMPTED", "TERMINATED")
        )

    def _quota_error(self, project: str, zone: str, accelerator_types: list[str]) -> ApiError | None:
        """The error for creating nodes of these types now, if that would exceed the quota."""
        limit = self.config.quota_cores
        if limit is None:
            return None
        if self._node_usage(project, zone) + sum(_cores(a) for a in accelerator_types) <= limit:
            return None
        return ApiError(
            "RESOURCE_EXHAUSTED",
            f"Quota limit 'TPUCoresPerProjectPerZone' has been exceeded. Limit: {limit} in zone {zone}.",
        )

    def _validate_node(self, node: dict, where: str) -> None:
        if "acceleratorConfig" in node:
            raise ApiError("UNIMPLEMENTED", "This fake supports acceleratorType only, not acceleratorConfig.")
        accelerator = node.get("acceleratorType")
        if not accelerator:
            raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{where}.accelerator_type': must be set.")
        if accelerator not in self.config.workers:
            known = ", ".join(sorted(self.config.workers))
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Accelerator type '{accelerator}' is not available in this zone (known: {known}).",
            )
        runtime = node.get("runtimeVersion")
        if not runtime:
            raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{where}.runtime_version': must be set.")
        if runtime not in self.config.runtime_versions:
            raise ApiError("INVALID_ARGUMENT", f"Runtime version '{runtime}' is not available in this zone.")
        scheduling = node.get("schedulingConfig", {})
        if scheduling.get("spot") and scheduling.get("preemptible"):
            raise ApiError("INVALID_ARGUMENT", "A node cannot be both spot and preemptible.")

    @staticmethod
    def _check_id(resource_id: str | None, what: str) -> str:
        if not resource_id:
            raise ApiError("INVALID_ARGUMENT", f"Invalid value for {what}: must be set.")
        if not _RESOURCE_ID.match(resource_id):
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Invalid value for {what} '{resource_id}': must be 1-63 characters, lowercase letters, "
                "digits and hyphens, starting with a letter and not ending with a hyphen.",
            )
        return resource_id

    def _add_node(self, parent: str, node_id: str, node: dict, now: float, qr_name: str | None) -> dict:
        name = f"{parent}/nodes/{node_id}"
        project = parent.split("/")[1]
        resource = {
            k: v
            for k, v in node.items()
            if k not in ("name", "state", "createTime", "networkEndpoints", "health", "id", "queuedResource")
        }
        resource.update(
            name=name,
            state="CREATING",
            createTime=_now_rfc3339(now),
            id=str(random.randrange(10**18, 2**63)),  # an int64
            apiVersion="V2",
        )
        resource.setdefault("networkConfig", {})
        resource["networkConfig"].setdefault("network", f"projects/{project}/global/networks/default")
        resource.setdefault("serviceAccount", {"email": "default", "scope": []})
        resource.setdefault("schedulingConfig", {})
        if qr_name is not None:
            resource["queuedResource"] = qr_name
        record = {
            "resource": resource,
            "due": now + self.config.create_delay_s,
            "next": "READY",
            "op": None,
            "ips": [],
        }
        self.nodes[name] = record
        return record

    def create_node(self, project: str, zone: str, query: dict, body: dict, now: float) -> dict:
        parent = f"projects/{project}/locations/{zone}"
        node_id = self._check_id(query.get("nodeId"), "node_id")
        node = _check_body(body, _NODE_SCHEMA, "node")
        self._validate_node(node, "node")
        name = f"{parent}/nodes/{node_id}"
        if name in self.nodes:
            raise ApiError("ALREADY_EXISTS", f"Resource '{name}' already exists")
        over_quota = self._quota_error(project, zone, [node["acceleratorType"]])
        if over_quota is not None and self.config.quota_reject_at == "request":
            raise over_quota
        op = self._new_operation(parent, name, "create", now)
        if over_quota is not None:
            # Admission fails: no node is left behind; the operation finishes with the error.
            op["due"], op["error"] = now, over_quota.rpc_status()
        else:
            self._add_node(parent, node_id, node, now, qr_name=None)["op"] = op["resource"]["name"]
        return copy.deepcopy(op["resource"])

    def _free_ips(self, count: int) -> list[str]:
        taken = {ip for r in self.nodes.values() for ip in r["ips"]}
        free = [ip for ip in self.config.worker_ips if ip not in taken]
        if len(free) < count:
            raise ApiError("RESOURCE_EXHAUSTED", "The fake's pool of worker IP addresses is exhausted.")
        return free[:count]

    def _node_transition(self, name: str, now: float) -> None:
        record = self.nodes[name]
        node = record["resource"]
        step, record["due"], record["next"] = record["next"], None, None
        if step == "READY" and node["state"] == "CREATING":
            record["ips"] = self._free_ips(self.config.workers[node["acceleratorType"]])
            external = node.get("networkConfig", {}).get("enableExternalIps", False)
            node["networkEndpoints"] = [
                {"ipAddress": ip, "port": self.config.endpoint_port}
                | ({"accessConfig": {"externalIp": ip}} if external else {})
                for ip in record["ips"]
            ]
            self._notify_workers("node_ready", name, list(record["ips"]), dict(node.get("metadata", {})))
            node["state"], node["health"] = "READY", "HEALTHY"
            self._finish_operation(record["op"], now, self._view_for_operation(name))
            record["op"] = None
        elif step == "GONE":
            del self.nodes[name]
            self._notify_workers("node_gone", name, "deleted")
            self._finish_operation(record["op"], now, {"@type": _EMPTY_TYPE})

    def _notify_workers(self, hook: str, *args: Any) -> None:
        """Call a hook of the worker VMs, if any. A failure is reported, not raised: the node keeps
        its state, and connecting to its workers fails, as with a VM that did not boot."""
        if self.workers is None:
            return
        try:
            getattr(self.workers, hook)(*args)
        except Exception as e:  # noqa: BLE001 - any failure of the "VMs" must not break the API
            print(f"fake Cloud TPU API: workers.{hook}({args[0]}) failed: {e}", file=sys.stderr, flush=True)

    def get_node(self, name: str) -> dict:
        record = self.nodes.get(name)
        if record is None:
            raise ApiError("NOT_FOUND", f"Resource '{name}' was not found")
        return copy.deepcopy(record["resource"])

    def delete_node(self, name: str, now: float) -> dict:
        record = self.nodes.get(name)
        if record is None:
            raise ApiError("NOT_FOUND", f"Resource '{name}' was not found")
        parent = name.rsplit("/nodes/", 1)[0]
        op = self._new_operation(parent, name, "delete", now)
        self._start_node_delete(record, now, op["resource"]["name"])
        return copy.deepcopy(op["resource"])

    def _start_node_delete(self, record: dict, now: float, op_name: str | None) -> None:
        if record["resource"]["state"] == "DELETING":
            # A second delete: finish the earlier one's operation now, and report through this one.
            self._finish_operation(record["op"], now, {"@type": _EMPTY_TYPE})
        else:
            # A create still in flight never finishes.
            self._finish_operation(
                record["op"],
                now,
                None,
                ApiError("NOT_FOUND", "The node was deleted while it was being created.").rpc_status(),
            )
        record["resource"]["state"] = "DELETING"
        record["resource"].pop("health", None)
        record["due"], record["next"], record["op"] = now + self.config.delete_delay_s, "GONE", op_name

    def preempt(self, node_id: str, project: str | None, zone: str | None, now: float) -> dict:
        """The test hook: a spot or preemptible node is taken back by the service."""
        matches = [
            name
            for name in self.nodes
            if name.endswith(f"/nodes/{node_id}")
            and (project is None or name.startswith(f"projects/{project}/locations/{zone}/"))
        ]
        if not matches:
            raise ApiError("NOT_FOUND", f"No node '{node_id}' to preempt.")
        if len(matches) > 1:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Node id '{node_id}' is ambiguous ({', '.join(matches)}); "
                "use /_fake/projects/{p}/locations/{z}/nodes/{n}:preempt.",
            )
        record = self.nodes[matches[0]]
        node = record["resource"]
        scheduling = node.get("schedulingConfig", {})
        if not (scheduling.get("spot") or scheduling.get("preemptible")):
            raise ApiError("FAILED_PRECONDITION", f"Node '{matches[0]}' is neither spot nor preemptible.")
        if node["state"] not in ("CREATING", "READY"):
            raise ApiError("FAILED_PRECONDITION", f"Node '{matches[0]}' is {node['state']}, not running.")
        self._finish_operation(
            record["op"], now, None, ApiError("RESOURCE_EXHAUSTED", "The node was preempted.").rpc_status()
        )
        node["state"] = "PREEMPTED"
        node.pop("health", None)
        self._notify_workers("node_gone", matches[0], "preempted")
        record["due"], record["next"], record["op"] = None, None, None
        qr = self.qrs.get(node.get("queuedResource", ""))
        if qr is not None and qr["resource"]["state"]["state"] not in ("DELETING", "FAILED"):
            qr["resource"]["state"] = {"state": "SUSPENDED", "suspendedData": {}, "stateInitiator": "SERVICE"}
        return copy.deepcopy(node)

    # ---------------------------------------------------------------- queued resources

    def create_queued_resource(self, project: str, zone: str, query: dict, body: dict, now: float) -> dict:
        parent = f"projects/{project}/locations/{zone}"
        qr_id = self._check_id(query.get("queuedResourceId"), "queued_resource_id")
        qr = _check_body(body, _QR_SCHEMA, "queued_resource")
        specs = qr.get("tpu", {}).get("nodeSpec", [])
        if not specs:
            raise ApiError(
                "INVALID_ARGUMENT", "Invalid value at 'queued_resource.tpu.node_spec': must be set."
            )
        for i, spec in enumerate(specs):
            where = f"queued_resource.tpu.node_spec[{i}]"
            if spec.get("parent") != parent:
                raise ApiError(
                    "INVALID_ARGUMENT",
                    f"Invalid value at '{where}.parent': '{spec.get('parent')}' must be '{parent}'.",
                )
            if "multisliceParams" in spec:
                count = int(spec["multisliceParams"].get("nodeCount", 0))
                if count < 1:
                    raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{where}.multislice_params'.")
                self._check_id(spec["multisliceParams"].get("nodeIdPrefix"), "node_id_prefix")
            else:
                self._check_id(spec.get("nodeId"), f"{where}.node_id")
            self._validate_node(spec.get("node", {}), f"{where}.node")
        if "spot" in qr and "guaranteed" in qr:
            raise ApiError("INVALID_ARGUMENT", "Only one of spot and guaranteed may be set.")
        if "reservationName" in qr and not _RESERVATION.match(qr["reservationName"]):
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Invalid reservation_name '{qr['reservationName']}': expected "
                "projects/{project}/locations/{zone}/reservations/{reservation}.",
            )
        name = f"{parent}/queuedResources/{qr_id}"
        if name in self.qrs:
            raise ApiError("ALREADY_EXISTS", f"Resource '{name}' already exists")
        if self.config.quota_reject_at == "request":
            over_quota = self._quota_error(project, zone, self._accelerators(specs))
            if over_quota is not None:
                raise over_quota
        qr.update(name=name, createTime=_now_rfc3339(now), state={"state": "ACCEPTED", "acceptedData": {}})
        qr.pop("tpu", None)
        qr = {"name": name, "createTime": qr.pop("createTime"), "tpu": {"nodeSpec": specs}, **qr}
        self.qrs[name] = {
            "resource": qr,
            "due": now + self.config.accept_delay_s,
            "next": "PROVISIONING",
            "op": None,
        }
        op = self._new_operation(parent, name, "create", now)
        op["due"] = now  # admission is immediate; the queueing shows in the resource's state
        return copy.deepcopy(op["resource"])

    @staticmethod
    def _node_ids(spec: dict) -> list[str]:
        if "multisliceParams" in spec:
            params = spec["multisliceParams"]
            return [f"{params['nodeIdPrefix']}-{i}" for i in range(int(params["nodeCount"]))]
        return [spec["nodeId"]]

    def _accelerators(self, specs: list[dict]) -> list[str]:
        """The accelerator type of every node that these node specs create."""
        return [s["node"]["acceleratorType"] for s in specs for _ in self._node_ids(s)]

    def _qr_node_names(self, qr: dict) -> list[str]:
        return [f"{s['parent']}/nodes/{i}" for s in qr["tpu"]["nodeSpec"] for i in self._node_ids(s)]

    def _qr_transition(self, name: str, now: float) -> None:
        record = self.qrs[name]
        qr = record["resource"]
        record["due"], record["next"] = None, None
        if qr["state"]["state"] != "ACCEPTED":
            return
        _, project, _, zone = name.split("/")[:4]
        failure = None
        for node_name in self._qr_node_names(qr):
            if node_name in self.nodes:
                failure = ApiError("ALREADY_EXISTS", f"Resource '{node_name}' already exists")
        if failure is None:
            failure = self._quota_error(project, zone, self._accelerators(qr["tpu"]["nodeSpec"]))
        if failure is not None:
            qr["state"] = {"state": "FAILED", "failedData": {"error": failure.rpc_status()}}
            return
        qr["state"] = {"state": "PROVISIONING", "provisioningData": {}}
        for spec in qr["tpu"]["nodeSpec"]:
            node = copy.deepcopy(spec["node"])
            if "spot" in qr:
                node.setdefault("schedulingConfig", {})["spot"] = True
            for node_id in self._node_ids(spec):
                self._add_node(spec["parent"], node_id, node, now, qr_name=name)

    def _settle_queued_resources(self, now: float) -> bool:
        """The transitions that follow from the nodes: ACTIVE when all are READY, gone when all are."""
        changed = False
        for name, record in list(self.qrs.items()):
            qr = record["resource"]
            state = qr["state"]["state"]
            nodes = [self.nodes.get(n) for n in self._qr_node_names(qr)]
            if state == "PROVISIONING" and all(n and n["resource"]["state"] == "READY" for n in nodes):
                qr["state"] = {"state": "ACTIVE", "activeData": {}}
                changed = True
            elif state == "DELETING" and not any(nodes) and (record["due"] or 0) <= now:
                del self.qrs[name]
                self._finish_operation(record["op"], now, {"@type": _EMPTY_TYPE})
                changed = True
        return changed

    def get_queued_resource(self, name: str) -> dict:
        record = self.qrs.get(name)
        if record is None:
            raise ApiError("NOT_FOUND", f"Resource '{name}' was not found")
        return copy.deepcopy(record["resource"])

    def delete_queued_resource(self, name: str, force: bool, now: float) -> dict:
        record = self.qrs.get(name)
        if record is None:
            raise ApiError("NOT_FOUND", f"Resource '{name}' was not found")
        qr = record["resource"]
        live = [
            n
            for n in self._qr_node_names(qr)
            if n in self.nodes and self.nodes[n]["resource"]["state"] not in ("PREEMPTED", "TERMINATED")
        ]
        if live and not force:
            raise ApiError(
                "FAILED_PRECONDITION",
                f"Queued resource '{name}' is {qr['state']['state']} with nodes "
                f"({', '.join(live)}); delete them first or set force=true.",
            )
        parent = name.rsplit("/queuedResources/", 1)[0]
        op = self._new_operation(parent, name, "delete", now)
        for node_name in self._qr_node_names(qr):
            if node_name in self.nodes:
                self._start_node_delete(self.nodes[node_name], now, None)
        qr["state"] = {"state": "DELETING", "deletingData": {}, "stateInitiator": "USER"}
        record["due"], record["next"], record["op"] = (
            now + self.config.delete_delay_s,
            None,
            op["resource"]["name"],
        )
        return copy.deepcopy(op["resource"])

    # ---------------------------------------------------------------- lists

    @staticmethod
    def page(items: list[dict], key: str, query: dict) -> dict:
        start = int(query.get("pageToken") or 0)
        size = int(query.get("pageSize") or 0) or len(items) or 1
        out: dict[str, Any] = {key: items[start : start + size]}
        if start + size < len(items):
            out["nextPageToken"] = str(start + size)
        return out

    def accelerator_types(self, parent: str, int_enums: bool) -> list[dict]:
        out = []
        for name in sorted(self.config.workers, key=lambda t: (t.rsplit("-", 1)[0], _cores(t))):
            kind = _ACCELERATOR_CONFIG_TYPE.get(name.rsplit("-", 1)[0])
            entry: dict[str, Any] = {"name": f"{parent}/acceleratorTypes/{name}", "type": name}
            if kind is not None:
                entry["acceleratorConfigs"] = [{"type": kind[1] if int_enums else kind[0]}]
            out.append(entry)
        return out

    def runtime_versions(self, parent: str) -> list[dict]:
        return [
            {"name": f"{parent}/runtimeVersions/{version}", "version": version}
            for version in sorted(self.config.runtime_versions)
        ]

    @staticmethod
    def one(items: list[dict], name: str, what: str) -> dict:
        for item in items:
            if item["name"] == name:
                return item
        raise ApiError("NOT_FOUND", f"{what} '{name.rsplit('/', 1)[-1]}' was not found.")

    def list_nodes(self, parent: str) -> list[dict]:
        return [
            copy.deepcopy(r["resource"]) for n, r in sorted(self.nodes.items()) if n.startswith(parent + "/")
        ]

    def list_queued_resources(self, parent: str) -> list[dict]:
        return [
            copy.deepcopy(r["resource"]) for n, r in sorted(self.qrs.items()) if n.startswith(parent + "/")
        ]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one write: with two small writes on a kept-alive connection,
    # Nagle's algorithm and delayed ACKs add ~40 ms to every answer.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        state = self.server.state
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError as e:
            self._reply(400, ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. {e}").body())
            return
        with state.lock:
            now = time.time()
            changed = state.advance(now)
            if not url.path.startswith("/_fake/"):
                state.requests.append({"method": method, "path": url.path, "query": query, "body": body})
            try:
                if url.path.startswith("/_fake/"):
                    status, reply = self._admin(method, url.path, body or {}, now)
                else:
                    status, reply = 200, self._api(method, url.path, query, body or {}, now)
                changed = changed or method != "GET"
            except ApiError as e:
                status, reply = e.http_code, e.body()
            if changed:
                state.save()
        self._reply(status, reply)

    def _api(self, method: str, path: str, query: dict, body: dict, now: float) -> dict:
        state = self.server.state
        match = _API_PATH.match(path)
        if match is None:
            raise ApiError("NOT_FOUND", f"The requested URL {path} was not found on this server.")
        project, zone, collection, resource_id = match.group("project", "zone", "collection", "id")
        parent = f"projects/{project}/locations/{zone}"
        name = f"{parent}/{collection}/{resource_id}"
        int_enums = "enum-encoding=int" in query.get("$alt", "")
        view = _as_ints if int_enums else (lambda r: r)
        route = (method, collection, resource_id is not None)
        if route == ("POST", "nodes", False):
            return state.create_node(project, zone, query, body, now)
        if route == ("GET", "nodes", False):
            return state.page([view(n) for n in state.list_nodes(parent)], "nodes", query)
        if route == ("GET", "nodes", True):
            return view(state.get_node(name))
        if method == "DELETE" and state.config.refuse_deletes:
            raise ApiError(state.config.refuse_deletes, "The service is currently unavailable.")
        if route == ("DELETE", "nodes", True):
            return state.delete_node(name, now)
        if route == ("POST", "queuedResources", False):
            return state.create_queued_resource(project, zone, query, body, now)
        if route == ("GET", "queuedResources", False):
            items = [view(q) for q in state.list_queued_resources(parent)]
            return state.page(items, "queuedResources", query)
        if route == ("GET", "queuedResources", True):
            return view(state.get_queued_resource(name))
        if route == ("DELETE", "queuedResources", True):
            return state.delete_queued_resource(name, query.get("force", "").lower() == "true", now)
        if route == ("GET", "operations", True):
            return state.operation_view(name, int_enums)
        if method == "GET" and collection == "acceleratorTypes":
            items = state.accelerator_types(parent, int_enums)
            if resource_id is not None:
                return state.one(items, name, "Accelerator type")
            return state.page(items, "acceleratorTypes", query)
        if method == "GET" and collection == "runtimeVersions":
            items = state.runtime_versions(parent)
            if resource_id is not None:
                return state.one(items, name, "Runtime version")
            return state.page(items, "runtimeVersions", query)
        raise ApiError("UNIMPLEMENTED", f"{method} {path} is not implemented by the fake Cloud TPU API.")

    def _admin(self, method: str, path: str, body: dict, now: float) -> tuple[int, dict]:
        state = self.server.state
        config = state.config
        preempt = _PREEMPT_PATH.match(path)
        if method == "POST" and preempt:
            project, zone, node_id = preempt.group("project", "zone", "id")
            return 200, state.preempt(node_id, project, zone, now)
        if (method, path) == ("POST", "/_fake/quota"):
            reject_at = body.get("reject_at", config.quota_reject_at)
            if reject_at not in ("operation", "request"):
                raise ApiError("INVALID_ARGUMENT", "reject_at must be 'operation' or 'request'.")
            config.quota_cores, config.quota_reject_at = body.get("cores"), reject_at
            return 200, {"cores": config.quota_cores, "reject_at": config.quota_reject_at}
        if (method, path) == ("POST", "/_fake/config"):
            known = {f.name for f in dataclasses.fields(FakeTpuConfig)}
            unknown = sorted(set(body) - known)
            if unknown:
                raise ApiError("INVALID_ARGUMENT", f"Unknown config keys {unknown}; known: {sorted(known)}.")
            for key, value in body.items():
                setattr(config, key, value)
            return 200, dataclasses.asdict(config)
        if (method, path) == ("GET", "/_fake/config"):
            return 200, dataclasses.asdict(config)
        if (method, path) == ("GET", "/_fake/requests"):
            return 200, {"requests": copy.deepcopy(state.requests)}
        if (method, path) == ("DELETE", "/_fake/requests"):
            state.requests.clear()
            return 200, {}
        if (method, path) == ("POST", "/_fake/reset"):
            state.reset()
            return 200, {}
        raise ApiError("NOT_FOUND", f"No test hook {method} {path}.")

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body, indent=2).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: FakeTpuState, verbose: bool):
        super().__init__(address, _Handler)
        self.state = state
        self.verbose = verbose


class FakeTpuServer:
    """The fake served from a background thread of this process: `with FakeTpuServer() as fake:`.

    `url` is what the client takes as `api_endpoint`. The methods below are the test hooks, called
    directly instead of over HTTP.
    """

    def __init__(
        self,
        config: FakeTpuConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        state_file: str | Path | None = None,
        verbose: bool = False,
        workers: Any = None,
    ):
        self.state = FakeTpuState(config or FakeTpuConfig(), Path(state_file) if state_file else None)
        self.state.workers = workers
        if workers is not None:  # nodes restored from the state file: their VMs boot again
            for name, record in self.state.nodes.items():
                if record["resource"]["state"] == "READY":
                    self.state._notify_workers(
                        "node_ready", name, list(record["ips"]), dict(record["resource"].get("metadata", {}))
                    )
        self._httpd = _Server((host, port), self.state, verbose)
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> FakeTpuConfig:
        return self.state.config

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeTpuServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake-tpu-api", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        if self.state.workers is not None and hasattr(self.state.workers, "close"):
            self.state.workers.close()

    def __enter__(self) -> FakeTpuServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def preempt(self, node_id: str, project: str | None = None, zone: str | None = None) -> dict:
        with self.state.lock:
            now = time.time()
            self.state.advance(now)
            node = self.state.preempt(node_id, project, zone, now)
            self.state.save()
            return node

    def set_quota(self, cores: int | None, reject_at: str = "operation") -> None:
        with self.state.lock:
            self.state.config.quota_cores, self.state.config.quota_reject_at = cores, reject_at
            self.state.save()

    def requests(self) -> list[dict]:
        """The API requests received so far, in order: {method, path, query, body}."""
        with self.state.lock:
            return copy.deepcopy(self.state.requests)

    def clear_requests(self) -> None:
        with self.state.lock:
            self.state.requests.clear()


def _parse_workers(text: str) -> dict[str, int]:
    """`v4-8=1,v4-16=2` -> {"v4-8": 1, "v4-16": 2}."""
    out = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        out[name.strip()] = int(count)
    return out


def _parse_ips(text: str) -> list[str]:
    """`127.0.0.2-127.0.0.9` (a range) or `127.0.0.2,127.0.0.5` (a list)."""
    if "-" in text:
        first, last = text.split("-", 1)
        return _loopback_pool(first.strip(), last.strip())
    return [ip.strip() for ip in text.split(",") if ip.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m infra.fake_tpu.server",
        description="A local fake of the Cloud TPU API v2 (REST) for tests and demos.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--state-file", help="keep the resources in this JSON file across restarts")
    parser.add_argument("--create-delay", type=float, default=0.0, help="seconds from CREATING to READY")
    parser.add_argument("--delete-delay", type=float, default=0.0, help="seconds from DELETING to gone")
    parser.add_argument(
        "--accept-delay", type=float, default=0.0, help="queued resource ACCEPTED -> PROVISIONING"
    )
    parser.add_argument("--quota-cores", type=int, default=None, help="TPU cores per project and zone")
    parser.add_argument("--quota-reject-at", choices=("operation", "request"), default="operation")
    parser.add_argument(
        "--workers", type=_parse_workers, help="accelerator type -> worker hosts, v4-16=2,..."
    )
    parser.add_argument("--worker-ips", type=_parse_ips, help="worker IP pool: FIRST-LAST or a,b,c")
    parser.add_argument("--endpoint-port", type=int, default=8470)
    parser.add_argument(
        "--sshd-port", type=int, help="run a real sshd per worker host on WORKER_IP:PORT (not 22)"
    )
    parser.add_argument(
        "--state-dir", help="with --sshd-port: sshd keys, configs and logs (default: a temp dir)"
    )
    parser.add_argument(
        "--preempt-grace", type=float, default=10.0, help="with --sshd-port: seconds from SIGTERM to SIGKILL"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    config = FakeTpuConfig(
        create_delay_s=args.create_delay,
        delete_delay_s=args.delete_delay,
        accept_delay_s=args.accept_delay,
        quota_cores=args.quota_cores,
        quota_reject_at=args.quota_reject_at,
        endpoint_port=args.endpoint_port,
    )
    if args.workers:
        config.workers.update(args.workers)
    if args.worker_ips:
        config.worker_ips = args.worker_ips
    workers = None
    if args.sshd_port is not None:
        from infra.fake_tpu.workers import SshdWorkers

        state_dir = args.state_dir or tempfile.mkdtemp(prefix="fake-tpu-workers-")
        workers = SshdWorkers(state_dir, port=args.sshd_port, grace_s=args.preempt_grace)
    server = FakeTpuServer(config, args.host, args.port, args.state_file, args.verbose, workers=workers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"fake Cloud TPU API listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
