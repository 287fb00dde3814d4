#!/usr/bin/env bash
# run.sh: install what is missing, build qpnet, and run it under the
# supervisor (scripts/qpnet-supervise) until Ctrl-C.
#
# usage: sudo scripts/run.sh [--demo | --demo-socket] [--socket PATH] [--tap NAME]
#                            [--queue-pairs N] [--name NAME] [-- MORE-RUN-OPTIONS]
#   default: --socket /run/qpnet/NAME.sock --tap qpnet0 --name qpnet,
#            queue pairs = number of CPUs (at most 16)
#   --demo   everything in a network namespace "qpnet-demo": qpnet with 2
#            queue pairs on TAP qpdemo0 (10.77.0.1/24), an iperf3 server, and
#            a small Linux guest under QEMU (10.77.0.2) that pings and runs
#            iperf3 both ways through qpnet; then shows `qpnet stats`, and
#            keeps qpnet running until Ctrl-C.
#   --demo-socket
#            no TAP and no privilege for qpnet: in a network namespace
#            "qpnet-demo-socket", qpnet runs as user nobody with 2 queue
#            pairs on its UDP backend (127.0.0.1:5000+K, --single-peer to
#            127.0.0.1:6000); guest A (10.77.0.2) is served by qpnet over
#            vhost-user, guest B (10.77.0.3) by QEMU's own -netdev dgram on
#            127.0.0.1:6000. They ping each other and A runs iperf3 both
#            ways against B; then it shows `qpnet stats`, stops everything
#            and exits 0 on success, 1 on failure (scripts/demo-socket.sh).
#            --name names the instance; --socket, --tap and --queue-pairs
#            are refused.
#   Builds into $CARGO_TARGET_DIR when it is set (default target/).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

demo=0; demo_socket=0; socket=""; tap=""; qp=""; name=""; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) demo=1; shift ;;
    --demo-socket) demo_socket=1; shift ;;
    --socket) socket="$2"; shift 2 ;;
    --tap) tap="$2"; shift 2 ;;
    --queue-pairs) qp="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$demo" = 1 ] && [ "$demo_socket" = 1 ]; then
  echo "run.sh: --demo and --demo-socket are exclusive (see --help)" >&2
  exit 2
fi
if [ "$demo_socket" = 1 ] && [ -n "$socket$tap$qp" ]; then
  echo "run.sh: --demo-socket chooses its own socket, host side and queue pairs: drop --socket, --tap and --queue-pairs" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  if [ "$demo_socket" = 1 ]; then
    echo "run.sh: --demo-socket creates a network namespace and starts qpnet as nobody: run as root (sudo scripts/run.sh --demo-socket)" >&2
  else
    echo "run.sh: qpnet opens TAP devices (CAP_NET_ADMIN): run as root (sudo scripts/run.sh)" >&2
  fi
  exit 1
fi

bash scripts/install-deps.sh run
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p qpnet-primary
qpnet="${CARGO_TARGET_DIR:-$repo/target}/release/qpnet"

if [ "$demo_socket" = 1 ]; then
  exec scripts/demo-socket.sh "$qpnet" "${name:-demo-socket}" "${extra[@]}"
fi

if [ "$demo" = 0 ]; then
  name="${name:-qpnet}"
  socket="${socket:-/run/qpnet/$name.sock}"
  tap="${tap:-qpnet0}"
  mkdir -p "$(dirname "$socket")" /var/log/qpnet
  args=(--socket "$socket" --tap "$tap" --name "$name")
  [ -n "$qp" ] && args+=(--queue-pairs "$qp")
  echo "run.sh: starting qpnet under the supervisor (log /var/log/qpnet/$name.log); Ctrl-C stops it" >&2
  exec scripts/qpnet-supervise --qpnet "$qpnet" --log "/var/log/qpnet/$name.log" -- "${args[@]}" "${extra[@]}"
fi

# ---- demo ----------------------------------------------------------------
ns=qpnet-demo
name="${name:-demo}"
socket="${socket:-/run/qpnet/$name.sock}"
tap="${tap:-qpdemo0}"
qp="${qp:-2}"
log="/var/log/qpnet/$name.log"
mkdir -p /run/qpnet /var/log/qpnet
sup=""; iperf=""
cleanup() {
  # Best effort, every step: Ctrl-C may have ended some of these already.
  set +e
  if [ -n "$sup" ]; then kill -TERM "$sup" 2>/dev/null; wait "$sup" 2>/dev/null; fi
  if [ -n "$iperf" ]; then kill "$iperf" 2>/dev/null; fi
  ip netns del "$ns" 2>/dev/null
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns del "$ns" 2>/dev/null || true
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" sysctl -qw net.ipv4.ip_nonlocal_bind=1
ip netns exec "$ns" scripts/qpnet-supervise --qpnet "$qpnet" --log "$log" -- \
  --socket "$socket" --tap "$tap" --queue-pairs "$qp" --name "$name" "${extra[@]}" &
sup=$!
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
[ -S "$socket" ] || { echo "run.sh: qpnet did not come up; see $log" >&2; exit 1; }
ip netns exec "$ns" ip addr add 10.77.0.1/24 dev "$tap"
ip netns exec "$ns" sh -c "echo 1 > /proc/sys/net/ipv6/conf/$tap/disable_ipv6"
ip netns exec "$ns" iperf3 -s -B 10.77.0.1 >/dev/null 2>&1 &
iperf=$!

echo "run.sh: booting the demo guest (QEMU, TCG; about 30 s)..." >&2
status=0
scripts/guest/run-guest.sh --vhost-user "$socket" --queues "$qp" --smp 2 \
  --tests ping,iperf-tx,iperf-rx --secs 5 --streams 4 --timeout 300 || status=$?
echo
"$qpnet" stats --name "$name" || true
echo
if [ "$status" = 0 ]; then
  echo "run.sh: the guest pinged and ran iperf3 through qpnet (see QPNET-RESULT lines above)."
else
  echo "run.sh: the demo guest reported a failure (status $status); qpnet log: $log" >&2
fi
echo "run.sh: qpnet keeps running in namespace $ns (socket $socket); watch it with"
echo "        $qpnet stats --name $name"
echo "        Ctrl-C stops it."
wait "$sup"
