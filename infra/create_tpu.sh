#!/usr/bin/env bash
# Create a Cloud TPU VM or queued resource, wait until it is ready and install the project on every
# host (`infra/create_tpu.sh --help` lists the parameters). See infra/tpu.sh.
exec "$(dirname -- "${BASH_SOURCE[0]}")/tpu.sh" create "$@"
