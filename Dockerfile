# syntax=docker/dockerfile:1
# llamaflow: multi-stage build. The builder compiles the release binary (rdkafka builds the
# bundled librdkafka from source, hence the C toolchain); the runtime is debian:bookworm-slim.

FROM rust:1-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache the registry and target dir between builds (BuildKit); copy the binary out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pipeline --bin llamaflow \
 && install -D -m 0755 target/release/llamaflow /out/llamaflow

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/llamaflow --create-home llamaflow
COPY --from=builder /out/llamaflow /usr/local/bin/llamaflow
USER llamaflow
WORKDIR /var/lib/llamaflow
ENV LLAMAFLOW_LOG=info
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=6 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["llamaflow"]
CMD ["run", "--config", "/etc/llamaflow/llamaflow.toml"]
