"""A first shard's start on an image without bytecode: the bytecode prefix filled first, beside the
imports, or not at all, as whole `score` processes on a fresh cache each.

    python bench/first_start.py --python /tmp/nobc/bin/python --device cpu --repeats 3 --out first_start.json

`--python`: an interpreter whose packages were installed without bytecode (`pip install
--no-compile`), as the lent GPU's image is. Each run is the command line's own `main` with
bytecode.BACKGROUND_MIN_CORES and PRECOMPILE_MIN_CORES set for the mode, PYTHONDONTWRITEBYTECODE=1
and ATTNFALLBACK_BYTECODE=on (the image's case), a fresh ATTNFALLBACK_CACHE, the modes in turn
within each repeat. It prints each mode's median wall time, its phases and the ratio to `first`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STSB = ROOT.parent / "shared" / "data" / "stsb" / "stsb-en-test.csv"
MODES = {"first": (2, 10**6), "beside": (2, 1), "none": (10**6, 10**6)}  # (precompile, background) min cores

PROGRAM = """
import sys
from attnfallback import bytecode
bytecode.PRECOMPILE_MIN_CORES, bytecode.BACKGROUND_MIN_CORES = {precompile}, {background}
from attnfallback.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def write_input(path: Path, rows: int) -> Path:
    """STS-B test's first sentences as JSON lines, repeated up to `rows`."""
    with open(STSB, newline="", encoding="utf-8") as f:
        sentences = [r[0] for r in csv.reader(f) if r]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"text": sentences[i % len(sentences)]}) + "\n")
    return path


def run_once(python: str, mode: str, args, data: Path, workdir: Path, index: int) -> dict:
    cache = workdir / f"cache-{mode}-{index}"
    shutil.rmtree(cache, ignore_errors=True)
    output = workdir / f"out-{mode}-{index}.parquet"
    output.unlink(missing_ok=True)
    precompile, background = MODES[mode]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTNFALLBACK_", "PYTHONPYCACHEPREFIX"))}
    env.update(ATTNFALLBACK_CACHE=str(cache), ATTNFALLBACK_BYTECODE="on", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=str(ROOT / "src"))
    command = [python, "-c", PROGRAM.format(precompile=precompile, background=background), "score", args.model,
               "--task", args.task, "--input", str(data), "--output", str(output), "--device", args.device, "--json"]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"mode": mode, "exit": proc.returncode, "wall_s": round(wall, 3), "error": proc.stderr[-2000:]}
    result = json.loads(proc.stdout)
    phases = result.get("phases", {})
    marks = list((cache / "bytecode").glob(".precompiled-*"))
    return {"mode": mode, "exit": 0, "wall_s": round(wall, 3), "rows": result.get("rows_written"),
            "before_run_s": phases.get("before_run_s"), "facts_s": phases.get("facts_s"), "run_s": phases.get("run_s"),
            "filled_mark": marks[0].read_text().strip() if marks else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--model", default="default")
    p.add_argument("--task", default="embed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="first,beside,none")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--workdir", default="/tmp/first-start")
    p.add_argument("--out", default="bench/results/first_start.json")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(MODES)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = write_input(workdir / f"in-{args.rows}.jsonl", args.rows)
    runs = []
    for index in range(args.repeats):
        for mode in modes:
            run = run_once(args.python, mode, args, data, workdir, index)
            runs.append(run)
            print(f"  {index} {mode:<7} wall {run['wall_s']:6.2f} s  before_run {run.get('before_run_s')}  "
                  f"facts {run.get('facts_s')}  exit {run['exit']}", flush=True)
    summary = {}
    for mode in modes:
        ok = [r for r in runs if r["mode"] == mode and r["exit"] == 0]
        if ok:
            summary[mode] = {key: round(statistics.median(r[key] for r in ok), 3)
                             for key in ("wall_s", "before_run_s", "facts_s", "run_s") if all(r.get(key) is not None for r in ok)}
    if "first" in summary:
        for mode, s in summary.items():
            s["x_first"] = round(summary["first"]["wall_s"] / s["wall_s"], 3)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = {"python": args.python, "cores": cores, "device": args.device, "rows": args.rows, "runs": runs, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"cores {cores}; median of {args.repeats}:")
    for mode, s in summary.items():
        print(f"  {mode:<7} wall {s['wall_s']:6.2f} s  before_run {s.get('before_run_s')}  facts {s.get('facts_s')}  "
              f"x first {s.get('x_first')}")


if __name__ == "__main__":
    main()
