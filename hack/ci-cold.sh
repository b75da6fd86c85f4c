#!/usr/bin/env bash
# Measures a cold CI run on this machine without touching your caches: a
# fresh clone of HEAD runs .ci/run with HOME pointed at an empty directory,
# so the Go module and build caches (~/go, ~/.cache/go-build), cargo's
# registry (~/.cargo/registry), the cargo target directory and
# ~/.cache/kubevmm (control plane, helm, promtool, Linux fixtures) all start
# empty, as on a new machine. The Rust toolchain (rustup) and Go in
# /usr/local/go are the machine image's and are reused. Debian packages are
# not removed: on a new machine their download and install add ~2 minutes.
#
# Usage: hack/ci-cold.sh [DIR]   (default /tmp/kubevmm-ci-cold; emptied first)
#
# Writes DIR/ci.log and prints each phase's time from it. Takes over an hour
# on 2 cores; do not run it beside another CI run or a local cluster (one
# kubelet per machine).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR="${1:-/tmp/kubevmm-ci-cold}"
case "$DIR" in /tmp/* | /var/tmp/*) ;; *) echo "ci-cold: DIR must be under /tmp or /var/tmp (it is emptied)" >&2; exit 2 ;; esac

rm -rf "$DIR"
mkdir -p "$DIR/home/.cargo/bin"
# rustup's proxies, with the toolchains where they are (RUSTUP_HOME).
for f in "$HOME"/.cargo/bin/*; do ln -s "$f" "$DIR/home/.cargo/bin/"; done
# shellcheck disable=SC2016 # $PATH is expanded when the file is sourced
printf 'export PATH="%s/home/.cargo/bin:$PATH"\n' "$DIR" >"$DIR/home/.cargo/env"
git -C "$HERE/.." clone -q . "$DIR/src"

start=$(date +%s)
rc=0
env -i PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
	HOME="$DIR/home" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
	CARGO_HOME="$DIR/home/.cargo" TERM=dumb LANG=C.UTF-8 \
	bash "$DIR/src/.ci/run" >"$DIR/ci.log" 2>&1 || rc=$?
total=$(($(date +%s) - start))

grep -E "took|built in|passed in|test-lanes: [0-9]+ passed|FAILED" "$DIR/ci.log" || true
echo "ci-cold: .ci/run exited $rc after ${total}s ($((total / 60)) min); log: $DIR/ci.log"
exit "$rc"
