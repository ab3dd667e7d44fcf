# lagprobe container image: a release build of the binary on a slim Debian runtime.
#
#   docker build -t lagprobe .
#   docker run --rm lagprobe --help
#
# The build needs no protoc (the .proto files are compiled by protox, in Rust), but it needs clang and
# libclang: pg_query (the proxy's SQL parser) compiles PostgreSQL's parser in C and runs bindgen.
# The runtime needs nothing but the binary (no TLS library: the database
# connections are plain TCP inside the compose network). The build command line is the one
# .ci/check-compose.sh runs and tests outside Docker: keep the two in step.
# Nothing secret is baked in: database URLs come from the environment at run time.

# The builder's Debian must match the runtime's (the binary links against its glibc): change both
# together, e.g. --build-arg RUST_IMAGE=rust:1.95-slim-trixie --build-arg RUNTIME_IMAGE=debian:trixie-slim
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# sqlx query macros, if any, read the checked-in .sqlx data instead of a live database.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/lagprobe /out/lagprobe

FROM ${RUNTIME_IMAGE}
RUN groupadd --system --gid 10001 lagprobe \
    && useradd --system --uid 10001 --gid lagprobe --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin lagprobe
COPY --from=build /out/lagprobe /usr/local/bin/lagprobe
USER 10001:10001
# In a container the servers must listen on every interface; published ports decide who reaches them.
ENV LAGPROBE_HTTP_ADDR=0.0.0.0:8000 \
    LAGPROBE_GRPC_ADDR=0.0.0.0:50051
EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["lagprobe", "healthcheck", "--url", "http://127.0.0.1:8000/readyz"]
ENTRYPOINT ["lagprobe"]
CMD ["serve"]
