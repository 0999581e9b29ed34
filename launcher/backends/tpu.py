"""The TPU backends: `tpu_vm` (one host) and `tpu_pod` (several hosts), through the Cloud TPU API.

One TPU per job; the jobs of a sweep run one after another, or `backend.max_parallel` at once (one
thread each), and the launch blocks until the last has ended (like the local backend), printing the
hosts' logs as they come. For one job:

1. Stage. The code snapshot (once per sweep, content-addressed) and the job's resolved config go
   to `backend.bucket`, each checked against the MD5 that GCS reports (launcher/tpu/staging.py).
2. TPU. `backend.tpu_name` names a TPU to reuse when it is READY; otherwise a node (or a queued
   resource, `backend.queued`) is created with our SSH public key in its `ssh-keys` metadata, and
   we wait for READY / ACTIVE with a status line and `backend.ready_timeout_s`.
3. Run. Every host gets the same command at the same time over SSH (launcher/tpu/fanout.py): the
   agent (launcher/tpu/agent.py) fetches and verifies the staged code and config, then runs the
   trainer. Lines are printed as `[job N w I] ...` and kept in `<run_dir>/logs/worker<I>.log`.
   One host failing stops the others.
4. Survive. The API is polled every `backend.poll_s`. A node that goes PREEMPTED or TERMINATED,
   a queued resource that goes SUSPENDING / SUSPENDED, or a trainer exit 75 (it saved a
   checkpoint at a signal) is a preemption: the TPU is deleted and created again and the trainer
   resumes from its last committed checkpoint in the bucket, at most `backend.max_retries` times.
   Any other exit code is a failure and is not retried.
5. Teardown. `backend.teardown=delete` removes the TPU after the job, `keep` leaves it for the
   next run (reuse it with `backend.tpu_name`). A queued resource is deleted after a failure or
   Ctrl-C whatever the setting, so no quota is left held.

Why SSH rather than a startup script: the launcher sees each host's output and exit code as they
happen, can stop all hosts at once, and a preempted-and-recreated TPU does not rerun a stale job
at boot. The hosts need only sshd (every TPU VM image has it) and a Python environment with the
project's dependencies (`infra/create_tpu.sh` installs them).

The outputs the trainer leaves under `<bucket>/<sweep id>/jobs/<n>/` (metrics.json, status files)
are copied into the local run dir at the end, so `vlaunch-ctl` and the results table read them.
"""

from __future__ import annotations

import getpass
import logging
import os
import queue
import re
import shlex
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import registry
from launcher.errors import LaunchError
from launcher.plan import JobPlan, SweepPlan
from launcher.results import CANCELLED, COMPLETED, FAILED, JobResult, StatusLine, read_metrics, tail

REQUEUE_EXIT_CODE = 75  # trainers.core.job: "I saved a checkpoint at a signal; run me again"
# Set on the hosts only when emulating: real TPU hosts find each other through the TPU runtime.
_EMULATOR_ENV = (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
    "GOOGLE_CLOUD_PROJECT",
    "VLAUNCH_DATA_CACHE",
)
_NODE_PREEMPTED = {"PREEMPTED", "TERMINATED"}
_QUEUED_PREEMPTED = {"SUSPENDING", "SUSPENDED"}
_TEARDOWN = ("delete", "keep")
_OUTPUT_COPY_LIMIT = 4 << 20  # copy small result files of the bucket into the run dir
_KEY_LOCK = threading.Lock()  # jobs side by side (max_parallel) make the launcher's SSH key once


# ------------------------------------------------------------------------------- pure: checks, plan


