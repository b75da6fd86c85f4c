#!/usr/bin/env bash
# VMM benchmarks (`make bench`): our VMM beside its anchors on this machine.
#
# Usage: hack/bench-vmm.sh [RUNS]   (RUNS >= 10, default 10)
#
# Builds the release VMM and the bench driver (node-vmm/vmm/examples/bench.rs)
# and the test guests, then prints a markdown table:
#   - process start -> first guest serial output, and -> exit: our VMM vs
#     QEMU -M microvm (qboot, -accel kvm) booting the same PVH guest
#     (tests/guests/bench.elf) with -kernel; median [min-max] over RUNS;
#   - VMM memory overhead: RSS summed over /proc/PID/smaps minus guest RAM
#     (as Firecracker measures it), ours vs QEMU's;
#   - I/O-port round trip: a guest doing `out` to port 0x80 20000 times,
#     timed in-guest with rdtsc, vs the same loop on a bare KVM vCPU
#     handling KVM_EXIT_IO in a tight loop;
#   - virtio-blk sequential 1 MiB reads of a 64 MiB file by the guest vs
#     the host reading the same file with read(2); both from a warm page
#     cache (the file is read once first);
#   - virtio-blk 4 KiB random reads (4096 at queue depth 1, the same
#     xorshift offsets everywhere) in IOPS: the guest on the raw file vs the
#     host's pread(2), and on a qcow2 overlay vs raw and vs QEMU microvm on
#     the same overlay (the qcow2 overlay also for the sequential reads).
#   - start-up step by step (`kubevmm-vmm --trace-boot`, medians over RUNS),
#     and Debian's stock kernel (hack/fixtures-linux.sh) from start to its
#     banner and to its MADT line, ours beside QEMU microvm (LINUX_RUNS,
#     default 3: about 20 s a boot here).
# Nothing here is asserted; the figures go in docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-10}"
command -v qemu-system-x86_64 >/dev/null ||
	{ echo "bench-vmm: qemu-system-x86_64 missing: run hack/install-deps.sh --bench (make bench does)" >&2; exit 1; }
[ -e /usr/share/qemu/qboot.rom ] ||
	{ echo "bench-vmm: /usr/share/qemu/qboot.rom missing: run hack/install-deps.sh" >&2; exit 1; }
cargo build --release -q -p kubevmm-vmm --bin kubevmm-vmm --example bench --example bench_boot
make -s -C tests/guests
WORK="$(mktemp -d /tmp/kubevmm-bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
T="${CARGO_TARGET_DIR:-target}/release"
"$T/examples/bench" "$T/kubevmm-vmm" tests/guests/build/bench.elf "$WORK" "$RUNS"
LINUX_ARGS=()
if [ -f "${KUBEVMM_LINUX_DIR:-$HOME/.cache/kubevmm/linux}/vmlinux" ]; then
	LINUX_ARGS=("${KUBEVMM_LINUX_DIR:-$HOME/.cache/kubevmm/linux}/vmlinux" "${LINUX_RUNS:-3}")
else
	echo "bench-vmm: no Linux fixture: the early-boot comparison is skipped (hack/fixtures-linux.sh makes it)" >&2
fi
"$T/examples/bench_boot" "$T/kubevmm-vmm" tests/guests/build/bench.elf "$WORK" "$RUNS" "${LINUX_ARGS[@]}"
