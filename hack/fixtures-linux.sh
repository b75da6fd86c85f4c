#!/usr/bin/env bash
# Linux guest fixtures, built from Debian packages and cached.
#
# Usage: hack/fixtures-linux.sh [--force] [--print-dir]
#
# Produces, in ${KUBEVMM_LINUX_DIR:-~/.cache/kubevmm/linux}:
#   vmlinux            uncompressed kernel ELF taken out of the bzImage; it
#                      carries the Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY),
#                      so a VMM can enter it directly in 32-bit protected mode
#   vmlinuz            the stock bzImage, as shipped in /boot
#   initramfs.cpio.gz  busybox initramfs: /init mounts proc/sys/dev, loads the
#                      virtio modules of the same kernel, prints
#                      "KUBEVMM-LINUX-READY", the block devices and network
#                      interfaces it sees, then powers off
#   config             the kernel's .config
#   fixtures.env       KUBEVMM_LINUX_* variables (kernel release, package
#                      version, PVH entry address, file paths), shell-sourceable
#
# The kernel is the one Debian's linux-image-amd64 depends on (override with
# KUBEVMM_KERNEL_PKG=linux-image-6.1.0-NN-amd64). Nothing is installed into the
# host: the package is fetched with `apt-get download` and unpacked locally.
# A second run with the fixtures present does nothing (no apt, no network).
#
# Guest kernel command line hints understood by /init:
#   kubevmm.shell=1    drop into a busybox shell instead of powering off
#
# Needs: apt-get, dpkg-deb, busybox-static, cpio, gzip, xz-utils, zstd,
# binutils (readelf, objcopy). hack/install-deps.sh installs them.
set -euo pipefail

readonly MARKER="KUBEVMM-LINUX-READY"
# Modules /init loads (with their dependencies, from the modules' own
# `depends=` metadata). Names use '_' ; files may use '-'.
readonly WANT_MODULES="virtio virtio_ring virtio_mmio virtio_pci virtio_blk virtio_net virtio_rng virtio_console"

OUT="${KUBEVMM_LINUX_DIR:-${HOME}/.cache/kubevmm/linux}"
FORCE=0

die() { echo "fixtures-linux: error: $*" >&2; exit 1; }
log() { echo "fixtures-linux: $*" >&2; }

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
	case "$1" in
	--force) FORCE=1 ;;
	--print-dir) echo "$OUT"; exit 0 ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown argument '$1' (try --help)" ;;
	esac
	shift
done

START_NS=$(date +%s%N)
elapsed() {
	local now
	now=$(date +%s%N)
	awk -v a="$START_NS" -v b="$now" 'BEGIN { printf "%.2fs", (b - a) / 1e9 }'
}

# ---------------------------------------------------------------- fast path
if [ "$FORCE" = 0 ] && [ -f "$OUT/.complete" ] &&
	[ -s "$OUT/vmlinux" ] && [ -s "$OUT/vmlinuz" ] &&
	[ -s "$OUT/initramfs.cpio.gz" ] && [ -s "$OUT/fixtures.env" ]; then
	log "up to date in $OUT ($(cat "$OUT/.complete")), took $(elapsed)"
	exit 0
fi

# ------------------------------------------------------------------- checks
need() {
	local cmd="$1" pkg="$2"
	command -v "$cmd" >/dev/null 2>&1 ||
		die "'$cmd' not found; install it with: apt-get install -y $pkg (or run hack/install-deps.sh)"
}
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need cpio cpio
need gzip gzip
need xz xz-utils
need zstd zstd
need readelf binutils
need objcopy binutils
BUSYBOX=""
for b in /bin/busybox /usr/bin/busybox; do
	if [ -x "$b" ] && file_out=$(readelf -d "$b" 2>&1) && ! grep -q NEEDED <<<"$file_out"; then
		BUSYBOX="$b"
		break
	fi
done
[ -n "$BUSYBOX" ] || die "no statically linked busybox found; install it with: apt-get install -y busybox-static"

# ---------------------------------------------------------- pick the kernel
if [ -n "${KUBEVMM_KERNEL_PKG:-}" ]; then
	PKG="$KUBEVMM_KERNEL_PKG"
