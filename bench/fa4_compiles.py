"""Why FlashAttention-4 is slow inside one-shot `score` shards: its kernel compiles, counted.

    python bench/fa4_compiles.py --models modernbert-base-random,llama-1b-random --docs 2000 --out results.json

Each configuration runs `attnfallback score` in a fresh process (a one-shot shard, as a sweep runs
it), with FlashAttention-4's forward wrapped so that every compile (a new entry in its JIT cache) is
timed and its variant key kept. Configurations: sdpa; FA4 with each packed batch's own shape
(ATTNFALLBACK_FLASH_SHAPES=plain, the code before session 8); FA4 with declared shapes
(kernel_variants.py); FA4 with declared shapes and FlashAttention-4's on-disk kernel cache, run twice
(the second process finds the first one's kernels). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_models import MODELS, build_model, stsb_documents, write_input  # noqa: E402

OFF = {"ATTNFALLBACK_FLASH_KERNEL_CACHE": "off"}
DISK = {"FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1"}
CONFIGS = {  # name: (score flags, environment); "{w}" is the work directory
    "sdpa": (["--prefer", "sdpa"], OFF),
    "fa4-plain": (["--prefer", "flash_attention_4"], {**OFF, "ATTNFALLBACK_FLASH_SHAPES": "plain"}),
    "fa4-declared": (["--prefer", "flash_attention_4"], {**OFF, "ATTNFALLBACK_FLASH_SHAPES": "declared"}),
    "fa4-declared-diskcache-1": (["--prefer", "flash_attention_4"], {**DISK, "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": "{w}/kernels"}),
    "fa4-declared-diskcache-2": (["--prefer", "flash_attention_4"], {**DISK, "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": "{w}/kernels"}),
    "fastest": (["--policy", "fastest"], {**DISK, "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": "{w}/kernels-f", "ATTNFALLBACK_CACHE": "{w}/choice-f"}),
    "default-1": ([], {**DISK, "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": "{w}/kernels-d", "ATTNFALLBACK_CACHE": "{w}/choice-d"}),
    "default-2": ([], {**DISK, "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": "{w}/kernels-d", "ATTNFALLBACK_CACHE": "{w}/choice-d"}),
    "default-after-fastest": ([], {**DISK, "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": "{w}/kernels-f", "ATTNFALLBACK_CACHE": "{w}/choice-f"}),
}


def child(args) -> None:
    """One shard in this process, FA4's compiles counted; prints one JSON line."""
    compiles: list[dict] = []
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute") is not None:
        import flash_attn.cute.interface as fi

        original = fi._flash_attn_fwd
        cache = original.compile_cache.cache

        def counted(*a, **k):
            before, t0 = len(cache), time.perf_counter()
            out = original(*a, **k)
            if len(cache) > before:
                key = list(cache)[-1]
                compiles.append({"seconds": round(time.perf_counter() - t0, 3), "key": repr(key)})
            return out

        counted.compile_cache = original.compile_cache
        fi._flash_attn_fwd = counted
    from attnfallback.cli.app import main

    argv = ["score", args.model_dir, "--input", args.input, "--output", args.output, "--task", args.task,
            *json.loads(args.flags), "--json", "--quiet"]
    if args.task == "pairs":
        argv += ["--text-columns", "a,b"]
    sys.argv = ["attnfallback", *argv]
    import contextlib
    import io

    buffer = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buffer):
        try:
            main()
        except SystemExit as e:
            code = int(e.code or 0)
    text = buffer.getvalue()
    try:
        result = json.loads(text[text.index("{"):])
    except ValueError:
        result = {"unparsed": text[-2000:]}
    print("RESULT " + json.dumps({"exit": code, "compiles": compiles, "result": result}), flush=True)


