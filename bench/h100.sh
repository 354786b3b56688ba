#!/usr/bin/env bash
# The H100 runs behind bench/NOTES.md, in the order the lent machine allows (see ../shared/gpu):
# FlashAttention-4 comes in two carried folders made by ../shared/gpu/fa4-kit.sh.
#
#   call 1 (carry .gpu-wheels/fa4-1 .gpu-wheels/pytest):  bash bench/h100.sh stage
#   call 2 (carry .gpu-wheels/fa4-2 .gpu-wheels/tok):     bash bench/h100.sh fa4   (or throughput)
#   call 3 (carry .gpu-wheels/minilm):                    bash bench/h100.sh long
#   any call (carry .gpu-wheels/tok), no FlashAttention-4: bash bench/h100.sh sdpa
# session 3 (v8: leases G/H, the forward thread's own core, since removed; v9: the tokenizer process):
#   call 1 (carry .gpu-wheels/fa4-1 .gpu-wheels/pytest):  bash bench/h100.sh stage
#   call 2 (carry .gpu-wheels/fa4-2 .gpu-wheels/tok):     bash bench/h100.sh v9-rows
#   call 3 (carry .gpu-wheels/minilm):                    bash bench/h100.sh v9-tests
#   call 4 (carry .gpu-wheels/tok):                       bash bench/h100.sh v9-growth
# session 4 (v10: the final file written as the run goes; the first chunk's steps held while the GPU is busy):
#   (leases J and K ran the growth steps below with `--ramp-steps 16,1`, a flag removed with the ramp
#   after them: J at commit 6ad2922; K at cdcf958 (v10-rows, v10-tests) and d8afc5d (v10-qwen); bench/NOTES.md v10)
#   lease J (carry .gpu-wheels/tok):                      bash bench/h100.sh v10-growth
#   lease K, call 1 (carry .gpu-wheels/fa4-1 .gpu-wheels/pytest):  bash bench/h100.sh stage
#   call 2 (carry .gpu-wheels/fa4-2 .gpu-wheels/tok):     bash bench/h100.sh v10-rows
#   call 3 (carry .gpu-wheels/minilm .gpu-wheels/tok):    bash bench/h100.sh v10-tests
#   call 4 (carry .gpu-wheels/tok):                       bash bench/h100.sh v10-qwen
#   lease L (carry .gpu-wheels/minilm .gpu-wheels/tok .gpu-wheels/pytest):  bash bench/h100.sh v10-final
# session 5 (v11: SDPA's kernel order, the first parts from 512 rows, growth on fresh texts):
#   lease M (carry .gpu-wheels/tok):                      bash bench/h100.sh v11-probe
#   (lease N ran BERT growth, with ATTNFALLBACK_SDPA_ORDER=torch too, and row 1 at fed9468, with a
#   small-chunk budget removed after it; bench/NOTES.md v11)
#   lease O (carry .gpu-wheels/tok):                      bash bench/h100.sh v11-growth
#   lease P, the final code (carry .gpu-wheels/minilm .gpu-wheels/tok .gpu-wheels/pytest):  bash bench/h100.sh v11-final
#   then (carry .gpu-wheels/tok):                         bash bench/h100.sh v11-qwen
#   lease Q (carry .gpu-wheels/tok):                      bash bench/h100.sh v11-first1024
# session 6 (v12: batches cut by least cost; a lead piece for the first part, tried and removed):
#   lease R at 9bcfd65 (carry .gpu-wheels/tok):          bash bench/h100.sh v12-variants
#   lease S at 75803f9 (carry .gpu-wheels/tok):          bash bench/h100.sh v12-ab
#   lease T at 24fb96b (overhead budget/32) (carry .gpu-wheels/minilm .gpu-wheels/tok .gpu-wheels/pytest):  bash bench/h100.sh v12-final
#   lease U at 24fb96b (carry .gpu-wheels/tok):          bash bench/h100.sh v12-qwen (lease T's own ran on a GPU at 190 TFLOP/s)
#   lease U, the final code (overhead budget/64) (carry .gpu-wheels/tok):  bash bench/h100.sh v12-rows
# session 7 (v13: the first part in pieces by characters; floors):
#   lease W (carry .gpu-wheels/tok):                      bash bench/h100.sh v13-probe
#   lease X (carry .gpu-wheels/tok):                      bash bench/h100.sh v13-lead
#   lease Y, the final code (carry .gpu-wheels/minilm .gpu-wheels/tok .gpu-wheels/pytest):  bash bench/h100.sh v13-final
#   then (carry .gpu-wheels/tok):                         bash bench/h100.sh v13-qwen
#   lease Z (carry .gpu-wheels/tok):                      bash bench/h100.sh v13-floor
#   lease AA, call 1 (carry .gpu-wheels/fa4-1 .gpu-wheels/pytest):  bash bench/h100.sh stage
#   call 2 (carry .gpu-wheels/fa4-2 .gpu-wheels/tok):     bash bench/h100.sh v13-long
#   call 3 (carry .gpu-wheels/minilm .gpu-wheels/tok .gpu-wheels/pytest):  bash bench/h100.sh v13-tests
#   call 4 (carry .gpu-wheels/tok):                       bash bench/h100.sh v13-qwen-growth
#
# .gpu-wheels/tok holds the MiniLM tokenizer and config (the random-weight bench models use it);
# .gpu-wheels/minilm the whole embedded model (the gpu tests score with it; its weights saved in
# float16, 45 MB, to fit a call's 64 MiB with the others). Results go to $OUT.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