else
	PKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
	[ -n "$PKG" ] || die "cannot resolve the kernel package linux-image-amd64 depends on; run 'apt-get update' (is deb.debian.org reachable?) or set KUBEVMM_KERNEL_PKG"
fi
log "kernel package: $PKG"

mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# apt-get download writes to the current directory; _apt cannot write into a
# root-only cache dir, which only costs a warning (unsandboxed download).
DEB_DIR="$OUT/debs"
mkdir -p "$DEB_DIR"
DEB=$(find "$DEB_DIR" -maxdepth 1 -name "${PKG}_*.deb" -print 2>/dev/null | LC_ALL=C sort | tail -n1)
if [ -z "$DEB" ] || [ "$FORCE" = 1 ]; then
	log "downloading $PKG"
	(cd "$WORK" && apt-get download "$PKG" 2>&1 | grep -v 'unsandboxed' >&2) ||
		die "apt-get download $PKG failed; run 'apt-get update' and check network access to deb.debian.org"
	got=$(find "$WORK" -maxdepth 1 -name "${PKG}_*.deb" -print | head -n1)
	[ -n "$got" ] || die "apt-get download $PKG produced no .deb"
	rm -f "$DEB_DIR/${PKG}"_*.deb
	mv "$got" "$DEB_DIR/"
	DEB="$DEB_DIR/$(basename "$got")"
fi
PKG_VERSION=$(dpkg-deb -f "$DEB" Version)
log "unpacking $(basename "$DEB")"
dpkg-deb -x "$DEB" "$WORK/pkg"

VMLINUZ=$(find "$WORK/pkg/boot" -maxdepth 1 -name 'vmlinuz-*' -print | head -n1)
[ -n "$VMLINUZ" ] || die "$DEB has no /boot/vmlinuz-*"
KREL=${VMLINUZ##*/vmlinuz-}
MODDIR="$WORK/pkg/lib/modules/$KREL"
[ -d "$MODDIR" ] || die "$DEB has no /lib/modules/$KREL"

# ------------------------------------------------ vmlinux out of the bzImage
# Boot protocol (Documentation/arch/x86/boot.rst): setup_sects at 0x1f1,
# "HdrS" at 0x202, payload_offset/payload_length at 0x248/0x24c (>= 2.08).
# The protected-mode code starts at (setup_sects + 1) * 512.
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 --endian=little "$1" | tr -d ' '; }
[ "$(od -An -c -j $((0x202)) -N4 "$VMLINUZ" | tr -d ' ')" = "HdrS" ] ||
	die "$VMLINUZ is not a bzImage (no HdrS boot header)"
SETUP_SECTS=$(u8 "$VMLINUZ" $((0x1f1)))
[ "$SETUP_SECTS" != 0 ] || SETUP_SECTS=4
PAYLOAD_OFF=$(($((SETUP_SECTS + 1)) * 512 + $(u32 "$VMLINUZ" $((0x248)))))
PAYLOAD_LEN=$(u32 "$VMLINUZ" $((0x24c)))
MAGIC=$(od -An -tx1 -j "$PAYLOAD_OFF" -N6 "$VMLINUZ" | tr -d ' \n')

decompress_payload() {
	case "$MAGIC" in
	fd377a585a00) xz -dc --single-stream ;;  # xz
	28b52ffd*) zstd -dc 2>/dev/null || true ;; # zstd (kernel appends 4 size bytes)
	1f8b*) gzip -dc 2>/dev/null || true ;;     # gzip (trailing size bytes too)
	*) return 1 ;;
	esac
}
case "$MAGIC" in
fd377a585a00) COMP=xz ;;
28b52ffd*) COMP=zstd ;;
1f8b*) COMP=gzip ;;
*) die "unknown bzImage payload compression (magic $MAGIC at offset $PAYLOAD_OFF); only xz, zstd and gzip are handled" ;;
esac
log "extracting vmlinux ($COMP payload, $PAYLOAD_LEN bytes at offset $PAYLOAD_OFF)"
dd if="$VMLINUZ" bs=1M skip="$PAYLOAD_OFF" count="$PAYLOAD_LEN" iflag=skip_bytes,count_bytes status=none | decompress_payload >"$WORK/vmlinux" ||
	die "decompressing the $COMP payload of $VMLINUZ failed"
