#!/usr/bin/env bash
# Issue 19 on one host with several GPUs: bench/multi_gpu.py's parts as whole processes, in two calls
# of the device tool on a 2-GPU kind (nvidia-h200-x2), back to back while the machine is warm (the
# second reuses the first's model, input and 1-GPU reference under /tmp/multi_gpu; on a fresh machine
# it makes them again). The image has no Ray: `kit` fetches it here for Python 3.12, split in two.
#
#   here, once:                                                  bash bench/multi_gpu.sh kit
#   call 1 (kind nvidia-h200-x2, carry .gpu-wheels/ray-1 .gpu-wheels/tok):  bash bench/multi_gpu.sh measure
#       stages Ray's first half; (c) the 1-GPU reference, (a) the sweep, one shard per GPU
#   call 2 (same kind, carry .gpu-wheels/ray-2 .gpu-wheels/tok):           bash bench/multi_gpu.sh ray-resume
#       installs Ray; (b) score --engine ray --actors auto; (d) a shard killed on GPU 1, resumed
#   a host that has Ray and time for all of it:                   bash bench/multi_gpu.sh all
#   a CPU or one-GPU machine (degraded, says so):                 bash bench/multi_gpu.sh smoke
#   (python3 is the GPU image's, which holds torch; elsewhere: PYTHON=.venv/bin/python bash bench/multi_gpu.sh smoke)
#
# Extra arguments go to bench/multi_gpu.py (e.g. --rows 50000 --mean-sentences 16). Results: $OUT
# (multi_gpu.json, the table in multi_gpu-*.log, the processes' stderr in processes.log).
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
WORK=/tmp/multi_gpu
PY=${PYTHON:-python3}
RAY_STAGE=/tmp/multi_gpu-ray/stage RAY_SITE=/tmp/multi_gpu-ray/site
RAY_VERSION=2.60.0
# Ray's own dependencies the image lacks (versions seen working with Ray 2.60 on the CPU machine)
RAY_DEPS="jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1"

common_env() {
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
    # NVLink multicast off here too (every worker the sweep or Ray starts gets the same from attnfallback)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    if [ -d .gpu-wheels/tok ]; then export ATTNFALLBACK_DEFAULT_MODEL_DIR=$PWD/.gpu-wheels/tok; fi
    [ -d "$RAY_SITE" ] && export PYTHONPATH=$RAY_SITE:$PYTHONPATH
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,name,uuid,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
    fi
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda devices", torch.cuda.device_count())'
}

bench() {  # name, multi_gpu.py arguments...
    local name=$1; shift
    echo "=== $name ($(date +%T))"
    "$PY" bench/multi_gpu.py --workdir "$WORK" --out "$OUT/multi_gpu.json" "$@" 2>&1 | tee "$OUT/multi_gpu-$name.log" \
        | grep -v "Writing model shards\|Loading weights"
    local code=${PIPESTATUS[0]}
    cp "$WORK/processes.log" "$OUT/processes.log" 2>/dev/null
    echo "=== $name exit $code"
    return "$code"
}

stage_ray() {  # the first half of Ray's wheel, and its dependencies, to this machine's /tmp
    [ -d .gpu-wheels/ray-1 ] || { echo "ray: .gpu-wheels/ray-1 not carried; call 2 will have no Ray" >&2; return 0; }
    mkdir -p "$RAY_STAGE" && cp .gpu-wheels/ray-1/* "$RAY_STAGE/" && echo "ray: first half staged in $RAY_STAGE"
}

install_ray() {
    "$PY" -c 'import ray.data' 2>/dev/null && { echo "ray: already importable"; return 0; }
    [ -d "$RAY_SITE/ray" ] && return 0
    [ -f "$RAY_STAGE/part.aa" ] || { echo "ray: the first half is not staged on this machine (a fresh one?): run call 1 first" >&2; return 3; }
    [ -d .gpu-wheels/ray-2 ] || { echo "ray: .gpu-wheels/ray-2 not carried" >&2; return 3; }
    cat "$RAY_STAGE/part.aa" .gpu-wheels/ray-2/part.a[b-z] > "$RAY_STAGE/$(cat .gpu-wheels/ray-2/bigname)" && rm "$RAY_STAGE/part.aa"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$RAY_SITE" "$RAY_STAGE"/*.whl || return 3
    export PYTHONPATH=$RAY_SITE:$PYTHONPATH
    "$PY" -c 'import ray, ray.data; print("ray", ray.__version__, "installed in '"$RAY_SITE"'")' || return 3
}

case "${1:-}" in
kit)
    root=$(git rev-parse --show-toplevel) && cd "$root" || exit 2
    py=$PY; [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
    one=.gpu-wheels/ray-1 two=.gpu-wheels/ray-2
    rm -rf "$one" "$two"; mkdir -p "$one" "$two"
    dl() { "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
    tmp=$(mktemp -d)
    dl "$tmp" "ray==$RAY_VERSION" || exit 3
    big=$(ls "$tmp"/ray-*.whl)
    split -b 40000000 "$big" "$tmp/part."
    mv "$tmp/part.aa" "$one/" && mv "$tmp"/part.a? "$two/" && basename "$big" > "$two/bigname"
    rm -rf "$tmp"
    # shellcheck disable=SC2086
    dl "$one" $RAY_DEPS || exit 3
    if [ ! -d .gpu-wheels/tok ]; then  # the MiniLM tokenizer: the image lacks the embedded default model
        PYTHONPATH=$PWD/src "$py" - <<'PY'
import shutil
from pathlib import Path
from attnfallback.model_facts import default_model_path
src, dst = default_model_path(), Path(".gpu-wheels/tok")
dst.mkdir(parents=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (src / name).exists():
        shutil.copy(src / name, dst / name)
PY
    fi
    du -sh "$one" "$two" .gpu-wheels/tok
    ;;
measure)
    stage_ray
    common_env
    bench measure --parts reference,sweep "${@:2}"
    ;;
ray-resume)
    common_env
    install_ray || echo "ray: not installed; the ray part will say skipped" >&2
    bench ray-resume --parts ray,resume "${@:2}"
    ;;
all)
    common_env
    install_ray || true
    bench all --parts reference,sweep,ray,resume "${@:2}"
    ;;
smoke)  # small: on a CPU machine a tiny job on two CPU workers, on one GPU both shards sharing it
    common_env
    if nvidia-smi -L >/dev/null 2>&1; then
        bench smoke --fresh --rows 5000 --mean-sentences 4 --part-rows 256 "${@:2}"
    else
        bench smoke --fresh --device cpu --rows 200 --mean-sentences 2 --part-rows 4 "${@:2}"
    fi
    ;;
*)
    echo "usage: bash bench/multi_gpu.sh kit|measure|ray-resume|all|smoke [multi_gpu.py arguments]" >&2; exit 2
    ;;
esac