def check_resources(resources: dict[str, Any]) -> None:
    """Fail at plan time, on the laptop, on TPU settings that cannot work."""
    from launcher.tpu.client import CAPACITIES, default_runtime_version

    name = resources["name"]
    for key in ("project", "zone", "bucket"):
        if not resources.get(key):
            raise LaunchError(
                f"backend.{key} is not set for backend={name}; set it once in your site profile "
                f"(conf/site/<site>.yaml under `tpu:`) or give backend.{key}=... (to try it on this "
                "machine's emulated TPU cloud: infra/local_tpu.sh up, then add site=local_tpu)"
            )
    if not str(resources["bucket"]).startswith("gs://"):
        raise LaunchError(
            f"backend.bucket must be a gs:// URL (gs://bucket/prefix), got {resources['bucket']!r}"
        )
    if resources["capacity"] not in CAPACITIES:
        raise LaunchError(
            f"backend.capacity={resources['capacity']} is not a capacity; choose one of: {', '.join(CAPACITIES)}"
        )
    if resources["capacity"] in ("guaranteed",) and not resources["queued"]:
        raise LaunchError("backend.capacity=guaranteed needs a queued resource: add backend.queued=true")
    if resources.get("python") is None:  # emulated hosts are this machine: our interpreter has it all
        resources["python"] = sys.executable if resources.get("emulated") else "python3"
    if resources.get("teardown") is None:  # a TPU named by the user is theirs to keep by default
        resources["teardown"] = "keep" if resources.get("tpu_name") else "delete"
    parallel = resources.get("max_parallel")
    if parallel is not None and (not str(parallel).isdigit() or int(parallel) < 1):
        raise LaunchError(f"backend.max_parallel must be a whole number of jobs, 1 or more, got {parallel}")
    if parallel is not None and int(parallel) > 1 and resources.get("tpu_name"):
        raise LaunchError(
            f"backend.tpu_name={resources['tpu_name']} is one TPU, so a sweep's jobs take turns on it; "
            "drop backend.max_parallel, or backend.tpu_name to give each job a TPU of its own"
        )
    if resources["teardown"] not in _TEARDOWN:
        raise LaunchError(f"backend.teardown={resources['teardown']}; choose one of: {', '.join(_TEARDOWN)}")
    for key in ("max_retries", "ready_timeout_s", "stop_grace_s"):
        if int(resources[key]) < 0:
            raise LaunchError(f"backend.{key} must be 0 or more, got {resources[key]}")
    if not resources.get("runtime_version"):
        resources["runtime_version"] = default_runtime_version(resources["accelerator_type"])
    hosts = hosts_of(resources["accelerator_type"])
    if name == "tpu_vm" and hosts is not None and hosts > 1:
        raise LaunchError(
            f"backend=tpu_vm is one host, but {resources['accelerator_type']} has {hosts}; "
            "use backend=tpu_pod, or a single-host type such as v4-8 or v5litepod-8"
        )


