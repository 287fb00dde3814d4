#!/usr/bin/env bash
# Frames/s benchmark of qpnet against DPDK's own vhost-user<->TAP bridge, and of qpnet's
# socket backends against its TAP backend, driven by a real vhost-user frontend (DPDK
# virtio-user in dpdk-testpmd, no VM needed).
#
# For every point (direction x frame size x queue pairs), run and backend, the script
# starts fresh processes in a network namespace it owns: the backend ("ref" = testpmd
# net_vhost + net_tap with io forwarding, "qpnet" = `qpnet run --tap`, or "qpnet-udp",
# "qpnet-unix", "qpnet-stream" = `qpnet run` with --udp, --unix-dgram, --stream), a testpmd
# virtio-user frontend on the backend's socket (txonly for guest->host, rxonly for
# host->guest) and the host side's far end: for a TAP, in host->guest, a testpmd AF_PACKET
# generator writing frames of many flows into the TAP; for a socket backend qpnet-sockpeer
# (tests/src/bin/qpnet-sockpeer/, socket-peer.sh), a sink counting what qpnet sends or a source sending.
# After a warm-up it counts frames at the receiving end over a fixed window:
#   guest->host  the TAP's rx_packets in the namespace (what the kernel got from the
#                backend), or the frames the sink read;
#   host->guest  virtio-user's RX-packets (what the guest side got), asked from testpmd;
# checks the sending end (frontend TX-packets and ring-full refusals, TAP tx_packets and
# tx_dropped, or the source's frames sent and qpnet's UDP receive-buffer drops), and reads
# utime+stime of every process (qpnet: primary plus its workers)
# from /proc, because 2 CPUs are shared by busy-polling testpmd processes and the backend:
# frames per backend CPU-second is the fair figure. By default the backend is confined to
# the last CPU and the drivers use the others. Prints per point the median of the runs,
# min..max and the ratios qpnet/ref and SOCKET/qpnet; --markdown FILE writes the same
# for BENCHMARKS.md.
# Everything it starts (processes, namespace, TAP, sockets, DPDK runtime dirs) is removed
# on exit. Run as root: scripts/bench/dpdk-bench.sh [--quick] [--help].
set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
readonly SCRIPT_DIR REPO_ROOT
# shellcheck source=scripts/bench/socket-peer.sh
. "$SCRIPT_DIR/socket-peer.sh"
readonly ORIG_ARGS="$*"

RUNS=3
DURATION=10
WARMUP=3
SIZES=64,1500
QUEUES=1,2
DIRECTIONS=g2t,t2g
BACKENDS=ref,qpnet
MARKDOWN=""
KEEP_LOGS=0
LAYOUT="split"
QUEUE_SIZE=1024
GEN_NICE=0
FE_NICE=0
MAX_OTHER_LOAD=0.5
RETRIES=2
MBUFS=16384
STARTUP_TIMEOUT=60

