#!/bin/bash
# Boot the qpnet test guest under QEMU (TCG) with its virtio-net device backed
# by a vhost-user backend (qpnet, or any other), by QEMU's own TAP netdev
# (the in-process baseline), by QEMU's own UDP datagram netdev (a peer of
# qpnet's --udp backend) or by QEMU's own stream netdev on a unix socket (a
# peer such as passt, without qpnet), pass it its instructions on the kernel
# command line, keep its serial console in a log file and exit with its
# verdict.
#
# Usage: scripts/guest/run-guest.sh (--vhost-user SOCK | --tap NAME | --dgram L,R | --stream SOCK) [options]
#   --vhost-user SOCK  QEMU connects to the backend listening on SOCK
#   --server           with --vhost-user: QEMU listens on SOCK instead
#                      (server=on,wait=off) and the backend connects
#   --reconnect SECS   with --vhost-user (client): reconnect=SECS
#   --tap NAME         QEMU's own -netdev tap on TAP NAME (QEMU sets
#                      IFF_MULTI_QUEUE only when --queues > 1: a
#                      multi_queue TAP needs --queues >= 2)
#   --dgram LOCAL_IP:PORT,REMOTE_IP:PORT
#                      QEMU's own -netdev dgram (IPv4): one unconnected UDP
#                      socket bound to LOCAL, sending to REMOTE, one frame
#                      per datagram; one queue pair
#   --stream SOCK      QEMU's own -netdev stream, connecting to the unix
#                      socket SOCK (frames behind a 4-byte length); one
#                      queue pair
#   --netns NS         run QEMU inside network namespace NS (for --tap and
#                      --dgram: the namespace of the TAP or the addresses)
#   --queues N         queue pairs (default 1); the guest sets combined N
#   --tests LIST       guest steps, comma separated (default ping); see init
#   --ip CIDR          guest address (default 10.77.0.2/24; none: no static
#                      address, for the dhcp step)
#   --peer ADDR        host side address (default 10.77.0.1)
#   --secs S           iperf3 seconds (default 5)
#   --streams P        iperf3 parallel streams (default 4)
#   --pingwait S       seconds the guest waits for a first ping reply (60)
#   --dhcptries N      DHCP discovers, a second apart, before dhcp fails (30)
#   --mac MAC          guest MAC (default 52:54:00:77:00:02)
#   --smp N            vCPUs (default 1)
#   --log FILE         serial console log (default: a new file under /tmp)
#   --timeout S        kill QEMU after S seconds (default 300; 0 = never;
#                      default 0 when the tests include hold or shell)
#   --guest-dir DIR    kernel + initramfs (default <repo>/target/guest,
#                      built there if missing or out of date)
#   --quiet            do not copy the serial console to stdout
#   --interactive      serial console on this terminal (for tests=shell)
# Exit status: 0 every step ok; 1 a step failed; 2 no verdict (the guest
# never printed "QPNET-RESULT done": crash, hang or killed); 3 bad usage or
# missing prerequisite; 124 the timeout fired.
set -euo pipefail

