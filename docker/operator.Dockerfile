# syntax=docker/dockerfile:1
# The weightsync operator image: runs `weightsync operator` (kopf) as an unprivileged user.
# Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/weightsync/weightsync-operator:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch is a dependency of the package, but the operator never touches a GPU: the CPU wheel
# keeps the image small (the default wheel bundles CUDA libraries).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY weightsync ./weightsync
COPY daemon ./daemon
COPY operator ./operator
RUN pip install . && cd / && rm -rf /src

# A numeric UID, so that the kubelet can verify runAsNonRoot (the chart runs as 10001 too).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin weightsync
USER 10001:10001
WORKDIR /tmp

# It runs until SIGTERM or SIGINT; it needs no terminal and never reads stdin.
CMD ["weightsync", "operator", "--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz"]
