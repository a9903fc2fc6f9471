# syntax=docker/dockerfile:1
# The weightsync operator image: runs `weightsync operator` (kopf) as an unprivileged user.
# Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/weightsync/weightsync-operator:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY weightsync ./weightsync
COPY daemon ./daemon
COPY operator ./operator
COPY engines ./engines
COPY cli ./cli
# weightsync[operator]: the control plane only. The operator never touches a tensor, and its
# image has no PyTorch (tests/test_packaging.py resolves the extra and runs the command without it).
RUN pip install ".[operator]" && cd / && rm -rf /src

# A numeric UID, so that the kubelet can verify runAsNonRoot (the chart runs as 10001 too).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin weightsync
USER 10001:10001
WORKDIR /tmp

# It runs until SIGTERM or SIGINT; it needs no terminal and never reads stdin.
CMD ["weightsync", "operator", "--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz"]