die() {
	echo "run-guest: $*" >&2
	exit 3
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

VHOST_SOCK="" SERVER=0 RECONNECT="" TAP="" DGRAM="" STREAM_SOCK="" NETNS="" QUEUES=1 TESTS=ping
IP=10.77.0.2/24 PEER=10.77.0.1 SECS=5 STREAMS=4 PINGWAIT=60 DHCPTRIES=30
MAC=52:54:00:77:00:02 SMP=1 LOG="" TIMEOUT="" GUEST_DIR=$REPO/target/guest
QUIET=0 INTERACTIVE=0

while [ $# -gt 0 ]; do
	opt=$1
	case "$opt" in
	--server) SERVER=1 ;;
	--quiet) QUIET=1 ;;
	--interactive) INTERACTIVE=1 ;;
	--vhost-user | --reconnect | --tap | --dgram | --stream | --netns | --queues | --tests | --ip | \
		--peer | --secs | --streams | --pingwait | --dhcptries | --mac | --smp | --log | --timeout | \
		--guest-dir)
		[ $# -ge 2 ] || die "$opt needs a value"
		val=$2
		shift
		case "$opt" in
		--vhost-user) VHOST_SOCK=$val ;;
		--reconnect) RECONNECT=$val ;;
		--tap) TAP=$val ;;
		--dgram) DGRAM=$val ;;
		--stream) STREAM_SOCK=$val ;;
		--netns) NETNS=$val ;;
		--queues) QUEUES=$val ;;
		--tests) TESTS=$val ;;
		--ip) IP=$val ;;
		--peer) PEER=$val ;;
		--secs) SECS=$val ;;
		--streams) STREAMS=$val ;;
		--pingwait) PINGWAIT=$val ;;
		--dhcptries) DHCPTRIES=$val ;;
		--mac) MAC=$val ;;
		--smp) SMP=$val ;;
		--log) LOG=$val ;;
		--timeout) TIMEOUT=$val ;;
		--guest-dir) GUEST_DIR=$val ;;
		esac
		;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown option $opt (see --help)" ;;
	esac
	shift
done

BACKENDS=0
for b in "$VHOST_SOCK" "$TAP" "$DGRAM" "$STREAM_SOCK"; do [ -z "$b" ] || BACKENDS=$((BACKENDS + 1)); done
[ "$BACKENDS" = 1 ] ||
	die "give exactly one of --vhost-user SOCK, --tap NAME, --dgram LOCAL,REMOTE, --stream SOCK"
[ -z "$STREAM_SOCK" ] || [ "$QUEUES" = 1 ] || die "--stream is one connection: one queue pair (--queues 1)"
if ! [[ "$QUEUES" =~ ^[1-9][0-9]*$ ]]; then
	die "--queues must be a positive number"
fi
DGRAM_RE='^([0-9.]+):([0-9]+),([0-9.]+):([0-9]+)$'
if [ -n "$DGRAM" ]; then
	[[ "$DGRAM" =~ $DGRAM_RE ]] ||
		die "--dgram wants LOCAL_IP:PORT,REMOTE_IP:PORT (IPv4), e.g. 127.0.0.1:6000,127.0.0.1:5000"
	[ "$QUEUES" = 1 ] || die "--dgram is one socket: one queue pair (--queues 1)"
fi
command -v qemu-system-x86_64 >/dev/null ||
	die "qemu-system-x86_64 not found: install the Debian package 'qemu-system-x86'"
if [ -z "$TIMEOUT" ]; then
	case ",$TESTS," in
	*,hold,* | *,shell,*) TIMEOUT=0 ;;
	*) TIMEOUT=300 ;;
	esac
fi
[ -n "$LOG" ] || LOG=$(mktemp /tmp/qpnet-guest.XXXXXX.log)

"$HERE/build-initramfs.sh" "$GUEST_DIR" >&2

# NETDEV: the -netdev (and -chardev) arguments for the chosen backend.
if [ -n "$VHOST_SOCK" ]; then
	CHARDEV="socket,id=c0,path=$VHOST_SOCK"
	if [ "$SERVER" = 1 ]; then
		CHARDEV+=",server=on,wait=off"
	elif [ -n "$RECONNECT" ]; then
		CHARDEV+=",reconnect=$RECONNECT"
	fi
	NETDEV=(-chardev "$CHARDEV" -netdev "vhost-user,id=n0,chardev=c0,queues=$QUEUES")
elif [ -n "$STREAM_SOCK" ]; then
	NETDEV=(-netdev "stream,id=n0,server=off,addr.type=unix,addr.path=$STREAM_SOCK")
