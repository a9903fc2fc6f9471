# syntax=docker/dockerfile:1
# The weightsync daemon image for GPU nodes: `weightsync daemon` on a CUDA build of PyTorch
# (NCCL included), as an unprivileged user. Build from the repository root:
#   docker build -f docker/daemon.Dockerfile -t ghcr.io/weightsync/weightsync-daemon:0.1.0 .
# Choose another CUDA/PyTorch pairing with --build-arg BASE_IMAGE=... (torch>=2.4).
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

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
# weightsync[daemon]: the daemon and the data plane, no Kubernetes client. The base image's torch
# satisfies the dependency, so pip keeps it (and its CUDA build).
RUN pip install ".[daemon]" && cd / && rm -rf /src

# A numeric UID, so that the kubelet can verify runAsNonRoot (the chart runs as 10001 too).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin weightsync
USER 10001:10001
WORKDIR /tmp

EXPOSE 8200
# It runs until SIGTERM or SIGINT (`docker stop`, a pod's deletion); it needs no terminal and no
# stdin (`docker run` without -i/-t is fine). A round in flight gets up to --shutdown-grace (20 s)
# to finish, so give `docker stop` more than its default 10 s: `docker stop -t 30`.
CMD ["weightsync", "daemon", "--host", "0.0.0.0", "--port", "8200", "--backend", "nccl", "--device", "cuda:0"]
