"""The launcher's Cloud TPU client: TPU VMs (nodes) and queued resources through the Cloud TPU API v2.

Built on the real `google-cloud-tpu` library (`tpu_v2`, REST transport); no gcloud. The endpoint is
injectable so that tests point the same code at the local fake (`infra/fake_tpu`):

    tpu = TpuClient("my-proj", "us-central2-b", endpoint="http://127.0.0.1:8470")
    tpu.create_queued_resource("run-1", TpuSpec("v4-16", "tpu-ubuntu2204-base", capacity="spot"))
    qr = tpu.wait_until(tpu.queued_resource_name("run-1"), "ACTIVE", timeout_s=1800, on_progress=print)
    node = tpu.get_node(qr.node_ids[0]); node.worker_ips   # one address per worker host, by worker id

Plan and apply share one request builder: `render_requests` (pure, no network, no credentials)
prints the very request objects that `create_node` / `create_queued_resource` send, transcoded to
HTTP the way the REST transport does it, so `--dry-run` shows the exact bodies.

Every refusal or failure becomes one `TpuError` line naming what failed, the API's status and
message, and what to do about it. Results are plain dataclasses (`TpuNode`, `TpuQueuedResource`),
so callers never touch protobufs. `google.cloud.tpu_v2` is imported only inside the functions that
need it: importing this module is cheap.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from launcher.errors import LaunchError

DEFAULT_ENDPOINT = "https://tpu.googleapis.com"

# Capacity words -> how each is asked for. A node can only say so in its schedulingConfig; a queued
# resource has tiers (v2: `spot` | `guaranteed`, plus `reservationName`); "on_demand" asks for neither.
CAPACITIES = ("on_demand", "spot", "preemptible", "guaranteed", "reserved")
_NODE_SCHEDULING = {
    "on_demand": {},
    "spot": {"spot": True},
    "preemptible": {"preemptible": True},
    "reserved": {"reserved": True},
}
_QUEUED_TIER = {"on_demand": None, "spot": "spot", "guaranteed": "guaranteed", "reserved": "guaranteed"}

# What to do about a refusal, by the API's status.
_HINTS = {
    "ALREADY_EXISTS": "pick another name, or delete the existing one first",
    "NOT_FOUND": "check the name, project and zone",
    "RESOURCE_EXHAUSTED": "ask for more quota, or use a smaller accelerator type or another zone",
    "PERMISSION_DENIED": "check the project and that your credentials may use the Cloud TPU API there",
    "UNAUTHENTICATED": "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
    "INVALID_ARGUMENT": "check the TPU settings in your backend config",
    "FAILED_PRECONDITION": "check the resource's state",
}

# States a wait cannot get out of: the TPU will not become what we wait for.
_NODE_DEAD_ENDS = {"PREEMPTED", "TERMINATED", "DELETING", "STOPPED", "STOPPING", "HIDDEN"}
_QUEUED_DEAD_ENDS = {"FAILED", "SUSPENDING", "SUSPENDED", "DELETING"}

# The TPU software version Google documents for each generation (cloud.google.com/tpu/docs/runtimes):
# v6e, v5p and v5e have images of their own; v4 and older boot tpu-ubuntu2204-base. A TPU booted with
# another generation's image fails in ways that do not name the version, so this is the default.
_DOCUMENTED_RUNTIMES = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
}
_BASE_RUNTIME = "tpu-ubuntu2204-base"

_RESOURCE_ID = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# The REST rules of the two create calls (google/cloud/tpu/v2/cloud_tpu.proto `google.api.http`).
_HTTP_RULES = {
    "CreateNode": [{"method": "post", "uri": "/v2/{parent=projects/*/locations/*}/nodes", "body": "node"}],
    "CreateQueuedResource": [
        {
            "method": "post",
            "uri": "/v2/{parent=projects/*/locations/*}/queuedResources",
            "body": "queued_resource",
        }
    ],
}


class TpuError(LaunchError):
    """A Cloud TPU API refusal or a TPU that did not become ready, as one line.

    `status` is the API's canonical status (ALREADY_EXISTS, NOT_FOUND, RESOURCE_EXHAUSTED, ...), or
    the state the TPU ended in (FAILED, PREEMPTED, SUSPENDED, TIMEOUT, UNREACHABLE)."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status


