#!/usr/bin/env bash
# Runs kubevmm's own components for the local control plane as host
# processes, the way the Deployment and the DaemonSet would run them:
# kubevmm-operator and `node-vmm agent` for this machine.
#
# Usage: hack/kubevmm-local.sh up | down | status
#   up     start the operator and the agent (release binaries from
#          `make build`) against $KUBEVMM_CLUSTER_DIR/admin.kubeconfig
#   down   stop them, then the guests on this machine (ACPI shutdown, force
#          stop after 10 s): nothing is left running. The VirtualMachines stay
#          in the API; the next `up` starts them again per runStrategy.
#          The guests' taps, the masquerade bridge and its nftables tables
#          go too (leases stay, so addresses stay stable).
#
# Environment: KUBEVMM_CLUSTER_DIR [~/.cache/kubevmm/cluster], KUBEVMM_BIN
# [<repo>/target/release], KUBEVMM_NODE_NAME [host name],
# KUBEVMM_STATE_DIR [/var/lib/kubevmm-node], KUBEVMM_MASQUERADE_BRIDGE [kubevmm0].
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
D="${KUBEVMM_CLUSTER_DIR:-$HOME/.cache/kubevmm/cluster}"
BIN="${KUBEVMM_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release}"
NODE="${KUBEVMM_NODE_NAME:-$(hostname)}"
STATE="${KUBEVMM_STATE_DIR:-/var/lib/kubevmm-node}"
MASQ_BRIDGE="${KUBEVMM_MASQUERADE_BRIDGE:-kubevmm0}"
RUN="$D/run"
LOGS="$D/logs"

die() { echo "kubevmm-local: error: $*" >&2; exit 1; }
log() { echo "kubevmm-local: $*" >&2; }

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() {
	local name=$1
	shift
	if running "$name"; then
		log "$name already running (pid $(cat "$RUN/$name.pid"))"
		return
	fi
	setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
	echo $! >"$RUN/$name.pid"
	log "$name started (pid $!, log $LOGS/$name.log)"
}

stop() {
	local name=$1 pid
	running "$name" || { rm -f "$RUN/$name.pid"; return; }
	pid=$(cat "$RUN/$name.pid")
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	kill -KILL "$pid" 2>/dev/null || true
	rm -f "$RUN/$name.pid"
	log "$name stopped"
}

case "${1:-}" in
up)
	[ -f "$D/admin.kubeconfig" ] || die "no control plane in $D: run hack/cluster.sh up first"
	for b in kubevmm-operator node-vmm kubevmm-vmm; do
		[ -x "$BIN/$b" ] || die "$BIN/$b missing: run make build"
	done
	mkdir -p "$RUN" "$LOGS" "$STATE"
	start kubevmm-operator "$BIN/kubevmm-operator" --kubeconfig "$D/admin.kubeconfig" \
		--id local-operator --metrics-addr 127.0.0.1:9100
	start node-vmm env KUBECONFIG="$D/admin.kubeconfig" "$BIN/node-vmm" agent \
		--node-name "$NODE" --state-dir "$STATE" --vmm-binary "$BIN/kubevmm-vmm" \
		--allowed-dir /var/lib/kubevmm --metrics-addr 127.0.0.1:9101 \
		--masquerade-bridge "$MASQ_BRIDGE"
	for _ in $(seq 100); do
		KUBECONFIG="$D/admin.kubeconfig" kubectl get hvnode "$NODE" >/dev/null 2>&1 && break
		sleep 0.1
	done
	KUBECONFIG="$D/admin.kubeconfig" kubectl get hvnode "$NODE" >/dev/null 2>&1 ||
		die "node-vmm did not register HypervisorNode $NODE; see $LOGS/node-vmm.log"
	log "operator (metrics 127.0.0.1:9100) and node-vmm for node $NODE (metrics 127.0.0.1:9101) are up"
	;;
down)
	stop node-vmm
	stop kubevmm-operator
	socks=()
	for s in "$STATE"/vms/*/api.sock; do [ -S "$s" ] && socks+=("$s"); done
	for s in "${socks[@]}"; do
		curl -s -m 2 -X PUT --unix-socket "$s" http://vmm/vm/shutdown >/dev/null || true
	done
	for _ in $(seq 100); do
		left=0
		for s in "${socks[@]}"; do [ -S "$s" ] && curl -s -m 1 --unix-socket "$s" http://vmm/vm >/dev/null 2>&1 && left=1; done
		[ "$left" = 0 ] && break
		sleep 0.1
	done
	for s in "${socks[@]}"; do
		curl -s -m 2 -X PUT --unix-socket "$s" http://vmm/vm/stop >/dev/null 2>&1 || true
	done
	[ "${#socks[@]}" = 0 ] || log "stopped ${#socks[@]} guest(s)"
	# The agent's network: taps of the guests, the masquerade bridge and its
	# nftables tables (named after the bridge). Leases stay in the state
	# directory, so the next `up` gives each VM its address again.
	for tap in /sys/class/net/kvt*; do
		if [ -e "$tap" ]; then ip link del "$(basename "$tap")" 2>/dev/null || true; fi
	done
	ip link del "$MASQ_BRIDGE" 2>/dev/null || true
	nft delete table ip "$MASQ_BRIDGE" 2>/dev/null || true
	nft delete table bridge "$MASQ_BRIDGE" 2>/dev/null || true
	log "removed the guests' taps, bridge $MASQ_BRIDGE and its rules"
	;;
status)
	for c in kubevmm-operator node-vmm; do
		if running "$c"; then echo "$c: running (pid $(cat "$RUN/$c.pid"))"; else echo "$c: stopped"; fi
	done
	;;
*)
	sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
	exit 2
	;;
esac