def hosts_of(accelerator_type: str) -> int | None:
    """Hosts of a TPU slice by its type (None when the type is not one we know the shape of):
    v2/v3/v4/v5p count TensorCores, 8 per host; v5e/v6e count chips, 4 per host past 8 chips."""
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type or "")
    if not match:
        return None
    family, count = match.group(1), int(match.group(2))
    if family in ("v5litepod", "v6e"):
        return 1 if count <= 8 else count // 4
    return max(1, count // 8)


def tpu_name(plan: SweepPlan, job: JobPlan, resources: dict[str, Any]) -> str:
    """The TPU a job runs on: the configured name, or one of its own (vl-<sweep id>-<job>)."""
    if resources.get("tpu_name"):
        return str(resources["tpu_name"])
    return re.sub(r"[^a-z0-9-]", "-", f"vl-{plan.sweep_id}-{job.num}".lower())[:63].rstrip("-")


def tpu_spec(resources: dict[str, Any], ssh_keys: str, labels: dict[str, str]):
    from launcher.tpu.client import TpuSpec

    return TpuSpec(
        accelerator_type=resources["accelerator_type"],
        runtime_version=resources["runtime_version"],
        capacity=resources["capacity"],
        reservation=resources.get("reservation"),
        network=resources.get("network"),
        subnetwork=resources.get("subnetwork"),
        service_account=resources.get("service_account"),
        labels={**labels, **{str(k): str(v) for k, v in (resources.get("labels") or {}).items()}},
        metadata={"ssh-keys": ssh_keys},
    )


def ssh_user(resources: dict[str, Any]) -> str:
    return resources.get("ssh_user") or getpass.getuser()


def key_dir(plan: SweepPlan, resources: dict[str, Any]) -> Path:
    return Path(resources.get("ssh_key_dir") or plan.sweep_dir.parent / ".ssh").expanduser()


def job_labels(plan: SweepPlan, job: JobPlan) -> dict[str, str]:
    return {"vlaunch-sweep": plan.sweep_id.lower(), "vlaunch-job": str(job.num)}


def gcs_emulator_env(endpoint: str) -> dict[str, str]:
    """What points google-cloud-storage, gcsfs and tensorstore at a GCS emulator (infra/fake_gcs.py)."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": os.environ.get("GOOGLE_CLOUD_PROJECT", "test-project"),
    }


def worker_env(
    resources: dict[str, Any], index: int, hosts: list[str], coordinator_port: int
) -> dict[str, str]:
    """The environment of the trainer on host `index`. Emulated hosts get JAX's coordinator
    explicitly (real TPU hosts find it themselves) and this process's GCS emulator settings."""
    env = {str(k): str(v) for k, v in (resources.get("worker_env") or {}).items()}
    env["PYTHONUNBUFFERED"] = "1"
    env["VL_WORKER_ID"] = str(index)
    if resources.get("emulated"):
        env.update(
            VL_JAX_COORDINATOR=f"{hosts[0]}:{coordinator_port}",
            VL_JAX_NUM_PROCESSES=str(len(hosts)),
            VL_JAX_PROCESS_ID=str(index),
            VL_JAX_CPU_DEVICES=str(resources.get("cpu_devices_per_host") or 1),
        )
        for name in _EMULATOR_ENV:
            if name in os.environ and name not in env:
                env[name] = os.environ[name]
    if resources.get("gcs_endpoint"):
        for name, value in gcs_emulator_env(resources["gcs_endpoint"]).items():
            env.setdefault(name, value)
    if "STORAGE_EMULATOR_HOST" in env:
        # tensorstore (Orbax's array writer) looks for Google credentials first, and logs an error
        # line when it has none; the emulator takes any token, as in tensorstore's own tests.
        env.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    return env


def host_workdir(resources: dict[str, Any], plan: SweepPlan, job: JobPlan, index: int) -> str:
    # Per host and job: emulated hosts share one disk, and a job's restart finds its own files.
    return f"{resources['workdir'].rstrip('/')}/{plan.sweep_id}/{job.num}/w{index}"


def staging_urls(plan: SweepPlan, job: JobPlan, resources: dict[str, Any]) -> tuple[str, str]:
    """(code prefix, config URL) of a job in the bucket."""
    bucket = resources["bucket"].rstrip("/")
    return bucket, f"{job.config['job']['output_url']}/config.yaml"


def render(plan: SweepPlan) -> str:
    """What `apply` would do, for `--dry-run`: the exact API requests, what is staged where and
    the command every host runs. Pure: no API call, no upload, no key is made."""
    from launcher.tpu.client import render_requests, runtime_mismatch

    lines = []
    for job in plan.jobs:
        resources = job.config["backend"]
        name = tpu_name(plan, job, resources)
        hosts = hosts_of(resources["accelerator_type"])
        pub = key_dir(plan, resources) / "id_ed25519.pub"
        key = pub.read_text().strip() if pub.is_file() else "ssh-ed25519 <public key made at launch>"
        spec = tpu_spec(resources, f"{ssh_user(resources)}:{key}", job_labels(plan, job))
        code_prefix, config_url = staging_urls(plan, job, resources)
        lines.append(f"# job {job.num}: {job.label}")
        lines.append(
            f"# {resources['name']}: {resources['accelerator_type']} ({hosts or '?'} host(s)), "
            f"{resources['capacity']}{' queued resource' if resources['queued'] else ''}, "
            f"project {resources['project']}, zone {resources['zone']}; "
            f"teardown={resources['teardown']}, up to {resources['max_retries']} recreation(s) after "
            "preemption or rerun(s) after a lost ssh connection"
            + (
                f"; {resources['max_parallel']} jobs at once"
                if int(resources.get("max_parallel") or 1) > 1
                else ""
            )
        )
        note = runtime_mismatch(resources["accelerator_type"], resources["runtime_version"])
        if note:
            lines.append(f"# note: {note}")
        if resources.get("tpu_name"):
            lines.append(f"# reuses TPU {name} when it exists and is READY; otherwise creates it:")
        lines.append(
            render_requests(
                resources["project"],
                resources["zone"],
                name,
                spec,
                queued=bool(resources["queued"]),
                endpoint=resources.get("api_endpoint"),
            )
        )
        lines.append(f"# stage: code snapshot -> {code_prefix}/code/<sha256>.tar.gz (MD5-verified)")
        lines.append(f"# stage: config -> {config_url}")
        lines.append(f"# outputs, checkpoints -> {job.config['job']['output_url']}/")
        lines.append(f"# every host runs, over ssh as {ssh_user(resources)} (port {resources['ssh_port']}):")
        lines.append(shlex.join(job.command))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- apply


@dataclass
class _Attempt:
    codes: list[int]
    preempted: bool
    first_failure: int | None
    lost: list[int] = field(default_factory=list)  # hosts whose ssh connection died under the trainer

    def cut_off(self) -> bool:
        """Stopped by lost connections, not by the trainer: every other host ended 0 or saved (75)."""
        return bool(self.lost) and all(
            c in (0, REQUEUE_EXIT_CODE) or i in self.lost for i, c in enumerate(self.codes)
        )


def _check_answers(url: str, setting: str, emulator: bool = True) -> None:
    """`url` must accept connections; else one line, at once, instead of a client retrying for half a
    minute. `setting` names where the URL came from (or what it is, for Google's own)."""
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=5).close()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        if emulator:
            raise LaunchError(
                f"nothing answers at {url} ({setting}: {reason}); if it is this machine's emulated "
                "TPU cloud (site=local_tpu), start it with infra/local_tpu.sh up"
            ) from None
        raise LaunchError(
            f"cannot reach {setting} at {url} ({reason}); check this machine's network, or try it on the "
            "emulated TPU cloud: infra/local_tpu.sh up, then add site=local_tpu"
        ) from None


