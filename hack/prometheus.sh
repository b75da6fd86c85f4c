#!/usr/bin/env bash
# A real Prometheus (upstream's, built by hack/helm-build.sh) for the local cluster of
# hack/deploy.sh: it discovers the chart's metrics Services through the API
# server, scrapes the operator and node-vmm the way the chart's
# ServiceMonitors describe, and evaluates the chart's alert rules.
#
# Usage: hack/prometheus.sh up | down [--purge] | status | query PROMQL
#   up       make Prometheus's client certificate (cluster CA) and its RBAC,
#            write prometheus.yml and the rule file rendered from the chart,
#            start Prometheus (or reload it when it runs), wait until it is
#            ready and the operator and node-vmm targets are up; prints
#            `export KUBEVMM_PROMETHEUS=http://127.0.0.1:PORT` on stdout.
#   down     stop it; --purge also deletes its data and logs and the RBAC
#   status   whether it runs, its targets and its rules
#   query    an instant query; prints the API's JSON answer
#
# Environment (defaults in brackets):
#   KUBEVMM_CLUSTER_DIR      the cluster's state dir [~/.cache/kubevmm/cluster];
#                            Prometheus's lives in its prometheus/ subdirectory
#   KUBEVMM_APISERVER_PORT   kube-apiserver port [6443], reached on 127.0.0.1
#   KUBEVMM_PROMETHEUS_PORT  Prometheus's port on 127.0.0.1 [9090]
#   KUBEVMM_PROMETHEUS_BIN   the prometheus binary
#                            [~/.cache/kubevmm/promtool-<version>/prometheus]
#   KUBEVMM_RELEASE          the chart's release [kubevmm], in kubevmm-system
#   KUBEVMM_HELM             helm [on PATH, else ~/.cache/kubevmm/helm-v3.18.6/helm]
#   KUBEVMM_READY_TIMEOUT    seconds to wait for readiness and targets [120]
#
# Decisions (docs/monitoring.md, "Prometheus on the local cluster"): one
# scrape job per ServiceMonitor with prometheus-operator's job name and
# relabelling (job = the Service's name; namespace, service, pod, container,
# endpoint labels), so the chart's rules and dashboard see what they would
# see under prometheus-operator; scrape and rule evaluation every 5 s;
# targets found by kubernetes_sd_configs (role endpointslice) with
# Prometheus's own client certificate. Not Debian's package: it is built
# without Kubernetes discovery (Debian removed it in 1.5.0 for client-go's
# dependencies); upstream's is built from the Go module proxy with promtool.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CD="${KUBEVMM_CLUSTER_DIR:-$HOME/.cache/kubevmm/cluster}"
D="$CD/prometheus"
PKI="$CD/pki"
API_PORT="${KUBEVMM_APISERVER_PORT:-6443}"
PORT="${KUBEVMM_PROMETHEUS_PORT:-9090}"
TIMEOUT="${KUBEVMM_READY_TIMEOUT:-120}"
RELEASE="${KUBEVMM_RELEASE:-kubevmm}"
NS=kubevmm-system
PROM_VERSION=$(sed -n 's/^PROMTOOL_VERSION=\(v[0-9.]*\).*/\1/p' "$HERE/helm-build.sh")
PROMETHEUS="${KUBEVMM_PROMETHEUS_BIN:-$HOME/.cache/kubevmm/promtool-$PROM_VERSION/prometheus}"
PROMTOOL="$(dirname "$PROMETHEUS")/promtool"
URL="http://127.0.0.1:$PORT"
USER_CN=kubevmm-prometheus
# shellcheck disable=SC2034 # TAG is lib.sh's (die, log)
TAG=prometheus
# shellcheck source=hack/lib.sh disable=SC1091 # followed with shellcheck -x
. "$HERE/lib.sh"

for p in API_PORT PORT; do
	{ [[ "${!p}" =~ ^[0-9]+$ ]] && [ "${!p}" -ge 1 ] && [ "${!p}" -le 65535 ]; } ||
		die "$p='${!p}' is not a port number"
done

BIN=$("$HERE/k8s-build.sh" --print-bin-dir)
exe_of() {
	case "$1" in
	prometheus) echo "$PROMETHEUS" ;;
	*) echo "$BIN/$1" ;;
	esac
}
kc() { "$(kubectl_bin)" --kubeconfig "$CD/admin.kubeconfig" "$@"; }
HELM="${KUBEVMM_HELM:-$(command -v helm 2>/dev/null || echo "$HOME/.cache/kubevmm/helm-v3.18.6/helm")}"

