"""End to end, whole processes: `attnfallback score` as a user runs it, against what that user would
otherwise run (bench/baseline.py: sentence-transformers `encode`, `CrossEncoder.predict`, plain
transformers), on the same rows, one cold process each.

    python bench/end_to_end.py --device cuda --models modernbert-base-random,xlmr-base-cross-random,llama-1b-random \\
        --rows 1000,10000,50000 --out bench/results/end_to_end.json
    python bench/end_to_end.py --device cpu --models default --rows 1000,10000

Per model (random weights of a real shape, bench/zoo_models.py; `default` is the embedded
all-MiniLM-L6-v2 on the STS-B sentences) and row count, the rows are STS-B sentences joined into
documents (mean --mean-sentences sentences). Variants, each a fresh process timed from spawn to exit:
- `ours-sdpa`: `attnfallback score ... --prefer sdpa`;
- `ours-default`: `attnfallback score ...` with the default preference (FlashAttention-4 first, used
  when it is installed and measured faster);
- `ours-fa4` (asked for by --variants): `attnfallback score ... --prefer flash_attention_4 --policy strict`;
- `ours-unfused` (asked for by --variants): the default with ATTNFALLBACK_FUSED=off (the model's own
  norms, MLPs and logprob head instead of fused_ops.py's kernels);
- `ours-nowarm` (asked for by --variants): the default with ATTNFALLBACK_KERNEL_WARMUP=off (without
  the model's kernels run once on the warm-up thread beside the imports, kernel_warmup.py);
- `ours-later`: the default, as a later shard of a sweep on the same machine (or one sharing
  $ATTNFALLBACK_CACHE): its cache, one per model, was used by one untimed shard first (compiled
  bytecode where the image ships none, FlashAttention-4's kernels, measured choices);
- `baseline-bytecode` (asked for by --variants): the baseline with compiled bytecode it wrote in an
  untimed run before ($PYTHONPYCACHEPREFIX), what a user who knows the image ships none could get;
- the baseline at each of --batch-sizes; its end-to-end time is its start-up to loaded plus that
  batch size's scoring (see bench/baseline.py); the best batch size is the baseline's figure.
On CUDA (--machine-warm-up auto), one untimed baseline process on 64 of the first model's rows runs
before any timed one: the machine's first process on its GPU verified 0.6-1.1 s slower than every
later one in session 22's runs, whichever variant it was (bench/NOTES.md, runs C and D).
Each run gets its own empty $ATTNFALLBACK_CACHE (a one-shot shard on a fresh machine) unless
--shared-cache. Ratios are baseline-best / ours. Also reported: ours' time outside the scoring loop
against the baseline's import + load, and `ours-default` against `ours-sdpa`. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_models import MODELS, build_model, json_tail, stsb_documents, stsb_sentences, write_input  # noqa: E402

BASELINE_KIND = {"embed": "st-encode", "pairs": "cross-encoder", "logprob": "hf-logprob", "classify": "hf-classify"}
BATCH_SIZES = {"st-encode": "32,64,128,256,512", "cross-encoder": "32,64,128,256,512", "hf-logprob": "8,16,32,64",
               "hf-classify": "8,16,32,64"}


def documents(name: str, n: int, mean_sentences: float) -> list[str]:
    """`n` rows for `name`: STS-B sentences (cycled) for the embedded default, else documents of them."""
    if name == "default":
        sentences = stsb_sentences()
        return [sentences[i % len(sentences)] for i in range(n)]
    return stsb_documents(n, mean_sentences, seed=n)


def run_process(cmd: list[str], env: dict, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(env, BENCH_SPAWNED_AT=repr(time.time()))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, proc


def run_ours(model: str, task: str, data: Path, out: Path, extra: list[str], env: dict, timeout: float) -> dict:
    if out.exists():
        out.unlink()
    cmd = [sys.executable, "-m", "attnfallback.cli.app", "score", model, "--input", str(data), "--output", str(out),
           "--task", task, "--json", "--quiet", *extra]
    if task == "pairs":
        cmd += ["--text-columns", "a,b"]
    wall, proc = run_process(cmd, env, timeout)
    result = json_tail(proc.stdout)
    if proc.returncode != 0 or result is None:
        return {"wall_s": wall, "exit": proc.returncode, "error": (proc.stderr or proc.stdout)[-2000:]}
    decision = result.get("decision") or {}
    loop_s = result["tokens"] / result["tokens_per_s"] if result.get("tokens_per_s") else None
    return {"wall_s": round(wall, 3), "exit": 0, "in_run_s": result.get("seconds"), "loop_s": loop_s,
            "outside_loop_s": None if loop_s is None else round(wall - loop_s, 3), "tokens": result.get("tokens"),
            "loop_tokens_per_s": result.get("tokens_per_s"), "rows_written": result.get("rows_written"),
            "used": decision.get("used"), "choice": decision.get("choice"), "measured": decision.get("measured"),
            "phases": result.get("phases"), "timing": decision.get("timing"), "fused": (result.get("task") or {}).get("fused")}


def compile_processes() -> list[int]:
    """The pids of fused-kernel compile processes (`python -m attnfallback.fused_ops`) running here."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"attnfallback.fused_ops" in cmdline and b"-m" in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_for_compiles(limit_s: float = 180.0) -> float:
    """Wait until no compile process a shard started is running (so none runs beside the next
    timed run); the seconds waited after the shard's exit."""
    start = time.perf_counter()
    while compile_processes() and time.perf_counter() - start < limit_s:
        time.sleep(0.1)
    return round(time.perf_counter() - start, 3)


