# Sourced by dpdk-bench.sh: qpnet's socket backends (qpnet-udp, qpnet-unix, qpnet-stream)
# and their far end, qpnet-sockpeer (tests/src/bin/qpnet-sockpeer/): a sink counting the frames qpnet sends
# (guest->host) or a source writing frames toward qpnet as fast as it takes them
# (host->guest). The peer takes the place of the TAP and, for host->guest, of the
# generator: it runs on the frontend's CPUs and its CPU is the "peer CPU" column.
# shellcheck shell=bash

# Addresses inside the benchmark's namespace (loopback only).
readonly UDP_QPNET=127.0.0.1:15000 UDP_PEER=127.0.0.1:16000

is_qpnet() {
  [[ $1 == qpnet* ]]
}

is_socket_backend() {
  [[ $1 == qpnet-* ]]
}

find_or_build_sockpeer() {
  SOCKPEER=${SOCKPEER_BIN:-$REPO_ROOT/target/release/qpnet-sockpeer}
  if [ ! -x "$SOCKPEER" ]; then
    [ -z "${SOCKPEER_BIN:-}" ] || die "SOCKPEER_BIN=$SOCKPEER_BIN is not an executable"
    say "building qpnet-sockpeer: cargo build --release -p qpnet-tests --bin qpnet-sockpeer"
    (cd "$REPO_ROOT" && cargo build --release -p qpnet-tests --bin qpnet-sockpeer >&2) || die "cargo build of qpnet-sockpeer failed"
    [ -x "$SOCKPEER" ] || die "cargo build did not produce $SOCKPEER"
  fi
}

snapshot_sockpeer_binary() {
  cp "$SOCKPEER" "$WORK/qpnet-sockpeer"
  SOCKPEER=$WORK/qpnet-sockpeer
}

# The host side given to qpnet, and the same value for the peer, one word per line:
# qpnet's option, its value, the peer's option.
socket_backend_args() {
  case "$1" in
    qpnet-udp) printf '%s\n' --udp "$UDP_QPNET,$UDP_PEER" --qpnet-udp ;;
    qpnet-unix) printf '%s\n' --unix-dgram "$WORK/qpnet-dgram.sock,$WORK/peer-dgram.sock" --qpnet-unix-dgram ;;
    qpnet-stream) printf '%s\n' --stream "unix:$WORK/stream.sock" --qpnet-stream ;;
    *) die "not a socket backend: $1" ;;
  esac
}

# Sockets the peer bound or listened on (qpnet removes its own at exit).
remove_peer_sockets() {
  rm -f "$WORK"/peer-dgram.sock* "$WORK"/stream.sock* "$WORK"/qpnet-dgram.sock*
}

# start_peer DIRECTION SIZE QP BACKEND LOG: the sink (g2t) or the source (t2g), started
# before qpnet (a unix datagram peer must be bound first, a stream peer listening) and
# ready when it says so. Sets PEER_PID.
start_peer() {
  local direction=$1 size=$2 qp=$3 backend=$4 log=$5
  local -a args mode
  mapfile -t args < <(socket_backend_args "$backend")
  if [ "$direction" = g2t ]; then
    mode=(sink)
    PEER_SINK=1
  else
    mode=(source --size "$size")
    PEER_SINK=""
  fi
  start_in_ns "peer-$backend" "$log" "$WORK/peer.in" taskset -c "$DRIVER_CPUS" nice -n "$GEN_NICE" \
    "$SOCKPEER" "${mode[@]}" "${args[2]}" "${args[1]}" --queue-pairs "$qp"
  PEER_PID=$STARTED_PID
  PEER_LOG=$log
  wait_for "peer ${mode[0]}" "$PEER_PID" "$log" log_contains "$log" "ready" || return 1
}

# The source starts sending (where the TAP reference starts its generator).
start_peer_source() {
  kill -USR2 "$PEER_PID"
}

# Prints "frames waits" of the peer, asked now (SIGUSR1; it prints a stats line).
read_peer_counters() {
  local before i
  before=$(grep -c '^stats ' "$PEER_LOG" || true)
  kill -USR1 "$PEER_PID" 2>/dev/null || { say "  peer (pid $PEER_PID) is gone"; return 1; }
  for ((i = 0; i < 100; i++)); do
    if [ "$(grep -c '^stats ' "$PEER_LOG" || true)" -gt "$before" ]; then
      awk '/^stats / {f = $4; w = $8} END {print f, w}' "$PEER_LOG"
      return 0
    fi
    sleep 0.01
  done
  say "  peer did not answer SIGUSR1"
  return 1
}

# Datagrams the kernel dropped at a full UDP receive buffer in the namespace (RcvbufErrors
# of /proc/net/snmp): the sink's in guest->host, qpnet's in host->guest.
read_udp_rcvbuf_errors() {
  ip netns exec "$NS" cat /proc/net/snmp | awk '/^Udp:/ { if (!n++) { for (i = 2; i <= NF; i++) if ($i == "RcvbufErrors") c = i }
    else { print $c + 0; exit } }'
}

# The host side's "received sent refused waits", the TAP's fields for a TAP backend: frames
# the host side got from qpnet, frames it offered qpnet (taken), frames lost because qpnet's
# input was full, and times the source waited for room (socket backends only).
read_host_counters() {
  local backend=$1 peer drops
  if ! is_socket_backend "$backend"; then
    read_tap_counters | awk '{print $0, 0}'
    return
  fi
  peer=$(read_peer_counters) || return 1
  drops=$(read_udp_rcvbuf_errors)
  awk -v p="$peer" -v d="$drops" -v sink="$PEER_SINK" 'BEGIN {
    split(p, a, " ")
    # host->guest: what reached qpnet is what the source sent less what the full UDP
    # socket of qpnet dropped, as tx_packets of a TAP leaves out its tx_dropped.
    if (sink) print a[1], 0, 0, a[2]; else print 0, a[1] - d, d, a[2] }'
}

# The peer's per-queue frames (since start), to show that every queue pair carried frames.
log_peer_queue_spread() {
  awk '/^stats / {line = $0} END {
    n = split(line, f, " "); s = ""
    for (i = 11; i < n; i += 2) s = s " " f[i] "=" f[i + 1]
    print "  peer per queue (since start):" s }' "$PEER_LOG" >&2
}
