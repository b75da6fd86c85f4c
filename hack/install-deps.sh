#!/usr/bin/env bash
# Installs what building and testing kubevmm needs on Debian bookworm (root),
# then builds the control-plane binaries (hack/k8s-build.sh).
#
# Usage: hack/install-deps.sh [--no-k8s] [--fixtures] [--bench]
#   --no-k8s     skip hack/k8s-build.sh and hack/helm-build.sh
#   --fixtures   also build the Linux guest fixtures (hack/fixtures-linux.sh)
#   --bench      also install what `make bench` compares against (QEMU)
#
# Idempotent and fast when everything is present: packages are checked with
# `dpkg -s`; `apt-get update` and `apt-get install` run only for missing ones.
# Go >= 1.24 is taken from PATH or /usr/local/go; when there is none, the Go
# toolchain module (golang.org/toolchain, the same download `go` itself does
# for GOTOOLCHAIN) is fetched from proxy.golang.org into ~/.cache/kubevmm/go.
# Rust is not installed here (use rustup).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "install-deps: error: $*" >&2; exit 1; }
log() { echo "install-deps: $*" >&2; }

K8S=1
FIXTURES=0
BENCH=0
for a in "$@"; do
	case "$a" in
	--no-k8s) K8S=0 ;;
	--fixtures) FIXTURES=1 ;;
	--bench) BENCH=1 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument '$a' (try --help)" ;;
	esac
done

START_NS=$(date +%s%N)
elapsed() {
	awk -v a="$START_NS" -v b="$(date +%s%N)" 'BEGIN { printf "%.1fs", (b - a) / 1e9 }'
}

PACKAGES=(
	ca-certificates # TLS to the Go module proxy and crates.io
	openssl         # control-plane PKI (hack/cluster.sh)
	curl            # readiness probes (hack/cluster.sh), Go toolchain bootstrap
	iproute2        # ss (hack/cluster.sh), ip/tap set-up in tests
	gcc             # test guests (tests/guests), linker for Rust
	libc6-dev
	make
	binutils        # readelf/objcopy (fixtures), test guests
	qemu-utils      # qemu-img (disk images in tests)
	busybox-static  # Linux fixture initramfs; udhcpc, ping, nc in network tests
	cpio
	gzip
	xz-utils
	zstd
	util-linux      # flock, setsid, blkid (cloud-init seed label)
	mtools          # mcopy: reads cloud-init seed images in tests
	strace          # the blk flush test orders fdatasync before the guest sees completion
	shellcheck      # make lint: hack/*.sh, .ci/run
	nftables        # nft: node-vmm's NAT and anti-spoofing rules (agent/nft.rs); kube-proxy
	containerd      # the kubelet node (hack/node.sh): container runtime (1.6.20),
	runc            # its OCI runtime (1.1.5)
	containernetworking-plugins # and the pods' CNI bridge (1.1.1)
)

# The benchmarks' anchor (hack/bench-vmm.sh, bench-net.sh): QEMU microvm.
# Large (~100 MB with its firmware), and no test needs it.
[ "$BENCH" = 0 ] || PACKAGES+=(qemu-system-x86)

need_root() {
	[ "$(id -u)" = 0 ] || die "missing packages: $*; run this script as root (or: sudo apt-get install -y $*)"
}

missing=()
for p in "${PACKAGES[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	need_root "${missing[@]}"
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >&2 || die "apt-get update failed; check network access to deb.debian.org"
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
		die "apt-get install ${missing[*]} failed (see above)"
else
	log "apt packages present"
fi

# ---------------------------------------------------------------- Go
GO_BOOTSTRAP_VERSION=go1.24.13
GO_CACHE="$HOME/.cache/kubevmm/go"

go_ok() { # go_ok BINARY: is it Go >= 1.24?
	local v
	v=$("$1" env GOVERSION 2>/dev/null) || return 1
	v=${v#go}
	local major=${v%%.*} rest=${v#*.}
	local minor=${rest%%[.a-z]*}
	[ "$major" -gt 1 ] || { [ "$major" = 1 ] && [ "$minor" -ge 24 ]; }
}

GO=""
for g in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go "$GO_CACHE/bin/go"; do
	if [ -n "$g" ] && [ -x "$g" ] && go_ok "$g"; then
		GO="$g"
		break
	fi
done
if [ -z "$GO" ]; then
	if ! dpkg -s unzip >/dev/null 2>&1; then
		need_root unzip
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends unzip >&2 ||
			die "apt-get install unzip failed"
	fi
	url="https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-$GO_BOOTSTRAP_VERSION.linux-amd64.zip"
	log "no Go >= 1.24 found; fetching $GO_BOOTSTRAP_VERSION from $url"
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	curl -fsSL -o "$tmp/go.zip" "$url" ||
		die "downloading the Go toolchain from $url failed; install Go >= 1.24 into /usr/local/go instead"
	unzip -q "$tmp/go.zip" -d "$tmp/x"
	rm -rf "$GO_CACHE"
	mkdir -p "$(dirname "$GO_CACHE")"
	mv "$tmp/x/golang.org/toolchain@v0.0.1-$GO_BOOTSTRAP_VERSION.linux-amd64" "$GO_CACHE"
	chmod -R u+w "$GO_CACHE"
	GO="$GO_CACHE/bin/go"
	go_ok "$GO" || die "the downloaded Go toolchain in $GO_CACHE does not run"
fi
log "go: $GO ($("$GO" env GOVERSION))"
export PATH
PATH="$(dirname "$GO"):$PATH"

if [ "$K8S" = 1 ]; then
	"$HERE/k8s-build.sh"
	# helm and promtool for the chart and monitoring tests (tests/tests/helm.rs).
	"$HERE/helm-build.sh"
fi
if [ "$FIXTURES" = 1 ]; then
	"$HERE/fixtures-linux.sh"
fi
log "dependencies ready, took $(elapsed)"