@dataclass
class TpuSpec:
    """What to create: the same fields for a plain node and for a queued resource's node."""

    accelerator_type: str  # e.g. v4-16, v5litepod-16
    runtime_version: str  # e.g. tpu-ubuntu2204-base
    capacity: str = "on_demand"  # one of CAPACITIES
    reservation: str | None = None  # capacity=reserved: a reservation id or its full name
    network: str | None = None
    subnetwork: str | None = None
    enable_external_ips: bool = False
    service_account: str | None = None
    scopes: list[str] = field(default_factory=lambda: ["https://www.googleapis.com/auth/cloud-platform"])
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # e.g. ssh-keys, startup-script
    tags: list[str] = field(default_factory=list)
    description: str = ""
    valid_until_s: int | None = None  # queued resources: give up if not provisioned within this


@dataclass(frozen=True)
class TpuNode:
    """A TPU VM (slice) as the API reports it. `worker_ips` has one address per host, by worker id."""

    name: str
    node_id: str
    state: str
    accelerator_type: str
    runtime_version: str
    worker_ips: list[str]
    external_ips: list[str]
    health: str
    capacity: str  # on_demand | spot | preemptible | reserved
    queued_resource: str  # full name of the queued resource that created it, or ""
    metadata: dict[str, str]
    labels: dict[str, str]


@dataclass(frozen=True)
class TpuQueuedResource:
    """A queued resource as the API reports it; `error` is the reason when it is FAILED."""

    name: str
    queued_resource_id: str
    state: str
    state_initiator: str  # USER or SERVICE (who suspended or deleted it), or ""
    tier: str  # spot | guaranteed | on_demand
    reservation: str
    node_ids: list[str]
    error: str


@dataclass(frozen=True)
class RenderedRequest:
    """One API call as it goes over the wire: `body` is the JSON object the REST transport sends."""

    method: str
    url: str
    body: dict[str, Any]

    def text(self) -> str:
        return f"{self.method} {self.url}\n{json.dumps(self.body, indent=2)}"


# ------------------------------------------------------------------------------- pure: requests


def tpu_generation(accelerator_type: str) -> str:
    """The generation part of an accelerator type: v4 of v4-16, v5litepod of v5litepod-8."""
    return (accelerator_type or "").rpartition("-")[0] or accelerator_type or ""


def default_runtime_version(accelerator_type: str) -> str:
    """The TPU software version Google documents for this accelerator type's generation."""
    return _DOCUMENTED_RUNTIMES.get(tpu_generation(accelerator_type), _BASE_RUNTIME)


def runtime_mismatch(accelerator_type: str, runtime_version: str) -> str | None:
    """A note when `runtime_version` is the image of another generation than `accelerator_type`'s
    (None when it is the documented one, or one we know nothing about, e.g. a TensorFlow image)."""
    documented = default_runtime_version(accelerator_type)
    known = {*_DOCUMENTED_RUNTIMES.values(), _BASE_RUNTIME}
    if runtime_version == documented or runtime_version not in known:
        return None
    return (
        f"runtime version {runtime_version} is not the one Google documents for "
        f"{tpu_generation(accelerator_type)} TPUs ({documented})"
    )


def _tpu():
    from google.cloud import tpu_v2

    return tpu_v2


def _check_id(resource_id: str, what: str) -> None:
    if not _RESOURCE_ID.match(resource_id or ""):
        raise TpuError(
            f"invalid {what} '{resource_id}': use 1-63 lowercase letters, digits and hyphens, "
            "starting with a letter and not ending with a hyphen",
            "INVALID_ARGUMENT",
        )


def _check_capacity(capacity: str, allowed: tuple[str, ...], queued: bool) -> None:
    if capacity in allowed:
        return
    if capacity in CAPACITIES:
        fix = "a queued resource" if not queued else "a plain node, or capacity 'spot' for a queued resource"
        raise TpuError(
            f"capacity '{capacity}' is not available for a {'queued resource' if queued else 'node'}; "
            f"use {fix} (valid here: {', '.join(allowed)})",
            "INVALID_ARGUMENT",
        )
    raise TpuError(
        f"unknown capacity '{capacity}'; choose one of: {', '.join(CAPACITIES)}", "INVALID_ARGUMENT"
    )