elif [ -n "$DGRAM" ]; then
	NETDEV=(-netdev "dgram,id=n0,local.type=inet,local.host=${BASH_REMATCH[1]},local.port=${BASH_REMATCH[2]},remote.type=inet,remote.host=${BASH_REMATCH[3]},remote.port=${BASH_REMATCH[4]}")
else
	NETDEV=(-netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no,queues=$QUEUES")
fi

DEVICE="virtio-net-pci,netdev=n0,mac=$MAC"
if [ "$QUEUES" -gt 1 ]; then
	DEVICE+=",mq=on,vectors=$((2 * QUEUES + 2))"
fi
# pci=nomsi: QEMU 7.2 TCG + vhost-user + MSI-X crashes (see TESTING-NOTES).
APPEND="console=ttyS0 pci=nomsi panic=-1 quiet qpnet.ip=$IP qpnet.peer=$PEER qpnet.queues=$QUEUES"
APPEND+=" qpnet.test=$TESTS qpnet.secs=$SECS qpnet.streams=$STREAMS qpnet.pingwait=$PINGWAIT"
APPEND+=" qpnet.dhcptries=$DHCPTRIES"

if [ "$INTERACTIVE" = 1 ]; then
	SERIAL=(-chardev "stdio,id=ser0,signal=on,logfile=$LOG" -serial chardev:ser0)
else
	SERIAL=(-chardev "file,id=ser0,path=$LOG" -serial chardev:ser0)
fi

# shellcheck disable=SC2054 # the commas are QEMU's, inside single arguments
QEMU=(qemu-system-x86_64 -accel tcg -machine pc -cpu max -smp "$SMP" -m 512
	-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
	-kernel "$GUEST_DIR/vmlinuz" -initrd "$GUEST_DIR/initramfs.cpio.gz" -append "$APPEND"
	"${NETDEV[@]}" -device "$DEVICE"
	-display none -monitor none -no-reboot "${SERIAL[@]}")
if [ -n "$NETNS" ]; then
	QEMU=(ip netns exec "$NETNS" "${QEMU[@]}")
fi
if [ "$TIMEOUT" != 0 ]; then
	QEMU=(timeout -k 5 "$TIMEOUT" "${QEMU[@]}")
fi

echo "run-guest: log $LOG; ${QEMU[*]}" >&2
: >"$LOG"
TAIL_PID=""
if [ "$QUIET" = 0 ] && [ "$INTERACTIVE" = 0 ]; then
	tail -n +1 -f "$LOG" &
	TAIL_PID=$!
fi
START=$(date +%s.%N)
set +e
if [ "$INTERACTIVE" = 1 ]; then
	"${QEMU[@]}"
	QEMU_RC=$?
else
	# In the background so that a TERM sent to this script reaches QEMU.
	"${QEMU[@]}" </dev/null &
	QEMU_PID=$!
	trap 'kill -TERM "$QEMU_PID" 2>/dev/null' TERM INT HUP
	wait "$QEMU_PID"
	QEMU_RC=$?
	while kill -0 "$QEMU_PID" 2>/dev/null; do
		wait "$QEMU_PID"
		QEMU_RC=$?
	done
	trap - TERM INT HUP
fi
set -e
END=$(date +%s.%N)
if [ -n "$TAIL_PID" ]; then
	sleep 0.2
	kill "$TAIL_PID" 2>/dev/null || true
	wait "$TAIL_PID" 2>/dev/null || true
fi

ELAPSED=$(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.1f", b - a }')
VERDICT=$(tr -d '\r' <"$LOG" | grep -a '^QPNET-RESULT done ' | tail -n 1 || true)
echo "run-guest: qemu exit $QEMU_RC after ${ELAPSED}s; ${VERDICT:-no verdict}" >&2
case "$VERDICT" in
"QPNET-RESULT done ok"*) exit 0 ;;
"QPNET-RESULT done fail"*) exit 1 ;;
esac
[ "$QEMU_RC" = 124 ] && exit 124
exit 2
