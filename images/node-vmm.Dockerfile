# node-vmm image: the node agent and the per-guest VMM (kubevmm-vmm, found
# next to node-vmm). Build from the repository root:
#   docker build -f images/node-vmm.Dockerfile -t ghcr.io/kubevmm/node-vmm:0.1.0 .
# (Not built in this repository's CI: the development machines have no
# container engine. See docs/deploy.md.)
# Without an engine, images/build.py node-vmm builds the equivalent OCI tarball (--import: into containerd).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p node-vmm -p kubevmm-vmm \
 && install -D target/release/node-vmm /out/node-vmm \
 && install -D target/release/kubevmm-vmm /out/kubevmm-vmm

FROM debian:bookworm-slim
# nftables: `nft` applies the NAT and anti-spoofing rules (agent/nft.rs; links
# and taps go over netlink, no `ip`);
# ca-certificates: TLS to the API server.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/node-vmm /out/kubevmm-vmm /usr/local/bin/
# Runs privileged as root (see charts/kubevmm/templates/node-vmm.yaml).
EXPOSE 9101
ENTRYPOINT ["/usr/local/bin/node-vmm"]
CMD ["agent"]