def _node_message(spec: TpuSpec, capacity_in_node: bool = True):
    """The Node a spec asks for. A queued resource passes `capacity_in_node=False` except for
    'reserved': its tier (spot / guaranteed) carries the capacity instead of `schedulingConfig`."""
    tpu_v2 = _tpu()
    node = tpu_v2.Node(
        accelerator_type=spec.accelerator_type,
        runtime_version=spec.runtime_version,
        description=spec.description,
        labels=dict(spec.labels),
        metadata=dict(spec.metadata),
        tags=list(spec.tags),
    )
    if spec.network or spec.subnetwork or spec.enable_external_ips:
        node.network_config = tpu_v2.NetworkConfig(
            network=spec.network or "",
            subnetwork=spec.subnetwork or "",
            enable_external_ips=spec.enable_external_ips,
        )
    if spec.service_account:
        node.service_account = tpu_v2.ServiceAccount(email=spec.service_account, scope=list(spec.scopes))
    scheduling = _NODE_SCHEDULING.get(spec.capacity, {}) if capacity_in_node else {}
    if scheduling:
        node.scheduling_config = tpu_v2.SchedulingConfig(**scheduling)
    return node


def _reservation_name(project: str, zone: str, reservation: str) -> str:
    if "/" in reservation:
        return reservation
    return f"projects/{project}/locations/{zone}/reservations/{reservation}"


def create_node_request(project: str, zone: str, node_id: str, spec: TpuSpec):
    """The `CreateNodeRequest` for a TPU VM (validated here, so a bad spec fails before any call)."""
    _check_id(node_id, "TPU name")
    _check_capacity(spec.capacity, tuple(_NODE_SCHEDULING), queued=False)
    if spec.reservation:
        raise TpuError(
            f"reservation '{spec.reservation}' needs a queued resource: a plain TPU VM can only ask for "
            "capacity 'reserved' (any reservation of the project)",
            "INVALID_ARGUMENT",
        )
    return _tpu().CreateNodeRequest(
        parent=f"projects/{project}/locations/{zone}", node_id=node_id, node=_node_message(spec)
    )


def create_queued_resource_request(
    project: str, zone: str, queued_resource_id: str, spec: TpuSpec, node_id: str | None = None
):
    """The `CreateQueuedResourceRequest` for one node (`node_id`, default: the queued resource's id)."""
    tpu_v2 = _tpu()
    _check_id(queued_resource_id, "queued resource name")
    _check_id(node_id or queued_resource_id, "TPU name")
    _check_capacity(spec.capacity, tuple(_QUEUED_TIER), queued=True)
    if spec.reservation and spec.capacity != "reserved":
        raise TpuError("a reservation is only used with capacity 'reserved'", "INVALID_ARGUMENT")
    parent = f"projects/{project}/locations/{zone}"
    qr_type = tpu_v2.QueuedResource
    node = _node_message(spec, capacity_in_node=spec.capacity == "reserved")
    queued = qr_type(
        tpu=qr_type.Tpu(
            node_spec=[qr_type.Tpu.NodeSpec(parent=parent, node_id=node_id or queued_resource_id, node=node)]
        )
    )
    tier = _QUEUED_TIER[spec.capacity]
    if tier == "spot":
        queued.spot = qr_type.Spot()
    elif tier == "guaranteed":
        queued.guaranteed = qr_type.Guaranteed()
    if spec.reservation:
        queued.reservation_name = _reservation_name(project, zone, spec.reservation)
    if spec.valid_until_s:
        queued.queueing_policy = qr_type.QueueingPolicy(
            valid_until_duration={"seconds": int(spec.valid_until_s)}
        )
    return tpu_v2.CreateQueuedResourceRequest(
        parent=parent, queued_resource_id=queued_resource_id, queued_resource=queued
    )


def _rendered(rpc: str, request, endpoint: str) -> RenderedRequest:
    """Transcode a request as the REST transport does (path, query, body; enums as numbers)."""
    from google.api_core import path_template
    from google.protobuf import json_format

    http = path_template.transcode(_HTTP_RULES[rpc], type(request).pb(request))
    query = json.loads(json_format.MessageToJson(http["query_params"], use_integers_for_enums=True))
    body = json.loads(json_format.MessageToJson(http["body"], use_integers_for_enums=True))
    url = endpoint.rstrip("/") + http["uri"] + ("?" + urlencode(query) if query else "")
    return RenderedRequest(http["method"].upper(), url, body)