def _check_endpoints(resources: dict[str, Any], storage: bool = True) -> None:
    """Say at once when the storage or the TPU API is out of reach (an emulator that is not running,
    a machine without network): the clients would retry for most of a minute first. Through an HTTPS
    proxy, Google's endpoints are not probed (the proxy may reach what we cannot)."""
    from launcher.tpu.client import DEFAULT_ENDPOINT

    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    endpoints = [
        ("gcs_endpoint", "STORAGE_EMULATOR_HOST", "https://storage.googleapis.com", "Google Cloud Storage"),
        ("api_endpoint", None, DEFAULT_ENDPOINT, "the Cloud TPU API"),
    ]
    for key, emulator_env, google, what in endpoints[0 if storage else 1 :]:
        if resources.get(key):
            _check_answers(resources[key], f"backend.{key}")
        elif emulator_env and os.environ.get(emulator_env):
            _check_answers(os.environ[emulator_env], f"${emulator_env}")
        elif not proxied:
            _check_answers(google, what, emulator=False)


def preflight(plan: SweepPlan) -> None:
    """What must hold before anything starts (also checked before --detach leaves the terminal): a
    git checkout to stage, and the storage and TPU endpoints answering."""
    if plan.code_dir is None:
        raise LaunchError("the TPU backends stage the code of a git checkout; run the launcher from one")
    first = plan.jobs[0].config["backend"]
    if first.get("gcs_endpoint"):
        os.environ.update(gcs_emulator_env(first["gcs_endpoint"]))  # our own staging and reads
    _check_endpoints(first)
    _check_offered(plan)


def _check_offered(plan: SweepPlan) -> None:
    """The accelerator type and runtime version of every job that makes its own TPU, asked of the
    API before anything is staged or created (two list calls per zone); a runtime version meant for
    another generation gets a note, since the API may take it and the TPU then fail obscurely. A TPU
    named by backend.tpu_name is usually reused as it is (its version may no longer be offered)."""
    from launcher.tpu.client import TpuClient, runtime_mismatch

    by_zone: dict[tuple, list] = {}
    notes = set()
    for job in plan.jobs:
        resources = job.config["backend"]
        if resources.get("tpu_name"):
            continue
        zone = (resources["project"], resources["zone"], resources.get("api_endpoint"))
        by_zone.setdefault(zone, []).append(tpu_spec(resources, "", {}))
        note = runtime_mismatch(resources["accelerator_type"], resources["runtime_version"])
        if note:
            notes.add(note)
    for note in sorted(notes):
        print(f"note: {note}", file=sys.stderr)
    for (project, zone, endpoint), specs in by_zone.items():
        TpuClient(project, zone, endpoint=endpoint).check_offered(specs)


def run(plan: SweepPlan, on_change=None) -> list[JobResult]:
    """Run every job of the plan on its TPU, `backend.max_parallel` at once (default: one after
    another); return when all have ended.

    `on_change(num, state, handle, code)` hears of each start (RUNNING, the TPU's name) and end, in
    this thread."""
    from launcher.tpu import staging

    preflight(plan)
    files = _snapshot_files(Path(plan.code_dir))
    first = plan.jobs[0].config["backend"]
    commit, diff_hash = registry.git_facts(Path(__file__).resolve().parents[2])
    parallel = max(1, min(int(first.get("max_parallel") or 1), len(plan.jobs)))
    how = "one after another" if parallel == 1 else f"{parallel} at once, each on its own TPU"
    print(f"sweep {plan.sweep_id}: {len(plan.jobs)} job(s) on {plan.backend}, {how}")
    # gcsfs logs every exhausted retry with a traceback; the error line below says the same in one line.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    print(f"  staging the code ({len(files)} files) to {first['bucket']}", flush=True)
    code = staging.stage_code(Path(plan.code_dir), files, first["bucket"].rstrip("/"), commit, diff_hash)
    if parallel > 1:
        return _run_parallel(plan, code, on_change, parallel)
    results: list[JobResult] = []
    pending = list(plan.jobs)
    try:
        while pending:
            job = pending.pop(0)
            results.append(_run_job(plan, job, code, on_change))
    except KeyboardInterrupt:
        for job in pending:
            results.append(JobResult(job.num, job.label, CANCELLED))
            if on_change is not None:
                on_change(job.num, CANCELLED, None, None)
        raise
    return results


