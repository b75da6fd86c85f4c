#!/usr/bin/env bash
# A kubelet node for the control plane of hack/cluster.sh: containerd (with
# runc and the CNI plugins, Debian's packages), kube-scheduler, kube-proxy
# (nftables mode) and the kubelet, all on this machine.
#
# Usage: hack/node.sh up | down | status
#   up       start what is not running and wait until the node is Ready.
#            The control plane must be up with KUBEVMM_NODE_IP set (pods
#            reach the API server at that address through the `kubernetes`
#            Service); the sandbox image is built and imported if missing.
#   down     delete every pod sandbox (containers, shims, veths), stop the
#            node's processes, unmount what the kubelet mounted, remove the
#            CNI bridge and kube-proxy's nftables tables.
#   status   what runs
#
# Environment (defaults in brackets):
#   KUBEVMM_CLUSTER_DIR     the control plane's state dir [~/.cache/kubevmm/cluster];
#                           the node's lives in its node/ subdirectory
#   KUBEVMM_APISERVER_PORT  kube-apiserver port [6443]
#   KUBEVMM_NODE_IP         this node's address [the default route's source]
#   KUBEVMM_NODE_NAME       the Node's name [the host name, lower case]
#   KUBEVMM_POD_CIDR        pod addresses [10.244.0.0/24]
#   KUBEVMM_READY_TIMEOUT   seconds to wait for each component [120]
#
# Decisions (docs/deploy.md): no systemd here, so the cgroupfs driver on
# cgroup v1 (failCgroupV1: false); nothing can be pulled, so image garbage
# collection is off and the pause image is built from Kubernetes' pause.c;
# pods talk to the API server through the `kubernetes` Service, which
# kube-proxy maps to the node address the API server advertises.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CD="${KUBEVMM_CLUSTER_DIR:-$HOME/.cache/kubevmm/cluster}"
D="$CD/node"
PKI="$CD/pki"
API_PORT="${KUBEVMM_APISERVER_PORT:-6443}"
TIMEOUT="${KUBEVMM_READY_TIMEOUT:-120}"
POD_CIDR="${KUBEVMM_POD_CIDR:-10.244.0.0/24}"
CNI_BRIDGE=kubevmm-cni0
CNI_BIN=/usr/lib/cni
SOCK="$D/run/containerd.sock"
PAUSE_IMAGE=registry.k8s.io/pause:3.10
COMPONENTS=(containerd kube-scheduler kube-proxy kubelet)
TAG=node
# shellcheck source=hack/lib.sh
. "$HERE/lib.sh"

BIN=$("$HERE/k8s-build.sh" --print-bin-dir)
exe_of() {
	case "$1" in
	containerd) echo /usr/bin/containerd ;;
	*) echo "$BIN/$1" ;;
	esac
}
kc() { "$(kubectl_bin)" --kubeconfig "$CD/admin.kubeconfig" "$@"; }
crictl() { "$BIN/crictl" --runtime-endpoint "unix://$SOCK" --timeout 30s "$@"; }

NODE_IP="${KUBEVMM_NODE_IP:-$(ip -4 -o route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')}"
[ -n "$NODE_IP" ] || die "cannot find this machine's address (no default route); set KUBEVMM_NODE_IP"
NODE_NAME="${KUBEVMM_NODE_NAME:-$(hostname | tr '[:upper:]' '[:lower:]')}"
API="https://$NODE_IP:$API_PORT"

# ------------------------------------------------------------ config
make_node_pki() {
	[ -s "$PKI/ca.key" ] || die "no cluster CA in $PKI; run hack/cluster.sh up first"
	new_cert kubelet ca "/O=system:nodes/CN=system:node:$NODE_NAME" client
	new_cert kubelet-serving ca "/CN=$NODE_NAME" server "IP:$NODE_IP,IP:127.0.0.1,DNS:$NODE_NAME"
	new_cert kube-scheduler ca "/CN=system:kube-scheduler" client
	new_cert kube-proxy ca "/CN=system:kube-proxy" client
	write_kubeconfig "$D/kubelet.kubeconfig" "system:node:$NODE_NAME" kubelet "$API"
	write_kubeconfig "$D/kube-scheduler.kubeconfig" system:kube-scheduler kube-scheduler "$API"
	write_kubeconfig "$D/kube-proxy.kubeconfig" system:kube-proxy kube-proxy "$API"
}