def build_requests(
    project: str,
    zone: str,
    name: str,
    spec: TpuSpec,
    queued: bool = False,
    node_id: str | None = None,
    endpoint: str | None = None,
) -> list[RenderedRequest]:
    """The create request(s) for a TPU named `name`, as they go over the wire. Pure: no network.

    (The transport also adds `$alt=json;enum-encoding=int` to every URL; that is left out here.)"""
    endpoint = endpoint or DEFAULT_ENDPOINT
    if queued:
        request = create_queued_resource_request(project, zone, name, spec, node_id)
        return [_rendered("CreateQueuedResource", request, endpoint)]
    return [_rendered("CreateNode", create_node_request(project, zone, name, spec), endpoint)]


def render_requests(
    project: str,
    zone: str,
    name: str,
    spec: TpuSpec,
    queued: bool = False,
    node_id: str | None = None,
    endpoint: str | None = None,
) -> str:
    """`build_requests` as text for `--dry-run`: the method and URL, then the JSON body."""
    requests = build_requests(project, zone, name, spec, queued, node_id, endpoint)
    return "\n\n".join(r.text() for r in requests)


# ------------------------------------------------------------------------------- results


def _node_capacity(scheduling) -> str:
    for capacity in ("spot", "preemptible", "reserved"):
        if getattr(scheduling, capacity):
            return capacity
    return "on_demand"


def _node_from_proto(node) -> TpuNode:
    return TpuNode(
        name=node.name,
        node_id=node.name.rsplit("/", 1)[-1],
        state=node.state.name,
        accelerator_type=node.accelerator_type,
        runtime_version=node.runtime_version,
        worker_ips=[e.ip_address for e in node.network_endpoints],
        external_ips=[
            e.access_config.external_ip for e in node.network_endpoints if e.access_config.external_ip
        ],
        health=node.health.name if node.health else "",
        capacity=_node_capacity(node.scheduling_config),
        queued_resource=node.queued_resource,
        metadata=dict(node.metadata),
        labels=dict(node.labels),
    )


def _rpc_error_text(status) -> str:
    """A google.rpc.Status as `CODE_NAME: message`."""
    from google.rpc import code_pb2

    try:
        code = code_pb2.Code.Name(status.code)
    except ValueError:
        code = str(status.code)
    return f"{code}: {_one_line(status.message)}"


