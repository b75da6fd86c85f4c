#!/usr/bin/env bash
# Runs kubevmm's own components for the local control plane as host
# processes, the way the Deployment and the DaemonSet would run them:
# kubevmm-operator and `node-vmm agent` for this machine, with the
# subresource API (`kubectl vm console`, `logs`, `port-forward`, `ssh`;
# docs/access.md) registered with kube-apiserver.
#
# Usage: hack/kubevmm-local.sh up | down | status
#   up     start the operator and the agent (release binaries from
#          `make build`) against $KUBEVMM_CLUSTER_DIR/admin.kubeconfig, and
#          register the subresource API: the Service kubevmm-subresource-api
#          in kubevmm-system (no selector; its Endpoints are this machine's
#          address and the operator's access port), the APIService
#          v1alpha1.subresources.kubevmm.io trusting the access CA; waits
#          until kube-apiserver reports it Available. Also applies the
#          chart's ClusterRoles for people (templates/user-roles.yaml; needs
#          helm). A component already running with other flags is restarted.
#   down   take the APIService away (kube-apiserver would keep dialling a
#          dead server), stop the operator and the agent, then the guests
#          on this machine (ACPI shutdown, force stop after 10 s): nothing is
#          left running. The VirtualMachines stay in the API; the next `up`
#          starts them again per runStrategy. The guests' taps, the
#          masquerade bridge and its nftables tables go too (leases stay, so
#          addresses stay stable).
#   status what runs, and whether the APIService is Available
#
# The access PKI (made once with openssl, kept in $KUBEVMM_CLUSTER_DIR/access-pki,
# made anew only when a certificate is about to expire or the machine's
# address changed), as tests/src/pki.rs and the chart make it:
#   access-ca, access-serving  the subresource API's serving certificate, for
#                              IP:<address>, IP:127.0.0.1, DNS:localhost and
#                              DNS:kubevmm-subresource-api.kubevmm-system.svc
#   node-ca, node-serving      node-vmm's, for DNS:node-vmm.kubevmm.internal
#   operator-client            the operator's client certificate for nodes
#
# kube-apiserver refuses loopback Endpoints, so both access servers listen
# on this machine's first non-loopback IPv4 address (`ip -4 addr show scope
# global`).
#
# Environment: KUBEVMM_CLUSTER_DIR [~/.cache/kubevmm/cluster], KUBEVMM_BIN
# [<repo>/target/release], KUBEVMM_NODE_NAME [host name],
# KUBEVMM_STATE_DIR [/var/lib/kubevmm-node], KUBEVMM_MASQUERADE_BRIDGE [kubevmm0],
# KUBEVMM_ACCESS_IP [first non-loopback IPv4 address],
# KUBEVMM_ACCESS_PORT [18443] (the operator's subresource API),
# KUBEVMM_NODE_ACCESS_PORT [10260] (node-vmm's streams, for the operator),
# KUBEVMM_ACCESS_TIMEOUT [60] (seconds to wait for the APIService),
# KUBEVMM_HELM [helm on PATH, else ~/.cache/kubevmm/helm-v3.18.6/helm].
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
D="${KUBEVMM_CLUSTER_DIR:-$HOME/.cache/kubevmm/cluster}"
BIN="${KUBEVMM_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release}"
NODE="${KUBEVMM_NODE_NAME:-$(hostname)}"
STATE="${KUBEVMM_STATE_DIR:-/var/lib/kubevmm-node}"
MASQ_BRIDGE="${KUBEVMM_MASQUERADE_BRIDGE:-kubevmm0}"
ACCESS_PORT="${KUBEVMM_ACCESS_PORT:-18443}"
NODE_ACCESS_PORT="${KUBEVMM_NODE_ACCESS_PORT:-10260}"
ACCESS_TIMEOUT="${KUBEVMM_ACCESS_TIMEOUT:-60}"
RUN="$D/run"
LOGS="$D/logs"
APKI="$D/access-pki"
# The names the chart gives them (release "kubevmm", namespace kubevmm-system).
NS=kubevmm-system
SVC=kubevmm-subresource-api
APISERVICE=v1alpha1.subresources.kubevmm.io

TAG=kubevmm-local
# shellcheck source=hack/lib.sh
. "$HERE/lib.sh" # die, log, stop_guests (the functions below are this script's own)

