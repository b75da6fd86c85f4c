#!/usr/bin/env bash
# The cluster half of `make demo` (after `make cluster-up`): kubectl apply a
# VirtualMachine, watch the operator place it and node-vmm boot it, read the
# guest's console through the API server (`kubectl vm logs`), drive it with
# the kubectl plugin, type into a second guest (the echo guest) with
# `kubectl vm console` and see its answer come back through the API server,
# then delete both and show the graceful shutdown.
#
# Environment: KUBEVMM_CLUSTER_DIR [~/.cache/kubevmm/cluster], KUBEVMM_BIN
# [<repo>/target/release, or $CARGO_TARGET_DIR/release], KUBEVMM_DEMO_TIMEOUT
# [60] (seconds for each wait; every wait is bounded).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export KUBECONFIG="${KUBEVMM_CLUSTER_DIR:-$HOME/.cache/kubevmm/cluster}/admin.kubeconfig"
BIN="${KUBEVMM_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release}"
PATH="$BIN:$PATH" # kubectl finds our plugin, kubectl-vm
T="${KUBEVMM_DEMO_TIMEOUT:-60}"
DEMO_DISK=/var/lib/kubevmm/disks/demo.img

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
die() { echo "demo-cluster: error: $*" >&2; exit 1; }

[[ "$T" =~ ^[0-9]+$ ]] || die "KUBEVMM_DEMO_TIMEOUT='$T' is not a number of seconds"
[ -x "$BIN/kubectl-vm" ] || die "$BIN/kubectl-vm missing: run make build"
[ -f "$KUBECONFIG" ] || die "no cluster: run make cluster-up"
# The demo guest's disk (`make demo-standalone` writes it too).
if [ ! -f "$DEMO_DISK" ]; then
	install -d "$(dirname "$DEMO_DISK")"
	printf 'hello from a host file, read over virtio-blk\n' >"$DEMO_DISK"
	truncate -s 1M "$DEMO_DISK"
fi

wait_status() { # wait_status VM STATUS
	kubectl wait --for=jsonpath='{.status.printableStatus}'="$2" "vm/$1" --timeout="${T}s" >/dev/null
}

wait_logs() { # wait_logs VM TEXT: until TEXT is in `kubectl vm logs VM`
	local deadline=$((SECONDS + T)) out=""
	until grep -qF -- "$2" <<<"$out"; do
		if [ $SECONDS -ge $deadline ]; then
			printf '%s\n' "$out" >&2
			die "no \"$2\" in kubectl vm logs $1 after ${T}s (above: its last answer)"
		fi
		sleep 0.2
		out=$(kubectl vm logs "$1" 2>&1) || true
	done
}

kubectl delete vm demo echo --ignore-not-found --wait=true --timeout="${T}s" >/dev/null
say "\$ kubectl apply -f examples/demo-cluster.yaml"
start=$(date +%s%N)
kubectl apply -f "$REPO/examples/demo-cluster.yaml"
wait_status demo Running
ms=$((($(date +%s%N) - start) / 1000000))
say "\$ kubectl get vm,hvnode   (apply -> Running took ${ms} ms)"
kubectl get vm demo -o wide
kubectl get hvnode
wait_logs demo 'waiting for ACPI'
say "\$ kubectl vm logs demo   (the guest's serial console, through the API server)"
kubectl vm logs demo

say "\$ kubectl vm list; kubectl vm info demo   (the kubectl plugin, virsh-style)"
kubectl vm list
kubectl vm info demo
say "\$ kubectl vm pause demo; kubectl vm resume demo"
kubectl vm pause demo && wait_status demo Paused && kubectl vm list
kubectl vm resume demo && wait_status demo Running && kubectl vm list
say "\$ kubectl vm stop demo   (ACPI shutdown; runStrategy Halted until started)"
kubectl vm stop demo && wait_status demo Stopped && kubectl vm list
say "\$ kubectl vm start demo"
kubectl vm start demo && wait_status demo Running && kubectl vm list

# The demo guest reads no input: the echo guest answers each line typed.
say "\$ kubectl apply -f examples/echo-cluster.yaml   (a guest that answers its console)"
kubectl apply -f "$REPO/examples/echo-cluster.yaml"
wait_status echo Running
wait_logs echo 'echo guest ready'
line="hello from kubectl, through the API server"
# The pipe stays open 2 s after the line, for the answer to come back
# before --detach-on-eof detaches.
say "\$ (echo '$line'; sleep 2) | kubectl vm console echo --detach-on-eof"
out=$({
	echo "$line"
	sleep 2
} | timeout "$T" kubectl vm console echo --detach-on-eof 2>&1) ||
	die "kubectl vm console echo failed: $out"
printf '%s\n' "$out"
grep -qF "echo: $line" <<<"$out" || die "the echo guest's answer did not come back through the console"
say "\$ kubectl vm logs echo --tail 2   (the console's buffer keeps it)"
kubectl vm logs echo --tail 2

say "\$ kubectl delete vm demo echo   (ACPI shutdown, then the finalizer is released)"
kubectl delete vm demo echo --wait=true --timeout="${T}s"
kubectl get events --field-selector involvedObject.name=demo --sort-by=.lastTimestamp \
	-o custom-columns=REASON:.reason,MESSAGE:.message 2>/dev/null | tail -n 8
say "demo done: 'make cluster-down' powers the cluster off, guests included; 'make cluster-up' brings it back"
