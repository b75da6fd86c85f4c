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

die() { echo "cluster: error: $*" >&2; exit 1; }
log() { echo "cluster: $*" >&2; }

START_NS=$(date +%s%N)
elapsed() {
	awk -v a="$START_NS" -v b="$(date +%s%N)" 'BEGIN { printf "%.1fs", (b - a) / 1e9 }'
}

for p in API_PORT ETCD_PORT ETCD_PEER_PORT KCM_PORT; do
	{ [[ "${!p}" =~ ^[0-9]+$ ]] && [ "${!p}" -ge 1 ] && [ "${!p}" -le 65535 ]; } ||
		die "$p='${!p}' is not a port number"
done

BIN=$("$HERE/k8s-build.sh" --print-bin-dir)

kubectl_bin() {
	if [ -x "$BIN/kubectl" ]; then
		echo "$BIN/kubectl"
	elif command -v kubectl >/dev/null 2>&1; then
		command -v kubectl
	else
		die "no kubectl: run hack/k8s-build.sh (it builds one when the machine has none)"
	fi
}
kc() { "$(kubectl_bin)" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# ------------------------------------------------------------ processes
pid_of() { # prints the pid if the component runs (and is really ours)
	local f="$D/run/$1.pid" pid exe
	[ -f "$f" ] || return 1
	pid=$(cat "$f")
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
	[ "${exe% (deleted)}" = "$BIN/$1" ] || return 1
	tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$D/" || return 1
	echo "$pid"
}

port_busy() { # is anything listening on 127.0.0.1:$1 (or on all addresses)?
	ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

start() { # start NAME ARGS... detached, in its own session, logging to logs/
	local name="$1"
	shift
	mkdir -p "$D/logs" "$D/run"
	[ -x "$BIN/$name" ] || die "$BIN/$name is missing; run hack/k8s-build.sh"
	{
		echo "=== $(date -Is) starting $name"
		printf '%q ' "$BIN/$name" "$@"
		echo
	} >>"$D/logs/$name.log"
	setsid "$BIN/$name" "$@" >>"$D/logs/$name.log" 2>&1 </dev/null &
	echo $! >"$D/run/$name.pid"
	disown
}

wait_until() { # wait_until NAME CMD...: poll CMD until it succeeds
	local name="$1" deadline=$((SECONDS + TIMEOUT))
	shift
	until "$@" >/dev/null 2>&1; do
		sleep 0.1
		if ! pid_of "$name" >/dev/null; then
			tail -n 30 "$D/logs/$name.log" >&2 || true
			die "$name exited during start-up; its log is $D/logs/$name.log (last lines above)"
		fi
		if [ $SECONDS -ge $deadline ]; then
			tail -n 30 "$D/logs/$name.log" >&2 || true
			die "$name not ready after ${TIMEOUT}s; its log is $D/logs/$name.log (last lines above)"
		fi
	done
	log "  $* ok (at $(elapsed))"
}

stop() { # stop NAME...: SIGTERM to all at once, SIGKILL after 15s
	local name pid i pids=() names=()
	for name in "$@"; do
		if pid=$(pid_of "$name"); then
			kill -TERM "$pid" 2>/dev/null || true
			pids+=("$pid")
			names+=("$name")
		fi
		rm -f "$D/run/$name.pid"
	done
	for ((i = 0; i < ${#pids[@]}; i++)); do
		pid=${pids[$i]}
		local deadline=$((SECONDS + 15))
		while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
		if kill -0 "$pid" 2>/dev/null; then
			log "${names[$i]} (pid $pid) did not stop on SIGTERM; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			sleep 0.2
		fi
		log "stopped ${names[$i]} (pid $pid)"
	done
}

stray_pids() { # our binaries still running with this state dir, pid file or not
	local p exe
	for p in /proc/[0-9]*; do
		exe=$(readlink "$p/exe" 2>/dev/null) || continue
		case "${exe% (deleted)}" in
		"$BIN/etcd" | "$BIN/kube-apiserver" | "$BIN/kube-controller-manager") ;;
		*) continue ;;
		esac
		tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qF -- "$D/" && echo "${p#/proc/}"
	done
	return 0
}

# ------------------------------------------------------------------ PKI
# openssl helpers: EC P-256 keys, certificates signed by a CA.
newkey() { [ -s "$1" ] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

new_ca() { # new_ca NAME CN
	local n="$1" cn="$2"
	[ -s "$PKI/$n.crt" ] && [ -s "$PKI/$n.key" ] && return 0
	newkey "$PKI/$n.key"
	openssl req -x509 -new -key "$PKI/$n.key" -days 3650 -subj "/CN=$cn" \
		-addext "basicConstraints=critical,CA:TRUE" \
		-addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
		-out "$PKI/$n.crt" 2>/dev/null
}

new_cert() { # new_cert NAME CA SUBJECT USAGE(server|client|both) [SANS]
	local n="$1" ca="$2" subj="$3" usage="$4" sans="${5:-}" eku ext
	if [ -s "$PKI/$n.crt" ] && [ -s "$PKI/$n.key" ] &&
		openssl x509 -checkend 604800 -noout -in "$PKI/$n.crt" >/dev/null 2>&1; then
		return 0
	fi
	case "$usage" in
	server) eku=serverAuth ;;
	client) eku=clientAuth ;;
	both) eku=serverAuth,clientAuth ;;
	esac
	newkey "$PKI/$n.key"
	ext="$PKI/.$n.ext"
	{
		echo "basicConstraints=critical,CA:FALSE"
		echo "keyUsage=critical,digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=$eku"
		[ -z "$sans" ] || echo "subjectAltName=$sans"
	} >"$ext"
	openssl req -new -key "$PKI/$n.key" -subj "$subj" -out "$PKI/.$n.csr" 2>/dev/null
	openssl x509 -req -in "$PKI/.$n.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
		-set_serial "0x$(openssl rand -hex 16)" -days 825 -extfile "$ext" \
		-out "$PKI/$n.crt" 2>/dev/null
	rm -f "$ext" "$PKI/.$n.csr"
}

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
		"$local_sans,IP:$SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
	new_cert admin ca "/O=system:masters/CN=kubevmm-admin" client
	new_cert controller-manager ca "/CN=system:kube-controller-manager" client
	new_cert front-proxy-client front-proxy-ca "/CN=front-proxy-client" client
	# Service-account token signing key pair (RSA: accepted by everything).
	if [ ! -s "$PKI/sa.key" ] || [ ! -s "$PKI/sa.pub" ]; then
		openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key" 2>/dev/null
		openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
	fi
}