usage() {
  cat <<'EOF'
Usage: scripts/bench/dpdk-bench.sh [options]   (as root)

Frames/s guest->host and host->guest through qpnet (TAP or socket backends) and through
DPDK's vhost<->TAP bridge, driven by DPDK virtio-user. Prints a table per point and
backend: Mpps received (median, min..max), full % (share of the frames made that the
backend's full input refused; near 0: the sender set the rate; "-" where a flow-controlled
socket makes the source wait instead), CPU s/s of backend, frontend and peer (the
host->guest generator, or a socket backend's sink or source), Mframes per backend
CPU-second, received/sent %, CPU s/s used by other processes, runs; and the ratios
qpnet/ref and SOCKET/qpnet (each socket backend against qpnet's TAP backend).

  --runs N          runs per point and backend (default 3)
  --duration S      measured seconds per run (default 10)
  --warmup S        seconds of traffic before measuring (default 3)
  --sizes LIST      frame sizes in bytes, comma separated (default 64,1500)
  --queues LIST     queue pairs, comma separated (default 1,2)
  --directions LIST g2t (guest->host), t2g (host->guest) (default g2t,t2g)
  --backends LIST   ref (testpmd net_vhost+net_tap), qpnet (qpnet --tap), qpnet-udp
                    (--udp on 127.0.0.1), qpnet-unix (--unix-dgram), qpnet-stream (--stream
                    unix:PATH) (default ref,qpnet)
  --quick           1 run of 4 s after 2 s warm-up per point
  --layout L        split: the backend confined to the last CPU, frontend and peer
                    (generator, sink, source) on the others (default); shared: every
                    process may run on every CPU
  --queue-size N    virtio-user ring size (default 1024)
  --generator-nice N  nice value of the generator, sink or source (default 0)
  --frontend-nice N   nice value of the virtio-user frontend (default 0)
  --max-other-load X  redo a run when processes not started by this script used more
                    than X CPU s/s during its window (default 0.5; the machine is shared)
  --retries N       redo a run at most N times for that reason (default 2)
  --markdown FILE   also write the results as markdown to FILE
  --keep-logs       keep the work directory with all logs
  -h, --help        this text

Environment: QPNET_BIN (default target/release/qpnet, built if missing),
SOCKPEER_BIN (default target/release/qpnet-sockpeer, built if missing; socket backends),
DPDK_PMD_DIR (default: the pmds-* directory of the installed DPDK).
EOF
}

die() {
  printf 'dpdk-bench: error: %s\n' "$*" >&2
  exit 1
}

say() {
  printf '%s\n' "$*" >&2
}

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --runs) RUNS=${2:?--runs needs a value}; shift 2 ;;
      --duration) DURATION=${2:?--duration needs a value}; shift 2 ;;
      --warmup) WARMUP=${2:?--warmup needs a value}; shift 2 ;;
      --sizes) SIZES=${2:?--sizes needs a value}; shift 2 ;;
      --queues) QUEUES=${2:?--queues needs a value}; shift 2 ;;
      --directions) DIRECTIONS=${2:?--directions needs a value}; shift 2 ;;
      --backends) BACKENDS=${2:?--backends needs a value}; shift 2 ;;
      --quick) RUNS=1; DURATION=4; WARMUP=2; shift ;;
      --layout) LAYOUT=${2:?--layout needs split or shared}; shift 2 ;;
      --frontend-nice) FE_NICE=${2:?--frontend-nice needs a value}; shift 2 ;;
      --generator-nice) GEN_NICE=${2:?--generator-nice needs a value}; shift 2 ;;
      --queue-size) QUEUE_SIZE=${2:?--queue-size needs a value}; shift 2 ;;
      --max-other-load) MAX_OTHER_LOAD=${2:?--max-other-load needs a value}; shift 2 ;;
      --retries) RETRIES=${2:?--retries needs a value}; shift 2 ;;
      --markdown) MARKDOWN=${2:?--markdown needs a file}; shift 2 ;;
      --keep-logs) KEEP_LOGS=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) usage >&2; die "unknown option: $1" ;;
    esac
  done
  validate_list "$SIZES" '^[0-9]+$' sizes
  validate_list "$QUEUES" '^[1-8]$' queues
  validate_list "$DIRECTIONS" '^(g2t|t2g)$' directions
  validate_list "$BACKENDS" '^(ref|qpnet|qpnet-udp|qpnet-unix|qpnet-stream)$' backends
  [[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer"
  [[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "--duration must be a positive integer"
  [[ $WARMUP =~ ^[0-9]+$ ]] || die "--warmup must be an integer"
  [[ $GEN_NICE =~ ^[0-9]+$ ]] || die "--generator-nice must be 0..19"
  [[ $MAX_OTHER_LOAD =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--max-other-load must be a number"
  [[ $RETRIES =~ ^[0-9]+$ ]] || die "--retries must be an integer"
  [[ $FE_NICE =~ ^[0-9]+$ ]] || die "--frontend-nice must be 0..19"
  [[ $LAYOUT =~ ^(split|shared)$ ]] || die "--layout must be split or shared"
  [[ $QUEUE_SIZE =~ ^(64|128|256|512|1024|2048|4096)$ ]] || die "--queue-size must be a power of 2 in 64..4096"
  local size
  for size in ${SIZES//,/ }; do
    { [ "$size" -ge 60 ] && [ "$size" -le 1514 ]; } || die "frame size $size outside 60..1514"
  done
}

validate_list() {
  local list=$1 pattern=$2 what=$3 item
  for item in ${list//,/ }; do
    [[ $item =~ $pattern ]] || die "bad $what entry: '$item'"
  done
}

# ---------------------------------------------------------------------------------------
# Prerequisites

require_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (namespaces, TAPs, DPDK)"
}

install_testpmd_if_missing() {
  command -v dpdk-testpmd >/dev/null 2>&1 && return 0
  say "dpdk-testpmd missing: installing dpdk and dpdk-dev"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y dpdk dpdk-dev >&2; then
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y dpdk dpdk-dev >&2
  fi
  command -v dpdk-testpmd >/dev/null 2>&1 || die "dpdk-testpmd still missing after installing dpdk-dev"
}

find_pmd_dir() {
  if [ -n "${DPDK_PMD_DIR:-}" ]; then
    [ -d "$DPDK_PMD_DIR" ] || die "DPDK_PMD_DIR=$DPDK_PMD_DIR is not a directory"
    PMD_DIR=$DPDK_PMD_DIR
    return
  fi
  PMD_DIR=$(find /usr/lib /usr/local/lib -maxdepth 3 -type d -path '*dpdk/pmds-*' 2>/dev/null | sort | tail -n 1)
  [ -n "$PMD_DIR" ] || die "no DPDK pmds-* directory found; set DPDK_PMD_DIR"
  local pmd
  for pmd in net_vhost net_tap net_virtio net_af_packet; do
    compgen -G "$PMD_DIR/librte_${pmd}.so*" >/dev/null || die "DPDK PMD $pmd missing in $PMD_DIR"
  done
}

find_or_build_qpnet() {
  QPNET=${QPNET_BIN:-$REPO_ROOT/target/release/qpnet}
  if [ ! -x "$QPNET" ]; then
    [ -z "${QPNET_BIN:-}" ] || die "QPNET_BIN=$QPNET_BIN is not an executable"
    say "building qpnet: cargo build --release -p qpnet-primary"
    (cd "$REPO_ROOT" && cargo build --release -p qpnet-primary >&2) || die "cargo build of qpnet failed"
    [ -x "$QPNET" ] || die "cargo build did not produce $QPNET"
  fi
}

# All runs use one copy of the binary, taken at the start: a rebuild of target/release
# during the benchmark does not change what is measured (workers exec /proc/self/exe).
snapshot_qpnet_binary() {
  cp "$QPNET" "$WORK/qpnet"
  QPNET=$WORK/qpnet
  QPNET_SHA=$(sha256sum "$QPNET" | cut -c1-12)
}

# ---------------------------------------------------------------------------------------
# Resources: one namespace, one TAP name, one socket path, a work directory. Every process
# started is recorded with its start time so cleanup never signals a recycled pid.

setup_resources() {
  ID=$$
  NS=qpbench$ID
  TAP=qpbt$ID
  NAME=qpbench$ID
  PREFIX=qpb$ID
  WORK=$(mktemp -d /tmp/qpnet-bench.XXXXXX)
  SOCK=$WORK/vhost.sock
  PIDFILE=$WORK/pids
  RESULTS=$WORK/results.tsv
  : >"$PIDFILE"
  : >"$RESULTS"
  CLK_TCK=$(getconf CLK_TCK)
  NCPU=$(nproc)
  choose_cpu_layout
  ip netns add "$NS"
  NS_CREATED=1
  ip -n "$NS" link set lo up
  ip netns exec "$NS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
}

# split: the whole backend (testpmd with all its threads, or qpnet and its workers) confined
# to the last CPU, the frontend and the generator on the others, so both backends get the
# same single CPU and the busy-polling drivers do not take it. shared: every process floats
# over all CPUs.
choose_cpu_layout() {
  local last=$((NCPU - 1))
  if [ "$LAYOUT" = split ] && [ "$NCPU" -lt 2 ]; then
    die "--layout split needs at least 2 CPUs"
  fi
  if [ "$LAYOUT" = split ]; then
    BACKEND_CPUS=$last
    DRIVER_CPUS=$(cpu_range 0 $((last - 1)))
  else
    BACKEND_CPUS=$(cpu_range 0 "$last")
    DRIVER_CPUS=$BACKEND_CPUS
  fi
}

cpu_range() {
  if [ "$1" -eq "$2" ]; then echo "$1"; else echo "$1-$2"; fi
}

# DPDK --lcores value: main lcore 0 and forwarding lcore 1, both allowed on CPUS.
lcores_on() {
  local set=$1
  [[ $set == *-* ]] && set="($set)"
  echo "0@$set,1@$set"
}

proc_starttime() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  # Field 22 of /proc/PID/stat is field 20 after "pid (comm) ".
  awk '{print $20}' <<<"$stat"
}

register_pid() {
  local pid=$1 role=$2 start
  start=$(proc_starttime "$pid") || return 0
  printf '%s %s %s\n' "$pid" "$start" "$role" >>"$PIDFILE"
}

is_same_process() {
  local pid=$1 start=$2 now
  now=$(proc_starttime "$pid") || return 1
  [ "$now" = "$start" ]
}

# Stops every recorded process, the last started first (generator, frontend, backend), then
# any qpnet worker its primary left behind: SIGTERM, up to 5 s of grace, then SIGKILL.
stop_recorded_processes() {
  [ -n "${PIDFILE:-}" ] && [ -s "$PIDFILE" ] || return 0
  local pid start role
  record_children_of_qpnet
  while read -r pid start role; do
    stop_process "$pid" "$start" "$role"
  done < <(grep -v ' qpnet-worker$' "$PIDFILE" | tac)
  while read -r pid start role; do
    stop_process "$pid" "$start" "$role"
  done < <(grep ' qpnet-worker$' "$PIDFILE" || true)
  : >"$PIDFILE"
}

stop_process() {
  local pid=$1 start=$2 role=$3 i
  is_same_process "$pid" "$start" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    is_same_process "$pid" "$start" || return 0
    sleep 0.1
  done
  say "  $role (pid $pid) still running 5 s after SIGTERM: killing"
  kill -KILL "$pid" 2>/dev/null || true
}

# qpnet forks its workers: record them so they are stopped even if the primary dies first.
record_children_of_qpnet() {
  local pid start role child
  while read -r pid start role; do
    [[ $role == backend-qpnet* ]] || continue
    is_same_process "$pid" "$start" || continue
    for child in $(pgrep -P "$pid" || true); do
      grep -q "^$child " "$PIDFILE" || register_pid "$child" qpnet-worker
    done
  done < <(cat "$PIDFILE")
}

remove_run_leftovers() {
  if [ -n "${NS_CREATED:-}" ] && ip -n "$NS" link show "$TAP" >/dev/null 2>&1; then
    ip -n "$NS" link del "$TAP" 2>/dev/null || true
  fi
  rm -f "$SOCK"
  remove_peer_sockets
  rm -rf "/var/run/dpdk/$PREFIX-be" "/var/run/dpdk/$PREFIX-fe" "/var/run/dpdk/$PREFIX-gen"
  rm -rf "/run/qpnet/$NAME"
}

# Runs on exit (trap): stops the current run and everything recorded, removes what we made.
# shellcheck disable=SC2317
cleanup() {
  local rc=$?
  set +e
  if [ -n "${RUN_PID:-}" ]; then
    kill -TERM "$RUN_PID" 2>/dev/null
    wait "$RUN_PID" 2>/dev/null
  fi
  stop_recorded_processes
  if [ -n "${WORK:-}" ]; then
    remove_run_leftovers
  fi
  if [ -n "${NS_CREATED:-}" ]; then
    ip netns del "$NS" 2>/dev/null
  fi
  if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
    if [ "$KEEP_LOGS" -eq 1 ] || [ "$rc" -ne 0 ] || [ -n "${ANY_FAILURE:-}" ]; then
      say "logs kept in $WORK"
    else
      rm -rf "$WORK"
    fi
  fi
  exit "$rc"
}

# ---------------------------------------------------------------------------------------
# Processes. Every testpmd runs in the namespace with stdout line-buffered into a log and
# its stdin on a fifo it opens read-write itself, so stdin never reaches EOF (testpmd exits
# on EOF) and the script can write commands to the interactive frontend.

testpmd_eal_args() {
  local prefix=$1 mem=$2 cpus=$3
  printf '%s\n' --lcores "$(lcores_on "$cpus")" --no-huge -m "$mem" --no-pci --file-prefix="$prefix" -d "$PMD_DIR"
}

# start_in_ns ROLE LOG FIFO CMD...: starts CMD in the namespace, sets STARTED_PID.
start_in_ns() {
  local role=$1 log=$2 fifo=$3
  shift 3
  rm -f "$fifo"
  mkfifo "$fifo"
  # `ip netns exec` and stdbuf both exec: the pid is the benchmarked process itself.
  ip netns exec "$NS" stdbuf -oL "$@" 0<>"$fifo" >"$log" 2>&1 &
  STARTED_PID=$!
  register_pid "$STARTED_PID" "$role"
}

# wait_for WHAT PID LOG CHECK [ARGS...]: polls `CHECK ARGS...` until it succeeds; fails (with
# the end of LOG) when process PID exits first or after $STARTUP_TIMEOUT seconds.
wait_for() {
  local what=$1 pid=$2 log=$3 i
  shift 3
  for ((i = 0; i < STARTUP_TIMEOUT * 10; i++)); do
    "$@" && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      say "  $what: process $pid exited while waiting; last lines of $log:"
      tail -n 25 "$log" | sed 's/^/    | /' >&2
      return 1
    fi
    sleep 0.1
  done
  say "  $what: timed out after ${STARTUP_TIMEOUT}s; last lines of $log:"
  tail -n 25 "$log" | sed 's/^/    | /' >&2
  return 1
}

# Checks for wait_for (called through "$@").
# shellcheck disable=SC2317
socket_exists() {
  [ -S "$1" ]
}

# shellcheck disable=SC2317
log_contains() {
  grep -qF -- "$2" "$1"
}

# shellcheck disable=SC2317
tap_is_up() {
  ip -n "$NS" link show "$TAP" 2>/dev/null | grep -q '[<,]UP[,>]'
}

start_backend() {
  local backend=$1 qp=$2 log=$3
  if [ "$backend" = ref ]; then
    local -a eal
    mapfile -t eal < <(testpmd_eal_args "$PREFIX-be" 1024 "$BACKEND_CPUS")
    # taskset: EAL control threads (and the signal handling net_tap's O_ASYNC queues cause)
    # stay on the backend's CPUs too, like qpnet's primary and workers.
    start_in_ns backend-ref "$log" "$WORK/be.in" taskset -c "$BACKEND_CPUS" dpdk-testpmd "${eal[@]}" \
      --vdev "net_vhost0,iface=$SOCK,queues=$qp,tso=0" --vdev "net_tap0,iface=$TAP" -- \
      --no-mlockall --total-num-mbufs="$MBUFS" --forward-mode=io --rxq="$qp" --txq="$qp" \
      --nb-cores=1 -a
  else
    local -a host=(--tap "$TAP")
    if is_socket_backend "$backend"; then
      mapfile -t host < <(socket_backend_args "$backend" | head -n 2)
    fi
    start_in_ns "backend-$backend" "$log" "$WORK/be.in" taskset -c "$BACKEND_CPUS" "$QPNET" run --socket "$SOCK" \
      "${host[@]}" --queue-pairs "$qp" --name "$NAME"
  fi
  BACKEND_PID=$STARTED_PID
  wait_for "backend $backend" "$BACKEND_PID" "$log" socket_exists "$SOCK" || return 1
}

start_frontend() {
  local direction=$1 size=$2 qp=$3 log=$4
  local -a eal mode
  mapfile -t eal < <(testpmd_eal_args "$PREFIX-fe" 1024 "$DRIVER_CPUS")
  if [ "$direction" = g2t ]; then
    mode=(--forward-mode=txonly --txpkts="$size")
  else
    mode=(--forward-mode=rxonly)
  fi
  FE_FIFO=$WORK/fe.in
  start_in_ns frontend "$log" "$FE_FIFO" nice -n "$FE_NICE" dpdk-testpmd "${eal[@]}" \
    --vdev "net_virtio_user0,path=$SOCK,queues=$qp,queue_size=$QUEUE_SIZE" -- \
    -i -a --no-mlockall --total-num-mbufs="$MBUFS" --rxq="$qp" --txq="$qp" --nb-cores=1 "${mode[@]}"
  FRONTEND_PID=$STARTED_PID
  FE_LOG=$log
  wait_for frontend "$FRONTEND_PID" "$log" log_contains "$log" "testpmd> " || return 1
}

# TAP->guest traffic: AF_PACKET on the TAP netdev; --txonly-multi-flow varies the IPv4
# source address per frame so the TAP's flow hash spreads frames over its queues.
start_generator() {
  local size=$1 log=$2
  local -a eal
  wait_for "TAP $TAP up" "$BACKEND_PID" "$WORK/backend-current.log" tap_is_up || return 1
  mapfile -t eal < <(testpmd_eal_args "$PREFIX-gen" 512 "$DRIVER_CPUS")
  start_in_ns generator "$log" "$WORK/gen.in" nice -n "$GEN_NICE" dpdk-testpmd "${eal[@]}" \
    --vdev "net_af_packet0,iface=$TAP,qpairs=1,qdisc_bypass=1" -- \
    --no-mlockall --total-num-mbufs=8192 --forward-mode=txonly --txpkts="$size" \
    --txonly-multi-flow --nb-cores=1 -a
  PEER_PID=$STARTED_PID
  wait_for generator "$PEER_PID" "$log" log_contains "$log" "Press enter to exit" || return 1
}

# ---------------------------------------------------------------------------------------
# Counters

# CPU ticks (utime+stime, all threads) of a process, plus its children when asked.
cpu_ticks() {
  local pid=$1 with_children=${2:-0} total=0 stat child
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) }
  total=$(awk '{print $12 + $13}' <<<"$stat")
  if [ "$with_children" -eq 1 ]; then
    for child in $(pgrep -P "$pid" || true); do
      total=$((total + $(cpu_ticks "$child" 1)))
    done
  fi
  echo "$total"
}

# Idle plus iowait ticks of all CPUs. Busy time is derived from idle time: the kernel
# measures idle periods exactly, while user/system ticks are samples that miss or double
# count short runs of processes that sleep and wake often.
machine_idle_ticks() {
  awk '/^cpu /{print $5 + $6; exit}' /proc/stat
}

# From the frontend log: the number of completed "show fwd stats all" blocks, the RX and TX
# packet counters of the last "show port stats 0" and the TX-dropped of the last forward
# statistics of port 0 (frames txonly made but the full ring refused: backpressure).
frontend_stats_from_log() {
  awk '/NIC statistics for port 0/ {inport = 1}
       inport && /RX-packets:/ {rx = $2}
       inport && /TX-packets:/ {tx = $2; inport = 0}
       /Forward statistics for port 0/ {infwd = 1}
       infwd && /TX-dropped:/ {n++; last_rx = rx; last_tx = tx; last_drop = $4; infwd = 0}
       END {print n + 0, last_rx + 0, last_tx + 0, last_drop + 0}' "$FE_LOG"
}

# Prints "rx tx tx_dropped" of the frontend's port, asked from testpmd now.
read_frontend_counters() {
  local before after i
  before=$(frontend_stats_from_log | awk '{print $1}')
  printf 'show port stats 0\nshow fwd stats all\n' >"$FE_FIFO"
  for ((i = 0; i < 100; i++)); do
    after=$(frontend_stats_from_log)
    if [ "${after%% *}" -gt "$before" ]; then
      echo "${after#* }"
      return 0
    fi
    sleep 0.05
  done
  say "  frontend did not answer 'show port stats 0'"
  return 1
}

# Per-queue packet counters of the frontend (virtio xstats rx_qN_good_packets, tx_qN_good_packets), to
# show that frames used every queue pair.
log_frontend_queue_spread() {
  local before i
  before=$(grep -c 'NIC extended statistics for port 0' "$FE_LOG" || true)
  printf 'show port xstats 0\n' >"$FE_FIFO"
  for ((i = 0; i < 40; i++)); do
    sleep 0.05
    [ "$(grep -c 'NIC extended statistics for port 0' "$FE_LOG" || true)" -gt "$before" ] && break
  done
  sleep 0.2
  awk '/NIC extended statistics for port 0/ {delete rx; delete tx; n = 0}
       /^ *rx_q[0-9]+_good_packets:/ {split($1, a, "_"); rx[a[2]] = $2; q = substr(a[2], 2) + 1; if (q > n) n = q}
       /^ *tx_q[0-9]+_good_packets:/ {split($1, a, "_"); tx[a[2]] = $2}
       END {
         r = ""; t = ""
         for (q = 0; q < n; q++) { r = r " q" q "=" rx["q" q] + 0; t = t " q" q "=" tx["q" q] + 0 }
         print "  frontend per queue (since start): rx" r ", tx" t
       }' "$FE_LOG" >&2
}

read_tap_counters() {
  ip netns exec "$NS" sh -c "cd /sys/class/net/$TAP/statistics && cat rx_packets tx_packets tx_dropped" | paste -sd' '
}

# One snapshot: "time fe_rx fe_tx fe_txdrop host_rx host_tx host_txdrop be_ticks fe_ticks
# peer_ticks idle peer_waits"; host_* are the TAP's rx_packets, tx_packets, tx_dropped, or
# a socket backend's equivalents (read_host_counters).
take_snapshot() {
  local backend=$1 fe host t be fe_cpu peer_cpu=0 idle
  fe=$(read_frontend_counters) || return 1
  t=$EPOCHREALTIME
  host=$(read_host_counters "$backend") || { say "  cannot read the host side's counters"; return 1; }
  if is_qpnet "$backend"; then
    be=$(cpu_ticks "$BACKEND_PID" 1)
  else
    be=$(cpu_ticks "$BACKEND_PID")
  fi
  fe_cpu=$(cpu_ticks "$FRONTEND_PID")
  [ -n "${PEER_PID:-}" ] && peer_cpu=$(cpu_ticks "$PEER_PID")
  idle=$(machine_idle_ticks)
  echo "$t $fe ${host% *} $be $fe_cpu $peer_cpu $idle ${host##* }"
}

worker_set() {
  pgrep -P "$BACKEND_PID" 2>/dev/null | sort | paste -sd,
}

check_alive() {
  local what=$1 pid=$2 log=$3
  if ! kill -0 "$pid" 2>/dev/null; then
    say "  $what (pid $pid) died during the run; last lines of $log:"
    tail -n 25 "$log" | sed 's/^/    | /' >&2
    return 1
  fi
}

# ---------------------------------------------------------------------------------------
# One run of one point with one backend. Appends a line to $RESULTS:
# direction size qp backend run pps be_cpu fe_cpu gen_cpu sent received drops other_cpu
# full_percent, over the window. sent: frames the backend took in (frontend TX-packets, or
# TAP tx_packets); received: frames at the receiving end; drops: frames the sender made but
# the backend's input refused (virtio ring full, or TAP queue full); full_percent = share of
# the frames made that were refused: near 0 means the sender, not the backend, set the rate.

run_once() {
  local direction=$1 size=$2 qp=$3 backend=$4 run=$5
  local tag="${direction}-${size}-q${qp}-${backend}-r${run}"
  local be_log=$WORK/$tag.backend.log fe_log=$WORK/$tag.frontend.log peer_log=$WORK/$tag.peer.log
  local s0 s1 workers0 workers1 socket=""
  PEER_PID=""
  is_socket_backend "$backend" && socket=1
  ln -sf "$be_log" "$WORK/backend-current.log"
  [ -z "$socket" ] || start_peer "$direction" "$size" "$qp" "$backend" "$peer_log"
  start_backend "$backend" "$qp" "$be_log"
  start_frontend "$direction" "$size" "$qp" "$fe_log"
  if [ "$direction" = t2g ]; then
    if [ -n "$socket" ]; then start_peer_source; else start_generator "$size" "$peer_log"; fi
  fi
  sleep "$WARMUP"
  if is_qpnet "$backend"; then
    workers0=$(worker_set)
    record_children_of_qpnet
  fi
  s0=$(take_snapshot "$backend")
  sleep "$DURATION"
  s1=$(take_snapshot "$backend")
  log_frontend_queue_spread || true
  [ -z "$socket" ] || log_peer_queue_spread
  is_qpnet "$backend" && workers1=$(worker_set)
  check_alive "backend $backend" "$BACKEND_PID" "$be_log"
  check_alive frontend "$FRONTEND_PID" "$fe_log"
  [ -z "$PEER_PID" ] || check_alive peer "$PEER_PID" "$peer_log"
  if [ -n "$socket" ] && [ "$direction" = t2g ]; then
    say "  source waited for room $(awk -v a="$s0" -v b="$s1" 'BEGIN {split(a, x, " "); split(b, y, " "); print y[12] - x[12]}') times (qpnet's socket full)"
  fi
  if is_qpnet "$backend"; then
    [ "$workers0" = "$workers1" ] || say "  warning: qpnet workers changed during the window ($workers0 -> $workers1): CPU figure incomplete"
    "$QPNET" stats --name "$NAME" >"$WORK/$tag.qpnet-stats.txt" 2>&1 || true
  fi
  compute_run "$direction" "$size" "$qp" "$backend" "$run" "$s0" "$s1"
}

compute_run() {
  local direction=$1 size=$2 qp=$3 backend=$4 run=$5 s0=$6 s1=$7 line
  line=$(awk -v dir="$direction" -v size="$size" -v qp="$qp" -v be="$backend" -v run="$run" \
    -v hz="$CLK_TCK" -v ncpu="$NCPU" -v s0="$s0" -v s1="$s1" 'BEGIN {
      split(s0, a, " "); split(s1, b, " ")
      dt = b[1] - a[1]
      fe_rx = b[2] - a[2]; fe_tx = b[3] - a[3]; fe_drop = b[4] - a[4]
      tap_rx = b[5] - a[5]; tap_tx = b[6] - a[6]; tap_drop = b[7] - a[7]
      be_cpu = (b[8] - a[8]) / hz / dt; fe_cpu = (b[9] - a[9]) / hz / dt
      gen_cpu = (b[10] - a[10]) / hz / dt; busy = ncpu - (b[11] - a[11]) / hz / dt
      other = busy - be_cpu - fe_cpu - gen_cpu
      # sent: frames the backend took in; drops: frames offered that it did not take.
      if (dir == "g2t") { sent = fe_tx; received = tap_rx; drops = fe_drop }
      else { sent = tap_tx; received = fe_rx; drops = tap_drop }
      full = (sent + drops > 0) ? 100 * drops / (sent + drops) : 0
      printf "%s\t%s\t%s\t%s\t%s\t%.0f\t%.3f\t%.3f\t%.3f\t%.0f\t%.0f\t%.0f\t%.3f\t%.1f\n",
        dir, size, qp, be, run, received / dt, be_cpu, fe_cpu, gen_cpu, sent, received, drops, other, full
    }')
  local received sent
  received=$(cut -f11 <<<"$line")
  sent=$(cut -f10 <<<"$line")
  if [ "$received" -le 0 ]; then
    say "  no frames arrived at the receiving end (sent $sent): run failed"
    return 1
  fi
  printf '%s\n' "$line" >>"$RESULTS"
  awk -F'\t' -v dir="$direction" '{
    printf "  %.3f Mpps  backend %.2f CPU s/s  frontend %.2f  peer %.2f  other load %.2f  received/sent %.0f/%.0f (%.1f%%)",
      $6 / 1e6, $7, $8, $9, $13, $11, $10, ($10 > 0 ? 100 * $11 / $10 : 0)
    printf "  refused by full %s: %.0f (%.1f%%)", (dir == "t2g" ? "TAP queue or UDP socket" : "virtio ring"), $12, $14
    printf "\n" }' <<<"$line" >&2
}

# One run with fresh processes; redone (up to $RETRIES times) when other processes on the
# machine took more than $MAX_OTHER_LOAD CPU s/s during the window.
run_point_once() {
  local direction=$1 size=$2 qp=$3 backend=$4 run=$5 attempt rc other
  for ((attempt = 0; attempt <= RETRIES; attempt++)); do
    say "[$(direction_label "$direction") ${size} B, ${qp} qp, $backend, run $run/$RUNS$([ "$attempt" -eq 0 ] || echo ", retry $attempt")]"
    wait_for_quiet_machine
    # In the background so that `wait` returns at once on SIGINT/SIGTERM and cleanup runs.
    set +e
    (
      set -euo pipefail
      run_once "$direction" "$size" "$qp" "$backend" "$run"
    ) &
    RUN_PID=$!
    wait "$RUN_PID"
    rc=$?
    RUN_PID=""
    set -e
    stop_recorded_processes
    remove_run_leftovers
    if [ "$rc" -ne 0 ]; then
      ANY_FAILURE=1
      printf '%s\t%s\t%s\t%s\t%s\tFAIL\n' "$direction" "$size" "$qp" "$backend" "$run" >>"$RESULTS"
      return 0
    fi
    other=$(tail -n 1 "$RESULTS" | cut -f13)
    if awk -v o="$other" -v m="$MAX_OTHER_LOAD" 'BEGIN {exit !(o <= m)}'; then
      return 0
    fi
    if [ "$attempt" -lt "$RETRIES" ]; then
      say "  other processes used $other CPU s/s (> $MAX_OTHER_LOAD): run redone"
      sed -i '$d' "$RESULTS"
    else
      say "  other processes used $other CPU s/s (> $MAX_OTHER_LOAD): kept after $RETRIES retries"
    fi
  done
}

# Waits (at most 120 s) until the CPUs were busy less than $MAX_OTHER_LOAD CPU s/s over 2 s:
# nothing of ours runs between runs, so that is the load of the other users of the machine.
wait_for_quiet_machine() {
  local waited=0 b0 b1 load
  while [ "$waited" -lt 120 ]; do
    b0=$(machine_idle_ticks)
    sleep 2
    b1=$(machine_idle_ticks)
    load=$(awk -v a="$b0" -v b="$b1" -v hz="$CLK_TCK" -v n="$NCPU" 'BEGIN {printf "%.2f", n - (b - a) / hz / 2}')
    if awk -v l="$load" -v m="$MAX_OTHER_LOAD" 'BEGIN {exit !(l <= m)}'; then
      [ "$waited" -eq 0 ] || say "  machine quiet after ${waited}s"
      return 0
    fi
    [ "$waited" -eq 0 ] && say "  machine busy ($load CPU s/s used by others): waiting up to 120 s"
    waited=$((waited + 2))
  done
  say "  machine still busy after 120 s: running anyway"
}

direction_label() {
  if [ "$1" = g2t ]; then echo "guest->host"; else echo "host->guest"; fi
}

# ---------------------------------------------------------------------------------------
# Report: medians per point and backend, min..max, and the ratios qpnet/ref and
# SOCKET/qpnet (a socket backend against qpnet's TAP backend).

# One line per point and backend, tab separated: direction size qp backend, then either
# "FAIL failed_runs" or: mpps min max full_percent be_cpu mpps_per_be_cpu fe_cpu gen_cpu
# received_percent other_cpu runs failed_runs (medians over the runs that succeeded).
summarize() {
  awk -F'\t' '
    function median(list,    n, v, i, j, t) {
      n = split(list, v, " ")
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
      return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    function extreme(list, sign,    n, v, i, m) {
      n = split(list, v, " "); m = v[1]
      for (i = 2; i <= n; i++) if (sign * (v[i] - m) > 0) m = v[i]
      return m
    }
    function add(name, value) { acc[name, key] = acc[name, key] " " value }
    {
      key = $1 SUBSEP $2 SUBSEP $3 SUBSEP $4
      if (!(key in seen)) { seen[key] = 1; order[++nkeys] = key }
      if ($6 == "FAIL") { fails[key]++; next }
      add("pps", $6); add("full", $14); add("be", $7); add("fe", $8); add("gen", $9)
      add("per", $7 > 0 ? $6 / $7 : 0); add("recv", $10 > 0 ? 100 * $11 / $10 : 0); add("other", $13)
      runs[key]++
    }
    END {
      for (k = 1; k <= nkeys; k++) {
        key = order[k]
        if (runs[key] == 0) { printf "%s\tFAIL\t%d\n", key, fails[key]; continue }
        printf "%s\t%.3f\t%.3f\t%.3f\t%.3f\t%.2f\t%.3f\t%.2f\t%.2f\t%.1f\t%.2f\t%d\t%d\n", key,
          median(acc["pps", key]) / 1e6, extreme(acc["pps", key], -1) / 1e6, extreme(acc["pps", key], 1) / 1e6,
          median(acc["full", key]), median(acc["be", key]), median(acc["per", key]) / 1e6,
          median(acc["fe", key]), median(acc["gen", key]), median(acc["recv", key]),
          median(acc["other", key]), runs[key], fails[key]
      }
    }' SUBSEP=$'\t' "$RESULTS"
}

# Prints the summary as a text table (FORMAT text) or a markdown table (FORMAT md), with
# ratio rows after each point: qpnet/ref, and each socket backend over qpnet (TAP).
print_table() {
  local summary=$1 format=$2
  awk -F'\t' -v fmt="$format" '
    function label(d) { return d == "g2t" ? "guest->host" : "host->guest" }
    function row(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14) {
      if (fmt == "md")
        printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
          c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14
      else
        printf "%-11s %6s %3s %-18s %7s %13s %7s %6s %11s %6s %8s %6s %6s %s\n",
          c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14
    }
    function ratio1(p, a, b,    c) {
      if (!((p, a) in mpps) || !((p, b) in mpps) || mpps[p, b] == 0 || per[p, b] == 0) return
      split(p, c, SUBSEP)
      row(label(c[1]), c[2] " B", c[3], a "/" b, sprintf("x%.2f", mpps[p, a] / mpps[p, b]), "", "", "", \
        sprintf("x%.2f", per[p, a] / per[p, b]), "", "", "", "", "")
    }
    function ratio(p) {
      ratio1(p, "qpnet", "ref")
      ratio1(p, "qpnet-udp", "qpnet"); ratio1(p, "qpnet-unix", "qpnet"); ratio1(p, "qpnet-stream", "qpnet")
    }
    BEGIN {
      row("direction", "frame", "qp", "backend", "Mpps", "min..max", "full %", "be CPU", "Mfr/be CPU-s", \
        "fe CPU", "peer CPU", "recv %", "other", "runs")
      if (fmt == "md") print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    }
    {
      point = $1 SUBSEP $2 SUBSEP $3
      if (point != last && last != "") ratio(last)
      last = point
      if ($5 == "FAIL") {
        row(label($1), $2 " B", $3, $4, "FAILED", "", "", "", "", "", "", "", "", $6 " failed")
        next
      }
      mpps[point, $4] = $5; per[point, $4] = $10
      socket = ($4 ~ /^qpnet-/); waits = ($1 == "t2g" && ($4 == "qpnet-unix" || $4 == "qpnet-stream"))
      row(label($1), $2 " B", $3, $4, sprintf("%.3f", $5), sprintf("%.3f..%.3f", $6, $7), waits ? "-" : sprintf("%.1f", $8), \
        sprintf("%.2f", $9), sprintf("%.3f", $10), sprintf("%.2f", $11), ($1 == "t2g" || socket) ? sprintf("%.2f", $12) : "-", \
        sprintf("%.1f", $13), sprintf("%.2f", $14), $15 ($16 > 0 ? " (+" $16 " failed)" : ""))
    }
    END { if (last != "") ratio(last) }' SUBSEP=$'\t' <<<"$summary"
}

machine_description() {
  local cpu kernel dpdk
  cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
  kernel=$(uname -r)
  dpdk=$(dpkg-query -W -f='${Version}' dpdk 2>/dev/null || echo unknown)
  printf '%s CPUs (%s), kernel %s, DPDK %s' "$(nproc)" "$cpu" "$kernel" "$dpdk"
}

qpnet_revision() {
  local rev
  rev=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null) || { echo unknown; return; }
  if [ -n "$(git -C "$REPO_ROOT" status --porcelain 2>/dev/null)" ]; then
    rev="$rev (work tree modified)"
  fi
  echo "$rev"
}

write_markdown() {
  local file=$1 summary=$2
  {
    printf '#### Run of %s (%s to %s UTC)\n\n' "${START_TIME% *}" "${START_TIME#* }" "$(date -u '+%H:%M')"
    printf -- '- Command: %sscripts/bench/dpdk-bench.sh%s%s\n' '`' "${ORIG_ARGS:+ $ORIG_ARGS}" '`'
    printf -- '- Machine: %s\n' "$(machine_description)"
    printf -- '- qpnet revision: %s, binary sha256 %s\n' "$(qpnet_revision)" "${QPNET_SHA:-not used}"
    printf -- '- %s run(s) per point and backend, %s s measured after %s s warm-up; median, min..max over runs.\n' \
      "$RUNS" "$DURATION" "$WARMUP"
    printf -- '- CPU layout %s: backend on CPU %s, frontend and generator/sink/source on CPU %s; virtio-user ring size %s.\n\n' \
      "$LAYOUT" "$BACKEND_CPUS" "$DRIVER_CPUS" "$QUEUE_SIZE"
    print_table "$summary" md
  } >"$file"
  say "markdown written to $file"
}

main() {
  parse_args "$@"
  START_TIME=$(date -u '+%Y-%m-%d %H:%M')
  require_root
  install_testpmd_if_missing
  find_pmd_dir
  [[ ,$BACKENDS, == *,qpnet* ]] && find_or_build_qpnet
  [[ ,$BACKENDS, == *,qpnet-* ]] && find_or_build_sockpeer
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  setup_resources
  [[ ,$BACKENDS, == *,qpnet* ]] && snapshot_qpnet_binary
  [[ ,$BACKENDS, == *,qpnet-* ]] && snapshot_sockpeer_binary
  say "namespace $NS, TAP $TAP, work dir $WORK, $(machine_description)"
  say "CPU layout $LAYOUT: backend on CPU $BACKEND_CPUS, frontend and generator/sink/source on CPU $DRIVER_CPUS"
  local direction size qp run backend summary
  for direction in ${DIRECTIONS//,/ }; do
    for size in ${SIZES//,/ }; do
      for qp in ${QUEUES//,/ }; do
        for ((run = 1; run <= RUNS; run++)); do
          for backend in ${BACKENDS//,/ }; do
            run_point_once "$direction" "$size" "$qp" "$backend" "$run"
          done
        done
      done
    done
  done
  summary=$(summarize)
  printf '\n'
  print_table "$summary" text
  [ -z "$MARKDOWN" ] || write_markdown "$MARKDOWN" "$summary"
  [ -z "${ANY_FAILURE:-}" ] || die "some runs failed (FAILED rows above); their logs are kept"
}

main "$@"; exit