# ------------------------------------------------------------ config
make_access() { # client certificate, kubeconfig and RBAC for the discovery
	[ -s "$PKI/ca.key" ] || die "no cluster CA in $PKI; run hack/deploy.sh up (or hack/cluster.sh up) first"
	new_cert prometheus ca "/CN=$USER_CN" client
	mkdir -p "$D"
	write_kubeconfig "$D/prometheus.kubeconfig" "$USER_CN" prometheus "https://127.0.0.1:$API_PORT"
	kc apply -f - >&2 <<EOF || die "kubectl apply of Prometheus's ClusterRole failed (is the API server up?)"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: $USER_CN
  labels: {app.kubernetes.io/part-of: kubevmm, app.kubernetes.io/managed-by: hack-prometheus-sh}
rules:
  - apiGroups: [""]
    resources: [pods, services, endpoints, nodes]
    verbs: [get, list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [get, list, watch]
  - nonResourceURLs: [/metrics]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: $USER_CN
  labels: {app.kubernetes.io/part-of: kubevmm, app.kubernetes.io/managed-by: hack-prometheus-sh}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: $USER_CN}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: $USER_CN}
EOF
}

write_rules() { # the chart's PrometheusRule, its spec as a plain rule file
	[ -x "$HELM" ] || die "helm not found at $HELM; run hack/helm-build.sh (hack/install-deps.sh does)"
	local out="$D/rules/kubevmm.rules.yaml" rendered
	mkdir -p "$D/rules"
	rendered=$("$HELM" template "$RELEASE" "$REPO/charts/kubevmm" --namespace "$NS" --kube-version 1.33.0 \
		--set metrics.prometheusRule.enabled=true,metrics.prometheusRule.force=true \
		--show-only templates/prometheusrule.yaml) || die "helm template of charts/kubevmm failed (see above)"
	# The object's `spec:` is a rule file (`groups:`) indented by two spaces.
	{
		echo "# Rendered by hack/prometheus.sh from charts/kubevmm/templates/prometheusrule.yaml; do not edit."
		sed -n '/^spec:$/,$ { /^spec:$/d; s/^  //; p; }' <<<"$rendered"
	} >"$out.tmp"
	grep -q '^groups:$' "$out.tmp" || die "no spec.groups in the rendered PrometheusRule: $out.tmp"
	if [ -x "$PROMTOOL" ]; then
		"$PROMTOOL" check rules "$out.tmp" >/dev/null 2>"$D/rules/promtool.err" || {
			cat "$D/rules/promtool.err" >&2
			die "promtool check rules refused the rules rendered from the chart ($out.tmp)"
		}
	fi
	mv -f "$out.tmp" "$out"
}

SERVICE_MONITORS=""
render_service_monitors() { # the chart's ServiceMonitors, as prometheus-operator would get them
	SERVICE_MONITORS=$("$HELM" template "$RELEASE" "$REPO/charts/kubevmm" --namespace "$NS" --kube-version 1.33.0 \
		--set metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.force=true \
		--show-only templates/servicemonitor.yaml) || die "helm template of charts/kubevmm failed (see above)"
}

honor_labels() { # honor_labels COMPONENT: its ServiceMonitor's honorLabels (true|false)
	awk -v n="  name: $RELEASE-$1" '/^---/ { doc = 0 } $0 == n { doc = 1 }
		doc && /^ *-? *honorLabels: *true *$/ { t = 1 } END { print t ? "true" : "false" }' <<<"$SERVICE_MONITORS"
}

sd_config() { # the discovery block of a scrape job
	cat <<EOF
    kubernetes_sd_configs:
      - role: endpointslice
        api_server: https://127.0.0.1:$API_PORT
        tls_config:
          ca_file: $PKI/ca.crt
          cert_file: $PKI/prometheus.crt
          key_file: $PKI/prometheus.key
        namespaces:
          names: [$NS]
EOF
}

