#!/usr/bin/env bash
# A real local Kubernetes control plane on loopback: etcd, kube-apiserver,
# kube-controller-manager, TLS everywhere, RBAC, service-account tokens, and
# kubevmm's CRDs.
#
# Usage: hack/cluster.sh up | down [--purge] | env | status
#   up       build the binaries if needed (hack/k8s-build.sh), create the PKI
#            and kubeconfigs, start what is not running, wait until ready,
#            install crds/*.yaml; prints `export KUBECONFIG=...` on stdout.
#            Running it again when everything is up is fine.
#   down     stop what `up` started (pid files), wait until the ports are free.
#            --purge also deletes the etcd data (and the logs).
#   env      print the export lines (KUBECONFIG, and PATH if kubectl is ours)
#   status   what runs, on which port, and whether the API server is ready
#
# Environment (defaults in brackets); a test harness runs a private instance
# by setting its own directory and ports:
#   KUBEVMM_CLUSTER_DIR          state dir [~/.cache/kubevmm/cluster]
#   KUBEVMM_APISERVER_PORT       kube-apiserver secure port [6443]
#   KUBEVMM_ETCD_PORT            etcd client port [2379]
#   KUBEVMM_ETCD_PEER_PORT       etcd peer port [2380]
#   KUBEVMM_KCM_PORT             kube-controller-manager secure port [10257]
#   KUBEVMM_CRDS_DIR             CRD manifests to install [<repo>/crds]
#   KUBEVMM_ETCD_ARGS, KUBEVMM_APISERVER_ARGS, KUBEVMM_KCM_ARGS
#                                extra flags for each component
#   KUBEVMM_READY_TIMEOUT        seconds to wait for each component [120]
#
# Everything binds to 127.0.0.1. State dir layout: pki/ (CAs, certificates,
# service-account keys), etcd/ (data), logs/<component>.log, run/<component>.pid,
# admin.kubeconfig (O=system:masters), controller-manager.kubeconfig.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

D="${KUBEVMM_CLUSTER_DIR:-$HOME/.cache/kubevmm/cluster}"
API_PORT="${KUBEVMM_APISERVER_PORT:-6443}"
ETCD_PORT="${KUBEVMM_ETCD_PORT:-2379}"
ETCD_PEER_PORT="${KUBEVMM_ETCD_PEER_PORT:-2380}"
KCM_PORT="${KUBEVMM_KCM_PORT:-10257}"
CRDS_DIR="${KUBEVMM_CRDS_DIR:-$REPO/crds}"
TIMEOUT="${KUBEVMM_READY_TIMEOUT:-120}"
SERVICE_CIDR="10.96.0.0/16"
SERVICE_IP="10.96.0.1"
PKI="$D/pki"
KUBECONFIG_ADMIN="$D/admin.kubeconfig"
COMPONENTS=(etcd kube-apiserver kube-controller-manager)

TAG=cluster
# shellcheck source=hack/lib.sh
. "$HERE/lib.sh"

