#!/usr/bin/env bash
# Device check of the transformers backend in one call (see bench/gpu_check.py):
#   bash bench/gpu_check.sh                        # on a lent GPU box: fp32 + bf16, batches 1/8/32/128
#   bash bench/gpu_check.sh --device cpu --quick   # a smoke run anywhere
# Needs torch, transformers and peft only (no vLLM, no network, no weights). Writes $OUT/gpu_check.json
# when OUT is set. Extra arguments go to the Python script.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
fi
exec timeout "${GPU_CHECK_TIMEOUT:-540}" "$py" -m bench.gpu_check "$@"
