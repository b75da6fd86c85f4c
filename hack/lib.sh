# shellcheck shell=bash
# Shared by hack/cluster.sh and hack/node.sh: logging, detached processes
# tracked by pid files, and the openssl PKI helpers.
#
# The including script sets, before sourcing:
#   D       state directory (logs/, run/ and pki/ live under it)
#   PKI     where the CAs, keys and certificates are kept
#   TIMEOUT seconds wait_until waits
#   TAG     prefix of log and error lines ("cluster", "node")
#   BIN     hack/k8s-build.sh's binary directory
# and defines exe_of NAME, printing the absolute path of NAME's binary.

die() { echo "$TAG: error: $*" >&2; exit 1; }
log() { echo "$TAG: $*" >&2; }

START_NS=$(date +%s%N)
elapsed() {
	awk -v a="$START_NS" -v b="$(date +%s%N)" 'BEGIN { printf "%.1fs", (b - a) / 1e9 }'
}

kubectl_bin() { # hack/k8s-build.sh's kubectl ($BIN), else the machine's
	if [ -x "$BIN/kubectl" ]; then
		echo "$BIN/kubectl"
	elif command -v kubectl >/dev/null 2>&1; then
		command -v kubectl
	else
		die "no kubectl: run hack/k8s-build.sh (it builds one when the machine has none)"
	fi
}

# ------------------------------------------------------------ processes
pid_of() { # prints the pid if the component runs (and is really ours)
	local f="$D/run/$1.pid" pid exe
	[ -f "$f" ] || return 1
	pid=$(cat "$f")
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
	[ "${exe% (deleted)}" = "$(exe_of "$1")" ] || return 1
	tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$D/" || return 1
	echo "$pid"
}

port_busy() { # is anything listening on port $1 (any address)?
	ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

check_port_free() { # check_port_free NAME PORT VAR
	port_busy "$2" &&
		die "port $2 (for $1) is in use by another process; stop it or choose another port with $3=<port>"
	return 0
}

start() { # start NAME ARGS... detached, in its own session, logging to logs/
	local name="$1" exe
	shift
	exe=$(exe_of "$name")
	mkdir -p "$D/logs" "$D/run"
	[ -x "$exe" ] || die "$exe is missing; run hack/k8s-build.sh (or hack/install-deps.sh)"
	{
		echo "=== $(date -Is) starting $name"
		printf '%q ' "$exe" "$@"
		echo
	} >>"$D/logs/$name.log"
	setsid "$exe" "$@" >>"$D/logs/$name.log" 2>&1 </dev/null &
	local pid=$! i exe_now
	echo "$pid" >"$D/run/$name.pid"
	disown
	# Until the child has exec'd the binary, /proc/PID/exe is bash's (or
	# setsid's) and pid_of would take it for gone: on a loaded machine that
	# lasts longer than wait_until's first look. Wait for the exec (10 s at
	# most; a process that dies first is reported by wait_until).
	for ((i = 0; i < 500; i++)); do
		exe_now=$(readlink "/proc/$pid/exe" 2>/dev/null) || break
		[ "${exe_now% (deleted)}" = "$exe" ] && break
		sleep 0.02
	done
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

stray_pids() { # stray_pids NAME...: those binaries still running with $D, pid file or not
	local p exe n
	for p in /proc/[0-9]*; do
		exe=$(readlink "$p/exe" 2>/dev/null) || continue
		exe=${exe% (deleted)}
		for n in "$@"; do
			[ "$exe" = "$(exe_of "$n")" ] || continue
			tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qF -- "$D/" && echo "${p#/proc/}"
			break
		done
	done
	return 0
}

kill_strays() { # kill_strays NAME...: TERM, then KILL, what stray_pids finds
	local pid
	for pid in $(stray_pids "$@"); do
		log "stopping stray process $pid ($(readlink "/proc/$pid/exe" 2>/dev/null || true)) using $D"
		kill -TERM "$pid" 2>/dev/null || true
	done
	sleep 0.1
	for pid in $(stray_pids "$@"); do kill -KILL "$pid" 2>/dev/null || true; done
}

wait_ports_free() { # wait_ports_free PORT...: up to 15 s, else die
	local deadline=$((SECONDS + 15)) busy n
	while :; do
		busy=""
		for n in "$@"; do
			port_busy "$n" && busy="$busy $n"
		done
		[ -n "$busy" ] || return 0
		[ $SECONDS -lt $deadline ] ||
			die "port(s)$busy still in use after stopping; see: ss -ltnp 'sport = :PORT'"
		sleep 0.2
	done
}

# --------------------------------------------------------------- guests
stop_guests() { # stop_guests STATE BRIDGE: the VMMs of node-vmm's state dir
	# STATE (ACPI shutdown, forced stop after 10 s), then what the agent made
	# for them on this host: taps, the masquerade BRIDGE and its nftables
	# tables (named after it), their cgroups. Leases stay in STATE, so the
	# next start gives each VM its address again.
	local state="$1" bridge="$2" s left tap socks=()
	for s in "$state"/vms/*/api.sock; do [ -S "$s" ] && socks+=("$s"); done
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
	# Only this state dir's VMs: other agents on the machine (tests) have
	# taps and cgroups of their own. A VM's taps are kvt<first 8 hex digits
	# of its uid>n<index> (node-vmm's taps.rs), its cgroups
	# kubevmm/<node>/vm-<uid> in every hierarchy (cgroups.rs).
	local uid short vm
	for vm in "$state"/vms/*/; do
		[ -d "$vm" ] || continue
		uid=$(basename "$vm")
		short=$(printf '%s' "$uid" | tr -cd '0-9a-fA-F' | cut -c1-8)
		for tap in /sys/class/net/kvt"${short}"n*; do
			if [ -e "$tap" ]; then ip link del "$(basename "$tap")" 2>/dev/null || true; fi
		done
	done
	ip link del "$bridge" 2>/dev/null || true
	nft delete table ip "$bridge" 2>/dev/null || true
	nft delete table bridge "$bridge" 2>/dev/null || true
	# Their cgroups, empty now (the shims are gone with their VMMs); the
	# node's own kubevmm/<node> directory stays for its next start.
	sleep 0.2
	for vm in "$state"/vms/*/; do
		[ -d "$vm" ] || continue
		uid=$(basename "$vm")
		rmdir /sys/fs/cgroup/*/kubevmm/*/vm-"$uid" /sys/fs/cgroup/kubevmm/*/vm-"$uid" 2>/dev/null || true
	done
	log "removed the guests' taps, bridge $bridge and its rules"
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
	# Kept while it is valid for another week and was made for the same
	# subject and SANs (pki/NAME.req remembers them).
	local n="$1" ca="$2" subj="$3" usage="$4" sans="${5:-}" eku ext
	if [ -s "$PKI/$n.crt" ] && [ -s "$PKI/$n.key" ] &&
		[ "$(cat "$PKI/$n.req" 2>/dev/null)" = "$subj $usage $sans" ] &&
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
	echo "$subj $usage $sans" >"$PKI/$n.req"
}

write_kubeconfig() { # write_kubeconfig FILE USER CERT-NAME SERVER
	local f="$1" user="$2" n="$3" server="$4" tmp
	tmp=$(mktemp "$f.XXXXXX")
	cat >"$tmp" <<EOK
apiVersion: v1
kind: Config
clusters:
- name: kubevmm
  cluster:
    server: $server
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
EOK
	chmod 600 "$tmp"
	mv -f "$tmp" "$f"
}
