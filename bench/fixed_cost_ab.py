"""A shard's fixed cost, each change against what it replaced: whole `attnfallback score`
processes on one short input, variants in turn, each --repeats times, seconds from spawn to exit
and the run's phases.

    python bench/fixed_cost_ab.py --device cuda --model modernbert-base-random --rows 1000 --out bench/runs/ab.json

Variants (a later shard runs on the cache an untimed shard filled; a first shard on a fresh one):
- `first`: a first shard (the bytecode prefix filled before the run, bytecode.py; session 14
  also ran a fill in a child process against it, at 8baabd5, and reverted that: bench/NOTES.md);
- `later`: a later shard (the default) / `later-lean-off`: ATTNFALLBACK_LEAN_IMPORTS=off
  (transformers' optional scipy, Pillow, torchvision, torchaudio imported; lean_imports.py);
- `later-trace-dispatch`: a later shard whose kernel cache entry was removed, so the attention
  kernels are read again (the ops it dispatches, the default) / `later-trace-profiler`: the same
  under torch.profiler's ops-only trace, as before (kernels_seen.py).
Prints a table of medians; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_models import MODELS, build_model, json_tail, stsb_documents, write_input  # noqa: E402

CLI = "from attnfallback.cli.app import main; sys.argv[0] = 'attnfallback'; sys.exit(main(sys.argv[1:]))"
PATCHES = {
    "later-trace-profiler": "import attnfallback.kernels_seen as k; "
                            "k.dispatched_names = lambda run: k.traced_names(run, 'cuda', kernels=False)",
}
VARIANTS = ("first", "later", "later-lean-off", "later-trace-dispatch", "later-trace-profiler")


def command(variant: str, model_dir: Path, data: Path, out: Path, task: str, device: str) -> list[str]:
    code = f"import sys; {PATCHES.get(variant, 'pass')}; {CLI}"
    cmd = [sys.executable, "-c", code, "score", str(model_dir), "--input", str(data), "--output", str(out), "--task", task,
           "--json", "--quiet", "--device", device]
    return cmd + (["--text-columns", "a,b"] if task == "pairs" else [])


def run(cmd: list[str], env: dict, timeout: float = 300) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    result = json_tail(proc.stdout) or {}
    if proc.returncode != 0:
        return {"wall_s": round(wall, 3), "exit": proc.returncode, "error": (proc.stderr or proc.stdout)[-1500:]}
    decision = result.get("decision") or {}
    return {"wall_s": round(wall, 3), "exit": 0, "phases": result.get("phases"), "used": decision.get("used"),
            "kernels": decision.get("kernels"), "kernels_source": decision.get("kernels_source")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="modernbert-base-random", choices=sorted(MODELS))
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="bench/results/fixed_cost_ab.json")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fixed-cost-"))
    task = MODELS[args.model]
    model_dir = build_model(args.model, workdir / args.model, device=args.device)
    data = write_input(workdir / f"rows-{args.rows}.jsonl", stsb_documents(args.rows, 4.0), task)
    base = {k: v for k, v in os.environ.items() if k not in ("ATTNFALLBACK_CACHE", "ATTNFALLBACK_LEAN_IMPORTS")}
    base.update(PYTHONWARNINGS="ignore", HF_HUB_DISABLE_PROGRESS_BARS="1")
    later_cache = workdir / "cache-later"
    out = workdir / "out.parquet"
    filled = run(command("later", model_dir, data, out, task, args.device), dict(base, ATTNFALLBACK_CACHE=str(later_cache)))
    print(f"untimed shard filling the later cache: {filled['wall_s']} s, exit {filled['exit']}", file=sys.stderr)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for variant in variants:
            out.unlink(missing_ok=True)
            env = dict(base)
            if variant.startswith("first"):
                env["ATTNFALLBACK_CACHE"] = str(workdir / f"cache-{variant}-{r}")
            else:
                env["ATTNFALLBACK_CACHE"] = str(later_cache)
                if variant.startswith("later-trace"):
                    for entry in later_cache.glob("kernels-*.json"):
                        entry.unlink()
            if variant == "later-lean-off":
                env["ATTNFALLBACK_LEAN_IMPORTS"] = "off"
            result = run(command(variant, model_dir, data, out, task, args.device), env)
            runs[variant].append(result)
            phases = result.get("phases") or {}
            print(f"{variant:22s} round {r}: {result['wall_s']:6.2f} s exit {result['exit']} before {phases.get('before_run_s')} "
                  f"facts {phases.get('facts_s')} load {phases.get('load_s')} {phases.get('load_detail')}", file=sys.stderr, flush=True)
    def median_phase(ok: list[dict], key: str, detail: bool = False) -> float | None:
        phases = [x["phases"] or {} for x in ok]
        values = [(p.get("load_detail") or {}).get(key) if detail else p.get(key) for p in phases]
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    summary = {}
    for variant, results in runs.items():
        ok = [x for x in results if x["exit"] == 0]
        if not ok:
            summary[variant] = {"failed": results[0].get("error")}
            continue
        summary[variant] = {"wall_s": round(statistics.median(x["wall_s"] for x in ok), 3),
                            **{k: median_phase(ok, k) for k in ("before_run_s", "facts_s", "load_s")},
                            "kernels_s": median_phase(ok, "kernels_s", detail=True),
                            "kernels": ok[-1].get("kernels"), "kernels_source": ok[-1].get("kernels_source")}
    report = {"model": args.model, "rows": args.rows, "device": args.device, "repeats": args.repeats, "runs": runs,
              "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{args.model}, {args.rows} rows, {args.device}: medians of {args.repeats}, seconds")
    print(f"{'variant':22s} {'wall':>7s} {'before':>7s} {'facts':>7s} {'load':>7s} {'kernels':>8s}  kernels seen")
    for variant, s in summary.items():
        if "failed" in s:
            print(f"{variant:22s} failed: {str(s['failed'])[-300:]}")
            continue
        print(f"{variant:22s} {s['wall_s']:7.2f} {s['before_run_s'] or 0:7.2f} {s['facts_s'] or 0:7.2f} {s['load_s'] or 0:7.2f} "
              f"{s['kernels_s'] if s['kernels_s'] is not None else float('nan'):8.3f}  {s['kernels']} ({s['kernels_source']})")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