scrape_job() { # scrape_job COMPONENT APP-NAME: what prometheus-operator makes of the chart's ServiceMonitor
	cat <<EOF
  - job_name: serviceMonitor/$NS/$RELEASE-$1/0
    # The ServiceMonitor's endpoints[0].honorLabels (false: a scraped label
    # that clashes with a target label is kept as exported_<name>).
    honor_labels: $(honor_labels "$1")
    metrics_path: /metrics
    scheme: http
$(sd_config)
    relabel_configs:
      # spec.selector.matchLabels: the Service of this component and release.
      - source_labels: [__meta_kubernetes_service_label_app_kubernetes_io_name, __meta_kubernetes_service_labelpresent_app_kubernetes_io_name]
        regex: ($2);true
        action: keep
      - source_labels: [__meta_kubernetes_service_label_app_kubernetes_io_instance, __meta_kubernetes_service_labelpresent_app_kubernetes_io_instance]
        regex: ($RELEASE);true
        action: keep
      # spec.endpoints[0].port: metrics
      - source_labels: [__meta_kubernetes_endpointslice_port_name]
        regex: metrics
        action: keep
      - source_labels: [__meta_kubernetes_endpointslice_address_target_kind, __meta_kubernetes_endpointslice_address_target_name]
        separator: ;
        regex: Node;(.*)
        target_label: node
        replacement: \${1}
      - source_labels: [__meta_kubernetes_endpointslice_address_target_kind, __meta_kubernetes_endpointslice_address_target_name]
        separator: ;
        regex: Pod;(.*)
        target_label: pod
        replacement: \${1}
      - source_labels: [__meta_kubernetes_pod_phase]
        regex: (Failed|Succeeded)
        action: drop
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_service_name]
        target_label: service
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_container_name]
        target_label: container
      # No jobLabel in the ServiceMonitor: the job is the Service's name.
      - source_labels: [__meta_kubernetes_service_name]
        target_label: job
      - target_label: endpoint
        replacement: metrics
EOF
}

write_config() {
	mkdir -p "$D"
	render_service_monitors
	{
		cat <<EOF
# Written by hack/prometheus.sh up (rewritten each time); docs/monitoring.md.
global:
  # The chart's ServiceMonitors ask for 30 s. A local test cluster lives for
  # minutes: at 5 s, rate() over the dashboard's [5m] windows has its two
  # samples within 10 s of a target appearing, and the rules' "for:" clocks
  # run as they would in production, only on finer samples.
  scrape_interval: 5s
  scrape_timeout: 4s
  evaluation_interval: 5s
rule_files:
  - $D/rules/kubevmm.rules.yaml
scrape_configs:
EOF
		scrape_job operator kubevmm-operator
		scrape_job node-vmm node-vmm
	} >"$D/prometheus.yml.tmp"
	mv -f "$D/prometheus.yml.tmp" "$D/prometheus.yml"
}

# ------------------------------------------------------------ state
ready() { curl -fsS --max-time 2 "$URL/-/ready"; }

reload() { # SIGHUP, then wait until Prometheus reports the reload's outcome
	local pid="$1" t0 m settled=$((SECONDS + 2)) deadline=$((SECONDS + 30))
	t0=$(date +%s)
	log "prometheus runs (pid $pid); reloading its configuration"
	kill -HUP "$pid"
	while :; do
		m=$(curl -fsS --max-time 2 "$URL/metrics" 2>/dev/null || true)
		awk -v t="$t0" '$1 == "prometheus_config_last_reload_success_timestamp_seconds" && $2 + 0 >= t { ok = 1 }
			END { exit !ok }' <<<"$m" && return 0
		# (an earlier failed reload shows 0 too: give this one a moment)
		if { [ $SECONDS -ge $settled ] && grep -qx 'prometheus_config_last_reload_successful 0' <<<"$m"; } ||
			[ $SECONDS -ge $deadline ]; then
			tail -n 5 "$D/logs/prometheus.log" >&2 || true
			die "prometheus did not load the new configuration $D/prometheus.yml (its log above); it runs with the old one"
		fi
		sleep 0.5
	done
}

# targets_report: one line per active target of our jobs, "job health
# instance pod lastError"; exit status 0 when every job has a target and all
# of them are up.
targets_report() {
	local json
	json=$(curl -fsS --max-time 5 "$URL/api/v1/targets?state=active") || return 1
	python3 -c '
import json, sys
jobs = sys.argv[1:]
targets = json.loads(sys.stdin.read())["data"]["activeTargets"]
ok = True
for job in jobs:
    mine = [t for t in targets if t["scrapePool"] == job]
    if not mine:
        print("%s: no target discovered" % job)
        ok = False
    for t in mine:
        l = t["labels"]
        print("%-26s %-5s %-17s pod=%s %s" % (l.get("job", "?"), t["health"], l.get("instance", "?"), l.get("pod", "-"), t["lastError"]))
        ok = ok and t["health"] == "up"
sys.exit(0 if ok else 1)
' "serviceMonitor/$NS/$RELEASE-operator/0" "serviceMonitor/$NS/$RELEASE-node-vmm/0" <<<"$json"
}

