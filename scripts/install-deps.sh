#!/usr/bin/env bash
# install-deps.sh: install what qpnet needs on a Debian 12 machine, only
# what is missing (fast when everything is there).
#   install-deps.sh run    building and running qpnet (+ the demo guest)
#   install-deps.sh test   the whole test suite (namespaces, TAPs, QEMU guest)
#   install-deps.sh bench  the DPDK benchmarks
set -euo pipefail
what="${1:-test}"

pkgs=(iproute2 util-linux procps kmod)
case "$what" in
  run)   pkgs+=(qemu-system-x86 linux-image-amd64 busybox-static iperf3 ethtool cpio gzip) ;;
  test)  pkgs+=(qemu-system-x86 linux-image-amd64 busybox-static iperf3 ethtool cpio gzip passt) ;;
  bench) pkgs+=(qemu-system-x86 linux-image-amd64 busybox-static iperf3 ethtool cpio gzip dpdk) ;;
  *) echo "install-deps.sh: unknown target '$what' (run, test or bench)" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: missing packages: ${missing[*]}; run as root (sudo) to install them" >&2
    exit 1
  fi
  echo "install-deps.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps.sh: no Rust toolchain: qpnet needs Rust >= 1.80 with cargo (install it with rustup)" >&2
  exit 1
fi
if [ ! -e /dev/net/tun ]; then
  modprobe tun 2>/dev/null || true
  [ -e /dev/net/tun ] || { echo "install-deps.sh: /dev/net/tun is missing (load the tun module)" >&2; exit 1; }
fi
