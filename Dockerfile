# The image the Helm chart runs: a release build of tollgate on a distroless base
# (glibc, CA certificates for HTTPS webhooks are built into the binary: webpki roots).
#   docker build -t ghcr.io/tollgate/tollgate:0.1.0 .
# Not built in CI (no container engine there); the chart's manifests are checked instead.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tollgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
USER 65532:65532
WORKDIR /var/lib/tollgate
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve"]