write_configs() {
	mkdir -p "$D/containerd" "$D/cni/net.d" "$D/kubelet" "$D/run"
	cat >"$D/containerd/config.toml" <<EOF
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
[grpc]
  address = "$SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$D/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This machine refuses the sandbox's oom_score_adj below the runtime's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$D/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$D/cni/net.d"
EOF
	# Written before the kubelet starts: the node is Ready only with it.
	cat >"$D/cni/net.d/10-kubevmm.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "kubevmm-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$CNI_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$D/cni/ipam"
      }
    },
    {"type": "loopback"}
  ]
}
EOF
	cat >"$D/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
tlsCertFile: "$PKI/kubelet-serving.crt"
tlsPrivateKeyFile: "$PKI/kubelet-serving.key"
containerRuntimeEndpoint: "unix://$SOCK"
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
address: "$NODE_IP"
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# Nothing can be pulled again: never delete an image.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
serializeImagePulls: false
registerNode: true
# kube-proxy (nftables mode) does the Service rules; no iptables chains of
# the kubelet's own to leave behind.
makeIPTablesUtilChains: false
EOF
	cat >"$D/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: "$D/kube-proxy.kubeconfig"}
hostnameOverride: "$NODE_NAME"
clusterCIDR: "$POD_CIDR"
bindAddress: "$NODE_IP"
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$NODE_IP/32"]
# Leave the conntrack sysctls as the host has them.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# ------------------------------------------------------------ components
containerd_ready() { crictl info >/dev/null; }
scheduler_healthy() { curl -fsSk --max-time 2 https://127.0.0.1:10259/healthz; }
proxy_healthy() { curl -fsS --max-time 2 http://127.0.0.1:10256/healthz; }
node_ready() {
	kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}
image_present() { crictl inspecti "$1" >/dev/null 2>&1; }

start_containerd() {
	pid_of containerd >/dev/null && return 0
	log "starting containerd (socket $SOCK)"
	start containerd --config "$D/containerd/config.toml"
	wait_until containerd containerd_ready
}

import_pause() {
	image_present "$PAUSE_IMAGE" && return 0
	log "building and importing the sandbox image $PAUSE_IMAGE (from Kubernetes' pause.c)"
	"$REPO/images/build.py" --out "$D/images" --import --containerd-address "$SOCK" pause >&2 ||
		die "could not build or import $PAUSE_IMAGE (see above)"
}

start_scheduler() {
	pid_of kube-scheduler >/dev/null && return 0
	log "starting kube-scheduler"
	start kube-scheduler \
		--kubeconfig="$D/kube-scheduler.kubeconfig" \
		--authentication-kubeconfig="$D/kube-scheduler.kubeconfig" \
		--authorization-kubeconfig="$D/kube-scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --secure-port=10259 \
		--leader-elect=false --profiling=false
	wait_until kube-scheduler scheduler_healthy
}

start_proxy() {
	pid_of kube-proxy >/dev/null && return 0
	command -v nft >/dev/null 2>&1 || die "nft not found; apt-get install -y nftables (hack/install-deps.sh)"
	log "starting kube-proxy (nftables mode)"
	start kube-proxy --config="$D/kube-proxy.yaml"
	wait_until kube-proxy proxy_healthy
}

start_kubelet() {
	pid_of kubelet >/dev/null && return 0
	log "starting kubelet (node $NODE_NAME at $NODE_IP)"
	start kubelet \
		--config="$D/kubelet/config.yaml" \
		--kubeconfig="$D/kubelet.kubeconfig" \
		--root-dir="$D/kubelet/root" \
		--hostname-override="$NODE_NAME" \
		--node-ip="$NODE_IP" \
		--v=1
	wait_until kubelet node_ready
}

# ------------------------------------------------------------- commands
cmd_up() {
	for t in "$CNI_BIN/bridge" "$CNI_BIN/host-local" "$CNI_BIN/loopback" /usr/bin/containerd /usr/sbin/runc; do
		[ -x "$t" ] || die "$t is missing; run hack/install-deps.sh (containerd, runc, containernetworking-plugins)"
	done
	curl -fsS --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
		"$API/readyz" >/dev/null 2>&1 ||
		die "kube-apiserver is not reachable at $API; start it with KUBEVMM_NODE_IP=$NODE_IP hack/cluster.sh up"
	# The kubelet's HostToContainer and Bidirectional volumes need shared
	# mounts, which systemd would have set up.
	mount --make-rshared / || die "mount --make-rshared / failed (are you root?)"
	mkdir -p "$D"
	make_node_pki
	write_configs
	if ! pid_of kubelet >/dev/null; then
		local p
		for p in 10250 10248 10259 10256; do
			if port_busy "$p"; then
				die "port $p (kubelet, kube-scheduler or kube-proxy) is in use: another node runs on this machine (one per machine); stop it first (hack/deploy.sh down with its KUBEVMM_CLUSTER_DIR)"
			fi
		done
	fi
	start_containerd
	import_pause
	start_scheduler
	start_proxy
	start_kubelet
	log "node $NODE_NAME Ready (state in $D), took $(elapsed)"
}

unmount_below() { # lazily unmount every mount under $1, deepest first
	local m
	findmnt -rn -o TARGET | { grep -F -- "$1/" || true; } | sort -r | while read -r m; do
		umount -l "$m" 2>/dev/null || log "could not unmount $m"
	done
}

cmd_down() {
	stop kubelet kube-scheduler
	if pid_of containerd >/dev/null; then
		# Sandboxes first: their containers, shims and veths go with them.
		crictl rmp --all --force >/dev/null 2>&1 || log "crictl rmp --all failed; killing the shims instead"
	fi
	stop containerd
	stop kube-proxy
	kill_strays "${COMPONENTS[@]}"
	# Shims of this containerd that outlived it (their command line names it).
	local pid
	for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" || true); do
		kill -KILL "$pid" 2>/dev/null || true
	done
	# kube-proxy's own nftables tables.
	[ ! -f "$D/kube-proxy.yaml" ] || "$BIN/kube-proxy" --cleanup --config="$D/kube-proxy.yaml" >/dev/null 2>&1 || true
	unmount_below "$D"
	if ip link show "$CNI_BRIDGE" >/dev/null 2>&1; then
		ip link del "$CNI_BRIDGE" || log "could not delete $CNI_BRIDGE"
	fi
	rm -rf "$D/cni/ipam"
	# The kubelet's pod cgroups (empty now), in every hierarchy.
	local cg
	for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
		[ ! -d "$cg" ] || find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
	done
	# containerd's fixed runtime directories (shim sockets, fifos), if empty.
	rmdir /run/containerd/s /run/containerd/fifo /run/containerd/runc/k8s.io \
		/run/containerd/runc /run/containerd 2>/dev/null || true
	wait_ports_free 10250 10248 10259 10256 10249
	log "node down, took $(elapsed)"
}

cmd_status() {
	local n pid rc=0
	for n in "${COMPONENTS[@]}"; do
		if pid=$(pid_of "$n"); then
			printf '%-16s running  pid %s\n' "$n" "$pid"
		else
			printf '%-16s stopped\n' "$n"
			rc=1
		fi
	done
	return $rc
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
*) die "usage: $0 up | down | status" ;;
esac
