# syntax=docker/dockerfile:1.7
# tributary's image: the release binary and libtorch's CPU libraries on
# Debian slim, run as an unprivileged user.
#
#   docker build -t tributary .
#   docker run --rm -p 8080:8080 -e TRIBUTARY_KAFKA__BROKERS=kafka:9092 tributary
#
# Configuration is by TRIBUTARY_* variables (README, "Configuration"); the
# image sets only the HTTP address, so that the port is reachable.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

# ---- build: the binary, linked against PyTorch's CPU-only wheel ----------
FROM rust:${RUST_VERSION}-${DEBIAN} AS build
# The CPU wheel carries libtorch without any CUDA library (the default PyPI
# wheel would pull ~3 GB of them). Same version as scripts/setup. Only its
# libraries and headers are used: no Python dependency, no `import torch`.
ARG TORCH_VERSION=2.13.0
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv pkg-config zlib1g-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && ln -s "$(/opt/torch/bin/python -c 'import os, importlib.util as u; print(os.path.dirname(u.find_spec("torch").origin))')" /opt/libtorch
ENV LIBTORCH=/opt/libtorch

WORKDIR /src
COPY . .
# The registry and target directory are BuildKit caches: a rebuild after a
# source change recompiles tributary, not its ~300 dependencies. Then copies
# exactly the shared libraries the binary loads from the wheel (libtorch,
# libc10, their OpenMP runtime), as the loader itself finds them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tributary \
 && mkdir -p /out/lib \
 && cp target/release/tributary /out/ \
 && LD_LIBRARY_PATH=/opt/libtorch/lib ldd /out/tributary | awk '$3 ~ "^/opt/" {print $3}' | xargs -r cp -L -t /out/lib

# ---- runtime ----------------------------------------------------------------
FROM debian:${DEBIAN}-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tributary --create-home tributary
COPY --from=build /out/lib/ /opt/tributary/lib/
COPY --from=build /out/tributary /usr/local/bin/tributary
COPY config/tributary.toml /etc/tributary/tributary.toml
ENV LD_LIBRARY_PATH=/opt/tributary/lib \
    TRIBUTARY_HTTP__ADDR=0.0.0.0:8080 \
    TRIBUTARY_CHECKPOINT__STATE_DIR=/var/lib/tributary/state \
    RUST_LOG=info
# Fails the build if a library is missing here, where the wheel is not.
RUN ! ldd /usr/local/bin/tributary | grep 'not found' && tributary --version
USER tributary
WORKDIR /var/lib/tributary
VOLUME /var/lib/tributary
# HTTP; gRPC when grpc.addr is set (the compose fleet sets 0.0.0.0:8001).
EXPOSE 8080 8001
# Liveness: the HTTP API answers. (Readiness, caught up with the update log,
# is GET /readyz; a replica that is catching up is healthy.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["tributary", "healthcheck"]
# SIGTERM stops gracefully: drains, commits, writes a checkpoint.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tributary"]
CMD ["serve"]