# With a node (hack/node.sh), pods reach the API server at the node's
# address: kube-apiserver then listens on all addresses and advertises this
# one as the endpoint of the `kubernetes` Service.
NODE_IP="${KUBEVMM_NODE_IP:-}"
if [ -n "$NODE_IP" ]; then
	[[ "$NODE_IP" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "KUBEVMM_NODE_IP='$NODE_IP' is not an IPv4 address"
fi

for p in API_PORT ETCD_PORT ETCD_PEER_PORT KCM_PORT; do
	{ [[ "${!p}" =~ ^[0-9]+$ ]] && [ "${!p}" -ge 1 ] && [ "${!p}" -le 65535 ]; } ||
		die "$p='${!p}' is not a port number"
done

BIN=$("$HERE/k8s-build.sh" --print-bin-dir)

kc() { "$(kubectl_bin)" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
exe_of() { echo "$BIN/$1"; }

make_pki() {
	command -v openssl >/dev/null 2>&1 || die "openssl not found; apt-get install -y openssl"
	mkdir -p "$PKI"
	chmod 700 "$PKI"
	local local_sans="IP:127.0.0.1,DNS:localhost"
	new_ca ca "kubevmm-ca"
	new_ca etcd-ca "kubevmm-etcd-ca"
	new_ca front-proxy-ca "kubevmm-front-proxy-ca"
	new_cert etcd-server etcd-ca "/CN=etcd" both "$local_sans"
	new_cert apiserver-etcd-client etcd-ca "/O=system:masters/CN=kube-apiserver-etcd-client" client
	new_cert apiserver ca "/CN=kube-apiserver" server \
		"$local_sans${NODE_IP:+,IP:$NODE_IP},IP:$SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
	new_cert admin ca "/O=system:masters/CN=kubevmm-admin" client
	new_cert controller-manager ca "/CN=system:kube-controller-manager" client
	new_cert front-proxy-client front-proxy-ca "/CN=front-proxy-client" client
	# kube-apiserver -> kubelet (logs, exec, port-forward of pods).
	new_cert apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" client
	# Service-account token signing key pair (RSA: accepted by everything).
	if [ ! -s "$PKI/sa.key" ] || [ ! -s "$PKI/sa.pub" ]; then
		openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key" 2>/dev/null
		openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
	fi
}

# ----------------------------------------------------------- components
curl_ok() { # curl_ok URL CA [CERT KEY]: 2xx from a TLS endpoint
	local url="$1" ca="$2"
	shift 2
	if [ $# -eq 2 ]; then
		curl -fsS --max-time 2 --cacert "$ca" --cert "$1" --key "$2" "$url"
	else
		curl -fsS --max-time 2 --cacert "$ca" "$url"
	fi
}
etcd_healthy() {
	curl_ok "https://127.0.0.1:$ETCD_PORT/health" "$PKI/etcd-ca.crt" \
		"$PKI/apiserver-etcd-client.crt" "$PKI/apiserver-etcd-client.key" | grep -q '"health":"true"'
}
apiserver_ready() {
	curl_ok "https://127.0.0.1:$API_PORT/readyz" "$PKI/ca.crt" "$PKI/admin.crt" "$PKI/admin.key"
}
kcm_healthy() {
	# Serving certificate is self-signed (in pki/controller-manager-serving).
	curl -fsSk --max-time 2 "https://127.0.0.1:$KCM_PORT/healthz"
}
default_sa_exists() { kc -n default get serviceaccount default; }

start_etcd() {
	if pid_of etcd >/dev/null; then return 0; fi
	mkdir -p "$D/etcd"
	chmod 700 "$D/etcd"
	log "starting etcd on 127.0.0.1:$ETCD_PORT"
	# shellcheck disable=SC2086 # extra args are a word list
	start etcd \
		--name=default \
		--data-dir="$D/etcd" \
		--listen-client-urls="https://127.0.0.1:$ETCD_PORT" \
		--advertise-client-urls="https://127.0.0.1:$ETCD_PORT" \
		--listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster="default=http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster-state=new \
		--cert-file="$PKI/etcd-server.crt" \
		--key-file="$PKI/etcd-server.key" \
		--trusted-ca-file="$PKI/etcd-ca.crt" \
		--client-cert-auth=true \
		--heartbeat-interval=50 \
		--election-timeout=300 \
		--auto-compaction-retention=1h \
		--quota-backend-bytes=2147483648 \
		--log-level=warn \
		${KUBEVMM_ETCD_ARGS:-}
	wait_until etcd etcd_healthy
}

start_apiserver() {
	if pid_of kube-apiserver >/dev/null; then return 0; fi
	mkdir -p "$PKI/apiserver-generated"
	local listen=(--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none)
	if [ -n "$NODE_IP" ]; then
		listen=(--bind-address=0.0.0.0 --advertise-address="$NODE_IP" --endpoint-reconciler-type=lease)
	fi
	log "starting kube-apiserver on https://${NODE_IP:-127.0.0.1}:$API_PORT"
	# shellcheck disable=SC2086 # extra args are a word list
	start kube-apiserver \
		"${listen[@]}" \
		--secure-port="$API_PORT" \
		--cert-dir="$PKI/apiserver-generated" \
		--tls-cert-file="$PKI/apiserver.crt" \
		--tls-private-key-file="$PKI/apiserver.key" \
		--client-ca-file="$PKI/ca.crt" \
		--etcd-servers="https://127.0.0.1:$ETCD_PORT" \
		--etcd-cafile="$PKI/etcd-ca.crt" \
		--etcd-certfile="$PKI/apiserver-etcd-client.crt" \
		--etcd-keyfile="$PKI/apiserver-etcd-client.key" \
		--authorization-mode=Node,RBAC \
		--anonymous-auth=false \
		--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,NodeRestriction,DefaultStorageClass,DefaultTolerationSeconds,ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-account-key-file="$PKI/sa.pub" \
		--service-account-signing-key-file="$PKI/sa.key" \
		--api-audiences=https://kubernetes.default.svc.cluster.local \
		--service-cluster-ip-range="$SERVICE_CIDR" \
		--allow-privileged=true \
		--requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
		--requestheader-allowed-names=front-proxy-client \
		--requestheader-username-headers=X-Remote-User \
		--requestheader-group-headers=X-Remote-Group \
		--requestheader-extra-headers-prefix=X-Remote-Extra- \
		--proxy-client-cert-file="$PKI/front-proxy-client.crt" \
		--proxy-client-key-file="$PKI/front-proxy-client.key" \
		--enable-aggregator-routing=true \
		--kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
		--kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
		--kubelet-preferred-address-types=InternalIP \
		--profiling=false \
		${KUBEVMM_APISERVER_ARGS:-}
	wait_until kube-apiserver apiserver_ready
}

start_kcm() {
	if pid_of kube-controller-manager >/dev/null; then return 0; fi
	mkdir -p "$PKI/controller-manager-serving"
	log "starting kube-controller-manager (health on https://127.0.0.1:$KCM_PORT)"
	# shellcheck disable=SC2086 # extra args are a word list
	start kube-controller-manager \
		--kubeconfig="$D/controller-manager.kubeconfig" \
		--authentication-kubeconfig="$D/controller-manager.kubeconfig" \
		--authorization-kubeconfig="$D/controller-manager.kubeconfig" \
		--bind-address=127.0.0.1 \
		--secure-port="$KCM_PORT" \
		--cert-dir="$PKI/controller-manager-serving" \
		--leader-elect=false \
		--controllers='*' \
		--use-service-account-credentials=true \
		--service-account-private-key-file="$PKI/sa.key" \
		--root-ca-file="$PKI/ca.crt" \
		--cluster-signing-cert-file="$PKI/ca.crt" \
		--cluster-signing-key-file="$PKI/ca.key" \
		--service-cluster-ip-range="$SERVICE_CIDR" \
		--allocate-node-cidrs=false \
		--profiling=false \
		${KUBEVMM_KCM_ARGS:-}
	wait_until kube-controller-manager kcm_healthy
	# The service-account controller creating "default" shows the controllers
	# really run against the API server.
	wait_until kube-controller-manager default_sa_exists
}

install_crds() {
	local files=() f
	if [ -d "$CRDS_DIR" ]; then
		for f in "$CRDS_DIR"/*.yaml "$CRDS_DIR"/*.yml; do
			[ -f "$f" ] && files+=("$f")
		done
	fi
	if [ ${#files[@]} -eq 0 ]; then
		log "no CRD manifests in $CRDS_DIR (*.yaml); nothing to install"
		return 0
	fi
	local args=()
	for f in "${files[@]}"; do args+=(-f "$f"); done
	log "installing ${#files[@]} CRD manifest(s) from $CRDS_DIR"
	kc apply --server-side --force-conflicts --field-manager=kubevmm-cluster-sh "${args[@]}" >&2 ||
		die "kubectl apply of the CRDs in $CRDS_DIR failed (see above)"
	kc wait --for=condition=Established --timeout="${TIMEOUT}s" "${args[@]}" >/dev/null ||
		die "the CRDs in $CRDS_DIR did not become Established within ${TIMEOUT}s"
}

print_env() {
	echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
	if [ -x "$BIN/kubectl" ]; then echo "export PATH=$BIN:\$PATH"; fi
}

# ------------------------------------------------------------- commands
cmd_up() {
	command -v curl >/dev/null 2>&1 || die "curl not found; apt-get install -y curl"
	command -v ss >/dev/null 2>&1 || die "ss not found; apt-get install -y iproute2"
	"$HERE/k8s-build.sh"
	mkdir -p "$D"
	make_pki
	write_kubeconfig "$KUBECONFIG_ADMIN" kubevmm-admin admin "https://127.0.0.1:$API_PORT"
	write_kubeconfig "$D/controller-manager.kubeconfig" system:kube-controller-manager controller-manager \
		"https://127.0.0.1:$API_PORT"
	# Fail before starting anything when a port we need is taken.
	if ! pid_of etcd >/dev/null; then
		check_port_free etcd "$ETCD_PORT" KUBEVMM_ETCD_PORT
		check_port_free "etcd peer" "$ETCD_PEER_PORT" KUBEVMM_ETCD_PEER_PORT
	fi
	pid_of kube-apiserver >/dev/null || check_port_free kube-apiserver "$API_PORT" KUBEVMM_APISERVER_PORT
	pid_of kube-controller-manager >/dev/null || check_port_free kube-controller-manager "$KCM_PORT" KUBEVMM_KCM_PORT
	start_etcd
	start_apiserver
	start_kcm
	install_crds
	log "control plane up (state in $D), took $(elapsed)"
	print_env
}

cmd_down() {
	local purge=0
	case "${1:-}" in
	"") ;;
	--purge) purge=1 ;;
	*) die "unknown argument to down: '$1' (only --purge)" ;;
	esac
	# Which ports must be free afterwards: those of the components that run.
	local ports=""
	pid_of etcd >/dev/null && ports="$ports $ETCD_PORT $ETCD_PEER_PORT"
	pid_of kube-apiserver >/dev/null && ports="$ports $API_PORT"
	pid_of kube-controller-manager >/dev/null && ports="$ports $KCM_PORT"
	# The API server and the controller manager together, etcd after them.
	stop kube-controller-manager kube-apiserver
	stop etcd
	kill_strays "${COMPONENTS[@]}"
	# The ports must be free when we return.
	# shellcheck disable=SC2086 # a word list of ports
	wait_ports_free $ports
	if [ "$purge" = 1 ]; then
		rm -rf "$D/etcd" "$D/logs"
		log "removed etcd data and logs in $D"
	fi
	log "control plane down, took $(elapsed)"
}

cmd_status() {
	local n pid port rc=0
	for n in "${COMPONENTS[@]}"; do
		case "$n" in
		etcd) port=$ETCD_PORT ;;
		kube-apiserver) port=$API_PORT ;;
		kube-controller-manager) port=$KCM_PORT ;;
		esac
		if pid=$(pid_of "$n"); then
			printf '%-24s running  pid %-7s 127.0.0.1:%s\n' "$n" "$pid" "$port"
		else
			printf '%-24s stopped\n' "$n"
			rc=1
		fi
	done
	if [ -f "$PKI/admin.crt" ] && apiserver_ready >/dev/null 2>&1; then
		echo "API server ready: https://127.0.0.1:$API_PORT (KUBECONFIG=$KUBECONFIG_ADMIN)"
	else
		echo "API server not ready"
		rc=1
	fi
	return $rc
}

case "${1:-}" in
up) shift; [ $# -eq 0 ] || die "up takes no arguments"; cmd_up ;;
down) shift; cmd_down "$@" ;;
env) print_env ;;
status) cmd_status ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
*) die "usage: $0 up | down [--purge] | env | status" ;;
esac
