#!/usr/bin/env bash
# infra/local_slurm.sh -- a real, one-host Slurm cluster for tests and for trying the launcher.
#
# Run `infra/local_slurm.sh --help` for what it does. In short: it starts munged, MariaDB, slurmdbd,
# slurmctld and two slurmd daemons (node1, node2) on this machine, every one of them configured from
# and writing into a single state directory, on their own ports, so that nothing system-wide is read
# or changed and a real Slurm or munge on the same machine is left alone.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname -- "$SCRIPT_DIR")"

# ---------------------------------------------------------------------------------------------------
# Settings (environment overrides)
# ---------------------------------------------------------------------------------------------------
STATE="${VLAUNCH_SLURM_STATE:-$REPO_ROOT/.state/slurm}"
case "$STATE" in /*) ;; *) STATE="$PWD/$STATE" ;; esac
STATE="${STATE%/}"
PORT_BASE="${VLAUNCH_SLURM_PORT_BASE:-16810}"
MAX_ARRAY_SIZE="${VLAUNCH_SLURM_MAX_ARRAY_SIZE:-1001}"
CLUSTER="${VLAUNCH_SLURM_CLUSTER:-vlaunch}"
UP_TIMEOUT="${VLAUNCH_SLURM_UP_TIMEOUT:-90}"
CRED_EXPIRE="${VLAUNCH_SLURM_CRED_EXPIRE:-10}"

if [[ ! "$PORT_BASE" =~ ^[0-9]+$ ]] || ((PORT_BASE < 1024 || PORT_BASE > 65000)); then
    printf '[local_slurm] error: VLAUNCH_SLURM_PORT_BASE must be a number between 1024 and 65000, got %q\n' "$PORT_BASE" >&2
    exit 2
fi

# Every daemon runs as the user who runs 'up' (root on our test machines; as root, jobs of any
# user can run, as anyone else only that user's).
RUN_USER="$(id -un)"
NODES=(node1 node2)
CPUS_PER_NODE=2
PACKAGES=(munge mariadb-server mariadb-client slurmctld slurmd slurmdbd slurm-client)

# Ports: base+0 MariaDB, +1 slurmdbd, +2 slurmctld, +3.. one per slurmd.
DB_PORT=$((PORT_BASE + 0))
DBD_PORT=$((PORT_BASE + 1))
CTLD_PORT=$((PORT_BASE + 2))
node_port() { # node index (0-based) -> port
    echo $((PORT_BASE + 3 + $1))
}

# Layout of the state directory.
ETC="$STATE/etc"              # slurm.conf, slurmdbd.conf
RUN="$STATE/run"              # pid files
LOG="$STATE/log"              # every daemon's log
SPOOL="$STATE/spool"          # slurmctld state, one slurmd spool dir per node
MUNGE_DIR="$STATE/munge"      # key, socket, seed
DB_DIR="$STATE/mariadb"       # datadir, socket, the slurm user's password
SLURM_CONF_FILE="$ETC/slurm.conf"
DBD_CONF_FILE="$ETC/slurmdbd.conf"
MUNGE_KEY="$MUNGE_DIR/munge.key"
MUNGE_SOCK="$MUNGE_DIR/munged.sock"
DB_SOCK="$DB_DIR/mysqld.sock"
DB_DATA="$DB_DIR/data"
DB_PASS_FILE="$DB_DIR/slurm.pass"
DB_NAME="slurm_acct_db"
DB_USER="slurm"

# Every daemon we start carries this variable in its environment; it is how we recognise our own
# processes (a pid file alone could point at a recycled pid or at somebody else's daemon).
MARK="VLAUNCH_SLURM_DAEMON_OF=$STATE"

# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------
say() { printf '[local_slurm] %s\n' "$*"; }
warn() { printf '[local_slurm] warning: %s\n' "$*" >&2; }
die() {
    printf '[local_slurm] error: %s\n' "$*" >&2
    exit 1
}

show_log_tail() { # file -- print the end of a log to stderr, to explain a failure
    local file="$1"
    if [[ -s "$file" ]]; then
        printf '[local_slurm] ---- last lines of %s ----\n' "$file" >&2
        # Debian's slurm loads its PMIx plugins at start and logs errors when libpmix is absent;
        # they are harmless here (MpiDefault=none) and would hide the line that matters.
        grep -v -e 'pmix' -e 'MPI: Cannot create context' -- "$file" | tail -n 20 >&2 || true
        printf '[local_slurm] ----\n' >&2
    fi
}

fail_with_log() { # message logfile...
    local msg="$1"
    shift
    local f
    for f in "$@"; do show_log_tail "$f"; done
    die "$msg (see $*)"
}

first_cmd() { # print the first of the given commands that exists
    local c
    for c in "$@"; do
        if command -v "$c" >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

alive() { # pid -- true if the process exists and is not a zombie
    local pid="$1" stat
    [[ -r "/proc/$pid/stat" ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat%% *}" != "Z" ]]
}

is_ours() { # pid -- true if the process was started by this script for this state dir
    local pid="$1"
    grep -zqxF -- "$MARK" "/proc/$pid/environ" 2>/dev/null && return 0
    grep -zqF -- "$STATE/" "/proc/$pid/cmdline" 2>/dev/null
}

our_pid() { # pidfile -- print the pid if it names a live process of ours
    local pidfile="$1" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" ]] || return 1
    alive "$pid" && is_ours "$pid" || return 1
    echo "$pid"
}

wait_until() { # timeout_seconds command... -- poll until the command succeeds
    local timeout="$1"
    shift
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.3
    done
}

wait_for_pidfile() { # timeout pidfile
    wait_until "$1" our_pid "$2"
}

stop_by_pidfile() { # name pidfile [timeout]
    local name="$1" pidfile="$2" timeout="${3:-30}" pid deadline
    if ! pid="$(our_pid "$pidfile")"; then
        if [[ -e "$pidfile" ]]; then
            say "$name: not running (removing stale pid file)"
            rm -f -- "$pidfile"
        else
            say "$name: not running"
        fi
        return 0
    fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + timeout))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            warn "$name (pid $pid) did not exit within ${timeout}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f -- "$pidfile"
}

port_busy() { # port -- true if something listens on the TCP port
    command -v ss >/dev/null 2>&1 || return 1
    [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]
}

check_port_free() { # name port
    if port_busy "$2"; then
        die "port $2 (for $1) is already in use by another program; pick other ports with VLAUNCH_SLURM_PORT_BASE=<n> (uses n..n+$((2 + ${#NODES[@]}))), or run '$0 down' if it is a leftover of this cluster"
    fi
}

write_if_changed() { # path mode -- write stdin to path if the content differs
    local path="$1" mode="$2" tmp
    tmp="$(mktemp "$path.XXXXXX")"
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f "$path" ]] && cmp -s "$tmp" "$path"; then
        rm -f -- "$tmp"
    else
        mv -f -- "$tmp" "$path"
    fi
}

short_hostname() {
    local h
    h="$(hostname -s 2>/dev/null || true)"
    [[ -n "$h" ]] || h="$(uname -n)"
    echo "${h%%.*}"
}

slurm_env() { # run a command with this cluster's slurm.conf
    SLURM_CONF="$SLURM_CONF_FILE" "$@"
}

start_daemon() { # logfile command... -- start a self-daemonising program, detached from us
    local logfile="$1"
    shift
    # fd 9 is our lock (see take_lock); a daemon must not inherit it.
    env "$MARK" SLURM_CONF="$SLURM_CONF_FILE" setsid "$@" </dev/null >>"$logfile" 2>&1 9>&-
}

# ---------------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------------
binaries_present() {
    local c
    for c in munged munge unmunge slurmctld slurmd slurmdbd sinfo squeue scontrol sacct sacctmgr srun sbatch; do
        command -v "$c" >/dev/null 2>&1 || return 1
    done
    first_cmd mariadbd mysqld >/dev/null || return 1
    first_cmd mariadb-install-db mysql_install_db >/dev/null || return 1
    first_cmd mariadb mysql >/dev/null || return 1
    first_cmd mariadb-admin mysqladmin >/dev/null || return 1
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

list_daemon_pids() { # print pids of munged / mariadbd / mysqld / slurm* processes
    local d comm
    for d in /proc/[0-9]*; do
        comm="$(cat "$d/comm" 2>/dev/null || true)"
        case "$comm" in munged | mariadbd | mysqld | slurmctld | slurmd | slurmdbd) echo "${d#/proc/}" ;; esac
    done
}

POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_SAVED=""
POLICY_RC_CREATED=0

restore_policy_rc() {
    if [[ "$POLICY_RC_CREATED" == 1 ]]; then
        rm -f -- "$POLICY_RC"
        POLICY_RC_CREATED=0
        if [[ -n "$POLICY_RC_SAVED" ]]; then
            mv -f -- "$POLICY_RC_SAVED" "$POLICY_RC"
            POLICY_RC_SAVED=""
        fi
    fi
}

block_service_starts() {
    # Debian's maintainer scripts ask invoke-rc.d before starting a service; a policy-rc.d that
    # exits 101 answers "no". Keep an existing one that already says no.
    if [[ -x "$POLICY_RC" ]]; then
        local rc=0
        "$POLICY_RC" munge start >/dev/null 2>&1 || rc=$?
        [[ "$rc" == 101 ]] && return 0
        POLICY_RC_SAVED="$POLICY_RC.vlaunch-saved"
        mv -f -- "$POLICY_RC" "$POLICY_RC_SAVED"
    fi
    trap restore_policy_rc EXIT
    trap 'restore_policy_rc; exit 130' INT TERM
    printf '#!/bin/sh\n# temporary, written by vlaunch infra/local_slurm.sh during apt-get install\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    POLICY_RC_CREATED=1
}

install_packages() {
    if binaries_present; then
        return 0
    fi
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        die "Slurm/munge/MariaDB packages are installed but some programs are not on PATH ($PATH)"
    fi
    if [[ "$(id -u)" != 0 ]]; then
        die "missing packages: ${missing[*]}; install them as root: apt-get install --no-install-recommends ${missing[*]}"
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing packages (${missing[*]}) and no apt-get to install them"

    mkdir -p -- "$LOG"
    local apt_log="$LOG/apt.log" before after pid
    say "installing ${missing[*]} with apt-get (log: $apt_log)"
    before=" $(list_daemon_pids | tr '\n' ' ') "
    block_service_starts
    local apt_install=(apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold "${missing[@]}")
    if ! DEBIAN_FRONTEND=noninteractive "${apt_install[@]}" >>"$apt_log" 2>&1; then
        say "package not found or index stale; running apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$apt_log" 2>&1 ||
            fail_with_log "apt-get update failed" "$apt_log"
        DEBIAN_FRONTEND=noninteractive "${apt_install[@]}" >>"$apt_log" 2>&1 ||
            fail_with_log "apt-get install ${missing[*]} failed" "$apt_log"
    fi
    restore_policy_rc
    trap - EXIT INT TERM
    # If a maintainer script started a system daemon anyway, stop exactly that one.
    after="$(list_daemon_pids)"
    for pid in $after; do
        if [[ "$before" != *" $pid "* ]] && ! is_ours "$pid"; then
            say "stopping $(cat "/proc/$pid/comm" 2>/dev/null || echo daemon) (pid $pid) started by apt's maintainer scripts"
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    binaries_present || die "installed ${missing[*]} but the programs are still not found on PATH"
    say "packages installed"
}

# ---------------------------------------------------------------------------------------------------
# Configuration files
# ---------------------------------------------------------------------------------------------------
make_dirs() {
    mkdir -p -- "$ETC" "$RUN" "$LOG" "$SPOOL/ctld" "$MUNGE_DIR" "$DB_DIR"
    local n
    for n in "${NODES[@]}"; do mkdir -p -- "$SPOOL/$n"; done
    # munged refuses directories that others can write to; MariaDB and slurmdbd hold secrets.
    chmod 755 -- "$STATE" "$ETC" "$RUN" "$LOG" "$SPOOL"
    chmod 755 -- "$MUNGE_DIR"  # munged: socket dir must be searchable by all
    chmod 700 -- "$DB_DIR"
}

node_real_memory_mb() { # half of this machine's memory for each of the two nodes
    local kb
    kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    echo $((kb / 1024 / ${#NODES[@]}))
}

write_slurm_conf() {
    local host mem i nodelist
    host="$(short_hostname)"
    mem="$(node_real_memory_mb)"
    nodelist="$(
        IFS=,
        echo "${NODES[*]}"
    )"
    {
        cat <<EOF
# Generated by infra/local_slurm.sh -- edits are overwritten on the next 'up'.
# A one-host cluster: two slurmd daemons (${nodelist}) share this machine's cores.
ClusterName=${CLUSTER}
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=$(node_port 0)
SlurmUser=${RUN_USER}
SlurmdUser=${RUN_USER}

# Authentication through our own munged, never the system one.
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (Slurm adds 1s);
# the default 120s would make every requeue test wait two minutes.
AuthInfo=socket=${MUNGE_SOCK},cred_expire=${CRED_EXPIRE}
CredType=cred/munge

# Everything on disk lives in the state directory.
StateSaveLocation=${SPOOL}/ctld
SlurmdSpoolDir=${SPOOL}/%n
SlurmctldPidFile=${RUN}/slurmctld.pid
SlurmdPidFile=${RUN}/slurmd-%n.pid
SlurmctldLogFile=${LOG}/slurmctld.log
SlurmdLogFile=${LOG}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups in a container: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SlurmdParameters=config_overrides
PropagateResourceLimitsExcept=MEMLOCK
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true

# Scheduling.
SchedulerType=sched/backfill
# sched_interval: a requeued job (or one whose --begin passed) starts within seconds of
# becoming eligible, not after the default 60s main-scheduler period.
SchedulerParameters=sched_interval=3,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PreemptType=preempt/none
EnforcePartLimits=ALL
MaxArraySize=${MAX_ARRAY_SIZE}
MaxJobCount=$((MAX_ARRAY_SIZE > 10000 ? MAX_ARRAY_SIZE * 2 : 10000))
JobRequeue=1
ReturnToService=2

# Short timeouts so tests do not wait; finished jobs stay in sacct (slurmdbd), not in squeue.
MinJobAge=10
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
MessageTimeout=10

# Accounting through slurmdbd, so that sacct answers.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=${DBD_PORT}
# Clients (sacct, sacctmgr) and slurmctld take the munge socket for slurmdbd connections from
# AccountingStoragePass, not from AuthInfo; without it they would look for the system munged.
AccountingStoragePass=socket=${MUNGE_SOCK}
JobCompType=jobcomp/none

# Nodes: one slurmd per node name, all on 127.0.0.1, each on its own port.
EOF
        for i in "${!NODES[@]}"; do
            printf 'NodeName=%s NodeHostname=%s NodeAddr=127.0.0.1 Port=%s CPUs=%s Boards=1 SocketsPerBoard=1 CoresPerSocket=%s ThreadsPerCore=1 RealMemory=%s State=UNKNOWN\n' \
                "${NODES[$i]}" "$host" "$(node_port "$i")" "$CPUS_PER_NODE" "$CPUS_PER_NODE" "$mem"
        done
        cat <<EOF
PartitionName=debug Nodes=${nodelist} Default=YES MaxTime=INFINITE State=UP
PartitionName=long Nodes=${nodelist} Default=NO MaxTime=INFINITE State=UP
EOF
    } | write_if_changed "$SLURM_CONF_FILE" 644
}

db_password() {
    if [[ ! -s "$DB_PASS_FILE" ]]; then
        (
            umask 077
            od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$DB_PASS_FILE"
        )
    fi
    cat "$DB_PASS_FILE"
}

write_slurmdbd_conf() {
    local pass
    pass="$(db_password)"
    write_if_changed "$DBD_CONF_FILE" 600 <<EOF
# Generated by infra/local_slurm.sh -- edits are overwritten on the next 'up'.
AuthType=auth/munge
AuthInfo=socket=${MUNGE_SOCK}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=${DBD_PORT}
SlurmUser=${RUN_USER}
DebugLevel=info
LogFile=${LOG}/slurmdbd.log
PidFile=${RUN}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT}
StorageUser=${DB_USER}
StoragePass=${pass}
StorageLoc=${DB_NAME}
EOF
}

# ---------------------------------------------------------------------------------------------------
# munged
# ---------------------------------------------------------------------------------------------------
MUNGED_PID="$RUN/munged.pid"

munge_works() {
    local cred
    cred="$(munge -n -S "$MUNGE_SOCK" 2>/dev/null)" || return 1
    unmunge -S "$MUNGE_SOCK" <<<"$cred" >/dev/null 2>&1
}

start_munged() {
    local pid
    if pid="$(our_pid "$MUNGED_PID")"; then
        say "munged already running (pid $pid)"
        return 0
    fi
    if [[ ! -s "$MUNGE_KEY" ]]; then
        say "creating munge key $MUNGE_KEY"
        rm -f -- "$MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" >>"$LOG/munged.out" 2>&1 ||
                fail_with_log "mungekey failed" "$LOG/munged.out"
        else
            (
                umask 077
                dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
            )
        fi
    fi
    chmod 600 -- "$MUNGE_KEY"
    # Our munged is not running, so a socket left in our private directory is stale.
    rm -f -- "$MUNGE_SOCK" "$MUNGE_SOCK.lock" "$MUNGED_PID"
    say "starting munged (socket $MUNGE_SOCK)"
    start_daemon "$LOG/munged.out" munged \
        --socket="$MUNGE_SOCK" \
        --key-file="$MUNGE_KEY" \
        --pid-file="$MUNGED_PID" \
        --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" ||
        fail_with_log "munged failed to start" "$LOG/munged.out" "$LOG/munged.log"
    wait_until 20 munge_works || fail_with_log "munged did not answer on $MUNGE_SOCK" "$LOG/munged.log"
    wait_for_pidfile 10 "$MUNGED_PID" || fail_with_log "munged wrote no pid file $MUNGED_PID" "$LOG/munged.log"
}

# ---------------------------------------------------------------------------------------------------
# MariaDB
# ---------------------------------------------------------------------------------------------------
DB_PID="$RUN/mariadb.pid"

db_client() { # SQL... as the database's root over our socket
    "$(first_cmd mariadb mysql)" --no-defaults --socket="$DB_SOCK" --user=root --batch "$@"
}

db_ping() {
    "$(first_cmd mariadb-admin mysqladmin)" --no-defaults --socket="$DB_SOCK" --user=root ping
}

start_mariadb() {
    local pid mariadbd install_db pass
    if pid="$(our_pid "$DB_PID")"; then
        say "mariadb already running (pid $pid)"
        return 0
    fi
    mariadbd="$(first_cmd mariadbd mysqld)" || die "no mariadbd/mysqld on PATH"
    if [[ ! -d "$DB_DATA/mysql" ]]; then
        say "initialising MariaDB data dir $DB_DATA"
        rm -rf -- "$DB_DATA"
        install_db="$(first_cmd mariadb-install-db mysql_install_db)" || die "no mariadb-install-db on PATH"
        "$install_db" --no-defaults --user="$RUN_USER" --datadir="$DB_DATA" \
            --auth-root-authentication-method=normal --skip-test-db \
            >>"$LOG/mariadb-install.log" 2>&1 ||
            { rm -rf -- "$DB_DATA"; fail_with_log "mariadb-install-db failed" "$LOG/mariadb-install.log"; }
    fi
    check_port_free mariadb "$DB_PORT"
    rm -f -- "$DB_SOCK" "$DB_PID"
    mkdir -p -- "$DB_DIR/tmp"
    say "starting mariadb (port $DB_PORT, socket $DB_SOCK)"
    env "$MARK" setsid "$mariadbd" --no-defaults --user="$RUN_USER" \
        --datadir="$DB_DATA" --tmpdir="$DB_DIR/tmp" \
        --socket="$DB_SOCK" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$DB_PID" --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 --max-connections=200 \
        </dev/null >>"$LOG/mariadb.out" 2>&1 9>&- &
    wait_until 60 db_ping || fail_with_log "mariadb did not come up" "$LOG/mariadb.log"
    wait_for_pidfile 10 "$DB_PID" || fail_with_log "mariadb wrote no pid file $DB_PID" "$LOG/mariadb.log"
    pass="$(db_password)"
    db_client -e "CREATE USER IF NOT EXISTS '${DB_USER}'@'127.0.0.1' IDENTIFIED BY '${pass}';
                  ALTER USER '${DB_USER}'@'127.0.0.1' IDENTIFIED BY '${pass}';
                  GRANT ALL PRIVILEGES ON \`${DB_NAME}\`.* TO '${DB_USER}'@'127.0.0.1';
                  FLUSH PRIVILEGES;" >>"$LOG/mariadb.out" 2>&1 ||
        fail_with_log "could not create the database user for slurmdbd" "$LOG/mariadb.out"
}

# ---------------------------------------------------------------------------------------------------
# slurmdbd
# ---------------------------------------------------------------------------------------------------
DBD_PID="$RUN/slurmdbd.pid"

dbd_answers() {
    slurm_env sacctmgr -n -P list cluster format=cluster
}

start_slurmdbd() {
    local pid
    if pid="$(our_pid "$DBD_PID")"; then
        say "slurmdbd already running (pid $pid)"
        return 0
    fi
    check_port_free slurmdbd "$DBD_PORT"
    rm -f -- "$DBD_PID"
    say "starting slurmdbd (port $DBD_PORT)"
    start_daemon "$LOG/slurmdbd.out" slurmdbd ||
        fail_with_log "slurmdbd failed to start" "$LOG/slurmdbd.out" "$LOG/slurmdbd.log"
    if ! wait_until 60 dbd_answers; then
        dbd_answers >>"$LOG/sacctmgr.log" 2>&1 || true
        fail_with_log "slurmdbd did not answer sacctmgr" "$LOG/slurmdbd.log" "$LOG/sacctmgr.log"
    fi
    wait_for_pidfile 10 "$DBD_PID" || fail_with_log "slurmdbd wrote no pid file $DBD_PID" "$LOG/slurmdbd.log"
}

register_cluster() {
    local clusters
    clusters="$(slurm_env sacctmgr -n -P list cluster format=cluster 2>/dev/null || true)"
    if ! grep -qxF -- "$CLUSTER" <<<"$clusters"; then
        say "registering cluster '$CLUSTER' in slurmdbd"
        slurm_env sacctmgr -i add cluster "$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 ||
            fail_with_log "sacctmgr add cluster $CLUSTER failed" "$LOG/sacctmgr.log" "$LOG/slurmdbd.log"
    fi
}

# ---------------------------------------------------------------------------------------------------
# slurmctld
# ---------------------------------------------------------------------------------------------------
CTLD_PID="$RUN/slurmctld.pid"

ctld_answers() {
    local out
    out="$(slurm_env scontrol ping 2>/dev/null)" || return 1
    [[ "$out" == *"is UP"* ]]
}

start_slurmctld() {
    local pid
    if pid="$(our_pid "$CTLD_PID")"; then
        say "slurmctld already running (pid $pid)"
        return 0
    fi
    check_port_free slurmctld "$CTLD_PORT"
    rm -f -- "$CTLD_PID"
    say "starting slurmctld (port $CTLD_PORT)"
    start_daemon "$LOG/slurmctld.out" slurmctld -f "$SLURM_CONF_FILE" ||
        fail_with_log "slurmctld failed to start" "$LOG/slurmctld.out" "$LOG/slurmctld.log"
    wait_until 60 ctld_answers || fail_with_log "slurmctld did not answer 'scontrol ping'" "$LOG/slurmctld.log"
    wait_for_pidfile 10 "$CTLD_PID" || fail_with_log "slurmctld wrote no pid file $CTLD_PID" "$LOG/slurmctld.log"
}

# ---------------------------------------------------------------------------------------------------
# slurmd (one per node name)
# ---------------------------------------------------------------------------------------------------
slurmd_pidfile() { echo "$RUN/slurmd-$1.pid"; }

start_slurmd() { # index
    local i="$1" node pidfile pid
    node="${NODES[$i]}"
    pidfile="$(slurmd_pidfile "$node")"
    if pid="$(our_pid "$pidfile")"; then
        say "slurmd $node already running (pid $pid)"
        return 0
    fi
    check_port_free "slurmd $node" "$(node_port "$i")"
    rm -f -- "$pidfile"
    mkdir -p -- "$SPOOL/$node"
    say "starting slurmd $node (port $(node_port "$i"))"
    start_daemon "$LOG/slurmd-$node.out" slurmd -f "$SLURM_CONF_FILE" -N "$node" ||
        fail_with_log "slurmd $node failed to start" "$LOG/slurmd-$node.out" "$LOG/slurmd-$node.log"
    wait_for_pidfile 20 "$pidfile" ||
        fail_with_log "slurmd $node did not stay up" "$LOG/slurmd-$node.out" "$LOG/slurmd-$node.log"
}

node_state() { # node -- sinfo's long state, e.g. idle, mixed, down*, drained
    local out
    out="$(slurm_env sinfo -h -N -n "$1" -o '%T' 2>/dev/null)" || return 1
    echo "${out%%$'\n'*}"
}

wait_for_nodes() {
    local deadline=$((SECONDS + UP_TIMEOUT)) node state resumed=" "
    local -a pending
    say "waiting for ${NODES[*]} to be idle (up to ${UP_TIMEOUT}s)"
    while :; do
        pending=()
        for node in "${NODES[@]}"; do
            state="$(node_state "$node" || true)"
            case "$state" in
            idle | mixed | allocated | completing) ;;
            down | drained | draining | drain | fail | failing)
                # Responding (no '*') but held from an earlier run: give it back.
                if [[ "$resumed" != *" $node "* ]]; then
                    say "node $node is $state; resuming it"
                    slurm_env scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
                    resumed+="$node "
                fi
                pending+=("$node=$state")
                ;;
            *) pending+=("$node=${state:-unknown}") ;;
            esac
        done
        ((${#pending[@]} == 0)) && return 0
        if ((SECONDS >= deadline)); then
            slurm_env sinfo -R >&2 2>/dev/null || true
            for node in "${NODES[@]}"; do show_log_tail "$LOG/slurmd-$node.log"; done
            show_log_tail "$LOG/slurmctld.log"
            die "nodes not ready after ${UP_TIMEOUT}s (${pending[*]}); see $LOG/slurmd-<node>.log and $LOG/slurmctld.log"
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------
# name|pidfile pairs in start order.
daemon_table() {
    echo "munged|$MUNGED_PID"
    echo "mariadb|$DB_PID"
    echo "slurmdbd|$DBD_PID"
    echo "slurmctld|$CTLD_PID"
    local n
    for n in "${NODES[@]}"; do echo "slurmd-$n|$(slurmd_pidfile "$n")"; done
}

all_running() {
    local name pidfile
    while IFS='|' read -r name pidfile; do
        our_pid "$pidfile" >/dev/null || return 1
    done < <(daemon_table)
}

take_lock() {
    mkdir -p -- "$STATE"
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another local_slurm.sh holds $STATE/.lock"
}

validate_settings() {
    if [[ ! "$MAX_ARRAY_SIZE" =~ ^[0-9]+$ ]] || ((MAX_ARRAY_SIZE < 1)); then
        die "VLAUNCH_SLURM_MAX_ARRAY_SIZE must be a positive number, got '$MAX_ARRAY_SIZE'"
    fi
    [[ "$CLUSTER" =~ ^[a-z][a-z0-9_-]*$ ]] ||
        die "VLAUNCH_SLURM_CLUSTER must be lower case letters, digits, '-' or '_', got '$CLUSTER'"
    if [[ ! "$CRED_EXPIRE" =~ ^[0-9]+$ ]] || ((CRED_EXPIRE < 5)); then
        die "VLAUNCH_SLURM_CRED_EXPIRE must be a number of seconds >= 5 (Slurm's minimum), got '$CRED_EXPIRE'"
    fi
    [[ "$UP_TIMEOUT" =~ ^[0-9]+$ ]] || die "VLAUNCH_SLURM_UP_TIMEOUT must be a number of seconds, got '$UP_TIMEOUT'"
    # Unix socket paths are limited to 107 bytes.
    ((${#MUNGE_SOCK} < 100 && ${#DB_SOCK} < 100)) ||
        die "state dir path too long for unix sockets ($STATE); set VLAUNCH_SLURM_STATE to a shorter path"
}

check_ports() { # before starting anything: the ports of the daemons we are about to start are free
    our_pid "$DB_PID" >/dev/null || check_port_free mariadb "$DB_PORT"
    our_pid "$DBD_PID" >/dev/null || check_port_free slurmdbd "$DBD_PORT"
    our_pid "$CTLD_PID" >/dev/null || check_port_free slurmctld "$CTLD_PORT"
    local i
    for i in "${!NODES[@]}"; do
        our_pid "$(slurmd_pidfile "${NODES[$i]}")" >/dev/null || check_port_free "slurmd ${NODES[$i]}" "$(node_port "$i")"
    done
}

cmd_up() {
    validate_settings
    local t0=$SECONDS i
    take_lock
    if all_running; then
        say "cluster already running (state dir $STATE)"
        wait_for_nodes
        return 0
    fi
    install_packages
    say "state dir $STATE (ports $DB_PORT-$(node_port $((${#NODES[@]} - 1))))"
    check_ports
    make_dirs
    write_slurm_conf
    write_slurmdbd_conf
    start_munged
    start_mariadb
    start_slurmdbd
    register_cluster
    start_slurmctld
    for i in "${!NODES[@]}"; do start_slurmd "$i"; done
    wait_for_nodes
    local env_cmd="$0 env"
    [[ -z "${VLAUNCH_SLURM_STATE:-}" ]] || env_cmd="VLAUNCH_SLURM_STATE=$(printf '%q' "$STATE") $env_cmd"
    say "cluster '$CLUSTER' is up in $((SECONDS - t0))s; use it with: eval \"\$($env_cmd)\""
}

cancel_all_jobs() {
    our_pid "$CTLD_PID" >/dev/null || return 0
    local jobs
    jobs="$(slurm_env squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)"
    [[ -n "${jobs// /}" ]] || return 0
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086  # job ids are plain numbers
    slurm_env scancel $jobs >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 20))
    while [[ -n "$(slurm_env squeue -h -t running,completing -o '%A' 2>/dev/null || true)" ]]; do
        ((SECONDS < deadline)) || {
            warn "jobs still running after scancel"
            break
        }
        sleep 0.5
    done
}

holds_state_file() { # pid -- true if the process has a file of our state dir open (or lives in it)
    local pid="$1" fd target
    target="$(readlink "/proc/$pid/cwd" 2>/dev/null || true)"
    [[ "$target/" == "$STATE/"* ]] && return 0
    for fd in "/proc/$pid/fd/"*; do
        target="$(readlink "$fd" 2>/dev/null || true)"
        [[ "$target" == "$STATE/"* ]] && return 0
    done
    return 1
}

descendants() { # pid -- print all descendants of a process, children first
    local d stat ppid pid
    declare -A kids=()
    for d in /proc/[0-9]*; do
        stat="$(cat "$d/stat" 2>/dev/null)" || continue
        stat="${stat##*) }"
        ppid="$(awk '{print $2}' <<<"$stat")"
        kids[$ppid]+="${d#/proc/} "
    done
    local -a todo=("$1")
    while ((${#todo[@]})); do
        pid="${todo[0]}"
        todo=("${todo[@]:1}")
        for d in ${kids[$pid]:-}; do
            echo "$d"
            todo+=("$d")
        done
    done
}

kill_leftovers() {
    # Processes of this cluster that have no pid file: anything carrying our mark, and slurmstepd
    # processes (they overwrite their environment) whose slurmd died without cleaning up. A
    # slurmstepd takes its job's processes with it.
    local d pid comm kids
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        [[ "$pid" != "$$" && "$pid" != "$BASHPID" ]] || continue
        comm="$(cat "$d/comm" 2>/dev/null || true)"
        if [[ "$comm" == slurmstepd* ]] && holds_state_file "$pid"; then
            kids="$(descendants "$pid" | tr '\n' ' ')"
            kids="${kids% }"
            say "stopping leftover $comm (pid $pid) and its job processes (${kids:-none})"
            # shellcheck disable=SC2086  # pids are plain numbers
            kill -KILL "$pid" $kids 2>/dev/null || true
        elif grep -zqxF -- "$MARK" "$d/environ" 2>/dev/null; then
            say "stopping leftover $comm (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
}

cmd_down() {
    [[ -d "$STATE" ]] || {
        say "nothing to stop (no state dir $STATE)"
        return 0
    }
    take_lock
    cancel_all_jobs
    local n
    for n in "${NODES[@]}"; do stop_by_pidfile "slurmd $n" "$(slurmd_pidfile "$n")" 30; done
    stop_by_pidfile slurmctld "$CTLD_PID" 30
    stop_by_pidfile slurmdbd "$DBD_PID" 30
    stop_by_pidfile mariadb "$DB_PID" 60
    stop_by_pidfile munged "$MUNGED_PID" 15
    kill_leftovers
    say "cluster is down (state kept in $STATE)"
}

cmd_status() {
    local name pidfile pid all=0
    printf 'state dir: %s\n' "$STATE"
    while IFS='|' read -r name pidfile; do
        if pid="$(our_pid "$pidfile")"; then
            printf '  %-14s running  pid %s\n' "$name" "$pid"
        else
            printf '  %-14s stopped\n' "$name"
            all=3
        fi
    done < <(daemon_table)
    if our_pid "$CTLD_PID" >/dev/null; then
        echo
        slurm_env sinfo || all=3
    fi
    return "$all"
}

cmd_env() {
    printf 'export SLURM_CONF=%q\n' "$SLURM_CONF_FILE"
    printf 'export VLAUNCH_SLURM_STATE=%q\n' "$STATE"
}

usage() {
    cat <<EOF
Usage: $0 up|down|status|env|--help

A working Slurm cluster on this one machine, for the integration tests and for trying the launcher
without a real cluster. It is the real software (Debian's slurm-wlm, munge, MariaDB), not a mock:
sbatch, srun, job arrays, requeue and sacct behave as they do on a site cluster.

Commands
  up      Install what is missing with apt-get (slurmctld slurmd slurmdbd slurm-client munge
          mariadb-server mariadb-client; needs root the first time; a temporary policy-rc.d keeps
          the packages' own services from starting), then start, in this order: munged, MariaDB,
          slurmdbd (the cluster is registered with sacctmgr on first use), slurmctld and two slurmd
          daemons, node1 and node2, which share this machine's cores (${CPUS_PER_NODE} CPUs each). Returns
          once sinfo shows both nodes idle, or fails after ${UP_TIMEOUT}s naming the log to read. Running
          it on a cluster that is already up just says so. Nodes that an earlier run left down or
          drained are resumed, so that tests start from two idle nodes.
          Partitions: debug (the default) and long, both with node1 and node2.
  down    Cancel all jobs, then stop every daemon of this cluster through its pid file and wait for
          it to exit. Safe to run when nothing is running. State (job ids, accounting) is kept.
          Leftover slurmstepd processes of this cluster (their slurmd died) are killed too.
  status  One line per daemon (running with its pid, or stopped), then sinfo.
          Exit status 0 when everything runs, 3 otherwise.
  env     Print the exports a shell needs to use the cluster:  eval "\$($0 env)"

Nothing outside the state directory is written or read (apart from installing packages): the
cluster has its own slurm.conf (clients find it through SLURM_CONF), its own munged socket and key
(named in slurm.conf by AuthInfo=socket=...), its own MariaDB data dir and socket, its own ports,
pid files and logs. A system Slurm, munge or MySQL on the same machine is neither used nor stopped.
No systemctl, no /etc/slurm, no /etc/munge.

State directory: $STATE
  etc/        slurm.conf, slurmdbd.conf          log/    one log per daemon (read these on failure)
  run/        pid files                          spool/  slurmctld state, slurmd spool per node
  munge/      munge.key, munged.sock, seed       mariadb/ data dir, socket

Environment
  VLAUNCH_SLURM_STATE            state directory (default <repo>/.state/slurm)
  VLAUNCH_SLURM_PORT_BASE        first of the ports used (default 16810): +0 MariaDB, +1 slurmdbd,
                                 +2 slurmctld, +3 and +4 the slurmd of node1 and node2
  VLAUNCH_SLURM_MAX_ARRAY_SIZE   MaxArraySize (default 1001)
  VLAUNCH_SLURM_CLUSTER          ClusterName (default vlaunch)
  VLAUNCH_SLURM_UP_TIMEOUT       seconds 'up' waits for the nodes (default 90)
  VLAUNCH_SLURM_CRED_EXPIRE      AuthInfo cred_expire in seconds (default 10, at least 5); a requeued
                                 job becomes eligible again this many seconds (+1) after the requeue
EOF
}

main() {
    case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    "")
        usage >&2
        exit 2
        ;;
    *)
        printf '[local_slurm] error: unknown command %q; expected up, down, status, env or --help\n' "$1" >&2
        exit 2
        ;;
    esac
}

main "$@"