def _queued_from_proto(queued) -> TpuQueuedResource:
    state = queued.state
    error = ""
    if "failed_data" in state and state.failed_data.error.code:
        error = _rpc_error_text(state.failed_data.error)
    tier = "spot" if "spot" in queued else "guaranteed" if "guaranteed" in queued else "on_demand"
    initiator = state.state_initiator.name if state.state_initiator else ""
    return TpuQueuedResource(
        name=queued.name,
        queued_resource_id=queued.name.rsplit("/", 1)[-1],
        state=state.state.name,
        state_initiator=initiator,
        tier=tier,
        reservation=queued.reservation_name,
        node_ids=[s.node_id for s in queued.tpu.node_spec if s.node_id]
        + [
            f"{s.multislice_params.node_id_prefix}-{i}"
            for s in queued.tpu.node_spec
            if not s.node_id
            for i in range(s.multislice_params.node_count)
        ],
        error=error,
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def sorted_names(names: list[str]) -> list[str]:
    """Distinct names with their numbers in numeric order: v4-8 before v4-16."""
    return sorted(set(names), key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def _some(names: list[str], most: int = 12) -> str:
    """Names sorted, at most `most` of them, for a one-line message."""
    names = sorted_names(names)
    if not names:
        return "none"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


# ------------------------------------------------------------------------------- the client


class TpuClient:
    """Nodes and queued resources of one project and zone.

    `endpoint` defaults to the real API; `anonymous` (default: only for an http:// loopback
    endpoint, i.e. the fake) skips Google credentials. `call_timeout_s` bounds each API call.
    """

    def __init__(
        self,
        project: str,
        zone: str,
        endpoint: str | None = None,
        anonymous: bool | None = None,
        poll_interval_s: float = 5.0,
        call_timeout_s: float = 60.0,
    ):
        self.project = project
        self.zone = zone
        self.endpoint = endpoint or DEFAULT_ENDPOINT
        self.anonymous = _is_local(self.endpoint) if anonymous is None else anonymous
        self.poll_interval_s = poll_interval_s
        self.call_timeout_s = call_timeout_s
        self._api_client = None
        self._creations: dict[str, Any] = {}  # resource name -> its create operation, while pending

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"

    def node_name(self, node_id: str) -> str:
        return f"{self.parent}/nodes/{node_id}"

    def queued_resource_name(self, queued_resource_id: str) -> str:
        return f"{self.parent}/queuedResources/{queued_resource_id}"

    @property
    def _api(self):
        if self._api_client is None:
            from google.api_core.client_options import ClientOptions

            credentials = None
            if self.anonymous:
                from google.auth.credentials import AnonymousCredentials

                credentials = AnonymousCredentials()
            with self._calling("set up a client for", self.parent):
                self._api_client = _tpu().TpuClient(
                    credentials=credentials,
                    transport="rest",
                    client_options=ClientOptions(api_endpoint=self.endpoint),
                )
        return self._api_client

    # ---------------------------------------------------------------- create

    def create_node(self, node_id: str, spec: TpuSpec) -> str:
        """Ask for a TPU VM; returns its full name at once (wait with `wait_until(name, "READY")`)."""
        request = create_node_request(self.project, self.zone, node_id, spec)
        name = self.node_name(node_id)
        with self._calling("create", name):
            operation = self._api.create_node(request=request, timeout=self.call_timeout_s)
        self._creations[name] = operation
        self._raise_if_failed(name, refresh=False)
        return name

    def create_queued_resource(
        self, queued_resource_id: str, spec: TpuSpec, node_id: str | None = None
    ) -> str:
        """Ask for a queued resource holding one node (`node_id`, default: the same id); returns its
        full name at once (wait with `wait_until(name, "ACTIVE")`)."""
        request = create_queued_resource_request(self.project, self.zone, queued_resource_id, spec, node_id)
        name = self.queued_resource_name(queued_resource_id)
        with self._calling("create", name):
            operation = self._api.create_queued_resource(request=request, timeout=self.call_timeout_s)
        self._creations[name] = operation
        self._raise_if_failed(name, refresh=False)
        return name

    def _raise_if_failed(self, name: str, refresh: bool) -> None:
        """Raise the error of `name`'s create operation if it has finished with one. Without
        `refresh`, look only at the operation as last received (no API call)."""
        operation = self._creations.get(name)
        if operation is None:
            return
        if refresh:
            with self._calling("check the creation of", name):
                operation.done()
        if not operation.operation.done:
            return
        del self._creations[name]
        if operation.operation.HasField("error"):
            error = operation.operation.error
            raise TpuError(
                f"creating {_subject(name)} failed: {_rpc_error_text(error)} ({_hint(error)})",
                _code_name(error.code),
            )

    # ---------------------------------------------------------------- read

    def get_node(self, node_id: str) -> TpuNode:
        name = self.node_name(node_id) if "/" not in node_id else node_id
        with self._calling("get", name):
            return _node_from_proto(self._api.get_node(name=name, timeout=self.call_timeout_s))

    def get_queued_resource(self, queued_resource_id: str) -> TpuQueuedResource:
        name = queued_resource_id
        if "/" not in name:
            name = self.queued_resource_name(queued_resource_id)
        with self._calling("get", name):
            return _queued_from_proto(self._api.get_queued_resource(name=name, timeout=self.call_timeout_s))

    def get(self, name: str) -> TpuNode | TpuQueuedResource:
        """A node or a queued resource by its full name."""
        if "/queuedResources/" in name:
            return self.get_queued_resource(name)
        return self.get_node(name)

    def list_nodes(self) -> list[TpuNode]:
        with self._calling("list the TPUs of", self.parent):
            return [_node_from_proto(n) for n in self._api.list_nodes(parent=self.parent)]

    def list_queued_resources(self) -> list[TpuQueuedResource]:
        with self._calling("list the queued resources of", self.parent):
            return [_queued_from_proto(q) for q in self._api.list_queued_resources(parent=self.parent)]

    def list_accelerator_types(self) -> list[str]:
        """The accelerator types offered in this zone (v4-8, v4-16, ...), every page."""
        with self._calling("list the accelerator types of", self.parent):
            return [a.type_ for a in self._api.list_accelerator_types(parent=self.parent)]

    def list_runtime_versions(self) -> list[str]:
        """The TPU software versions offered in this zone (tpu-ubuntu2204-base, ...), every page."""
        with self._calling("list the runtime versions of", self.parent):
            return [r.version for r in self._api.list_runtime_versions(parent=self.parent)]

    def check_offered(self, specs: list[TpuSpec]) -> None:
        """Refuse, in one line, an accelerator type or runtime version this zone does not offer, before
        anything is created (a wrong runtime version is otherwise found late and obscurely). An API
        that refuses to list (an unknown zone, say) is one TpuError line as usual; a caller that may
        not list (PERMISSION_DENIED) is left to the create call's own answer."""
        try:
            types = self.list_accelerator_types()
            versions = self.list_runtime_versions()
        except TpuError as e:
            if e.status == "PERMISSION_DENIED":
                return
            raise
        for spec in specs:
            if spec.accelerator_type not in types:
                generation = tpu_generation(spec.accelerator_type)
                kin = [t for t in types if tpu_generation(t) == generation]
                offered = (
                    f"{generation} types offered there: {_some(kin)}"
                    if kin
                    else f"offered there: {_some(types)}"
                )
                raise TpuError(
                    f"accelerator type {spec.accelerator_type} is not offered in zone {self.zone} "
                    f"({offered}); pick one of those or another zone",
                    "INVALID_ARGUMENT",
                )
            if spec.runtime_version not in versions:
                raise TpuError(
                    f"runtime version {spec.runtime_version} is not offered in zone {self.zone} "
                    f"(offered there: {_some(versions)}); Google documents "
                    f"{default_runtime_version(spec.accelerator_type)} for "
                    f"{tpu_generation(spec.accelerator_type)} TPUs",
                    "INVALID_ARGUMENT",
                )

    # ---------------------------------------------------------------- wait

    def wait_until(
        self,
        name: str,
        state: str,
        timeout_s: float,
        on_progress: Callable[[TpuNode | TpuQueuedResource, float], None] | None = None,
    ) -> TpuNode | TpuQueuedResource:
        """Poll the node or queued resource `name` until it is in `state` (READY, ACTIVE, ...).

        `on_progress(resource, elapsed_s)` is called after every poll. Raises a one-line TpuError when
        the creation failed (with the API's reason, e.g. the quota message), when the resource ends
        up where it cannot reach `state` (FAILED, PREEMPTED, SUSPENDED, ...), or on timeout."""
        dead_ends = _QUEUED_DEAD_ENDS if "/queuedResources/" in name else _NODE_DEAD_ENDS
        start = time.monotonic()
        last = "not created yet"
        while True:
            try:
                resource = self.get(name)
            except TpuError as e:
                if e.status != "NOT_FOUND" or name not in self._creations:
                    raise
                self._raise_if_failed(name, refresh=True)  # a refused creation leaves no resource
                resource = None
            elapsed = time.monotonic() - start
            if resource is not None:
                last = resource.state
                if on_progress is not None:
                    on_progress(resource, elapsed)
                if resource.state == state:
                    self._creations.pop(name, None)
                    return resource
                if resource.state in dead_ends and resource.state != state:
                    raise TpuError(_dead_end_message(resource, state), resource.state)
            if elapsed >= timeout_s:
                raise TpuError(
                    f"timed out after {timeout_s:g}s waiting for {_subject(name)} to be {state} "
                    f"(it is {last}); raise the timeout or check the zone's capacity",
                    "TIMEOUT",
                )
            time.sleep(max(0.0, min(self.poll_interval_s, timeout_s - elapsed)))

    # ---------------------------------------------------------------- delete

    def delete_node(self, node_id: str, wait: bool = True, timeout_s: float = 600.0) -> None:
        """Delete a TPU VM; with `wait`, return once it is gone."""
        name = self.node_name(node_id) if "/" not in node_id else node_id
        with self._calling("delete", name):
            operation = self._api.delete_node(name=name, timeout=self.call_timeout_s)
            if wait:
                operation.result(timeout=timeout_s, polling=self._polling(timeout_s))

    def delete_queued_resource(
        self, queued_resource_id: str, force: bool = True, wait: bool = True, timeout_s: float = 600.0
    ) -> None:
        """Delete a queued resource; `force` deletes its TPU VMs with it (otherwise they must be gone)."""
        name = queued_resource_id
        if "/" not in name:
            name = self.queued_resource_name(queued_resource_id)
        request = _tpu().DeleteQueuedResourceRequest(name=name, force=force)
        with self._calling("delete", name):
            operation = self._api.delete_queued_resource(request=request, timeout=self.call_timeout_s)
            if wait:
                operation.result(timeout=timeout_s, polling=self._polling(timeout_s))

    def _polling(self, timeout_s: float):
        from google.api_core.future import polling

        interval = self.poll_interval_s
        return polling.DEFAULT_POLLING.with_delay(
            initial=interval, maximum=interval, multiplier=1.0
        ).with_timeout(timeout_s)

    # ---------------------------------------------------------------- errors

    def _calling(self, verb: str, name: str):
        return _ApiCall(f"{verb} {_subject(name)}", self.endpoint)


class _ApiCall:
    """Turns the library's exceptions into one TpuError line: what, the API's status and message, a hint."""

    def __init__(self, action: str, endpoint: str):
        self.action, self.endpoint = action, endpoint

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or isinstance(error, TpuError):
            return False
        from google.api_core import exceptions as api_exceptions
        from google.auth import exceptions as auth_exceptions

        if isinstance(error, api_exceptions.GoogleAPICallError):
            status, message = _api_error(error)
            hint = _HINTS.get(status, "see the message")
            raise TpuError(
                f"Cloud TPU API: cannot {self.action}: {status}: {message} ({hint})", status
            ) from None
        if isinstance(error, auth_exceptions.DefaultCredentialsError):
            raise TpuError(
                f"Cloud TPU API: cannot {self.action}: no Google credentials ({_HINTS['UNAUTHENTICATED']})",
                "UNAUTHENTICATED",
            ) from None
        if isinstance(error, api_exceptions.RetryError | TimeoutError):
            raise TpuError(
                f"Cloud TPU API: could not {self.action} in time: {_one_line(str(error))}", "TIMEOUT"
            ) from None
        if isinstance(error, OSError) or _is_connection_error(error):
            raise TpuError(
                f"Cloud TPU API at {self.endpoint} did not answer when asked to {self.action}: "
                f"{_one_line(str(error))}",
                "UNREACHABLE",
            ) from None
        return False


def _is_connection_error(error: BaseException) -> bool:
    import requests

    return isinstance(error, requests.exceptions.RequestException)


def _api_error(error) -> tuple[str, str]:
    """The status name and message from Google's JSON error body (the exception's text adds the URL)."""
    status, message = "", error.message or ""
    response = getattr(error, "response", None)
    if response is not None:
        try:
            body = response.json()["error"]
            status, message = body.get("status", ""), body.get("message", message)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    if not status and error.grpc_status_code is not None:
        status = error.grpc_status_code.name
    return status or f"HTTP {error.code}", _one_line(message)


def _code_name(code: int) -> str:
    from google.rpc import code_pb2

    try:
        return code_pb2.Code.Name(code)
    except ValueError:
        return str(code)


def _hint(rpc_status) -> str:
    return _HINTS.get(_code_name(rpc_status.code), "see the message")


def _dead_end_message(resource: TpuNode | TpuQueuedResource, wanted: str) -> str:
    text = f"{_subject(resource.name)} is {resource.state}, so it will not become {wanted}"
    if isinstance(resource, TpuQueuedResource):
        if resource.error:
            status = resource.error.split(":", 1)[0]
            return f"{text}: {resource.error} ({_HINTS.get(status, 'see the message')})"
        if resource.state_initiator == "SERVICE":
            return f"{text}: the service took its capacity back (delete it and create it again)"
    if resource.state in ("PREEMPTED", "TERMINATED"):
        return f"{text}: the service took it back (delete it and create it again)"
    return text


_KINDS = {"nodes": "TPU", "queuedResources": "queued resource"}


def _subject(name: str) -> str:
    """A resource name for messages: `projects/p/locations/z/nodes/n` -> `TPU 'n' (project p, zone z)`."""
    parts = name.split("/")
    if len(parts) == 6 and parts[0] == "projects" and parts[4] in _KINDS:
        return f"{_KINDS[parts[4]]} '{parts[5]}' (project {parts[1]}, zone {parts[3]})"
    if len(parts) == 4 and parts[0] == "projects":
        return f"project {parts[1]}, zone {parts[3]}"
    return name


def _is_local(endpoint: str) -> bool:
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    host = parts.hostname or ""
    return parts.scheme == "http" and (host == "localhost" or host.startswith("127.") or host == "::1")
