#!/usr/bin/env bash
# Builds the local control plane's binaries from the Go module proxy, cached.
#
# Usage: hack/k8s-build.sh [--force] [--print-bin-dir]
#
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kube-proxy and the kubelet at the Kubernetes release pinned in
# hack/k8s-build/go.mod, helm at the release pinned there too (it shares
# most of their packages, so it costs a fraction when built with them;
# hack/helm-build.sh links it into ~/.cache/kubevmm/helm-<version>/), and
# crictl (cri-tools, pinned below), into
#   ${KUBEVMM_K8S_CACHE:-~/.cache/kubevmm}/k8s-<version>/bin/
# and makes sure a kubectl is available: /usr/bin/kubectl (or any kubectl on
# PATH) when it works, otherwise k8s.io/kubernetes/cmd/kubectl is built into
# the same directory. Does nothing when the binaries are there and were built
# from the current go.mod/go.sum (the cache key is the release plus a hash of
# both files and the link flags, kept in bin/.build-key).
#
# Environment:
#   KUBEVMM_K8S_CACHE        cache root (default ~/.cache/kubevmm)
#   KUBEVMM_GO_BUILD_FLAGS   extra `go build` flags (e.g. "-p 1" to be gentler)
#   KUBEVMM_BUILD_KUBECTL=1  build kubectl even if the machine has one
#
# Needs: go >= 1.24 (https://go.dev/dl), network access to proxy.golang.org
# on the first build (later builds use the Go module cache).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MOD="$HERE/k8s-build"

die() { echo "k8s-build: error: $*" >&2; exit 1; }
log() { echo "k8s-build: $*" >&2; }

FORCE=0
PRINT_BIN=0
while [ $# -gt 0 ]; do
	case "$1" in
	--force) FORCE=1 ;;
	--print-bin-dir) PRINT_BIN=1 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument '$1' (try --help)" ;;
	esac
	shift
done

{ [ -f "$MOD/go.mod" ] && [ -f "$MOD/go.sum" ]; } ||
	die "$MOD/go.mod or go.sum is missing (is this a kubevmm checkout?)"
VERSION=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$MOD/go.mod")
[ -n "$VERSION" ] || die "cannot find the k8s.io/kubernetes version in $MOD/go.mod"
BIN="${KUBEVMM_K8S_CACHE:-$HOME/.cache/kubevmm}/k8s-$VERSION/bin"
if [ "$PRINT_BIN" = 1 ]; then
	echo "$BIN"
	exit 0
fi

START_NS=$(date +%s%N)
elapsed() {
	awk -v a="$START_NS" -v b="$(date +%s%N)" 'BEGIN { printf "%.1fs", (b - a) / 1e9 }'
}