[ "$(od -An -c -N4 "$WORK/vmlinux" | tr -d ' ')" = '177ELF' ] ||
	die "the decompressed payload is not an ELF file"

# XEN_ELFNOTE_PHYS32_ENTRY = 18 (0x12): the PVH entry point.
PVH_ENTRY=$(readelf -n "$WORK/vmlinux" | awk '
	$1 == "Xen" && ($0 ~ /\(0x00000012\)/ || $0 ~ /PHYS32_ENTRY/) { want = 1; next }
	want && /description data:/ {
		sub(/.*description data: */, "")
		n = split($0, b, " ")
		v = ""
		for (i = (n >= 4 ? 4 : n); i >= 1; i--) v = v b[i]
		print "0x" v
		exit
	}
	{ want = 0 }')
[ -n "$PVH_ENTRY" ] ||
	die "vmlinux has no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY); was the kernel built with CONFIG_PVH=y?"
log "PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) at $PVH_ENTRY"

# ------------------------------------------------------------- module set
# name -> file, from the package's tree (modules.dep is generated by depmod
# at install time and is not shipped, so dependencies come from .modinfo).
declare -A MODFILE=()
while IFS= read -r f; do
	n=${f##*/}
	n=${n%%.ko*}
	MODFILE[${n//-/_}]="$f"
done < <(find "$MODDIR/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

# Decompress a module into $WORK/ko/<name>.ko and print that path.
plain_ko() {
	local src="${MODFILE[$1]}" dst="$WORK/ko/$1.ko"
	mkdir -p "$WORK/ko"
	if [ ! -f "$dst" ]; then
		case "$src" in
		*.ko.xz) xz -dc "$src" >"$dst" ;;
		*.ko.zst) zstd -qdc "$src" >"$dst" ;;
		*.ko.gz) gzip -dc "$src" >"$dst" ;;
		*) cp "$src" "$dst" ;;
		esac
	fi
	echo "$dst"
}
mod_depends() {
	objcopy -O binary --only-section=.modinfo "$(plain_ko "$1")" /dev/stdout 2>/dev/null |
		tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' '\n' | sed '/^$/d; s/-/_/g'
}
BUILTIN="$MODDIR/modules.builtin"
is_builtin() { [ -f "$BUILTIN" ] && grep -qE "/(${1}|${1//_/-})\.ko\$" "$BUILTIN"; }

declare -A SEEN=()
LOAD_ORDER=()
visit() { # depth-first, dependencies first
	local m="$1" d
	[ -z "${SEEN[$m]:-}" ] || return 0
	SEEN[$m]=1
	if [ -z "${MODFILE[$m]:-}" ]; then
		is_builtin "$m" && return 0
		die "module $m not found in $PKG (neither a .ko nor built in)"
	fi
	for d in $(mod_depends "$m"); do visit "$d"; done
	LOAD_ORDER+=("$m")
}
for m in $WANT_MODULES; do visit "$m"; done
log "modules (load order): ${LOAD_ORDER[*]}"

# ------------------------------------------------------------- initramfs
ROOT="$WORK/initramfs"
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,run,root,etc,"lib/modules/$KREL"}
cp "$BUSYBOX" "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
for m in "${LOAD_ORDER[@]}"; do
	cp "$(plain_ko "$m")" "$ROOT/lib/modules/$KREL/$m.ko"
done
printf '%s\n' "${LOAD_ORDER[@]}" >"$ROOT/lib/modules/$KREL/load-order"
# A minimal modules.dep as well, so busybox modprobe works from a shell.
for m in "${LOAD_ORDER[@]}"; do
	deps=""
	for d in $(mod_depends "$m"); do [ -n "${MODFILE[$d]:-}" ] && deps="$deps $d.ko"; done
	echo "$m.ko:$deps"