rules_report() { # one line per rule: group, name, health, state
	local json
	json=$(curl -fsS --max-time 5 "$URL/api/v1/rules") || return 1
	python3 -c '
import json, sys
ok = True
for g in json.loads(sys.stdin.read())["data"]["groups"]:
    for r in g["rules"]:
        print("%s  %-30s health=%s state=%s %s" % (g["name"], r["name"], r["health"], r.get("state", "-"), r.get("lastError", "")))
        ok = ok and r["health"] != "err"
sys.exit(0 if ok else 1)
' <<<"$json"
}

wait_targets_up() {
	local deadline=$((SECONDS + TIMEOUT))
	until targets_report >/dev/null 2>&1; do
		pid_of prometheus >/dev/null || {
			tail -n 30 "$D/logs/prometheus.log" >&2 || true
			die "prometheus exited; its log is $D/logs/prometheus.log (last lines above)"
		}
		if [ $SECONDS -ge $deadline ]; then
			targets_report >&2 || true
			die "the operator and node-vmm targets are not all up after ${TIMEOUT}s (above; is the chart installed as release $RELEASE in $NS?)"
		fi
		sleep 1
	done
	targets_report >&2
	log "  every target up (at $(elapsed))"
}

# ------------------------------------------------------------- commands
cmd_up() {
	[ -x "$PROMETHEUS" ] ||
		die "$PROMETHEUS is missing: run hack/helm-build.sh (hack/install-deps.sh does)"
	command -v python3 >/dev/null 2>&1 || die "python3 not found (it reads the API's JSON)"
	curl -fsS --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
		"https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1 ||
		die "kube-apiserver is not reachable at https://127.0.0.1:$API_PORT; start the cluster with hack/deploy.sh up"
	make_access
	write_rules
	write_config
	local pid
	if pid=$(pid_of prometheus); then
		reload "$pid"
	else
		check_port_free prometheus "$PORT" KUBEVMM_PROMETHEUS_PORT
		log "starting prometheus on $URL"
		start prometheus \
			--config.file="$D/prometheus.yml" \
			--storage.tsdb.path="$D/data" \
			--storage.tsdb.retention.time=1d \
			--web.listen-address="127.0.0.1:$PORT" \
			--web.external-url="$URL/"
	fi
	wait_until prometheus ready
	wait_targets_up
	log "prometheus up (state in $D), took $(elapsed)"
	echo "export KUBEVMM_PROMETHEUS=$URL"
}

cmd_down() {
	local purge=0 running=0
	case "${1:-}" in
	"") ;;
	--purge) purge=1 ;;
	*) die "unknown argument to down: '$1' (only --purge)" ;;
	esac
	pid_of prometheus >/dev/null && running=1
	stop prometheus
	kill_strays prometheus
	[ "$running" = 0 ] || wait_ports_free "$PORT"
	if [ "$purge" = 1 ]; then
		rm -rf "$D/data" "$D/logs"
		kc delete clusterrolebinding,clusterrole "$USER_CN" --ignore-not-found >/dev/null 2>&1 ||
			log "could not delete the ClusterRole(Binding) $USER_CN (API server down?)"
		log "removed Prometheus's data, logs and RBAC"
	fi
}

cmd_status() {
	local pid rc=0
	if pid=$(pid_of prometheus); then
		printf 'prometheus  running  pid %s\n' "$pid"
	else
		echo "prometheus  stopped"
		return 1
	fi
	echo "$URL"
	echo "targets:"
	targets_report || rc=1
	echo "rules:"
	rules_report || rc=1
	return $rc
}

cmd_query() {
	[ $# -eq 1 ] || die "usage: $0 query PROMQL"
	curl -sS --fail-with-body --max-time 30 --get --data-urlencode "query=$1" "$URL/api/v1/query" || {
		echo
		die "the query failed (answer above; is Prometheus up? $0 status)"
	}
	echo
}

case "${1:-}" in
up) shift; [ $# -eq 0 ] || die "up takes no arguments"; cmd_up ;;
down) shift; cmd_down "$@" ;;
status) cmd_status ;;
query) shift; cmd_query "$@" ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
*) die "usage: $0 up | down [--purge] | status | query PROMQL" ;;
esac