# Stamp the release into the binaries (what `kubectl version` and /version
# report); without it they say v0.0.0-master.
MINOR=${VERSION#v1.}
MINOR=${MINOR%%.*}
LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	LDFLAGS="$LDFLAGS -X $pkg.gitVersion=$VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$MINOR"
	LDFLAGS="$LDFLAGS -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
# helm's own release (`helm version`), as its release builds stamp it.
HELM=$(awk '$1 == "helm.sh/helm/v3" && $2 ~ /^v/ { print $2; exit }' "$MOD/go.mod")
[ -n "$HELM" ] || die "cannot find the helm.sh/helm/v3 version in $MOD/go.mod"
LDFLAGS="$LDFLAGS -X helm.sh/helm/v3/internal/version.version=$HELM -X helm.sh/helm/v3/internal/version.gitTreeState=clean"

# crictl is not part of the Kubernetes module: `go install` at its own
# release (its go.mod, checked against sum.golang.org). CRI is stable, so a
# newer crictl talks to containerd 1.6 fine.
CRICTL=sigs.k8s.io/cri-tools/cmd/crictl@v1.34.0
CRICTL_LDFLAGS="-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=${CRICTL#*@}"

KEY="$VERSION $( (cat "$MOD/go.mod" "$MOD/go.sum"; echo "$LDFLAGS $CRICTL $CRICTL_LDFLAGS") | sha256sum | cut -c1-16)"
KEY_FILE="$BIN/.build-key"

# name -> Go package. etcd's main package is go.etcd.io/etcd/server/v3, which
# `go build -o DIR/` would name "server" (or "v3"); always build to a named
# output instead.
NAMES=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet helm crictl)
declare -A PKG=(
	[etcd]=go.etcd.io/etcd/server/v3
	[kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
	[kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
	[kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
	[kube-proxy]=k8s.io/kubernetes/cmd/kube-proxy
	[kubelet]=k8s.io/kubernetes/cmd/kubelet
	[helm]=helm.sh/helm/v3/cmd/helm
	# Not part of the Kubernetes module: `go install` at its own release
	# (its go.mod, checked against sum.golang.org). CRI is stable, so a
	# newer crictl talks to containerd 1.6 fine.
	[crictl]=sigs.k8s.io/cri-tools/cmd/crictl@v1.34.0
	[kubectl]=k8s.io/kubernetes/cmd/kubectl
)

mkdir -p "$BIN"

# Never run two builds into the same directory at once.
exec 9>"$BIN/.lock"
if ! flock -n 9; then
	log "another k8s-build is running for $BIN; waiting for it"
	flock 9
fi

# Adopt an etcd built by a plain `go build -o DIR/ go.etcd.io/etcd/server/v3`.
if [ ! -x "$BIN/etcd" ]; then
	for alt in server v3; do
		if [ -x "$BIN/$alt" ] && "$BIN/$alt" --version 2>/dev/null | grep -q '^etcd Version'; then
			mv "$BIN/$alt" "$BIN/etcd"
			log "renamed $BIN/$alt to etcd"
			break
		fi
	done
fi

if [ "$FORCE" = 1 ]; then
	rm -f "$KEY_FILE"
	for n in "${NAMES[@]}"; do rm -f "$BIN/$n"; done
elif [ -f "$KEY_FILE" ] && [ "$(cat "$KEY_FILE")" != "$KEY" ]; then
	log "go.mod/go.sum changed since the last build ($(cat "$KEY_FILE") -> $KEY); rebuilding"
	for n in "${NAMES[@]}" kubectl; do rm -f "$BIN/$n"; done
fi

# kubectl: the machine's own if it works, else build one.
KUBECTL=""
if [ "${KUBEVMM_BUILD_KUBECTL:-0}" != 1 ] && [ ! -x "$BIN/kubectl" ]; then
	for k in /usr/bin/kubectl "$(command -v kubectl 2>/dev/null || true)"; do
		if [ -n "$k" ] && [ -x "$k" ] && "$k" version --client >/dev/null 2>&1; then
			KUBECTL="$k"
			break
		fi
	done
fi
[ -n "$KUBECTL" ] || NAMES+=(kubectl)

MISSING=()
for n in "${NAMES[@]}"; do
	[ -x "$BIN/$n" ] || MISSING+=("$n")
done

if [ ${#MISSING[@]} -eq 0 ]; then
	[ -f "$KEY_FILE" ] || echo "$KEY" >"$KEY_FILE"
	log "Kubernetes $VERSION binaries up to date in $BIN (kubectl: ${KUBECTL:-$BIN/kubectl}), took $(elapsed)"
	exit 0
fi

# Go: PATH, else /usr/local/go, else the toolchain hack/install-deps.sh fetched.
if ! command -v go >/dev/null 2>&1; then
	for g in /usr/local/go/bin "$HOME/.cache/kubevmm/go/bin"; do
		if [ -x "$g/go" ]; then
			PATH="$g:$PATH"
			break
		fi
	done
fi
command -v go >/dev/null 2>&1 ||
	die "'go' not found; run hack/install-deps.sh, or install Go >= 1.24 into /usr/local/go"

log "building ${MISSING[*]} ($VERSION) into $BIN; the first build takes ~12 minutes on 2 cores"
# The Kubernetes module's commands in one `go build`: the go command then
# links one binary while it compiles the next one's packages, instead of
# linking each (single-threaded, ~20 s) with the other core idle.
MOD_PKGS=()
MOD_NAMES=()
for n in "${MISSING[@]}"; do
	[[ "${PKG[$n]}" == *@* ]] && continue
	MOD_PKGS+=("${PKG[$n]}")
	MOD_NAMES+=("$n")
done
if [ ${#MOD_PKGS[@]} -gt 0 ]; then
	t0=$(date +%s)
	log "go build ${MOD_PKGS[*]}"
	rm -rf "$BIN/.new"
	# shellcheck disable=SC2086 # KUBEVMM_GO_BUILD_FLAGS is a word list
	(cd "$MOD" && go build -trimpath -ldflags="$LDFLAGS" ${KUBEVMM_GO_BUILD_FLAGS:-} -o "$BIN/.new/" "${MOD_PKGS[@]}") ||
		{ rm -rf "$BIN/.new"; die "go build failed (see above); check network access to proxy.golang.org and that go >= 1.24"; }
	for i in "${!MOD_NAMES[@]}"; do
		# `go build -o DIR/` names a binary after its package path's last
		# element, or the one before a major-version suffix (etcd's .../server/v3).
		out=${MOD_PKGS[$i]##*/}
		if [[ "$out" =~ ^v[0-9]+$ ]]; then
			out=${MOD_PKGS[$i]%/*}
			out=${out##*/}
		fi
		mv -f "$BIN/.new/$out" "$BIN/${MOD_NAMES[$i]}"
	done
	rm -rf "$BIN/.new"
	log "built ${MOD_NAMES[*]} in $(($(date +%s) - t0))s"
fi
# crictl is not in the Kubernetes module: `go install` at its own release.
for n in "${MISSING[@]}"; do
	[[ "${PKG[$n]}" == *@* ]] || continue
	t0=$(date +%s)
	log "go install ${PKG[$n]}"
	rm -rf "$BIN/.gobin"
	# shellcheck disable=SC2086 # KUBEVMM_GO_BUILD_FLAGS is a word list
	GOBIN="$BIN/.gobin" go install -trimpath -ldflags="$CRICTL_LDFLAGS" ${KUBEVMM_GO_BUILD_FLAGS:-} "${PKG[$n]}" ||
		{ rm -rf "$BIN/.gobin"; die "go install ${PKG[$n]} failed (see above); check network access to proxy.golang.org"; }
	mv -f "$BIN/.gobin/$n" "$BIN/$n"
	rm -rf "$BIN/.gobin"
	log "built $n in $(($(date +%s) - t0))s"
done
echo "$KEY" >"$KEY_FILE"
log "Kubernetes $VERSION binaries ready in $BIN, took $(elapsed)"