setup_env() {
    source /tmp/fa4/env.sh
    export PYTHONPATH=$PWD/src:/tmp/pyt:${PYTHONPATH:-}
    export HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
}

plain_env() {  # no FlashAttention-4 staged (as on the image)
    export PYTHONPATH=$PWD/src${1:+:$1} HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
}

bert_final_steps() {  # row 1 on sdpa and BERT growth on fresh texts
    step bert-final 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --prefer sdpa \
        --skip st-encode-bs32,hf-dataset-order-bs32 --out "$OUT/bert-final.json"
    step growth-bert-final 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --out "$OUT/growth-bert-final.json"
}

qwen_final_steps() {  # row 2 on sdpa and Qwen growth on fresh texts
    step qwen-final 280 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --repeats 2 \
        --prefer sdpa --hf-impl sdpa --out "$OUT/qwen-final.json"
    step growth-qwen-final 280 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 1 --out "$OUT/growth-qwen-final.json"
}

variant_steps() {  # name, BERT variants, Qwen variants: growth per variant, each round every variant in turn;
    # Qwen at 1k and 10k only (its 100k run takes 80 s)
    step "$1-bert" 240 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --variants "$2" --out "$OUT/$1-bert.json"
    step "$1-qwen" 300 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 10000 \
        --prefer sdpa --growth 1000,10000 --repeats 2 --variants "$3" --out "$OUT/$1-qwen.json"
}

step() {  # name, seconds, command...: run one step, keep its output, never stop the others
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    tail -n 30 "$OUT/$name.txt"
}

