#!/usr/bin/env bash
# Networking benchmarks (`make bench`): figures beside their anchors on
# this machine. Needs root (network namespaces, veth, taps, UDP port 67).
#
# Usage: hack/bench-net.sh
#
# Builds and runs node-vmm/dhcp/examples/bench.rs: DHCP DISCOVER -> ACK
# for 100 clients, through the pure handle() and through serve() on the
# host end of a veth pair with the clients in a network namespace, beside
# busybox udhcpd serving the same clients on the same veth.
# Prints markdown tables; nothing is asserted. The figures go in
# docs/testing.md (and the DHCP ones in docs/networking.md).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] ||
	{ echo "bench-net: needs root (network namespaces, veth, taps)" >&2; exit 1; }
cargo build --release -q -p kubevmm-dhcp --example dhcp-bench
WORK="$(mktemp -d /tmp/kubevmm-bench-net.XXXXXX)"
# Everything the benches create is named after TAG; removed here too in
# case a bench is killed before it cleans up.
TAG="$$"
cleanup() {
	ip netns del "kvnb${TAG}d" 2>/dev/null || true
	ip link del "kvnbh${TAG}" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
T="${CARGO_TARGET_DIR:-target}/release"
"$T/examples/dhcp-bench" "$WORK/dhcp" "$TAG"
