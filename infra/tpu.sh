#!/usr/bin/env bash
# infra/tpu.sh create|delete|list|describe ... -- Cloud TPU VMs and queued resources through the
# project's own TPU client (no gcloud); everything is in launcher/tpu/cli.py. `infra/create_tpu.sh`
# and `infra/delete_tpu.sh` are its two common commands; `--help` lists parameters and exit codes.
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$REPO_ROOT/.venv/bin/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m launcher.tpu.cli "$@"
