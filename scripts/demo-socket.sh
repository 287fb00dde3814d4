#!/usr/bin/env bash
# demo-socket.sh: the socket-backend demo of `scripts/run.sh --demo-socket`
# (run.sh installs what is missing and builds qpnet first).
#
# usage: sudo scripts/demo-socket.sh QPNET_BINARY [NAME] [MORE-RUN-OPTIONS...]
#
# No TAP anywhere, and qpnet without privilege. Everything lives in a
# network namespace "qpnet-demo-socket" (only its loopback; removed at the
# end):
#   qpnet    user nobody (setpriv, no capability), 2 queue pairs,
#            --udp 127.0.0.1:5000,127.0.0.1:6000 --single-peer: queue pair
#            K binds 127.0.0.1:5000+K and sends to 127.0.0.1:6000
#   guest B  QEMU's own -netdev dgram: one UDP socket on 127.0.0.1:6000
#            sending to 5000 (queue pair 0); 10.77.0.3, runs an iperf3
#            server and pings A
#   guest A  virtio-net over vhost-user from qpnet, 2 queue pairs
#            (mq=on); 10.77.0.2, pings B and runs iperf3 both ways
#            against B
# Guest B receives from both of qpnet's sockets (its socket is not
# connected); what B sends goes to queue pair 0, so A receives on queue 0
# only and transmits on both. Prints each step, both guests' results and
# `qpnet stats`, and exits 0 when both guests pinged each other and both
# iperf3 runs moved data, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 QPNET_BINARY [NAME] [MORE-RUN-OPTIONS...]" >&2; exit 2; }
qpnet=$1
name=${2:-demo-socket}
shift $(( $# >= 2 ? 2 : 1 ))
extra=("$@")

say() { echo "demo-socket: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: the demo creates a network namespace and starts qpnet as nobody"
[ -x "$qpnet" ] || die "no qpnet binary at $qpnet (build it: cargo build --release)"
command -v setpriv >/dev/null || die "setpriv not found: install the Debian package 'util-linux'"
id nobody >/dev/null 2>&1 || die "there is no user 'nobody' to run qpnet as"

ns=qpnet-demo-socket
user=nobody
group=$(id -g "$user")
ip_a=10.77.0.2 ip_b=10.77.0.3
qpnet_port=5000 peer_port=6000
dir=$(mktemp -d /tmp/qpnet-demo-socket.XXXXXX)
socket=$dir/vhost.sock
rundir=$dir/run
qpnet_pid="" guest_b="" passed=0
cleanup() {
  set +e
  [ -n "$guest_b" ] && kill -TERM "$guest_b" 2>/dev/null && wait "$guest_b" 2>/dev/null
  [ -n "$qpnet_pid" ] && kill -TERM "$qpnet_pid" 2>/dev/null && wait "$qpnet_pid" 2>/dev/null
  ip netns del "$ns" 2>/dev/null
  [ "$passed" = 1 ] && rm -rf "$dir"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "network namespace $ns (loopback only)"
ip netns del "$ns" 2>/dev/null || true
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up

mkdir -p "$rundir"
chown "$user:$group" "$dir" "$rundir"
say "qpnet as $user with no capability: 2 queue pairs on UDP 127.0.0.1:$qpnet_port+K -> 127.0.0.1:$peer_port (--single-peer); log $dir/qpnet.log"
ip netns exec "$ns" setpriv --reuid="$user" --regid="$group" --clear-groups \
  --inh-caps=-all --bounding-set=-all \
  "$qpnet" run --socket "$socket" --runtime-dir "$rundir" --name "$name" --queue-pairs 2 \
  --udp "127.0.0.1:$qpnet_port,127.0.0.1:$peer_port" --single-peer "${extra[@]}" \
  >"$dir/qpnet.log" 2>&1 &
qpnet_pid=$!
for _ in $(seq 100); do
  [ -S "$socket" ] && break
  kill -0 "$qpnet_pid" 2>/dev/null || break
  sleep 0.1
done
[ -S "$socket" ] || { cat "$dir/qpnet.log" >&2; die "qpnet did not create $socket"; }
say "qpnet is up (pid $qpnet_pid, uid $(awk '/^Uid:/ { print $2 }' "/proc/$qpnet_pid/status"), CapEff $(awk '/^CapEff:/ { print $2 }' "/proc/$qpnet_pid/status"))"

# B first: its socket must be bound before A's first frame.
say "guest B: QEMU -netdev dgram on 127.0.0.1:$peer_port -> 127.0.0.1:$qpnet_port, $ip_b (serial log $dir/guest-b.log)"
scripts/guest/run-guest.sh --dgram "127.0.0.1:$peer_port,127.0.0.1:$qpnet_port" --netns "$ns" \
  --ip "$ip_b/24" --peer "$ip_a" --mac 52:54:00:77:00:03 --tests iperf-server,ping,hold \
  --pingwait 120 --timeout 300 --quiet --log "$dir/guest-b.log" >"$dir/guest-b.out" 2>&1 &
guest_b=$!

say "guest A: vhost-user from qpnet, 2 queue pairs, $ip_a (its console follows; about a minute under TCG)"
status_a=0
scripts/guest/run-guest.sh --vhost-user "$socket" --netns "$ns" --queues 2 \
  --ip "$ip_a/24" --peer "$ip_b" --mac 52:54:00:77:00:02 --tests ping,iperf-tx,iperf-rx,queues \
  --pingwait 120 --secs 3 --streams 4 --timeout 300 --log "$dir/guest-a.log" || status_a=$?

echo
say "guest B's results:"
tr -d '\r' <"$dir/guest-b.log" | grep -a '^QPNET-RESULT' | sed 's/^/  /' >&2 || true
echo
"$qpnet" stats --name "$name" --runtime-dir "$rundir" || true
echo

b_ok() { tr -d '\r' <"$dir/guest-b.log" | grep -aq "^QPNET-RESULT $1 ok"; }
problems=()
[ "$status_a" = 0 ] || problems+=("guest A reported a failure (run-guest.sh status $status_a)")
b_ok ping || problems+=("guest B did not ping guest A")
b_ok iperf-server || problems+=("guest B's iperf3 server did not start")
kill -0 "$qpnet_pid" 2>/dev/null || problems+=("qpnet is no longer running")
if [ ${#problems[@]} -eq 0 ]; then
  say "SUCCESS: A ($ip_a, qpnet over UDP, unprivileged) and B ($ip_b, QEMU -netdev dgram) pinged each other and A ran iperf3 both ways against B; no TAP was used"
  passed=1
  exit 0
fi
for p in "${problems[@]}"; do say "problem: $p"; done
die "see the logs in $dir (qpnet.log, guest-a.log, guest-b.log, guest-b.out)"