done >"$ROOT/lib/modules/$KREL/modules.dep"
# The kernel's built-in initramfs normally provides /dev/console; make sure.
if [ "$(id -u)" = 0 ]; then
	mknod -m 600 "$ROOT/dev/console" c 5 1
	mknod -m 666 "$ROOT/dev/null" c 1 3
fi

cat >"$ROOT/init" <<EOF
#!/bin/busybox sh
# kubevmm Linux fixture init (generated by hack/fixtures-linux.sh)
KREL="$KREL"
MARKER="$MARKER"
EOF
cat >>"$ROOT/init" <<'EOF'
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
echo "kubevmm-init: kernel $(uname -r), cmdline: $(cat /proc/cmdline)"

for m in $(cat /lib/modules/$KREL/load-order); do
	if [ -e /sys/module/$m ]; then
		continue
	fi
	insmod /lib/modules/$KREL/$m.ko || echo "kubevmm-init: insmod $m failed"
done

# Give the virtio devices a moment to be probed and their disks to appear.
i=0
while [ $i -lt 20 ]; do
	n_virtio=$(ls /sys/bus/virtio/devices 2>/dev/null | wc -l)
	n_bound=$(ls -d /sys/bus/virtio/devices/*/driver 2>/dev/null | wc -l)
	[ "$n_virtio" = "$n_bound" ] && break
	sleep 0.1
	i=$((i + 1))
done

echo "$MARKER"
echo "kubevmm-init: virtio devices: $(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')"
for b in /sys/block/*; do
	[ -e "$b" ] || continue
	name=${b##*/}
	case "$name" in loop* | ram*) continue ;; esac
	echo "kubevmm-init: block $name sectors=$(cat $b/size) ro=$(cat $b/ro)"
done
for n in /sys/class/net/*; do
	[ -e "$n" ] || continue
	echo "kubevmm-init: net ${n##*/} mac=$(cat $n/address) driver=$(basename "$(readlink $n/device/driver 2>/dev/null)" 2>/dev/null)"
done
echo "kubevmm-init: done"

case " $(cat /proc/cmdline) " in
*" kubevmm.shell=1 "*)
	echo "kubevmm-init: kubevmm.shell=1, starting a shell (exit powers off)"
	setsid cttyhack sh
	;;
esac
sync
poweroff -f
EOF
chmod 755 "$ROOT/init"

log "packing initramfs"
(
	cd "$ROOT"
	find . -mindepth 1 -exec touch -h -d @0 {} +
	find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet
) | gzip -9 -n >"$WORK/initramfs.cpio.gz"

# ------------------------------------------------------------ install
cp "$VMLINUZ" "$WORK/vmlinuz"
cp "$WORK/pkg/boot/config-$KREL" "$WORK/config"
cat >"$WORK/fixtures.env" <<EOF
# generated by hack/fixtures-linux.sh
KUBEVMM_LINUX_DIR=$OUT
KUBEVMM_LINUX_PACKAGE=$PKG
KUBEVMM_LINUX_PACKAGE_VERSION=$PKG_VERSION
KUBEVMM_LINUX_RELEASE=$KREL
KUBEVMM_LINUX_VMLINUX=$OUT/vmlinux
KUBEVMM_LINUX_VMLINUZ=$OUT/vmlinuz
KUBEVMM_LINUX_INITRAMFS=$OUT/initramfs.cpio.gz
KUBEVMM_LINUX_PVH_ENTRY=$PVH_ENTRY
KUBEVMM_LINUX_MARKER=$MARKER
KUBEVMM_LINUX_MODULES="${LOAD_ORDER[*]}"
EOF
rm -f "$OUT/.complete"
for f in vmlinux vmlinuz initramfs.cpio.gz config fixtures.env; do
	mv -f "$WORK/$f" "$OUT/$f"
done
echo "$PKG $PKG_VERSION" >"$OUT/.complete"

rm -rf "$WORK"
size() { du -h --apparent-size "$1" | cut -f1; }
log "vmlinux $(size "$OUT/vmlinux"), vmlinuz $(size "$OUT/vmlinuz"), initramfs.cpio.gz $(size "$OUT/initramfs.cpio.gz")"
log "done in $OUT ($PKG $PKG_VERSION, kernel $KREL), took $(elapsed)"
