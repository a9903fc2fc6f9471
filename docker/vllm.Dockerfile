# syntax=docker/dockerfile:1
# vLLM's OpenAI-compatible serving image plus weightsync[vllm]: the weightsync weight-transfer
# backend inside vLLM, so a WeightSync drives the server through vLLM's own routes (no daemon).
# Build from the repository root:
#   docker build -f docker/vllm.Dockerfile -t ghcr.io/weightsync/weightsync-vllm:0.1.0 .
# The backend follows vLLM 0.32's and 0.33's interfaces (pyproject: vllm>=0.32,<0.34); the base
# image's vLLM satisfies the extra, so pip keeps it (and its CUDA build of torch).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

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
RUN python3 -m pip install ".[vllm]" && cd / && rm -rf /src

# VLLM_SERVER_DEV_MODE=1: vLLM registers its weight-transfer routes (/init_weight_transfer_engine,
# /start_weight_update, /update_weights, /finish_weight_update, /pause, /resume, ...) only then.
# They are NOT covered by --api-key (it guards /v1, /v2, /inference and /cohere only): keep the
# port reachable by the operator and the trainer alone (the chart's NetworkPolicy, vllm.enabled).
# WEIGHTSYNC_METRICS_PORT=8200: every vLLM worker serves weightsync's metrics on 8200 + its local
# rank (8200..8203 with tensor parallel 4), where the chart's ServiceMonitor scrapes them.
# WEIGHTSYNC_VLLM_URL: where the workers read the served version label (GET /weight_info).
ENV VLLM_SERVER_DEV_MODE=1 \
    WEIGHTSYNC_METRICS_PORT=8200 \
    WEIGHTSYNC_VLLM_URL=http://127.0.0.1:8000 \
    HF_HOME=/home/weightsync/.cache/huggingface

# A numeric UID, so that the kubelet can verify runAsNonRoot (the example Deployment runs as 10001).
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/weightsync --shell /usr/sbin/nologin weightsync
USER 10001:10001
WORKDIR /home/weightsync

EXPOSE 8000 8200
# The model and vLLM's other flags come as the container's args (CMD here, `args:` in a pod):
#   docker run --gpus all -p 8000:8000 ghcr.io/weightsync/weightsync-vllm:0.1.0 Qwen/Qwen3-0.6B --tensor-parallel-size 1
ENTRYPOINT ["vllm", "serve", "--host", "0.0.0.0", "--port", "8000", "--weight-transfer-config", "{\"backend\": \"weightsync\"}"]
CMD ["Qwen/Qwen3-0.6B"]
