#!/bin/bash
# Build the qpnet test guest: a Debian kernel plus a small initramfs holding
# busybox, iperf3, ethtool (with their shared libraries and the dynamic
# loader), the virtio-pci/virtio-net modules, scripts/guest/init and its
# DHCP client's event script (scripts/guest/udhcpc.script). The
# guest's /init reads its instructions from the kernel command line (see
# scripts/guest/init) and prints QPNET-RESULT lines on the serial console.
#
# Usage: scripts/guest/build-initramfs.sh OUTDIR
#   Writes OUTDIR/vmlinuz and OUTDIR/initramfs.cpio.gz. Does nothing (and
#   says so) when the inputs have not changed since the last build.
#   QPNET_GUEST_KVER=VERSION picks a kernel; default: the newest
#   /boot/vmlinuz-* that has a /lib/modules/VERSION directory.
set -euo pipefail

die() {
	echo "build-initramfs: $*" >&2
	exit 1
}

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
OUTDIR=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT_SRC=$HERE/init
DHCP_SCRIPT=$HERE/udhcpc.script
MODULES=(virtio_pci virtio_net net_failover failover)

# need CMD PACKAGE: fail naming the Debian package that provides CMD.
need() {
	command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package '$2' (apt-get install $2)"
}

# pick_kernel_version: QPNET_GUEST_KVER, else the newest kernel with modules.
pick_kernel_version() {
	if [ -n "${QPNET_GUEST_KVER:-}" ]; then
		echo "$QPNET_GUEST_KVER"
		return
	fi
	local f v best
	best=$(for f in /boot/vmlinuz-*; do
		v=${f#/boot/vmlinuz-}
		if [ -f "$f" ] && [ -f "/lib/modules/$v/modules.dep" ]; then echo "$v"; fi
	done | sort -V | tail -n 1)
	[ -n "$best" ] || die "no /boot/vmlinuz-* with modules under /lib/modules: install the Debian package 'linux-image-amd64'"
	echo "$best"
}

# module_paths: the .ko files of MODULES and their dependencies, in load
# order, without duplicates.
module_paths() {
	local m
	for m in "${MODULES[@]}"; do
		modprobe -S "$KVER" --show-depends "$m" ||
			die "module $m not found for kernel $KVER (linux-image-amd64 for $KVER incomplete?)"
	done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }'
}

# library_paths FILE...: the shared libraries ldd lists for FILE, plus the loader.
library_paths() {
	local f
	for f in "$@"; do
		ldd "$f" || die "ldd $f failed"
	done | awk '
		$2 == "=>" && $3 ~ /^\// { print $3 }
		$1 ~ /^\// && $2 ~ /^\(/ { print $1 }
	' | sort -u
}

need busybox busybox-static
need iperf3 iperf3
need ethtool ethtool
need cpio cpio
need modprobe kmod
need ldd libc-bin
need gzip gzip
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing: install the Debian package 'busybox-static'"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
	die "$BUSYBOX is dynamically linked: install the Debian package 'busybox-static' (not 'busybox')"
fi
IPERF3=$(command -v iperf3)
ETHTOOL=$(command -v ethtool)
[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"
[ -f "$DHCP_SCRIPT" ] || die "missing $DHCP_SCRIPT"

KVER=$(pick_kernel_version)
VMLINUZ=/boot/vmlinuz-$KVER
[ -r "$VMLINUZ" ] || die "$VMLINUZ not readable: install the Debian package 'linux-image-amd64'"

# Command substitutions (not process substitutions) so that a die() inside
# stops the build.
MOD_LIST=$(module_paths)
LIB_LIST=$(library_paths "$IPERF3" "$ETHTOOL")
mapfile -t MODS <<<"$MOD_LIST"
mapfile -t LIBS <<<"$LIB_LIST"
[ -n "$MOD_LIST" ] || die "no modules found for ${MODULES[*]}"

# Everything the image is made of; a change to any of them rebuilds it.
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
INPUTS=("$SELF" "$INIT_SRC" "$DHCP_SCRIPT" "$VMLINUZ" "$BUSYBOX" "$IPERF3" "$ETHTOOL" "${MODS[@]}" "${LIBS[@]}")
STAMP=$( (
	echo "kver=$KVER"
	printf '%s\n' "${INPUTS[@]}"
	stat -L -c '%s %Y' "${INPUTS[@]}"
	cat "$SELF" "$INIT_SRC" "$DHCP_SCRIPT" | sha256sum
) | sha256sum | cut -d' ' -f1)

mkdir -p "$OUTDIR"
# One build at a time per OUTDIR (tests may start several guests at once).
exec 9>"$OUTDIR/.lock"
flock 9
if [ -f "$OUTDIR/vmlinuz" ] && [ -f "$OUTDIR/initramfs.cpio.gz" ] &&
	[ "$(cat "$OUTDIR/.stamp" 2>/dev/null)" = "$STAMP" ]; then
	echo "build-initramfs: $OUTDIR up to date (kernel $KVER)"
	exit 0
fi

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/qpnet-initramfs.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT

# copy_keep_path FILE: copy FILE to the same path inside the image.
copy_keep_path() {
	mkdir -p "$ROOT$(dirname "$1")"
	cp -L "$1" "$ROOT$1"
}

# add_module KO: put KO (decompressed: busybox insmod reads plain ELF only)
# under /lib/modules in the image and append it to the load order.
add_module() {
	local ko=$1 base
	base=$(basename "$ko")
	case "$ko" in
	*.ko.xz)
		need xz xz-utils
		xz -dc "$ko" >"$ROOT/lib/modules/${base%.xz}"
		base=${base%.xz}
		;;
	*.ko.zst)
		need zstd zstd
		zstd -qdc "$ko" >"$ROOT/lib/modules/${base%.zst}"
		base=${base%.zst}
		;;
	*.ko.gz)
		gzip -dc "$ko" >"$ROOT/lib/modules/${base%.gz}"
		base=${base%.gz}
		;;
	*.ko) cp "$ko" "$ROOT/lib/modules/$base" ;;
	*) die "unexpected module file $ko" ;;
	esac
	echo "$base" >>"$ROOT/etc/qpnet-modules"
}

mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,lib/modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
	[ "$applet" = busybox ] || ln -sf busybox "$ROOT/bin/$applet"
done
copy_keep_path "$IPERF3"
copy_keep_path "$ETHTOOL"
for lib in "${LIBS[@]}"; do
	copy_keep_path "$lib"
done
: >"$ROOT/etc/qpnet-modules"
for ko in "${MODS[@]}"; do
	add_module "$ko"
done
echo "$KVER" >"$ROOT/etc/qpnet-kernel"
printf 'root:x:0:0:root:/:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
install -m 0755 "$INIT_SRC" "$ROOT/init"
install -m 0755 "$DHCP_SCRIPT" "$ROOT/etc/udhcpc.script"

(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
	gzip -n -6 >"$OUTDIR/initramfs.cpio.gz.tmp"
cp "$VMLINUZ" "$OUTDIR/vmlinuz.tmp"
mv "$OUTDIR/initramfs.cpio.gz.tmp" "$OUTDIR/initramfs.cpio.gz"
mv "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
echo "$STAMP" >"$OUTDIR/.stamp"
echo "build-initramfs: built $OUTDIR (kernel $KVER, ${#MODS[@]} modules, $(du -h "$OUTDIR/initramfs.cpio.gz" | cut -f1) initramfs)"
