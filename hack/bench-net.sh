#!/usr/bin/env bash
# Networking benchmarks (`make bench`): figures beside their anchors on
# this machine. Needs root (network namespaces, veth, taps, UDP port 67).
#
# Usage: hack/bench-net.sh [RUNS]   (VM boots of each VMM, default 3)
#
# Builds and runs
#   - node-vmm/dhcp/examples/bench.rs: DHCP DISCOVER -> ACK for 100
#     clients, through the pure handle() and through serve() on the host
#     end of a veth pair with the clients in a network namespace, beside
#     busybox udhcpd serving the same clients on the same veth;
#   - node-vmm/vmm/examples/bench_net.rs: virtio-net, the test guest
#     netecho echoing UDP datagrams through a tap (in a network namespace)
#     to a host socket: echoes/s and MB/s at a window of 32 (64 B and
#     1400 B datagrams) and the ping-pong round trip, our VMM beside QEMU
#     -M microvm (virtio-net-device on the same tap, same PVH guest).
# Prints markdown tables; nothing is asserted. The figures go in
# docs/testing.md (and the DHCP ones in docs/networking.md).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
[ "$(id -u)" = 0 ] ||
	{ echo "bench-net: needs root (network namespaces, veth, taps)" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null ||
	{ echo "bench-net: qemu-system-x86_64 missing: run hack/install-deps.sh --bench (make bench does)" >&2; exit 1; }
cargo build --release -q -p kubevmm-dhcp --example dhcp-bench
cargo build --release -q -p kubevmm-vmm --bin kubevmm-vmm --example bench_net
make -s -C tests/guests
WORK="$(mktemp -d /tmp/kubevmm-bench-net.XXXXXX)"
# Everything the benches create is named after TAG; removed here too in
# case a bench is killed before it cleans up.
TAG="$$"
cleanup() {
	ip netns del "kvnb${TAG}d" 2>/dev/null || true
	ip link del "kvnbh${TAG}" 2>/dev/null || true
	ip netns del "kvnb${TAG}v" 2>/dev/null || true
	rm -rf "/dev/shm/kubevmm-dhcp-bench-${TAG}"
	rm -rf "$WORK"
}
trap cleanup EXIT
T="${CARGO_TARGET_DIR:-target}/release"
"$T/examples/dhcp-bench" "$WORK/dhcp" "$TAG"
echo
"$T/examples/bench_net" "$T/kubevmm-vmm" tests/guests/build/netecho.elf "$WORK/net" "$TAG" "$RUNS"