def run_config(model_dir: Path, task: str, docs_path: Path, config: str, workdir: Path, cache_dir: Path) -> dict:
    flags, env_extra = CONFIGS[config]
    env = dict(os.environ, **{k: v.replace("{w}", str(cache_dir)) for k, v in env_extra.items()})
    env.setdefault("ATTNFALLBACK_CACHE", str(cache_dir / f"choice-{config}"))
    out = workdir / f"{config}-{model_dir.name}.parquet"
    if out.exists():
        out.unlink()
    cmd = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--task", task, "--input", str(docs_path),
           "--output", str(out), "--flags", json.dumps(flags)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"config": config, "wall_s": wall, "error": (proc.stderr or proc.stdout)[-3000:]}
    data = json.loads(line[len("RESULT "):])
    result = data["result"]
    data.update(config=config, wall_s=round(wall, 3), compile_s=round(sum(c["seconds"] for c in data["compiles"]), 3),
                n_compiles=len(data["compiles"]), used=(result.get("decision") or {}).get("used"),
                loop_tokens_per_s=result.get("tokens_per_s"), tokens=result.get("tokens"), output=str(out),
                seconds_in_run=result.get("seconds"), timing=(result.get("decision") or {}).get("timing"),
                measured=(result.get("decision") or {}).get("measured"), choice=(result.get("decision") or {}).get("choice"))
    return data


def max_difference(a: str, b: str) -> float | None:
    """The largest absolute difference between two outputs' float columns (same ids, same order)."""
    import numpy as np
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    worst = 0.0
    for name in ta.column_names:
        if name == "id":
            continue
        x = np.asarray(ta[name].to_pylist(), dtype=np.float64)
        y = np.asarray(tb[name].to_pylist(), dtype=np.float64)
        worst = max(worst, float(np.nanmax(np.abs(x - y))) if x.size else 0.0)
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--task")
    p.add_argument("--flags", default="[]")
    p.add_argument("--models", default="modernbert-base-random,llama-1b-random")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the real shape (compiles do not depend on it)")
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--mean-sentences", type=float, default=4.0)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--device", default="cuda", help="where the random models are built (cuda: fast init)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="bench/results/fa4_compiles.json")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fa4-compiles-"))
    cache_dir = workdir / "caches"
    docs = stsb_documents(args.docs, args.mean_sentences)
    report = {"docs": args.docs, "mean_sentences": args.mean_sentences, "runs": {}}
    try:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    for name in args.models.split(","):
        task = MODELS[name]
        t0 = time.perf_counter()
        model_dir = build_model(name, workdir / name, device=args.device, layers=args.layers)
        print(f"built {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        docs_path = write_input(workdir / f"{name}.jsonl", docs, task)
        runs = {}
        for config in args.configs.split(","):
            runs[config] = run_config(model_dir, task, docs_path, config, workdir, cache_dir)
            r = runs[config]
            print(f"{name:26} {config:26} used={r.get('used')} wall={r.get('wall_s')} s compiles={r.get('n_compiles')} "
                  f"({r.get('compile_s')} s) loop={r.get('loop_tokens_per_s')} tok/s {r.get('error', '')[-300:]}",
                  file=sys.stderr, flush=True)
        for config, r in runs.items():
            if config != "sdpa" and "output" in r and "output" in runs.get("sdpa", {}):
                try:
                    r["max_abs_difference_vs_sdpa"] = max_difference(runs["sdpa"]["output"], r["output"])
                except Exception as e:  # noqa: BLE001 - a diagnostic: report, go on
                    r["max_abs_difference_vs_sdpa"] = f"{type(e).__name__}: {e}"
        report["runs"][name] = runs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'model':24} {'config':25} {'used':18} {'wall s':>7} {'in-run s':>8} {'compiles':>8} {'compile s':>9} {'loop tok/s':>11}")
    for name, runs in report["runs"].items():
        for config, r in runs.items():
            print(f"{name:24} {config:25} {str(r.get('used')):18} {r.get('wall_s', 0):7.1f} {r.get('seconds_in_run') or 0:8.2f} "
                  f"{r.get('n_compiles', 0) or 0:8d} {r.get('compile_s', 0) or 0:9.1f} {r.get('loop_tokens_per_s') or 0:11,.0f}")
            if r.get("choice"):
                print(f"    {r['choice'][:200]}; timing {r.get('timing')}")


if __name__ == "__main__":
    main()