case "${1:-}" in
stage)
    bash .gpu-wheels/fa4-1/stage.sh
    python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .gpu-wheels/pytest/*.whl
    ;;
fa4)
    # lease A: the first two rows with FlashAttention-4, packed and padded, and growth
    source .gpu-wheels/fa4-2/install.sh || exit 3
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step bert 220 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --compare-packing \
        --out "$OUT/bert.json"
    step qwen 260 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --repeats 2 --prefer sdpa \
        --compare-packing --out "$OUT/qwen.json"
    step growth-bert 100 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --growth 1000,10000,100000 --repeats 3 --out "$OUT/growth-bert.json"
    ;;
throughput)
    # the first two rows, as on the image without flash-attn (sdpa), then where the host
    # time of a forward goes with FlashAttention-4 and with sdpa
    source .gpu-wheels/fa4-2/install.sh || exit 3
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step bert-sdpa 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --prefer sdpa \
        --skip st-encode-bs32,hf-dataset-order-bs32 --out "$OUT/bert-sdpa.json"
    step qwen-sdpa 200 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --repeats 2 --prefer sdpa \
        --prefer sdpa --out "$OUT/qwen-sdpa.json"
    step host-overhead 150 python3 bench/host_overhead.py --model qwen2-0.5b-random --texts 6000 \
        --impls flash_attention_4,sdpa --out "$OUT/host-overhead-qwen.json"
    ;;
long)
    # the long-text row with FlashAttention-4, the gpu tests, and growth 1k -> 100k
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/minilm
    step pytest-gpu 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ --junitxml "$OUT/gpu-junit.xml"
    step long 260 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 400 --mean-words 555 \
        --max-words 1900 --impls flash_attention_4,sdpa,eager --attention-bound --hf-impl sdpa --skip hf-dataset-order-bs32 \
        --repeats 2 --out "$OUT/long.json"
    step growth-qwen 200 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 100000 \
        --growth 1000,10000,100000 --repeats 1 --out "$OUT/growth-qwen.json"
    ;;
gil)
    # the worker's cost to the forward thread: prepared ahead, and under shorter GIL switch intervals
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step bert-gil 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --prefer sdpa \
        --prepared-ahead --switch-intervals 0.001,0.0002,0.00005 --skip st-encode-bs32,hf-dataset-order-bs32 \
        --repeats 5 --out "$OUT/bert-gil.json"
    # then, one process per setting: RAYON_NUM_THREADS=8|4|2 with
    # --prepared-ahead --skip st-encode-bs32,st-encode-bs256,hf-dataset-order-bs32,hf-sorted-budget --repeats 5
    step qwen-gil 150 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --prefer sdpa \
        --prepared-ahead --switch-intervals 0.0002 --skip hf-dataset-order-bs32,hf-sorted-budget --repeats 3 \
        --out "$OUT/qwen-gil.json"
    ;;
budget)
    # v7: CUDA budgets scaled by the model's feed-forward width (BERT-base 256k, Qwen2-0.5B 160k)
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step bert-v7 120 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --prefer sdpa \
        --skip st-encode-bs32,hf-dataset-order-bs32 --out "$OUT/bert-v7.json"
    step qwen-v7 200 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --repeats 2 --prefer sdpa \
        --prefer sdpa --out "$OUT/qwen-v7.json"
    ;;
sdpa)
    # no FlashAttention-4 needed (as on the image): the first two rows with the worker's cost, and growth
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step bert-sdpa 110 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --prefer sdpa \
        --prepared-ahead --skip st-encode-bs32,hf-dataset-order-bs32 --out "$OUT/bert-sdpa.json"
    step growth-bert-sdpa 90 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 3 --out "$OUT/growth-bert-sdpa.json"
    step qwen-sdpa 200 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --repeats 2 --prefer sdpa \
        --prefer sdpa --prepared-ahead --out "$OUT/qwen-sdpa.json"
    step growth-qwen-sdpa 180 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 1 --out "$OUT/growth-qwen-sdpa.json"
    ;;
v9-rows)
    # the first two rows, tokenizing in a child process and in a thread, on sdpa and FlashAttention-4
    source .gpu-wheels/fa4-2/install.sh || exit 3
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step bert-v9 200 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --prefer sdpa \
        --impls sdpa,flash_attention_4 --hf-impl sdpa --compare-tokenizer-thread --prepared-ahead \
        --skip st-encode-bs32,hf-dataset-order-bs32 --out "$OUT/bert-v9.json"
    step qwen-v9 330 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --repeats 2 \
        --prefer sdpa --impls sdpa,flash_attention_4 --hf-impl sdpa --compare-tokenizer-thread --out "$OUT/qwen-v9.json"
    ;;
v9-tests)
    # the gpu tests on the final code (FlashAttention-4 staged by the calls before), growth for BERT
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/minilm
    step pytest-gpu 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ --junitxml "$OUT/gpu-junit.xml"
    step growth-bert-v9 200 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --out "$OUT/growth-bert-v9.json"
    ;;
v9-growth)
    # growth for the Qwen shape, and the long-text row with the v7 budgets
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step growth-qwen-v9 330 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 1 --out "$OUT/growth-qwen-v9.json"
    step long-v9 250 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 400 --mean-words 555 \
        --max-words 1900 --impls flash_attention_4,sdpa,eager --attention-bound --hf-impl sdpa --skip hf-dataset-order-bs32 \
        --repeats 2 --out "$OUT/long-v9.json"
    ;;
v10-growth)
    # growth on sdpa (as on the image)
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    step growth-bert-v10 170 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --out "$OUT/growth-bert-v10.json"
    step growth-qwen-small-v10 120 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 10000 \
        --prefer sdpa --growth 1000,10000 --repeats 2 --out "$OUT/growth-qwen-small-v10.json"
    step growth-qwen-v10 280 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 1 --out "$OUT/growth-qwen-v10.json"
    ;;
v10-rows)
    # row 1 on sdpa and FlashAttention-4, and BERT growth
    source .gpu-wheels/fa4-2/install.sh || exit 3
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step bert-v10 200 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --prefer sdpa \
        --impls sdpa,flash_attention_4 --hf-impl sdpa --skip st-encode-bs32,hf-dataset-order-bs32 --out "$OUT/bert-v10.json"
    step growth-bert-v10 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --out "$OUT/growth-bert-v10.json"
    ;;
v10-tests)
    # the gpu tests (FlashAttention-4 staged by the calls before), Qwen growth at 1k and 10k
    setup_env
    ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/minilm \
        step pytest-gpu 220 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ --junitxml "$OUT/gpu-junit.xml"
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step growth-qwen-small-v10 150 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 10000 \
        --prefer sdpa --growth 1000,10000 --repeats 2 --out "$OUT/growth-qwen-small-v10.json"
    ;;
v10-qwen)
    # row 2 on sdpa and FlashAttention-4, and Qwen growth 1k to 100k
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step qwen-v10 260 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --repeats 2 \
        --prefer sdpa --impls sdpa,flash_attention_4 --hf-impl sdpa --out "$OUT/qwen-v10.json"
    step growth-qwen-v10 300 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 1 --out "$OUT/growth-qwen-v10.json"
    ;;
v10-final|v11-final|v12-final|v13-final)
    # no FlashAttention-4 (as on the image): the gpu tests, row 1 on sdpa and BERT growth on the final code
    python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .gpu-wheels/pytest/*.whl
    plain_env /tmp/pyt
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/minilm \
        step pytest-gpu 220 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ --junitxml "$OUT/gpu-junit.xml"
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    bert_final_steps
    ;;
v11-probe)
    # session 5: what a new batch shape costs per SDPA backend, the tokenizer's ceiling, BERT growth as it was
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nproc
    step tokenize-rate 120 python3 bench/tokenize_rate.py --rows 8192 --threads 1,2,4,8,16 --out "$OUT/tokenize-rate.json"
    step shape-bert 150 python3 bench/shape_cost.py --model bert-base-random --chunks 4 --batch-tokens 16384 \
        --backends default,efficient,cudnn --out "$OUT/shape-bert.json"
    step shape-bert-256k 150 python3 bench/shape_cost.py --model bert-base-random --chunks 2 --rows 8192 --batch-tokens 262144 \
        --backends default,efficient --out "$OUT/shape-bert-256k.json"
    step shape-qwen 200 python3 bench/shape_cost.py --model qwen2-0.5b-random --chunks 2 --batch-tokens 65536 \
        --backends default,efficient,cudnn --out "$OUT/shape-qwen.json"
    step growth-bert-v10 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --out "$OUT/growth-bert-v10.json"
    ;;
v11-growth)
    # growth on fresh texts each round (new shapes, as each shard of a sweep): BERT with the first
    # part of 512 rows (the default) and of 8192 (as before), row 1 on sdpa, Qwen growth
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    step growth-bert-v11 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --out "$OUT/growth-bert-v11.json"
    step growth-bert-v11-first8192 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --first-part-rows 8192 --out "$OUT/growth-bert-v11-first8192.json"
    step bert-v11 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --prefer sdpa \
        --skip st-encode-bs32,hf-dataset-order-bs32 --out "$OUT/bert-v11.json"
    step growth-qwen-v11 300 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 1 --out "$OUT/growth-qwen-v11.json"
    ;;
v11-qwen|v12-qwen|v13-qwen)
    # the final code: row 2 on sdpa, Qwen growth on fresh texts, the tokenizer's rate
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step tokenize-rate 90 python3 bench/tokenize_rate.py --rows 8192 --threads 16 --out "$OUT/tokenize-rate.json"
    qwen_final_steps
    ;;
v11-first1024)
    # the same steps with the first part at 1,024 rows (a 1,000-text run is then one part)
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step growth-bert-1024 120 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --first-part-rows 1024 --out "$OUT/growth-bert-1024.json"
    step bert-1024 100 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 --prefer sdpa \
        --skip st-encode-bs32,hf-dataset-order-bs32 --first-part-rows 1024 --out "$OUT/bert-1024.json"
    step growth-qwen-1024 240 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 1 --first-part-rows 1024 --out "$OUT/growth-qwen-1024.json"
    step qwen-1024 170 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --repeats 2 \
        --prefer sdpa --hf-impl sdpa --first-part-rows 1024 --out "$OUT/qwen-1024.json"
    ;;
v12-variants)
    # lease R ran this at 9bcfd65: `lead=` (the first part's lead piece) went with that code
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    variant_steps variants "planner=greedy,lead=0;lead=0;lead=128;lead=256;floor=16,lead=128" \
        "planner=greedy,lead=0;lead=0;lead=128;floor=16,lead=0;floor=16,lead=128"
    ;;
v12-ab)
    # the batch planners side by side (floor and overhead as divisors of the budget)
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    variant_steps ab "planner=greedy;overhead=0;floor=8;overhead=32" "planner=greedy;overhead=0;floor=8;floor=16"
    ;;
v12-rows)
    # rows 1 and 2 and both models' growth, on the final code
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    bert_final_steps
    qwen_final_steps
    ;;
v13-probe)
    # a forward's host time against its GPU time per model (where the floor of a batch lies), then
    # the first part in pieces by characters against whole, and lower floors for Qwen (lease W ran
    # `lead=chars`, the name 8-4-2 had then)
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    for tokens in 8192 32768; do
        step "shape-bert-$tokens" 60 python3 bench/shape_cost.py --model bert-base-random --chunks 2 --backends ours \
            --batch-tokens $tokens --out "$OUT/shape-bert-$tokens.json"
        step "shape-qwen-$tokens" 90 python3 bench/shape_cost.py --model qwen2-0.5b-random --chunks 1 --backends ours \
            --batch-tokens $tokens --out "$OUT/shape-qwen-$tokens.json"
    done
    variant_steps v13 "lead=whole;lead=8-4-2" \
        "lead=whole;lead=8-4-2;lead=8-4-2,floor=32,overhead=128;lead=8-4-2,floor=64,overhead=256"
    ;;
v13-floor)
    # lower floors: Qwen's 1k run (the one that pads most) in many rounds, BERT's 1k and 10k
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    step v13-floor-qwen 200 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 1000 \
        --prefer sdpa --growth 1000 --repeats 8 --variants "floor=8;floor=11;floor=16;floor=20" --out "$OUT/v13-floor-qwen.json"
    step v13-floor-bert 150 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 10000 \
        --prefer sdpa --growth 1000,10000 --repeats 4 --variants "floor=8;floor=11;floor=16" --out "$OUT/v13-floor-bert.json"
    ;;
v13-long)
    # the long-text row with FlashAttention-4 (after `stage`; carry .gpu-wheels/fa4-2)
    source .gpu-wheels/fa4-2/install.sh || exit 3
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step long 400 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 400 --mean-words 555 \
        --max-words 1900 --impls flash_attention_4,sdpa,eager --attention-bound --hf-impl sdpa --skip hf-dataset-order-bs32 \
        --repeats 2 --out "$OUT/long.json"
    ;;
v13-tests)
    # the gpu tests with FlashAttention-4 installed by v13-long on this machine
    setup_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/minilm
    step pytest-gpu 500 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ --junitxml "$OUT/gpu-junit.xml"
    ;;
v13-qwen-growth)
    # Qwen growth on the final code, median of 2 rounds after round 0
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    step growth-qwen-r2 560 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 100000 \
        --prefer sdpa --growth 1000,10000,100000 --repeats 2 --out "$OUT/growth-qwen-r2.json"
    ;;
v13-lead)
    # the first part whole, in one piece of 1/8 of its characters and the rest, or in four pieces;
    # 1k and 10k texts (100k scores the first part in the same pieces; lease W: within its noise)
    plain_env
    export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    step v13-lead-bert 200 python3 bench/score_throughput.py --device cuda --model bert-base-random --texts 10000 \
        --prefer sdpa --growth 1000,10000 --repeats 4 --variants "lead=whole;lead=8;lead=8-4-2" --out "$OUT/v13-lead-bert.json"
    step v13-lead-qwen 280 python3 bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 10000 \
        --prefer sdpa --growth 1000,10000 --repeats 2 --variants "lead=whole;lead=8;lead=8-4-2" --out "$OUT/v13-lead-qwen.json"
    ;;
*)
    echo "usage: bash bench/h100.sh stage|fa4|throughput|long|sdpa|gil|budget|v9-rows|v9-tests|v9-growth|v10-growth|v10-rows|v10-tests|v10-qwen|v10-final|v11-probe|v11-growth|v11-final|v11-qwen|v11-first1024|v12-variants|v12-ab|v12-final|v12-qwen|v12-rows|v13-probe|v13-lead|v13-final|v13-qwen|v13-floor|v13-long|v13-tests|v13-qwen-growth" >&2
    exit 2
    ;;
esac