for p in ACCESS_PORT NODE_ACCESS_PORT ACCESS_TIMEOUT; do
	{ [[ "${!p}" =~ ^[0-9]+$ ]] && [ "${!p}" -ge 1 ] && [ "${!p}" -le 65535 ]; } ||
		die "$p='${!p}' is not a number from 1 to 65535"
done

kc() { kubectl --kubeconfig "$D/admin.kubeconfig" "$@"; }

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

stop() {
	local name=$1 pid
	running "$name" || { rm -f "$RUN/$name.pid" "$RUN/$name.cmd"; return; }
	pid=$(cat "$RUN/$name.pid")
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	kill -KILL "$pid" 2>/dev/null || true
	rm -f "$RUN/$name.pid" "$RUN/$name.cmd"
	log "$name stopped"
}

start() { # start NAME PORT PORTVAR ARGS...: detached; restarted when it runs with other ARGS
	local name=$1 port=$2 var=$3 cmd
	shift 3
	cmd=$(printf '%q ' "$@")
	if running "$name"; then
		if [ "$(cat "$RUN/$name.cmd" 2>/dev/null)" = "$cmd" ]; then
			log "$name already running (pid $(cat "$RUN/$name.pid"))"
			return
		fi
		log "$name runs with other flags: restarting it"
		stop "$name"
	fi
	! port_busy "$port" ||
		die "port $port (for $name) is in use by another process; choose another with $var=<port>"
	setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
	echo $! >"$RUN/$name.pid"
	echo "$cmd" >"$RUN/$name.cmd"
	log "$name started (pid $!, log $LOGS/$name.log)"
}

wait_listening() { # wait_listening NAME PORT: NAME runs and something listens on PORT
	for _ in $(seq 100); do
		running "$1" || die "$1 exited; read $LOGS/$1.log"
		port_busy "$2" && return
		sleep 0.1
	done
	die "$1 does not listen on port $2 after 10 s; read $LOGS/$1.log"
}

# This machine's first non-loopback IPv4 address (as tests/src/pki.rs finds it).
host_ip() {
	if [ -n "${KUBEVMM_ACCESS_IP:-}" ]; then
		echo "$KUBEVMM_ACCESS_IP"
		return
	fi
	ip -4 -o addr show scope global |
		awk '{ for (i = 1; i < NF; i++) if ($i == "inet") { split($(i + 1), a, "/"); print a[1]; exit } }'
}

# ------------------------------------------------------------ access PKI
# The same CAs, keys and extensions as tests/src/pki.rs (EC P-256), valid
# for a year rather than a test's week.
DAYS=365
ossl() { openssl "$@" >/dev/null 2>&1 || die "openssl $* failed (in $PWD)"; }

pki_ca() { # pki_ca NAME
	ossl ecparam -name prime256v1 -genkey -noout -out "$1.key"
	ossl req -x509 -new -key "$1.key" -subj "/CN=$1" -days "$DAYS" -out "$1.crt" \
		-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign
}

pki_leaf() { # pki_leaf NAME CN CA EXTENSIONS
	ossl ecparam -name prime256v1 -genkey -noout -out "$1.key"
	ossl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
	printf '%b' "$4" >"$1.ext"
	ossl x509 -req -in "$1.csr" -CA "$3.crt" -CAkey "$3.key" -CAcreateserial \
		-days "$DAYS" -out "$1.crt" -extfile "$1.ext"
}

pki_usable() { # pki_usable IP: the kept PKI is whole, valid another day, and names IP
	local n
	for n in access-ca access-serving node-ca node-serving operator-client; do
		{ [ -s "$APKI/$n.crt" ] && [ -s "$APKI/$n.key" ]; } || return 1
		openssl x509 -checkend 86400 -noout -in "$APKI/$n.crt" >/dev/null 2>&1 || return 1
	done
	openssl x509 -noout -ext subjectAltName -in "$APKI/access-serving.crt" 2>/dev/null |
		grep -qE "IP Address:${1//./\\.}(,|\$)"
}

