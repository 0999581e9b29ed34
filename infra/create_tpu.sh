#!/usr/bin/env bash
# infra/create_tpu.sh -- create a Cloud TPU VM or queued resource through the project's own TPU client
# (no gcloud). A thin wrapper: everything is in launcher/tpu/cli.py; `infra/create_tpu.sh --help` lists
# the parameters and the exit codes.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname -- "$SCRIPT_DIR")"
PYTHON="$REPO_ROOT/.venv/bin/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m launcher.tpu.cli create "$@"
