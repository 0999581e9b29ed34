#!/usr/bin/env bash
# Delete a Cloud TPU VM or queued resource and wait until it is gone (`--help` for the parameters).
exec "$(dirname -- "${BASH_SOURCE[0]}")/tpu.sh" delete "$@"
