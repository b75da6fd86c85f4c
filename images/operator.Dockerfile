# kubevmm-operator image: static-ish Rust binary on a distroless nonroot base.
# Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/kubevmm/operator:0.1.0 .
# (Not built in this repository's CI: the development machines have no
# container engine. See docs/deploy.md.)
# Without an engine, images/build.py operator builds the equivalent OCI tarball (--import: into containerd).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kubevmm-operator \
 && install -D target/release/kubevmm-operator /out/kubevmm-operator

# glibc + CA certificates, no shell, UID/GID 65532 (matches the chart's
# runAsUser), read-only root filesystem friendly.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kubevmm-operator /usr/local/bin/kubevmm-operator
USER 65532:65532
EXPOSE 9100
ENTRYPOINT ["/usr/local/bin/kubevmm-operator"]