def run_baseline(kind: str, model_dir: str, data: Path, batch_sizes: str, device: str, env: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "baseline.py"), "--kind", kind, "--model", model_dir,
           "--input", str(data), "--batch-sizes", batch_sizes, "--device", device]
    wall, proc = run_process(cmd, env, timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BASELINE ")), None)
    if proc.returncode != 0 or line is None:
        return {"wall_s": wall, "exit": proc.returncode, "error": (proc.stderr or proc.stdout)[-2000:]}
    data_ = json.loads(line[len("BASELINE "):])
    return summarize_baseline({"wall_s": round(wall, 3), "exit": 0, "phases": data_["phases"], "score_s": data_["score_s"]})


def summarize_baseline(run: dict) -> dict:
    """The baseline's end-to-end time at each batch size: start-up to loaded, that batch size's
    scoring, and the process's exit (its wall time after the last scoring: interpreter and CUDA
    teardown, which `ours` pays inside its own wall time too)."""
    phases, score = run["phases"], {int(k): v for k, v in run["score_s"].items()}
    exit_s = max(run["wall_s"] - phases["warm_s"] - sum(score.values()), 0.0)
    e2e = {bs: round(phases["loaded_s"] + s + exit_s, 3) for bs, s in score.items()}
    best = min(e2e, key=e2e.get)
    return {**run, "exit_s": round(exit_s, 3), "e2e_s": e2e, "best_batch_size": best, "best_e2e_s": e2e[best],
            "import_and_load_s": round(phases["loaded_s"] - phases["read_s"], 3)}


def gpu_name(device: str) -> str:
    if not device.startswith("cuda"):
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "cuda"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="modernbert-base-random,xlmr-base-cross-random,llama-1b-random")
    p.add_argument("--rows", default="1000,10000,50000")
    p.add_argument("--mean-sentences", type=float, default=4.0)
    p.add_argument("--variants", default="ours-sdpa,ours-default,ours-later,baseline")
    p.add_argument("--batch-sizes", default=None, help="the baseline's batch sizes (default per kind)")
    p.add_argument("--sweep-batch-sizes-up-to", type=int, default=10000,
                   help="larger row counts run the baseline at the best batch size of the last smaller one")
    p.add_argument("--shared-cache", action="store_true", help="one $ATTNFALLBACK_CACHE for every run (later shards of a sweep)")
    p.add_argument("--machine-warm-up", choices=("auto", "on", "off"), default="auto",
                   help="one untimed baseline process before the timed ones (auto: on CUDA)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="bench/results/end_to_end.json")
    p.add_argument("--from-json", nargs="+", default=None, help="print the table of saved results (and re-summarize them)")
    args = p.parse_args()
    if args.from_json:
        for path in args.from_json:
            report = json.loads(Path(path).read_text())
            for entry in report["models"].values():
                for cell in entry["sizes"].values():
                    cell["summary"] = summarize(cell["runs"])
            print_table(report)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="e2e-"))
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="true")
    sizes = [int(x) for x in args.rows.split(",")]
    variants = args.variants.split(",")
    warm_up = args.machine_warm_up == "on" or (args.machine_warm_up == "auto" and args.device.startswith("cuda"))
    report = {"device": gpu_name(args.device), "rows": sizes, "mean_sentences": args.mean_sentences, "models": {}}
    print(f"device: {report['device']}", file=sys.stderr, flush=True)
    for name in args.models.split(","):
        if name == "default":
            from attnfallback.model_facts import default_model_path

            model, model_dir, task = "default", str(default_model_path()), "embed"
        else:
            task = MODELS[name]
            t0 = time.perf_counter()
            model_dir = str(build_model(name, workdir / name, device=args.device))
            model = model_dir
            print(f"built {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        kind = BASELINE_KIND[task]
        if warm_up and "machine_warm_up" not in report:
            docs = documents(name, 64, args.mean_sentences)
            first = run_baseline(kind, model_dir, write_input(workdir / f"{name}-warm-up.jsonl", docs, task), "8", args.device,
                                 env, args.timeout)
            report["machine_warm_up"] = {"model": name, "wall_s": round(first["wall_s"], 3), "exit": first["exit"]}
            print(f"machine warm-up (untimed baseline, 64 rows): {first['wall_s']:.1f} s, exit {first['exit']}",
                  file=sys.stderr, flush=True)
        entry = report["models"][name] = {"task": task, "baseline": kind, "sizes": {}}
        best_batch_size = None
        warmed: dict = {}
        for n in sizes:
            data = write_input(workdir / f"{name}-{n}.jsonl", documents(name, n, args.mean_sentences), task)
            runs = {}
            for variant in variants:
                run_env = dict(env)
                run_env["ATTNFALLBACK_CACHE"] = str(workdir / ("cache" if args.shared_cache else f"cache-{name}-{n}-{variant}"))
                if variant == "ours-later":
                    run_env["ATTNFALLBACK_CACHE"] = str(workdir / f"cache-{name}-later")
                    if name not in warmed:  # one earlier shard on this machine
                        warmed[name] = run_ours(model, task, data, workdir / f"{name}-warm.parquet", ["--device", args.device],
                                                run_env, args.timeout)
                        entry["warm_up"] = {k: warmed[name].get(k) for k in ("wall_s", "exit", "used", "phases")}
                        entry["warm_up"]["compile_after_s"] = wait_for_compiles()
                if variant == "baseline-bytecode":
                    run_env = {k: v for k, v in run_env.items() if k != "PYTHONDONTWRITEBYTECODE"}
                    run_env["PYTHONPYCACHEPREFIX"] = str(workdir / "baseline-bytecode")
                    if "baseline-bytecode" not in warmed:
                        warmed["baseline-bytecode"] = run_baseline(kind, model_dir, data, "512", args.device, run_env, args.timeout)
                    runs[variant] = run_baseline(kind, model_dir, data, str(best_batch_size or 256), args.device, run_env,
                                                 args.timeout)
                elif variant == "baseline":
                    sizes_tried = args.batch_sizes or BATCH_SIZES[kind]
                    if n > args.sweep_batch_sizes_up_to and best_batch_size is not None:
                        sizes_tried = str(best_batch_size)  # the best of the smaller run: a full sweep here costs minutes
                    runs[variant] = run_baseline(kind, model_dir, data, sizes_tried, args.device, run_env, args.timeout)
                    best_batch_size = runs[variant].get("best_batch_size", best_batch_size)
                else:
                    extra = {"ours-sdpa": ["--prefer", "sdpa"], "ours-fa4": ["--prefer", "flash_attention_4", "--policy", "strict"]
                             }.get(variant, [])
                    extra += ["--device", args.device]
                    if variant == "ours-unfused":
                        run_env["ATTNFALLBACK_FUSED"] = "off"
                    if variant == "ours-nowarm":
                        run_env["ATTNFALLBACK_KERNEL_WARMUP"] = "off"
                    runs[variant] = run_ours(model, task, data, workdir / f"{name}-{n}-{variant}.parquet", extra, run_env,
                                             args.timeout)
                r = runs[variant]
                if variant.startswith("ours"):  # its compile for later shards, untimed, never beside the next run
                    r["compile_after_s"] = wait_for_compiles()
                print(f"{name} {n} {variant}: wall {r.get('wall_s')} s, best e2e {r.get('best_e2e_s')}, used {r.get('used')} "
                      f"{r.get('error', '')[-400:]}", file=sys.stderr, flush=True)
            entry["sizes"][n] = {"runs": runs, "summary": summarize(runs)}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print_table(report)


def summarize(runs: dict) -> dict:
    """Ratios of one model and row count: baseline-best / ours (whole processes), ours' in-run time
    outside the scoring loop / the baseline's import + load, default / sdpa, FA4 / sdpa."""
    if runs.get("baseline", {}).get("exit") == 0:
        runs["baseline"] = summarize_baseline(runs["baseline"])
    base = runs.get("baseline", {}).get("best_e2e_s")
    summary = {}
    base_bytecode = runs.get("baseline-bytecode", {})
    if base_bytecode.get("exit") == 0:
        base_bytecode.update(summarize_baseline(base_bytecode))
    for variant in ("ours-sdpa", "ours-default", "ours-fa4", "ours-later", "ours-unfused", "ours-nowarm"):
        r = runs.get(variant, {})
        if base_bytecode.get("exit") == 0 and r.get("exit") == 0:
            summary[f"{variant}_vs_baseline_bytecode"] = round(base_bytecode["best_e2e_s"] / r["wall_s"], 3)
        if base and r.get("exit") == 0:
            summary[f"{variant}_vs_baseline"] = round(base / r["wall_s"], 3)
            il = runs["baseline"].get("import_and_load_s")
            if il and r.get("in_run_s") is not None and r.get("loop_s") is not None:
                summary[f"{variant}_in_run_outside_loop_vs_import_load"] = round((r["in_run_s"] - r["loop_s"]) / il, 3)
    if runs.get("ours-sdpa", {}).get("exit") == 0 and runs.get("ours-default", {}).get("exit") == 0:
        summary["default_vs_sdpa_time"] = round(runs["ours-default"]["wall_s"] / runs["ours-sdpa"]["wall_s"], 3)
    if runs.get("ours-unfused", {}).get("exit") == 0 and runs.get("ours-default", {}).get("exit") == 0:
        summary["fused_vs_unfused_time"] = round(runs["ours-default"]["wall_s"] / runs["ours-unfused"]["wall_s"], 3)
        if runs["ours-unfused"].get("loop_s") and runs["ours-default"].get("loop_s"):
            summary["fused_vs_unfused_loop"] = round(runs["ours-default"]["loop_s"] / runs["ours-unfused"]["loop_s"], 3)
    if runs.get("ours-nowarm", {}).get("exit") == 0 and runs.get("ours-default", {}).get("exit") == 0:
        summary["default_vs_nowarm_time"] = round(runs["ours-default"]["wall_s"] / runs["ours-nowarm"]["wall_s"], 3)
        verify = [(runs[v].get("phases") or {}).get("load_detail", {}).get("verify_s") for v in ("ours-default", "ours-nowarm")]
        if None not in verify:
            summary["default_vs_nowarm_verify_s"] = verify
    if runs.get("ours-sdpa", {}).get("exit") == 0 and runs.get("ours-fa4", {}).get("exit") == 0:
        summary["fa4_vs_sdpa_loop_rate"] = round(runs["ours-fa4"]["loop_tokens_per_s"] / runs["ours-sdpa"]["loop_tokens_per_s"], 3)
        summary["fa4_vs_sdpa_time"] = round(runs["ours-fa4"]["wall_s"] / runs["ours-sdpa"]["wall_s"], 3)
    return summary


def print_table(report: dict) -> None:
    print(f"\n{report['device']}; whole processes, seconds from spawn to exit")
    print(f"{'model':26} {'rows':>6} {'baseline (bs)':>16} {'ours sdpa':>9} {'x':>6} {'ours default':>12} {'x':>6} "
          f"{'default/sdpa':>12} {'in-run outside loop / baseline import+load':>43}  default used")
    for name, entry in report["models"].items():
        for n, cell in entry["sizes"].items():
            runs, s = cell["runs"], cell["summary"]
            b = runs.get("baseline", {})
            bs = f"{b.get('best_e2e_s', float('nan')):.2f} ({b.get('best_batch_size')})" if b.get("exit") == 0 else "failed"
            cells = []
            for variant in ("ours-sdpa", "ours-default"):
                r = runs.get(variant, {})
                cells.append(f"{r['wall_s']:.2f}" if r.get("exit") == 0 else ("failed" if r else "-"))
                cells.append(f"{s.get(f'{variant}_vs_baseline', float('nan')):.2f}")
            outside = [s.get(f"{v}_in_run_outside_loop_vs_import_load") for v in ("ours-sdpa", "ours-default")]
            outside_text = " / ".join(f"{x:.2f}" if x is not None else "-" for x in outside)
            print(f"{name:26} {n!s:>6} {bs:>16} {cells[0]:>9} {cells[1]:>6} {cells[2]:>12} {cells[3]:>6} "
                  f"{s.get('default_vs_sdpa_time', float('nan')):12.3f} {outside_text:>43}  "
                  f"{runs.get('ours-default', {}).get('used')}")
            later = runs.get("ours-later", {})
            if later:
                text = f"{later['wall_s']:.2f} s, {s.get('ours-later_vs_baseline', float('nan')):.2f}x" if later.get("exit") == 0 else "failed"
                bb = runs.get("baseline-bytecode", {})
                if bb.get("exit") == 0:
                    text += (f"; baseline with bytecode {bb['best_e2e_s']:.2f} s: later {s.get('ours-later_vs_baseline_bytecode', float('nan')):.2f}x, "
                             f"default {s.get('ours-default_vs_baseline_bytecode', float('nan')):.2f}x")
                print(f"{'':26} {'':6} later shard (warm cache): {text}, used {later.get('used')}")
            unfused = runs.get("ours-unfused", {})
            if unfused:
                text = (f"{unfused['wall_s']:.2f} s, {s.get('ours-unfused_vs_baseline', float('nan')):.2f}x; default/unfused time "
                        f"{s.get('fused_vs_unfused_time', float('nan')):.3f}, loop {s.get('fused_vs_unfused_loop', float('nan')):.3f}"
                        if unfused.get("exit") == 0 else "failed")
                print(f"{'':26} {'':6} unfused (ATTNFALLBACK_FUSED=off): {text}")
            nowarm = runs.get("ours-nowarm", {})
            if nowarm:
                text = (f"{nowarm['wall_s']:.2f} s, {s.get('ours-nowarm_vs_baseline', float('nan')):.2f}x; default/nowarm time "
                        f"{s.get('default_vs_nowarm_time', float('nan')):.3f}, verify s (default, nowarm) {s.get('default_vs_nowarm_verify_s')}"
                        if nowarm.get("exit") == 0 else "failed")
                print(f"{'':26} {'':6} no kernel warm-up (ATTNFALLBACK_KERNEL_WARMUP=off): {text}")
            if "fa4_vs_sdpa_loop_rate" in s:
                print(f"{'':26} {'':6} FA4 strict: {runs['ours-fa4']['wall_s']:.2f} s, loop {s['fa4_vs_sdpa_loop_rate']:.2f}x sdpa's rate, "
                      f"time {s['fa4_vs_sdpa_time']:.2f}x")


if __name__ == "__main__":
    main()
