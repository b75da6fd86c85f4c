#!/usr/bin/env bash
# The cluster half of `make demo` (after `make cluster-up`): kubectl apply a
# VirtualMachine, watch the operator place it and node-vmm boot it, show the
# guest's console, then delete it and show the graceful shutdown.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export KUBECONFIG="${KUBEVMM_CLUSTER_DIR:-$HOME/.cache/kubevmm/cluster}/admin.kubeconfig"
STATE="${KUBEVMM_STATE_DIR:-/var/lib/kubevmm-node}"
NODE_VMM="${KUBEVMM_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release}/node-vmm"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
PATH="$TARGET_DIR/release:$PATH"   # kubectl finds our plugin, kubectl-vm

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }

kubectl delete vm demo --ignore-not-found --wait=true >/dev/null
say "\$ kubectl apply -f examples/demo-cluster.yaml"
start=$(date +%s%N)
kubectl apply -f "$REPO/examples/demo-cluster.yaml"
kubectl wait --for=jsonpath='{.status.phase}'=Running vm/demo --timeout=60s >/dev/null
ms=$((($(date +%s%N) - start) / 1000000))
say "\$ kubectl get vm,hvnode   (apply -> Running took ${ms} ms)"
kubectl get vm demo -o wide
kubectl get hvnode
uid=$(kubectl get vm demo -o jsonpath='{.metadata.uid}')
console="$STATE/vms/$uid/console.ring"
for _ in $(seq 50); do "$NODE_VMM" console-log "$console" 2>/dev/null | grep -q 'waiting for ACPI' && break; sleep 0.1; done
say "guest console (node-vmm console-log $console):"
"$NODE_VMM" console-log "$console"
wait_status() {
	kubectl wait --for=jsonpath='{.status.printableStatus}'="$1" vm/demo --timeout=60s >/dev/null
}
say "\$ kubectl vm list; kubectl vm info demo   (the kubectl plugin, virsh-style)"
kubectl vm list
kubectl vm info demo
say "\$ kubectl vm pause demo; kubectl vm resume demo"
kubectl vm pause demo && wait_status Paused && kubectl vm list
kubectl vm resume demo && wait_status Running && kubectl vm list
say "\$ kubectl vm stop demo   (ACPI shutdown; runStrategy Halted until started)"
kubectl vm stop demo && wait_status Stopped && kubectl vm list
say "\$ kubectl vm start demo"
kubectl vm start demo && wait_status Running && kubectl vm list
say "\$ kubectl delete vm demo   (ACPI shutdown, then the finalizer is released)"
kubectl delete vm demo --wait=true
kubectl get events --field-selector involvedObject.name=demo --sort-by=.lastTimestamp \
	-o custom-columns=REASON:.reason,MESSAGE:.message 2>/dev/null | tail -n 8
say "demo done: 'make cluster-down' stops the control plane, the operator and node-vmm"