write_kubeconfig() { # write_kubeconfig FILE USER CERT-NAME
	local f="$1" user="$2" n="$3" tmp
	tmp=$(mktemp "$f.XXXXXX")
	cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubevmm
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$n.crt")
    client-key-data: $(base64 -w0 <"$PKI/$n.key")
contexts:
- name: kubevmm
  context: {cluster: kubevmm, user: $user}
current-context: kubevmm
EOF
	chmod 600 "$tmp"
	mv -f "$tmp" "$f"
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

check_port_free() { # check_port_free NAME PORT VAR
	port_busy "$2" &&
		die "port $2 (for $1) is in use by another process; stop it or choose another port with $3=<port>"
	return 0
}

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
	log "starting kube-apiserver on https://127.0.0.1:$API_PORT"
	# shellcheck disable=SC2086 # extra args are a word list
	start kube-apiserver \
		--bind-address=127.0.0.1 \
		--advertise-address=127.0.0.1 \
		--secure-port="$API_PORT" \
		--endpoint-reconciler-type=none \
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
	write_kubeconfig "$KUBECONFIG_ADMIN" kubevmm-admin admin
	write_kubeconfig "$D/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
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
	local purge=0 n pid
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
	for pid in $(stray_pids); do
		log "stopping stray process $pid ($(readlink "/proc/$pid/exe" 2>/dev/null || true)) using $D"
		kill -TERM "$pid" 2>/dev/null || true
	done
	sleep 0.1
	for pid in $(stray_pids); do kill -KILL "$pid" 2>/dev/null || true; done
	# The ports must be free when we return.
	local deadline=$((SECONDS + 15)) busy
	while :; do
		busy=""
		for n in $ports; do
			port_busy "$n" && busy="$busy $n"
		done
		[ -n "$busy" ] || break
		[ $SECONDS -lt $deadline ] ||
			die "port(s)$busy still in use after stopping the control plane; see: ss -ltnp 'sport = :PORT'"
		sleep 0.2
	done
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
