#!/usr/bin/env bash
# Builds helm, promtool and prometheus from the Go module proxy at pinned
# releases into ~/.cache/kubevmm/{helm,promtool}-<version>/ (used by the
# tests and hack/prometheus.sh).
#
# Usage: hack/helm-build.sh [--no-promtool]
#
# Idempotent: a binary already in its versioned cache directory is kept.
# GOFLAGS (default -p=2) bounds the parallel compiles on shared machines.
set -euo pipefail

HELM_VERSION=v3.17.4
# Prometheus v3.9.1 (module versions are v0.3XX.Y for v3.XX.Y); also pinned
# in hack/promtool-build/go.mod, which must name the same version.
PROMTOOL_VERSION=v0.309.1

die() { echo "helm-build: error: $*" >&2; exit 1; }
log() { echo "helm-build: $*" >&2; }

PROMTOOL=1
for a in "$@"; do
	case "$a" in
	--no-promtool) PROMTOOL=0 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument '$a' (try --help)" ;;
	esac
done

if ! command -v go >/dev/null 2>&1; then
	if [ -x /usr/local/go/bin/go ]; then
		PATH="/usr/local/go/bin:$PATH"
	elif [ -x "$HOME/.cache/kubevmm/go/bin/go" ]; then
		PATH="$HOME/.cache/kubevmm/go/bin:$PATH"
	else
		die "no Go toolchain (run hack/install-deps.sh)"
	fi
fi

CACHE="$HOME/.cache/kubevmm"

# build NAME VERSION PACKAGE@VERSION
build() {
	local name=$1 version=$2 pkg=$3
	local dir="$CACHE/$name-$version"
	if [ -x "$dir/$name" ]; then
		log "$name $version present ($dir/$name)"
		return 0
	fi
	mkdir -p "$dir"
	log "building $name $version from the Go module proxy (a few minutes)"
	# A temporary GOBIN keeps a half-built binary out of the cache directory.
	local tmp
	tmp=$(mktemp -d)
	GOBIN="$tmp" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--p=2}" go install "$pkg" ||
		{ rm -rf "$tmp"; die "go install $pkg failed"; }
	mv "$tmp/$name" "$dir/$name"
	rm -rf "$tmp"
	log "$name $version built: $dir/$name"
}

build helm "$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

# promtool: Prometheus's go.mod has exclude directives, which
# `go install pkg@version` refuses, so it is built inside the wrapper module
# hack/promtool-build (go.mod/go.sum pin the release).
if [ "$PROMTOOL" = 1 ]; then
	HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
	MOD="$HERE/promtool-build"
	grep -q "github.com/prometheus/prometheus $PROMTOOL_VERSION\$" "$MOD/go.mod" ||
		die "$MOD/go.mod does not require prometheus $PROMTOOL_VERSION"
	dir="$CACHE/promtool-$PROMTOOL_VERSION"
	# promtool for the tests, prometheus for the local cluster
	# (hack/prometheus.sh: Kubernetes service discovery, which Debian's
	# package leaves out); one module, so the second build reuses the first's.
	for cmd in promtool prometheus; do
		if [ -x "$dir/$cmd" ]; then
			log "$cmd $PROMTOOL_VERSION present ($dir/$cmd)"
			continue
		fi
		mkdir -p "$dir"
		t0=$(date +%s)
		log "building $cmd $PROMTOOL_VERSION in $MOD (large: several minutes)"
		(cd "$MOD" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--p=2}" \
			go build -trimpath -ldflags="-s -w" -o "$dir/.$cmd.tmp" "github.com/prometheus/prometheus/cmd/$cmd") ||
			{ rm -f "$dir/.$cmd.tmp"; die "go build $cmd failed"; }
		mv "$dir/.$cmd.tmp" "$dir/$cmd"
		log "$cmd $PROMTOOL_VERSION built in $(($(date +%s) - t0))s: $dir/$cmd"
	done
fi
