#!/usr/bin/env bash
# kubevmm the way users run it, on this machine: the control plane
# (hack/cluster.sh), a kubelet node (hack/node.sh), our two images built from
# the release binaries and imported into containerd (images/build.py), and
# `helm install` of charts/kubevmm, so the operator and node-vmm run as pods.
#
# Usage: hack/deploy.sh up | down | upgrade | status
#   up       everything above; labels the node kubevmm.io/hypervisor=true,
#            waits for the operator and node-vmm pods, starts Prometheus
#            (hack/prometheus.sh) scraping them; prints
#            `export KUBECONFIG=...` on stdout. Running it again rebuilds the
#            images and upgrades the release.
#   upgrade  rebuild and import the images, `helm upgrade` (pods roll when an
#            image changed)
#   down     power the cluster off: the node (pods, containerd, kube-proxy's
#            rules), the guests the release's agent ran (ACPI shutdown, then
#            forced) with their taps, bridge and rules, and the control
#            plane; nothing is left running. The release and the VMs stay
#            in etcd: `up` brings them back. (`helm uninstall` is the way to
#            remove kubevmm: docs/deploy.md.)
#   status   the node's processes and the release's pods
#
# Environment (defaults in brackets): those of hack/cluster.sh and
# hack/node.sh, and
#   KUBEVMM_BIN            release binaries [$CARGO_TARGET_DIR/release or target/release]
#   KUBEVMM_IMAGE_TAG      tag of both images [the chart's appVersion]
#   KUBEVMM_HELM           helm [on PATH, else ~/.cache/kubevmm/helm-v3.18.6/helm]
#   KUBEVMM_HELM_VALUES    an extra values file for the release
#   KUBEVMM_RELEASE        release name [kubevmm], in namespace kubevmm-system
#   KUBEVMM_PROMETHEUS     1: `up` also starts Prometheus (hack/prometheus.sh,
#                          KUBEVMM_PROMETHEUS_PORT [9090]) scraping the release [1]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
D="${KUBEVMM_CLUSTER_DIR:-$HOME/.cache/kubevmm/cluster}"
TIMEOUT="${KUBEVMM_READY_TIMEOUT:-180}"
RELEASE="${KUBEVMM_RELEASE:-kubevmm}"
NS=kubevmm-system
RELBIN="${KUBEVMM_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release}"
TAG=deploy
# shellcheck source=hack/lib.sh
. "$HERE/lib.sh"
BIN=$("$HERE/k8s-build.sh" --print-bin-dir)
exe_of() { echo "$BIN/$1"; }
kc() { "$(kubectl_bin)" --kubeconfig "$D/admin.kubeconfig" "$@"; }

HELM="${KUBEVMM_HELM:-$(command -v helm 2>/dev/null || echo "$HOME/.cache/kubevmm/helm-v3.18.6/helm")}"
NODE_IP="${KUBEVMM_NODE_IP:-$(ip -4 -o route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')}"
[ -n "$NODE_IP" ] || die "cannot find this machine's address (no default route); set KUBEVMM_NODE_IP"
export KUBEVMM_NODE_IP="$NODE_IP"
NODE_NAME="${KUBEVMM_NODE_NAME:-$(hostname | tr '[:upper:]' '[:lower:]')}"
export KUBEVMM_NODE_NAME="$NODE_NAME"
SOCK="$D/node/run/containerd.sock"

CHANGED=() # images whose content changed since the last import

images() {
	local tag=() img out digest stamp
	[ -z "${KUBEVMM_IMAGE_TAG:-}" ] || tag=(--tag "$KUBEVMM_IMAGE_TAG")
	for img in operator node-vmm; do
		out=$("$REPO/images/build.py" --bin-dir "$RELBIN" --out "$D/node/images" "${tag[@]}" \
			--import --containerd-address "$SOCK" "$img") ||
			die "building or importing the $img image failed (see above)"
		echo "$out" >&2
		digest=$(sed -n 's/^ *digest: *//p' <<<"$out")
		stamp="$D/node/images/$img.imported"
		[ "$digest" = "$(cat "$stamp" 2>/dev/null || true)" ] || CHANGED+=("$img")
		echo "$digest" >"$stamp"
	done
}

# The images keep their tag when only their content changes (a rebuilt
# binary): roll the workloads whose image changed, as a registry user would
# by pushing a new tag.
restart_changed() {
	local img kind
	for img in "${CHANGED[@]}"; do
		case "$img" in
		operator) kind=deployment ;;
		node-vmm) kind=daemonset ;;
		esac
		log "the $img image changed: restarting $kind/$RELEASE-$img"
		kc -n "$NS" rollout restart "$kind/$RELEASE-$img" >&2
		kc -n "$NS" rollout status "$kind/$RELEASE-$img" --timeout "${TIMEOUT}s" >&2 ||
			die "$kind/$RELEASE-$img did not roll out within ${TIMEOUT}s"
	done
}

