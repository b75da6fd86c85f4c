# kubevmm — the commands users and CI rely on (DESIGN.md, "Commands").
#   make demo          build, boot the demo guest standalone, then through the local cluster
#   make test          every test, installing what it needs (what .ci/run calls)
#   make cluster-up    a one-node cluster here (control plane, kubelet on containerd), our
#                      images imported and the chart installed with helm (hack/deploy.sh)
#   make cluster-down  helm uninstall, stop everything, leave nothing behind
#   make cluster-up-local / cluster-down-local  the same control plane with the operator
#                      and node-vmm as host processes (the inner loop, no images)
#   make bench         benchmarks beside their anchors
#   make bench-scale   the operator with 500 and 5,000 VMs on 100 simulated nodes
#   make doctor        what this machine has and lacks for guests
#   make install       kubectl-vm (the `kubectl vm` plugin) and node-vmm into $(PREFIX)/bin
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
RELEASE_BIN := $(TARGET_DIR)/release

.PHONY: all build install deps guests fixtures crds lint test test-rust test-linux-hw demo demo-standalone demo-cluster \
	cluster-up cluster-down cluster-up-local cluster-down-local bench bench-scale doctor clean

all: build

build:
	$(CARGO) build --release -p node-vmm -p kubevmm-vmm -p kubevmm-operator -p kubectl-vm

## kubectl-vm (so `kubectl vm` works) and node-vmm on PATH, with bash completion.
PREFIX ?= /usr/local
install: build
	install -d $(PREFIX)/bin $(PREFIX)/share/bash-completion/completions
	install -m 0755 $(RELEASE_BIN)/kubectl-vm $(RELEASE_BIN)/node-vmm $(PREFIX)/bin/
	$(RELEASE_BIN)/kubectl-vm completion bash > $(PREFIX)/share/bash-completion/completions/kubectl-vm

## Debian packages, Go-built control plane, Linux guest fixtures (cached under ~/.cache/kubevmm).
deps:
	hack/install-deps.sh --fixtures

## Our freestanding test guests (tests/guests/build/*.elf), also installed
## where examples/ and the node agent's default allow-list expect them.
GUEST_DIR := /var/lib/kubevmm/guests
guests:
	$(MAKE) -s -C tests/guests
	install -d $(GUEST_DIR)
	install -m 0644 tests/guests/build/*.elf $(GUEST_DIR)/

fixtures:
	hack/fixtures-linux.sh

## Regenerate the committed CRD YAML from the Rust types.
crds:
	$(CARGO) run -q -p kubevmm-crds --bin crdgen
	cp crds/*.yaml charts/kubevmm/crds/

lint:
	start=$$(date +%s); \
	$(CARGO) fmt --all -- --check; \
	$(CARGO) clippy --workspace --all-targets -- -D warnings; \
	shellcheck hack/*.sh .ci/run; \
	echo "lint: took $$(($$(date +%s) - start))s"

## The end-to-end tests run the workspace's binaries: build them first.
## hack/test-lanes.py runs the test binaries three at a time (KUBEVMM_TEST_LANES;
## 1 is `cargo test --workspace --no-fail-fast`'s order), every one to the end.
test-rust:
	start=$$(date +%s); \
	$(CARGO) build --workspace --bins; \
	echo "test-rust: binaries built in $$(($$(date +%s) - start))s"; \
	CARGO=$(CARGO) hack/test-lanes.py; \
	echo "test-rust: took $$(($$(date +%s) - start))s"

## Full Linux boot to the initramfs with disk and NIC: VT-x/AMD-V hosts only
## (ignored by `make test`, which says so; needs hack/fixtures-linux.sh).
test-linux-hw: fixtures
	$(CARGO) test -p kubevmm-vmm --test linux -- --ignored linux_full_boot_to_initramfs_with_disk_and_nic

## The README's test command.
test: deps guests lint test-rust

doctor: build
	$(RELEASE_BIN)/node-vmm doctor

demo: build guests demo-standalone demo-cluster

DEMO_DISK := /var/lib/kubevmm/disks/demo.img
demo-standalone: build guests
	install -d $(dir $(DEMO_DISK))
	printf 'hello from a host file, read over virtio-blk\n' > $(DEMO_DISK)
	truncate -s 1M $(DEMO_DISK)
	$(RELEASE_BIN)/node-vmm doctor || true
	@echo
	@echo "demo: booting examples/demo-standalone.yaml (node-vmm run): console below"
	$(RELEASE_BIN)/node-vmm run examples/demo-standalone.yaml

## kubectl apply -> the operator places it -> node-vmm boots it; console, then a graceful delete.
demo-cluster: build guests cluster-up
	hack/demo-cluster.sh

cluster-up: build guests
	hack/deploy.sh up

cluster-down:
	hack/deploy.sh down

cluster-up-local: build
	hack/cluster.sh up
	hack/kubevmm-local.sh up

cluster-down-local:
	hack/kubevmm-local.sh down
	hack/cluster.sh down

bench: build guests fixtures
	hack/install-deps.sh --no-k8s --bench
	hack/bench-vmm.sh
	hack/bench-net.sh
	# (the binaries they start come from `build`: a --bin filter here would
	# apply to every -p package and build none of theirs)
	$(CARGO) build --release -p kubevmm-e2e --bin bench-cluster --bin bench-import --bin bench-console
	$(RELEASE_BIN)/bench-cluster
	$(RELEASE_BIN)/bench-import
	$(RELEASE_BIN)/bench-console

## The operator at scale (tests/src/bin/bench-scale.rs): the real control
## plane and operator, 100 nodes simulated with node-vmm's own heartbeat and
## status code, 500 then 5,000 VMs, then 10 nodes lost. About 10 minutes.
bench-scale: build
	hack/install-deps.sh --no-k8s
	$(CARGO) build --release -p kubevmm-e2e --bin bench-scale
	$(RELEASE_BIN)/bench-scale

clean:
	$(CARGO) clean
	$(MAKE) -C tests/guests clean