make_access_pki() { # make_access_pki IP
	local ip=$1 tmp
	if pki_usable "$ip"; then
		log "access PKI: re-using $APKI"
		return
	fi
	command -v openssl >/dev/null 2>&1 || die "openssl not found; apt-get install -y openssl"
	tmp=$(mktemp -d "$D/.access-pki.XXXXXX")
	chmod 700 "$tmp"
	(
		cd "$tmp"
		pki_ca access-ca
		# kube-apiserver checks the name of the APIService's Service.
		pki_leaf access-serving kubevmm-access access-ca \
			"subjectAltName=IP:$ip,IP:127.0.0.1,DNS:localhost,DNS:$SVC.$NS.svc\nextendedKeyUsage=serverAuth\n"
		pki_ca node-ca
		# One name for every node (kubevmm_access::node_api::SERVER_NAME).
		pki_leaf node-serving node-vmm node-ca \
			"subjectAltName=DNS:node-vmm.kubevmm.internal\nextendedKeyUsage=serverAuth\n"
		pki_leaf operator-client kubevmm-operator node-ca "extendedKeyUsage=clientAuth\n"
		rm -f ./*.csr ./*.ext ./*.srl
	) || { rm -rf "$tmp"; exit 1; }
	rm -rf "$APKI"
	mv "$tmp" "$APKI"
	log "access PKI: made in $APKI (for $ip)"
}

# ----------------------------------------------- subresource API registration
register() { # register IP: Service, Endpoints and APIService pointing at the operator
	local ip=$1 ca out
	ca=$(base64 -w0 <"$APKI/access-ca.crt")
	out=$(kc apply -f - 2>&1 <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: $NS}
---
apiVersion: v1
kind: Service
metadata: {name: $SVC, namespace: $NS}
spec:
  ports: [{name: https, port: 443, targetPort: $ACCESS_PORT}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: $SVC, namespace: $NS}
subsets: [{addresses: [{ip: $ip}], ports: [{name: https, port: $ACCESS_PORT}]}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: $APISERVICE}
spec:
  group: subresources.kubevmm.io
  version: v1alpha1
  groupPriorityMinimum: 1000
  versionPriority: 15
  service: {name: $SVC, namespace: $NS, port: 443}
  caBundle: $ca
YAML
	) || die "registering the subresource API failed: $out"
	log "registered APIService $APISERVICE -> Service $NS/$SVC -> $ip:$ACCESS_PORT"
}

available() { # available status|message: of the APIService's Available condition
	kc get apiservice "$APISERVICE" \
		-o "jsonpath={.status.conditions[?(@.type=='Available')].$1}" 2>/dev/null || true
}

wait_available() {
	local deadline=$((SECONDS + ACCESS_TIMEOUT))
	until [ "$(available status)" = True ]; do
		running kubevmm-operator ||
			die "kubevmm-operator exited; read $LOGS/kubevmm-operator.log"
		[ $SECONDS -lt $deadline ] ||
			die "APIService $APISERVICE not Available after ${ACCESS_TIMEOUT}s ($(available message)); read $LOGS/kubevmm-operator.log"
		sleep 0.5
	done
}

find_helm() {
	if [ -n "${KUBEVMM_HELM:-}" ]; then
		echo "$KUBEVMM_HELM"
	elif command -v helm >/dev/null 2>&1; then
		command -v helm
	elif [ -x "$HOME/.cache/kubevmm/helm-v3.18.6/helm" ]; then
		echo "$HOME/.cache/kubevmm/helm-v3.18.6/helm"
	fi
}

user_roles() { # the chart's ClusterRoles for people (aggregated into admin, edit, view)
	local helm out
	helm=$(find_helm)
	if [ -z "$helm" ] || [ ! -x "$helm" ]; then
		log "note: no helm (hack/helm-build.sh builds it): the chart's user ClusterRoles are not applied (the admin kubeconfig does not need them)"
		return
	fi
	out=$(HELM_CONFIG_HOME="$D/helm/config" HELM_CACHE_HOME="$D/helm/cache" HELM_DATA_HOME="$D/helm/data" \
		"$helm" template kubevmm "$REPO/charts/kubevmm" --kube-version 1.33.0 \
		--show-only templates/user-roles.yaml 2>&1) || die "helm template of the user roles failed: $out"
	out=$(kc apply -f - 2>&1 <<<"$out") || die "applying the user roles failed: $out"
	log "applied the chart's user ClusterRoles (kubevmm-vm-user, kubevmm-vm-viewer)"
}

case "${1:-}" in
up)
	[ -f "$D/admin.kubeconfig" ] || die "no control plane in $D: run hack/cluster.sh up first"
	for b in kubevmm-operator node-vmm kubevmm-vmm; do
		[ -x "$BIN/$b" ] || die "$BIN/$b missing: run make build"
	done
	IP=$(host_ip)
	[ -n "$IP" ] ||
		die "this machine has no non-loopback IPv4 address, which the aggregated API needs; set KUBEVMM_ACCESS_IP"
	case "$IP" in
	127.* | ::1) die "KUBEVMM_ACCESS_IP=$IP is a loopback address: kube-apiserver refuses loopback Endpoints for an aggregated API" ;;
	esac
	mkdir -p "$RUN" "$LOGS" "$STATE"
	make_access_pki "$IP"
	start kubevmm-operator "$ACCESS_PORT" KUBEVMM_ACCESS_PORT "$BIN/kubevmm-operator" --kubeconfig "$D/admin.kubeconfig" \
		--id local-operator --metrics-addr 127.0.0.1:9100 \
		--access-listen "$IP:$ACCESS_PORT" \
		--access-cert "$APKI/access-serving.crt" --access-key "$APKI/access-serving.key" \
		--node-client-cert "$APKI/operator-client.crt" --node-client-key "$APKI/operator-client.key" \
		--node-ca "$APKI/node-ca.crt"
	start node-vmm "$NODE_ACCESS_PORT" KUBEVMM_NODE_ACCESS_PORT env KUBECONFIG="$D/admin.kubeconfig" "$BIN/node-vmm" agent \
		--node-name "$NODE" --state-dir "$STATE" --vmm-binary "$BIN/kubevmm-vmm" \
		--allowed-dir /var/lib/kubevmm --metrics-addr 127.0.0.1:9101 \
		--masquerade-bridge "$MASQ_BRIDGE" \
		--access-listen "$IP:$NODE_ACCESS_PORT" \
		--access-cert "$APKI/node-serving.crt" --access-key "$APKI/node-serving.key" \
		--access-client-ca "$APKI/node-ca.crt"
	for _ in $(seq 100); do
		kc get hvnode "$NODE" >/dev/null 2>&1 && break
		sleep 0.1
	done
	kc get hvnode "$NODE" >/dev/null 2>&1 ||
		die "node-vmm did not register HypervisorNode $NODE; see $LOGS/node-vmm.log"
	wait_listening kubevmm-operator "$ACCESS_PORT"
	wait_listening node-vmm "$NODE_ACCESS_PORT"
	register "$IP"
	user_roles
	wait_available
	for c in kubevmm-operator node-vmm; do running "$c" || die "$c exited; read $LOGS/$c.log"; done
	log "operator (metrics 127.0.0.1:9100, subresource API $IP:$ACCESS_PORT) and node-vmm for node $NODE (metrics 127.0.0.1:9101, access $IP:$NODE_ACCESS_PORT) are up; APIService $APISERVICE is Available: kubectl vm console|logs|port-forward NAME"
	;;
down)
	# The APIService first: kube-apiserver keeps dialling its Service (for
	# discovery and availability) as long as it exists.
	if [ -f "$D/admin.kubeconfig" ]; then
		if kc --request-timeout=10s delete apiservice "$APISERVICE" --ignore-not-found --wait=false >/dev/null 2>&1; then
			kc --request-timeout=10s -n "$NS" delete service,endpoints "$SVC" --ignore-not-found --wait=false >/dev/null 2>&1 || true
			log "deleted APIService $APISERVICE and Service $NS/$SVC"
		else
			log "could not delete APIService $APISERVICE (is the API server down?)"
		fi
	fi
	stop node-vmm
	stop kubevmm-operator
	stop_guests "$STATE" "$MASQ_BRIDGE"
	;;
status)
	for c in kubevmm-operator node-vmm; do
		if running "$c"; then echo "$c: running (pid $(cat "$RUN/$c.pid"))"; else echo "$c: stopped"; fi
	done
	if [ -f "$D/admin.kubeconfig" ] && kc --request-timeout=5s get apiservice "$APISERVICE" >/dev/null 2>&1; then
		echo "APIService $APISERVICE: Available=$(available status) $(available message)"
	else
		echo "APIService $APISERVICE: not registered (or the API server is down)"
	fi
	;;
*)
	sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
	exit 2
	;;
esac