installed() {
	"$HELM" status "$RELEASE" -n "$NS" --kubeconfig "$D/admin.kubeconfig" >/dev/null 2>&1
}

helm_install() {
	[ -x "$HELM" ] || die "helm not found at $HELM; run hack/helm-build.sh (hack/install-deps.sh does)"
	local args=(upgrade --install "$RELEASE" "$REPO/charts/kubevmm" --namespace "$NS" --create-namespace
		--kubeconfig "$D/admin.kubeconfig" --wait --timeout "${TIMEOUT}s")
	[ -z "${KUBEVMM_IMAGE_TAG:-}" ] ||
		args+=(--set "operator.image.tag=$KUBEVMM_IMAGE_TAG" --set "nodeVmm.image.tag=$KUBEVMM_IMAGE_TAG")
	[ -z "${KUBEVMM_HELM_VALUES:-}" ] || args+=(--values "$KUBEVMM_HELM_VALUES")
	log "helm ${args[*]}"
	"$HELM" "${args[@]}" >&2 || {
		kc -n "$NS" get pods -o wide >&2 || true
		kc -n "$NS" get events --sort-by=.lastTimestamp >&2 | tail -n 20 || true
		die "helm install of charts/kubevmm did not become ready within ${TIMEOUT}s (pods and events above)"
	}
	# Where the agent keeps its guests and which bridge it made: `down`
	# stops those guests and removes that bridge even with the API gone.
	"$HELM" get values "$RELEASE" -n "$NS" --kubeconfig "$D/admin.kubeconfig" --all -o json |
		python3 -c 'import json, sys; n = json.load(sys.stdin)["nodeVmm"]
print("GUEST_STATE=%s\nGUEST_BRIDGE=%s" % (n["stateDir"], n["masquerade"]["bridge"]))' \
		>"$D/node/release.env" || die "cannot read the release's values (helm get values)"
	# helm --wait does not wait for a DaemonSet's pods to be Ready.
	kc -n "$NS" rollout status "daemonset/$RELEASE-node-vmm" --timeout "${TIMEOUT}s" >&2 || {
		kc -n "$NS" get pods -o wide >&2 || true
		kc -n "$NS" logs "daemonset/$RELEASE-node-vmm" --tail 20 >&2 || true
		die "node-vmm did not become Ready within ${TIMEOUT}s (pods and its log above)"
	}
}

cmd_up() {
	"$HERE/cluster.sh" up >/dev/null
	"$HERE/node.sh" up
	images
	kc label node "$NODE_NAME" kubevmm.io/hypervisor=true --overwrite >/dev/null
	local was=0
	installed && was=1
	helm_install
	[ "$was" = 0 ] || restart_changed
	kc -n "$NS" get pods -o wide >&2
	if [ "${KUBEVMM_PROMETHEUS:-1}" = 1 ]; then
		"$HERE/prometheus.sh" up >/dev/null
	fi
	log "kubevmm installed with helm (release $RELEASE in $NS), took $(elapsed)"
	"$HERE/cluster.sh" env
}

cmd_upgrade() {
	installed || die "release $RELEASE is not installed; run hack/deploy.sh up"
	images
	helm_install
	restart_changed
	kc -n "$NS" get pods -o wide >&2
}

cmd_down() {
	# Powering the cluster off, not uninstalling: the release and the
	# VirtualMachines stay in etcd, and the next `up` starts the guests
	# again per runStrategy. Pods go with the node; guests outlive their
	# agent by design, so they are stopped here.
	"$HERE/prometheus.sh" down
	"$HERE/node.sh" down
	if [ -f "$D/node/release.env" ]; then
		local GUEST_STATE GUEST_BRIDGE
		# shellcheck disable=SC1091 # written by helm_install
		. "$D/node/release.env"
		stop_guests "$GUEST_STATE" "$GUEST_BRIDGE"
	fi
	"$HERE/cluster.sh" down
}

cmd_status() {
	local rc=0
	"$HERE/node.sh" status || rc=1
	kc -n "$NS" get pods -o wide || rc=1
	return $rc
}

case "${1:-}" in
up) cmd_up ;;
upgrade) cmd_upgrade ;;
down) cmd_down ;;
status) cmd_status ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
*) die "usage: $0 up | upgrade | down | status" ;;
esac
