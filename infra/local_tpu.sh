#!/usr/bin/env bash
# A TPU "cloud" on this machine, for trying backend=tpu_vm / tpu_pod without Google Cloud:
#   - the fake Cloud TPU API (infra/fake_tpu/server.py) on 127.0.0.1:$VLAUNCH_TPU_API_PORT, which starts
#     a real sshd per TPU worker host on 127.0.0.2, 127.0.0.3, ... port $VLAUNCH_TPU_SSH_PORT when a TPU
#     becomes READY (keys from the TPU's ssh-keys metadata, as on real TPU VMs);
#   - fake-gcs-server (infra/fake_gcs.py) on 127.0.0.1:$VLAUNCH_GCS_PORT with the bucket vl-local.
# conf/site/local_tpu.yaml points the TPU backends at them:
#   infra/local_tpu.sh up
#   python -m launcher trainer=reserve backend=tpu_pod site=local_tpu
#   infra/local_tpu.sh down
# State (pid files, logs, sshd configs, bucket contents) lives in .state/tpu/ of this checkout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${VLAUNCH_TPU_STATE:-$ROOT/.state/tpu}"
API_PORT="${VLAUNCH_TPU_API_PORT:-18470}"
SSH_PORT="${VLAUNCH_TPU_SSH_PORT:-18222}"
GCS_PORT="${VLAUNCH_GCS_PORT:-14443}"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

say() { echo "local_tpu: $*"; }
alive() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

wait_port() {  # wait_port PORT NAME LOG
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    tail -20 "$3" >&2 || true
    echo "local_tpu: error: $2 did not start on port $1 (log: $3)" >&2
    exit 1
}

start() {  # start NAME PORT command...
    local name=$1 port=$2
    shift 2
    if alive "$name"; then
        say "$name already runs (pid $(cat "$STATE/$name.pid"))"
        return
    fi
    setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
    echo $! >"$STATE/$name.pid"
    wait_port "$port" "$name" "$STATE/$name.log"
    say "$name runs on 127.0.0.1:$port (pid $(cat "$STATE/$name.pid"), log $STATE/$name.log)"
}

stop() {
    local name=$1
    if alive "$name"; then
        kill -TERM "$(cat "$STATE/$name.pid")" 2>/dev/null || true
        for _ in $(seq 1 50); do alive "$name" || break; sleep 0.1; done
        alive "$name" && kill -KILL "$(cat "$STATE/$name.pid")" 2>/dev/null || true
        say "$name stopped"
    fi
    rm -f "$STATE/$name.pid"
}

case "${1:-}" in
up)
    [[ -x /usr/sbin/sshd ]] || "$ROOT/infra/ensure_sshd.sh"
    mkdir -p "$STATE/gcs"
    start gcs "$GCS_PORT" "$PY" -m infra.fake_gcs --port "$GCS_PORT" --bucket vl-local --root "$STATE/gcs"
    start api "$API_PORT" "$PY" -m infra.fake_tpu.server --port "$API_PORT" --sshd-port "$SSH_PORT" \
        --state-dir "$STATE/workers" --create-delay 2 --delete-delay 1 --preempt-grace 60
    say "use it with: python -m launcher trainer=reserve backend=tpu_pod site=local_tpu"
    say "preempt a TPU with: curl -X POST http://127.0.0.1:$API_PORT/_fake/nodes/<name>:preempt"
    ;;
down)
    stop api
    stop gcs
    ;;
status)
    for name in api gcs; do
        if alive "$name"; then say "$name runs (pid $(cat "$STATE/$name.pid"))"; else say "$name is down"; fi
    done
    ;;
*)
    cat <<USAGE
usage: infra/local_tpu.sh up|down|status

  up      start the fake Cloud TPU API (127.0.0.1:$API_PORT, sshd workers on port $SSH_PORT)
          and fake-gcs-server (127.0.0.1:$GCS_PORT, bucket vl-local); state in $STATE
  down    stop both (and every sshd worker)
  status  say what runs

Then: python -m launcher trainer=reserve backend=tpu_pod site=local_tpu
Ports: VLAUNCH_TPU_API_PORT, VLAUNCH_TPU_SSH_PORT, VLAUNCH_GCS_PORT; state: VLAUNCH_TPU_STATE.
USAGE
    [[ "${1:-}" == -h || "${1:-}" == --help ]] || exit 2
    ;;
esac
