#!/usr/bin/env bash
# Make sure OpenSSH's server and client are installed: the emulated TPU workers of the tests are
# real sshd processes on loopback addresses (infra/fake_tpu/workers.py). Installs with apt-get
# when they are missing (as root), without starting the system's ssh service.
set -euo pipefail

if [[ -x /usr/sbin/sshd ]] && command -v ssh >/dev/null && command -v ssh-keygen >/dev/null; then
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "error: sshd is missing; install it as root: apt-get install --no-install-recommends openssh-server openssh-client" >&2
    exit 1
fi
command -v apt-get >/dev/null || { echo "error: sshd is missing and there is no apt-get to install it" >&2; exit 1; }

policy=/usr/sbin/policy-rc.d
created=0
if [[ ! -e "$policy" ]]; then
    # Tell maintainer scripts not to start services: our sshd instances are started by the tests.
    printf '#!/bin/sh\n# temporary, written by vlaunch infra/ensure_sshd.sh during apt-get install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created=1
fi
cleanup() { if ((created)); then rm -f "$policy"; fi; }
trap cleanup EXIT

log=$(mktemp)
echo "== installing openssh-server with apt-get (log: $log)"
install=(apt-get install -y -q --no-install-recommends openssh-server openssh-client)
if ! DEBIAN_FRONTEND=noninteractive "${install[@]}" >>"$log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1
    DEBIAN_FRONTEND=noninteractive "${install[@]}" >>"$log" 2>&1 || {
        tail -20 "$log" >&2
        echo "error: apt-get install openssh-server failed (log: $log)" >&2
        exit 1
    }
fi