def _run_parallel(plan: SweepPlan, code, on_change, parallel: int) -> list[JobResult]:
    """The jobs in `parallel` threads, each job on its own TPU. Ctrl-C (or a job's error) sets `stop`:
    every running job stops its hosts (they checkpoint) and tears its TPU down as on Ctrl-C, and the
    jobs not started yet end CANCELLED. The registry is this thread's: the jobs' `on_change` calls
    come here through a queue."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    events: queue.Queue = queue.Queue()
    relay = None if on_change is None else (lambda *args: events.put(args))

    def apply_events() -> None:
        while True:
            try:
                args = events.get_nowait()
            except queue.Empty:
                return
            on_change(*args)

    stop = threading.Event()

    def run(job: JobPlan) -> JobResult:
        try:
            return _run_job(plan, job, code, relay, stop)
        except BaseException:
            # Set here, not only by the launcher's thread once it sees the error: this thread's next
            # job would otherwise start creating its TPU in between.
            stop.set()
            raise

    results: dict[int, JobResult] = {}
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="tpu-job")
    futures = {pool.submit(run, job): job for job in plan.jobs}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            apply_events()
            for future in done:
                results[futures[future].num] = future.result()  # a job's error ends the sweep
    except BaseException:
        stop.set()
        print(f"  stopping the sweep's running jobs ({sum(not f.done() for f in futures)} left)", flush=True)
        wait(futures)
        pool.shutdown()
        apply_events()
        raise
    pool.shutdown()
    return [results[j.num] for j in plan.jobs]


class JobCancelled(KeyboardInterrupt):
    """`vlaunch-ctl cancel` asked for this job to stop: it stops as on Ctrl-C, and the sweep goes on."""


def _stopped(stop: threading.Event | None, run_dir: Path | None = None) -> None:
    """Stop this job as Ctrl-C would when its parallel sweep is being stopped (`stop`), or when
    `vlaunch-ctl cancel` asked for it (see launcher/registry.py)."""
    if stop is not None and stop.is_set():
        raise KeyboardInterrupt
    if run_dir is not None and registry.cancel_requested(run_dir):
        raise JobCancelled


def _snapshot_files(code_dir: Path) -> list[str]:
    files = []
    for root, _dirs, names in os.walk(code_dir):
        for name in names:
            files.append(os.path.relpath(os.path.join(root, name), code_dir))
    return sorted(files)


class _Tpu:
    """The TPU of one job: acquire (reuse or create and wait), watch, delete."""

    def __init__(
        self,
        plan: SweepPlan,
        job: JobPlan,
        resources: dict[str, Any],
        ssh_keys: str,
        stop: threading.Event | None = None,
    ):
        from launcher.tpu.client import TpuClient

        self.stop = stop  # set: a parallel sweep is stopping (see _run_parallel)
        self.run_dir = job.run_dir
        self.resources = resources
        self.name = tpu_name(plan, job, resources)
        self.queued = bool(resources["queued"])
        self.spec = tpu_spec(resources, ssh_keys, job_labels(plan, job))
        self.client = TpuClient(
            resources["project"],
            resources["zone"],
            endpoint=resources.get("api_endpoint"),
            poll_interval_s=min(float(resources["poll_s"]), 5.0),
        )
        self.created = False  # by us, in this launch (a reused TPU is never deleted on failure)

    def check_stop(self) -> None:
        _stopped(self.stop, self.run_dir)

    @property
    def full_name(self) -> str:
        if self.queued:
            return self.client.queued_resource_name(self.name)
        return self.client.node_name(self.name)

    def acquire(self):
        """The READY node to run on: the existing one, or a new one."""
        from launcher.tpu.client import TpuError

        try:
            existing = self.client.get_node(self.name)
        except TpuError as e:
            if e.status != "NOT_FOUND":
                raise
            existing = None
        if existing is not None and existing.state == "READY":
            print(
                f"  reusing TPU {self.name} ({existing.accelerator_type}, {len(existing.worker_ips)} host(s))"
            )
            return existing
        if existing is not None:
            raise LaunchError(
                f"TPU {self.name} exists but is {existing.state}; delete it (infra/delete_tpu.sh {self.name}) "
                "or pick another backend.tpu_name"
            )
        what = "queued resource" if self.queued else "TPU"
        print(
            f"  creating {what} {self.name}: {self.spec.accelerator_type}, {self.spec.capacity}, "
            f"{self.resources['zone']}",
            flush=True,
        )
        if self.queued:
            self.client.create_queued_resource(self.name, self.spec)
        else:
            self.client.create_node(self.name, self.spec)
        self.created = True
        # Jobs side by side would overwrite each other's status line: then plain lines.
        status = StatusLine(every_s=30.0, tty=None if self.stop is None else False)

        def progress(resource, elapsed: float) -> None:
            self.check_stop()
            status.show(f"  {self.name}: {resource.state} after {elapsed:.0f} s")

        try:
            self.client.wait_until(
                self.full_name,
                "ACTIVE" if self.queued else "READY",
                float(self.resources["ready_timeout_s"]),
                on_progress=progress,
            )
        finally:
            status.done()
        node = self.client.get_node(self.name)
        if node.state != "READY":  # a queued resource is ACTIVE once its node is READY
            node = self.client.wait_until(
                node.name,
                "READY",
                float(self.resources["ready_timeout_s"]),
                on_progress=lambda resource, elapsed: self.check_stop(),
            )
        print(f"  TPU {self.name} is READY: {len(node.worker_ips)} host(s) {', '.join(node.worker_ips)}")
        return node

    def preempted(self) -> str | None:
        """The state that says the TPU is gone under us, or None while it is fine."""
        from launcher.tpu.client import TpuError

        try:
            if self.queued:
                state = self.client.get_queued_resource(self.name).state
                return state if state in _QUEUED_PREEMPTED else None
            state = self.client.get_node(self.name).state
        except TpuError as e:
            if e.status == "NOT_FOUND":
                return "DELETED"
            return None  # the API hiccuped: ask again at the next poll
        return state if state in _NODE_PREEMPTED else None

    def delete(self, why: str) -> None:
        what = "queued resource" if self.queued else "TPU"
        print(f"  deleting {what} {self.name} ({why})", flush=True)
        from launcher.tpu.client import TpuError

        try:
            if self.queued:
                self.client.delete_queued_resource(self.name, force=True)
            else:
                self.client.delete_node(self.name)
        except TpuError as e:
            if e.status != "NOT_FOUND":
                raise


def teardown_left(plan: SweepPlan) -> Iterator[tuple[JobPlan, str]]:
    """Delete the TPUs (or queued resources) the plan's jobs left behind: their launcher was killed,
    or they ran with teardown=keep. A TPU named by backend.tpu_name is the user's and stays. Yields
    each job with what happened to its TPU."""
    _check_endpoints(plan.jobs[0].config["backend"], storage=False)
    for job in plan.jobs:
        yield job, _teardown_left(plan, job)


def _teardown_left(plan: SweepPlan, job: JobPlan) -> str:
    from launcher.tpu.client import TpuError

    resources = job.config["backend"]
    if resources.get("tpu_name"):
        name = resources["tpu_name"]
        return f"TPU {name} is yours (backend.tpu_name), kept: infra/delete_tpu.sh {name} deletes it"
    tpu = _Tpu(plan, job, resources, ssh_keys="")
    what = "queued resource" if tpu.queued else "TPU"
    try:
        (tpu.client.get_queued_resource if tpu.queued else tpu.client.get_node)(tpu.name)
    except TpuError as e:
        if e.status == "NOT_FOUND":
            return f"no {what} {tpu.name} (deleted already, or never made)"
        raise LaunchError(f"asking for {what} {tpu.name}: {e}") from None
    try:
        tpu.delete("vlaunch-ctl teardown")
    except TpuError as e:
        raise LaunchError(f"deleting {what} {tpu.name}: {e}") from None
    return f"{what} {tpu.name} deleted"


def _run_job(
    plan: SweepPlan, job: JobPlan, code, on_change, stop: threading.Event | None = None
) -> JobResult:
    from launcher.tpu import fanout, staging

    resources = job.config["backend"]
    # A parallel sweep stopped, or vlaunch-ctl cancel asked, before this job's turn.
    if (stop is not None and stop.is_set()) or registry.cancel_requested(job.run_dir, take=True):
        if on_change is not None:
            on_change(job.num, CANCELLED, None, None)
        return JobResult(job.num, job.label, CANCELLED)
    started = time.monotonic()
    with _KEY_LOCK:
        key_file, public_key = fanout.ensure_keypair(key_dir(plan, resources))
    user = ssh_user(resources)
    tpu = _Tpu(plan, job, resources, fanout.ssh_keys_metadata(user, public_key), stop)
    _code_prefix, config_url = staging_urls(plan, job, resources)
    config_md5 = staging.stage_file(job.run_dir / "config.yaml", config_url)
    ssh = fanout.SshConfig(
        user=user,
        key_file=key_file,
        port=int(resources["ssh_port"]),
        known_hosts=job.run_dir / "known_hosts",
    )
    print(
        f"  job {job.num} ({job.label}): TPU {tpu.name}; outputs {job.config['job']['output_url']}",
        flush=True,
    )
    if on_change is not None:
        on_change(job.num, "RUNNING", tpu.name, None)
    retries, reruns, state, code_out, failed_worker = 0, 0, FAILED, None, None
    ended_by = ""
    try:
        while True:
            node = tpu.acquire()
            if tpu.created:  # a new TPU has new host keys (also at the IPs of a run resumed here)
                ssh.known_hosts.unlink(missing_ok=True)
            attempt = _run_on_hosts(
                plan, job, resources, node.worker_ips, tpu, ssh, code, config_url, config_md5
            )
            if all(c == 0 for c in attempt.codes):
                state, code_out = COMPLETED, 0
                break
            cut_off = not attempt.preempted and attempt.cut_off()
            requeue = attempt.preempted or all(c in (0, REQUEUE_EXIT_CODE) for c in attempt.codes)
            if cut_off and retries < int(resources["max_retries"]):
                # The TPU is still there: run again on it (the hosts' agents stop what is left of
                # this attempt first), from the checkpoint the trainers saved when they were stopped.
                retries, reruns = retries + 1, reruns + 1
                hosts = ", ".join(f"w{i}" for i in attempt.lost)
                print(
                    f"  job {job.num}: lost the connection to {hosts}; running again on TPU {tpu.name} "
                    f"(retry {retries}/{resources['max_retries']})"
                )
                _record_retry(job, on_change, retries, f"lost the connection to {hosts}", tpu.name)
                continue
            if requeue and retries < int(resources["max_retries"]):
                retries += 1
                cause = "preempted" if attempt.preempted else f"trainer exit {REQUEUE_EXIT_CODE}"
                print(
                    f"  job {job.num}: {cause}; recreating the TPU (retry {retries}/{resources['max_retries']})"
                )
                _record_retry(job, on_change, retries, cause, tpu.name)
                tpu.delete(cause)
                continue
            if cut_off:
                failed_worker = attempt.lost[0]
                code_out = attempt.codes[failed_worker]
                ended_by = f"lost the connection to w{failed_worker}, no retries left"
                break
            failed_worker = attempt.first_failure
            bad = [c for c in attempt.codes if c != 0]
            code_out = bad[0] if bad else None
            ended_by = "preempted, no retries left" if requeue else ""
            break
    except KeyboardInterrupt as e:
        cancelled = isinstance(e, JobCancelled)
        print(f"\n  job {job.num}: {'cancelled (vlaunch-ctl cancel)' if cancelled else 'interrupted'}")
        # Recorded before the teardown, which may fail (the API down): the job has ended all the same.
        if on_change is not None:
            on_change(job.num, CANCELLED, None, None)
        _teardown(tpu, resources, ok=False)
        if not cancelled:
            raise
        registry.cancel_requested(job.run_dir, take=True)
        return JobResult(job.num, job.label, CANCELLED)
    except Exception:
        if on_change is not None:
            on_change(job.num, FAILED, None, None)
        _teardown(tpu, resources, ok=False)
        raise
    try:
        _teardown(tpu, resources, ok=state == COMPLETED)
    except BaseException:
        if on_change is not None:
            on_change(job.num, state, None, code_out)
        raise
    _copy_outputs(job)
    log = job.run_dir / "logs" / f"worker{failed_worker or 0}.log"
    note = f" ({ended_by})" if ended_by else ""
    print(
        f"  job {job.num} ({job.label}) {state}{'' if code_out in (0, None) else f' (exit code {code_out})'}"
        f"{note} after {time.monotonic() - started:.0f} s, {retries - reruns} recreation(s)"
        + (f", {reruns} rerun(s) after a lost connection" if reruns else "")
    )
    if on_change is not None:
        on_change(job.num, state, None, code_out)
    return JobResult(
        num=job.num,
        label=job.label,
        state=state,
        exit_code=code_out,
        log_path=log,
        metrics=read_metrics(job.run_dir),
        log_tail="" if state == COMPLETED else tail(log),
    )


def _record_retry(job: JobPlan, on_change, attempt: int, reason: str, tpu: str) -> None:
    """A requeue event in the job's run dir (events.jsonl, as Slurm tasks write them), so the
    registry counts it and `vlaunch-ctl status` / `history` show it while the job goes on."""
    from launcher.task import append_event

    event = {"time": time.time(), "event": "requeue", "attempt": attempt - 1, "by": "launcher"}
    append_event(job.run_dir, {**event, "reason": reason, "tpu": tpu})
    if on_change is not None:
        on_change(job.num, "RUNNING", None, None)


def _teardown(tpu: _Tpu, resources: dict[str, Any], ok: bool) -> None:
    """Delete per `backend.teardown`; a queued resource we made is deleted after any failure."""
    gone = tpu.preempted()
    if gone == "DELETED":
        return
    if gone:
        tpu.delete(f"it is {gone}")
    elif resources["teardown"] == "delete":
        tpu.delete("teardown=delete")
    elif tpu.queued and tpu.created and not ok:
        tpu.delete("a failed queued resource would keep holding quota")
    else:
        print(f"  keeping TPU {tpu.name} (teardown=keep): reuse it with backend.tpu_name={tpu.name}")


def _free_port(host: str) -> int:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    except OSError:
        return 8476  # a remote host: JAX's coordinator listens there, on a port we cannot probe


def _run_on_hosts(plan, job, resources, hosts, tpu: _Tpu, ssh, code, config_url, config_md5) -> _Attempt:
    """Run the trainer on every host at once; watch the API; return the exit codes."""
    from launcher.tpu import agent, fanout

    port = _free_port(hosts[0]) if resources.get("emulated") else 8476
    commands = [
        agent.agent_command(
            python=resources["python"],
            workdir=host_workdir(resources, plan, job, i),
            code_url=code.url,
            code_md5=code.md5,
            config_url=config_url,
            config_md5=config_md5,
            env=worker_env(resources, i, hosts, port),
            argv=job.command,
            grace_s=float(resources["stop_grace_s"]),
        )
        for i in range(len(hosts))
    ]

    def on_line(index: int, line: str) -> None:
        # One write per line: hosts (and, with max_parallel, jobs) print from threads of their own.
        sys.stdout.write(f"[job {job.num} w{index}] {line}\n")
        sys.stdout.flush()

    fan = fanout.FanOut(hosts, commands, ssh, on_line=on_line, log_dir=job.run_dir / "logs")
    fan.start()
    poll_s = float(resources["poll_s"])
    preempted: str | None = None
    next_check = time.monotonic() + poll_s
    try:
        while any(c is None for c in fan.poll()):
            time.sleep(0.2)
            tpu.check_stop()
            if preempted is None and time.monotonic() >= next_check:
                preempted = tpu.preempted()
                next_check = time.monotonic() + poll_s
                if preempted:
                    # The hosts get SIGTERM from the platform and save; give them the grace period.
                    print(f"  job {job.num}: TPU {tpu.name} is {preempted}; waiting for the hosts to save")
                    deadline = time.monotonic() + float(resources["stop_grace_s"]) + 30
                    while any(c is None for c in fan.poll()) and time.monotonic() < deadline:
                        time.sleep(0.5)
                    fan.kill()
        codes = fan.wait()
    except KeyboardInterrupt:
        # Closing the sessions makes each agent SIGTERM its trainer, which saves and exits.
        print(f"  job {job.num}: stopping the trainer on {len(hosts)} host(s) (they save a checkpoint first)")
        fan.stop(grace_s=float(resources["stop_grace_s"]))
        raise
    if preempted is None and any(c != 0 for c in codes):
        preempted = tpu.preempted()  # the hosts may have died with the TPU before our next poll
    return _Attempt(
        codes=codes,
        preempted=preempted is not None,
        first_failure=getattr(fan, "first_failure", None),
        lost=[i for i, lost in enumerate(getattr(fan, "lost", [])) if lost],
    )


def _copy_outputs(job: JobPlan) -> None:
    """The trainer's small result files (metrics.json, status/, ...) from the bucket to the run dir;
    checkpoints stay in the bucket."""
    from trainers.core import storage

    url = job.config["job"]["output_url"]
    try:
        fs, root = storage.filesystem(url)
        found = fs.find(root, detail=True)
    except (FileNotFoundError, OSError):
        return
    scheme = url.split("://", 1)[0] + "://"
    for path, info in found.items():
        relative = path[len(root) :].lstrip("/")
        if relative.startswith("checkpoints/") or relative == "config.yaml":
            continue
        if int(info.get("size") or 0) > _OUTPUT_COPY_LIMIT:
            continue
        storage.download(scheme + path, job.run_dir / relative)
    # The latest committed checkpoint (Orbax writes commit_success.txt last), for the registry.
    committed = [
        int(name)
        for name in storage.listdir(f"{url}/checkpoints")
        if name.isdigit() and storage.exists(f"{url}/checkpoints/{name}/commit_success.txt")
    ]
    if committed:
        storage.write_text(job.run_dir / "checkpoints" / "latest", f"{url}/checkpoints/{max(committed)}")
