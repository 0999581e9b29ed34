"""`python -m launcher.tpu.cli create|delete|list|describe|offered`: TPU VMs by hand, without gcloud.

`infra/create_tpu.sh` and `infra/delete_tpu.sh` are thin wrappers around `create` and `delete`.
Everything goes through the project's own Cloud TPU client (`launcher/tpu/client.py`), so the same
code is tested against the local fake API (`--api-endpoint http://127.0.0.1:PORT`).

create: asks for a TPU VM (or, with `--queued`, a queued resource holding one) with this machine's
vlaunch ssh key in its `ssh-keys` metadata, shows progress until it is READY (ACTIVE), then installs
the project on every worker: the checkout is staged to `--bucket` (`launcher/tpu/staging.py`) and the
agent (`launcher/tpu/agent.py`) runs the install command on all workers at once over ssh. An existing
READY TPU of that name is reused (it says so). A queued resource this command created is deleted
again when creating it fails, times out or is interrupted, so no quota is left held; a TPU VM that
is not READY in time is left as it is (the message says how to delete it). The install step stages
the code under `<bucket>/vlaunch/code/` and passes STORAGE_EMULATOR_HOST (when set here) and every
`--worker-env` to the workers; each also gets VLAUNCH_WORKER_INDEX and VLAUNCH_WORKER_COUNT.

delete: deletes the queued resource of that name with its TPU VMs (force), or the TPU VM, and waits
until it is gone.

offered: the accelerator types and runtime versions the zone offers, as the API lists them. create
checks its `--accelerator-type` and `--runtime-version` against these lists before asking for
anything; the runtime version defaults to the one Google documents for the type's generation.

Exit codes: 0 done; 1 the API refused or the TPU failed (one line says why); 2 bad arguments
(including ones the API calls INVALID_ARGUMENT);
3 no TPU or queued resource of that name (delete, describe); 4 the install step failed on a worker;
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from launcher.errors import LaunchError
from launcher.interrupts import Terminated, signals_stop_jobs
from launcher.tpu.client import (
    CAPACITIES,
    DEFAULT_ENDPOINT,
    TpuClient,
    TpuError,
    TpuSpec,
    default_runtime_version,
    render_requests,
    runtime_mismatch,
    sorted_names,
)

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INSTALL, EXIT_INTERRUPTED = 1, 2, 3, 4, 130

DEFAULT_INSTALL = "{python} -m pip install --quiet '.[jax,tpu]'"
DEFAULT_WORKDIR = "~/vlaunch"
DEFAULT_KEY_DIR = "~/.ssh/vlaunch"
# Where the workers find GCS: an emulator this process uses is the one the workers use too.
FORWARDED_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


EXIT_CODES = (
    "exit codes: 0 done, 1 the API refused or the TPU failed, 2 bad arguments, 3 no such TPU or queued "
    "resource, 4 the install step failed on a worker, 130 interrupted"
)


class CliError(LaunchError):
    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return key, value


def _default_user() -> str:
    import getpass

    return os.environ.get("VLAUNCH_SSH_USER") or getpass.getuser()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.tpu.cli",
        description="Create, delete, list and describe Cloud TPU VMs and queued resources (no gcloud).",
        epilog=EXIT_CODES,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="create|delete|list|describe|offered")

    def common(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("where")
        g.add_argument(
            "--project",
            default=os.environ.get("VLAUNCH_TPU_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT"),
            help="GCP project (default: $VLAUNCH_TPU_PROJECT or $GOOGLE_CLOUD_PROJECT)",
        )
        g.add_argument(
            "--zone",
            default=os.environ.get("VLAUNCH_TPU_ZONE"),
            help="zone, e.g. us-central2-b (default: $VLAUNCH_TPU_ZONE)",
        )
        g.add_argument(
            "--api-endpoint",
            default=os.environ.get("VLAUNCH_TPU_API_ENDPOINT", DEFAULT_ENDPOINT),
            help=f"Cloud TPU API endpoint (default: {DEFAULT_ENDPOINT}; tests give the local fake's URL)",
        )
        g.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait (default: 1800)")
        g.add_argument("--poll-interval", type=float, default=5.0, help="seconds between polls (default: 5)")

    create = sub.add_parser(
        "create", help="create a TPU VM or queued resource and install the project", epilog=EXIT_CODES
    )
    create.add_argument("name", help="TPU name (also the queued resource's name with --queued)")
    common(create)
    t = create.add_argument_group("the TPU")
    t.add_argument("--accelerator-type", required=True, help="e.g. v4-8, v4-16, v5litepod-16")
    t.add_argument(
        "--runtime-version",
        help="TPU software version; default: the one Google documents for the type's generation "
        "(tpu-ubuntu2204-base for v4 and older, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, "
        "v2-alpha-tpuv6e for v6e)",
    )
    t.add_argument("--capacity", default="on_demand", choices=CAPACITIES, help="default: on_demand")
    t.add_argument("--reservation", help="reservation id or full name (capacity reserved, --queued)")
    t.add_argument("--queued", action="store_true", help="create it as a queued resource")
    t.add_argument("--network", help="VPC network")
    t.add_argument("--subnetwork", help="VPC subnetwork")
    t.add_argument("--service-account", help="service account email the workers run as")
    t.add_argument("--label", type=_pair, action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    t.add_argument(
        "--metadata", type=_pair, action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    t.add_argument(
        "--dry-run", action="store_true", help="print the API request and staging plan; do nothing"
    )
    i = create.add_argument_group("installing the project on the workers")
    i.add_argument("--bucket", help="gs://bucket[/prefix] to stage the code to (needed unless --no-install)")
    i.add_argument("--ssh-user", default=_default_user(), help="ssh user on the workers (default: you)")
    i.add_argument(
        "--ssh-key-dir", default=DEFAULT_KEY_DIR, help=f"key pair kept here (default: {DEFAULT_KEY_DIR})"
    )
    i.add_argument("--ssh-port", type=int, default=22, help="default: 22")
    i.add_argument("--python", default="python3", help="python on the workers (default: python3)")
    i.add_argument(
        "--workdir", default=DEFAULT_WORKDIR, help=f"work dir on the workers (default: {DEFAULT_WORKDIR})"
    )
    i.add_argument(
        "--install-command",
        default=DEFAULT_INSTALL,
        help="shell command run in the staged code on every worker; {python}, {workdir} are replaced "
        f'(default: "{DEFAULT_INSTALL}")',
    )
    i.add_argument("--no-install", action="store_true", help="create the TPU only")
    i.add_argument(
        "--worker-env", type=_pair, action="append", default=[], metavar="NAME=VALUE", help="repeatable"
    )

    delete = sub.add_parser(
        "delete", help="delete a TPU VM or queued resource and wait until it is gone", epilog=EXIT_CODES
    )
    delete.add_argument("name")
    common(delete)
    delete.add_argument("--queued", action="store_true", help="only look for a queued resource of that name")

    listing = sub.add_parser(
        "list", help="list the TPU VMs and queued resources of a project and zone", epilog=EXIT_CODES
    )
    common(listing)

    describe = sub.add_parser("describe", help="print a TPU VM or queued resource as JSON", epilog=EXIT_CODES)
    describe.add_argument("name")
    common(describe)

    offered = sub.add_parser(
        "offered", help="list the accelerator types and runtime versions a zone offers", epilog=EXIT_CODES
    )
    common(offered)
    return parser


# ----------------------------------------------------------------------------------------- helpers


def _client(args) -> TpuClient:
    missing = [flag for flag, value in (("--project", args.project), ("--zone", args.zone)) if not value]
    if missing:
        raise CliError(f"{' and '.join(missing)} required (or set VLAUNCH_TPU_PROJECT / VLAUNCH_TPU_ZONE)", 2)
    return TpuClient(args.project, args.zone, endpoint=args.api_endpoint, poll_interval_s=args.poll_interval)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Progress:
    """One line per state change, and one every 30 s while nothing changes."""

    def __init__(self, what: str):
        self.what, self.last, self.shown_at = what, "", 0.0

    def __call__(self, resource, elapsed_s: float) -> None:
        if resource.state != self.last or elapsed_s - self.shown_at >= 30:
            _say(f"  {self.what}: {resource.state} ({elapsed_s:.0f}s)")
            self.last, self.shown_at = resource.state, elapsed_s


def _find(tpu: TpuClient, name: str):
    """(queued resource or None, node or None) of that name."""

    def get(fn):
        try:
            return fn(name)
        except TpuError as e:
            if e.status == "NOT_FOUND":
                return None
            raise

    return get(tpu.get_queued_resource), get(tpu.get_node)


def _bucket_prefix(bucket: str) -> str:
    url = bucket if "://" in bucket else f"gs://{bucket}"
    if not url.startswith("gs://") or len(url) <= len("gs://"):
        raise CliError(f"--bucket '{bucket}' is not a bucket; give gs://BUCKET[/PREFIX] or BUCKET", 2)
    return url.rstrip("/") + "/vlaunch"


# ------------------------------------------------------------------------------------------ create


def _spec(args, metadata: dict[str, str]) -> TpuSpec:
    return TpuSpec(
        accelerator_type=args.accelerator_type,
        runtime_version=args.runtime_version,
        capacity=args.capacity,
        reservation=args.reservation,
        network=args.network,
        subnetwork=args.subnetwork,
        service_account=args.service_account,
        labels=dict(args.label),
        metadata=metadata,
    )


def _create(args) -> int:
    if not args.runtime_version:
        args.runtime_version = default_runtime_version(args.accelerator_type)
    elif note := runtime_mismatch(args.accelerator_type, args.runtime_version):
        _say(f"note: {note}")
    if not args.no_install and not args.bucket:
        raise CliError("--bucket is needed to stage the code for the install step (or pass --no-install)", 2)
    prefix = _bucket_prefix(args.bucket) if args.bucket else ""
    # Validated before anything happens (a bad name or capacity fails here, not half-way).
    planned = _spec(args, dict(args.metadata, **{"ssh-keys": f"{args.ssh_user}:<public key>"}))
    text = render_requests(
        args.project or "PROJECT",
        args.zone or "ZONE",
        args.name,
        planned,
        args.queued,
        endpoint=args.api_endpoint,
    )
    if args.dry_run:
        print(text)
        if not args.no_install:
            from launcher.snapshot import SOURCE_ROOT, source_files
            from launcher.tpu.staging import render_staging

            files = source_files(SOURCE_ROOT) or []
            print(render_staging(SOURCE_ROOT, files, prefix))
        return 0

    from launcher.tpu import fanout

    key_file, pubkey = fanout.ensure_keypair(Path(args.ssh_key_dir).expanduser())
    metadata = dict(args.metadata)
    metadata["ssh-keys"] = fanout.ssh_keys_metadata(args.ssh_user, pubkey)
    spec = _spec(args, metadata)
    tpu = _client(args)
    node = _ready_node(tpu, args, spec)
    _say(f"TPU '{node.node_id}' is READY: {len(node.worker_ips)} worker(s) at {', '.join(node.worker_ips)}")
    if args.no_install:
        return 0
    return _install(args, node, prefix, key_file)


def _ready_node(tpu: TpuClient, args, spec: TpuSpec):
    """The READY node: an existing one of that name, or a new node / queued resource."""
    queued, node = _find(tpu, args.name)
    if node is not None and node.state == "READY":
        _say(f"reusing the existing TPU '{args.name}' (READY, {node.accelerator_type})")
        if spec.metadata["ssh-keys"] not in node.metadata.get("ssh-keys", ""):
            _say("  note: its ssh-keys metadata lacks this key; the workers may refuse the install step")
        return node
    if queued is not None or node is not None:
        state = (queued or node).state
        if state not in ("CREATING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES", "ACTIVE"):
            raise CliError(
                f"a {'queued resource' if queued else 'TPU'} named '{args.name}' already exists and is {state}; "
                f"delete it first (infra/delete_tpu.sh {args.name} --project {args.project} --zone {args.zone})"
            )
        _say(
            f"a {'queued resource' if queued else 'TPU'} named '{args.name}' is already {state}; waiting for it"
        )
        created = None
    elif args.queued:
        tpu.check_offered([spec])  # a type or version the zone lacks: exit 2, nothing created
        created = tpu.create_queued_resource(args.name, spec)
        _say(f"asked for queued resource '{args.name}' ({spec.accelerator_type}, {spec.capacity})")
    else:
        tpu.check_offered([spec])  # a type or version the zone lacks: exit 2, nothing created
        tpu.create_node(args.name, spec)
        _say(f"asked for TPU '{args.name}' ({spec.accelerator_type}, {spec.capacity})")
        created = None
    try:
        start = time.monotonic()
        if args.queued or queued is not None:
            name = tpu.queued_resource_name(args.name)
            qr = tpu.wait_until(name, "ACTIVE", args.timeout, _Progress(f"queued resource '{args.name}'"))
            node_id = qr.node_ids[0] if qr.node_ids else args.name
        else:
            node_id = args.name
        left = max(1.0, args.timeout - (time.monotonic() - start))
        return tpu.wait_until(tpu.node_name(node_id), "READY", left, _Progress(f"TPU '{node_id}'"))
    except (TpuError, KeyboardInterrupt) as e:
        if created is None and isinstance(e, TpuError) and e.status == "TIMEOUT":
            raise TpuError(
                f"{e}; to delete it: infra/delete_tpu.sh {args.name} --project {args.project} --zone {args.zone}",
                e.status,
            ) from None
        if created is not None:
            _say(f"deleting queued resource '{args.name}' so that it holds no quota")
            try:
                tpu.delete_queued_resource(created, force=True, wait=True, timeout_s=300)
            except TpuError as cleanup:
                _say(f"  could not delete it: {cleanup}; delete it with infra/delete_tpu.sh {args.name}")
        raise e


def _install(args, node, prefix: str, key_file: Path) -> int:
    from launcher.registry import git_facts
    from launcher.snapshot import SOURCE_ROOT, source_files
    from launcher.tpu import fanout
    from launcher.tpu.agent import agent_command
    from launcher.tpu.staging import stage_code

    files = source_files(SOURCE_ROOT)
    if files is None:
        raise CliError(f"{SOURCE_ROOT} is not a git checkout: cannot tell which files to install")
    commit, diff = git_facts(SOURCE_ROOT)
    staged = stage_code(SOURCE_ROOT, files, prefix, commit=commit, diff_sha256=diff)
    _say(f"staged {staged.files} files to {staged.url}" + ("" if staged.uploaded else " (already there)"))
    install = args.install_command.replace("{python}", args.python)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.update(dict(args.worker_env))
    count = len(node.worker_ips)
    commands = [
        agent_command(
            python=args.python,
            workdir=args.workdir,
            code_url=staged.url,
            code_md5=staged.md5,
            config_url="",
            config_md5="",
            env=dict(env, VLAUNCH_WORKER_INDEX=str(index), VLAUNCH_WORKER_COUNT=str(count)),
            argv=["/bin/sh", "-c", install],
        )
        for index in range(count)
    ]
    ssh = fanout.SshConfig(user=args.ssh_user, key_file=key_file, port=args.ssh_port)
    _say(f"installing on {count} worker(s): {install}")
    fan = fanout.FanOut(node.worker_ips, commands, ssh=ssh, on_line=_print_worker_line, stop_on_failure=True)
    fan.start()
    try:
        codes = fan.wait(args.timeout)
    except TimeoutError:
        fan.stop(grace_s=30)
        raise CliError(
            f"installing did not finish within {args.timeout:g}s on every worker; stopped it "
            "(raise --timeout, or check the install command)",
            EXIT_INSTALL,
        ) from None
    except KeyboardInterrupt:
        fan.stop(grace_s=10)
        raise
    failed = {i: c for i, c in enumerate(codes) if c != 0}
    if failed:
        listed = ", ".join(
            f"worker {i}: {'ssh failed' if c == fanout.SSH_FAILED else f'exit {c}'}"
            for i, c in failed.items()
        )
        raise CliError(
            f"installing failed on {len(failed)} of {count} worker(s) ({listed}); see the output above",
            EXIT_INSTALL,
        )
    _say(f"installed on all {count} worker(s)")
    return 0


def _print_worker_line(index: int, line: str) -> None:
    print(f"[worker {index}] {line.rstrip()}", flush=True)


# ------------------------------------------------------------------------------------------ delete


def _delete(args) -> int:
    tpu = _client(args)
    queued, node = _find(tpu, args.name)
    if queued is None and node is not None and node.queued_resource and not args.queued:
        queued_id = node.queued_resource.rsplit("/", 1)[-1]
        _say(f"TPU '{args.name}' belongs to queued resource '{queued_id}': deleting that")
        queued = tpu.get_queued_resource(node.queued_resource)
    if queued is not None:
        _say(f"deleting queued resource '{queued.queued_resource_id}' and its TPU VMs")
        tpu.delete_queued_resource(queued.name, force=True, wait=True, timeout_s=args.timeout)
    elif node is not None and not args.queued:
        _say(f"deleting TPU '{args.name}'")
        tpu.delete_node(node.name, wait=True, timeout_s=args.timeout)
    else:
        what = "queued resource" if args.queued else "TPU or queued resource"
        raise CliError(
            f"no {what} named '{args.name}' in project {args.project}, zone {args.zone}; "
            "check the name (python -m launcher.tpu.cli list)",
            EXIT_NOT_FOUND,
        )
    _say(f"deleted '{args.name}'")
    return 0


# ------------------------------------------------------------------------------------ list, describe


def _list(args) -> int:
    tpu = _client(args)
    rows = [("KIND", "NAME", "STATE", "TYPE / TIER", "WORKERS")]
    for n in tpu.list_nodes():
        rows.append(("node", n.node_id, n.state, n.accelerator_type, ",".join(n.worker_ips) or "-"))
    for q in tpu.list_queued_resources():
        rows.append(("queued", q.queued_resource_id, q.state, q.tier, ",".join(q.node_ids) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _describe(args) -> int:
    tpu = _client(args)
    queued, node = _find(tpu, args.name)
    if queued is None and node is None:
        raise CliError(
            f"no TPU or queued resource named '{args.name}' in project {args.project}, zone {args.zone}",
            EXIT_NOT_FOUND,
        )
    found = {}
    if node is not None:
        found["node"] = dataclasses.asdict(node)
    if queued is not None:
        found["queued_resource"] = dataclasses.asdict(queued)
    print(json.dumps(found, indent=2))
    return 0


def _offered(args) -> int:
    tpu = _client(args)
    for what, names in (
        ("accelerator types", tpu.list_accelerator_types()),
        ("runtime versions", tpu.list_runtime_versions()),
    ):
        print(f"{what} ({len(names)}):")
        for name in sorted_names(names):
            print(f"  {name}")
    return 0


COMMANDS = {"create": _create, "delete": _delete, "list": _list, "describe": _describe, "offered": _offered}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with signals_stop_jobs():  # `kill` cleans up like Ctrl-C: no queued resource left holding quota
            return COMMANDS[args.command](args)
    except CliError as e:
        _say(f"error: {e}")
        return e.code
    except TpuError as e:
        _say(f"error: {e}")
        return EXIT_USAGE if e.status == "INVALID_ARGUMENT" else EXIT_FAILED
    except LaunchError as e:  # staging and other one-line failures
        _say(f"error: {e}")
        return EXIT_FAILED
    except Terminated as e:
        _say(f"stopped by {signal.Signals(e.signum).name}")
        return 128 + e.signum
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
