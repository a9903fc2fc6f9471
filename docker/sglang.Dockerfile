# syntax=docker/dockerfile:1
# SGLang's serving image plus weightsync[sglang]: the weightsync plugin inside SGLang (entry point
# sglang.srt.plugins), so a trainer drives the server through SGLang's own routes (no daemon).
# Build from the repository root:
#   docker build -f docker/sglang.Dockerfile -t ghcr.io/weightsync/weightsync-sglang:0.1.0 .
# The plugin follows SGLang 0.5.23's weight-update interface (pyproject: sglang==0.5.23); the base
# image's SGLang satisfies the extra, so pip keeps it (and its CUDA build of torch).
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${SGLANG_IMAGE}

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
RUN python3 -m pip install ".[sglang]" && cd / && rm -rf /src

# SGLang's weight-update, pause and version routes answer anyone who reaches the port unless the
# server has --admin-api-key (docs/sglang.md, "What SGLang's own API leaves unprotected"): pass
# one in the args, and give the trainer the same key (SGLangTrainer.connect(..., api_key=...)).
ENV HF_HOME=/home/weightsync/.cache/huggingface

# A numeric UID, so that the kubelet can verify runAsNonRoot.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/weightsync --shell /usr/sbin/nologin weightsync
USER 10001:10001
WORKDIR /home/weightsync

EXPOSE 30000
# The model and SGLang's other flags come as the container's args (CMD here, `args:` in a pod):
#   docker run --gpus all -p 30000:30000 ghcr.io/weightsync/weightsync-sglang:0.1.0 \
#       --model-path Qwen/Qwen3-0.6B --admin-api-key "$KEY"
ENTRYPOINT ["python3", "-m", "sglang.launch_server", "--host", "0.0.0.0", "--port", "30000"]
CMD ["--model-path", "Qwen/Qwen3-0.6B"]
