"""Does making CUDA's context stop the main thread? torch's init against the driver's, fresh processes.

    python bench/cuda_context_gil.py --model-dir /tmp/e2e23/llama-1b-random --repeats 3 --out bench/results/cuda_context.json

Modes, each a fresh process (round robin, after one untimed process that writes the bytecode under
--workdir, as a shard's cache holds it):
- `spin-torch`: torch imported; a thread runs torch.cuda.init() while the main thread counts in a
  pure-Python loop; `blocked_s` is how long the main thread did not run (its count against the
  rate it had alone just before);
- `spin-driver`: the same with the driver's primary context made first (cuda_context.py), then
  torch.cuda.init();
- `facts-torch`, `facts-driver`: what a shard does: the run's warm-up thread (scoring/job.py's
  `_warm_device`, with ATTNFALLBACK_CUDA_CONTEXT torch or driver) beside the main thread reading
  the model's facts (model_facts.read_facts: transformers, the config, the model's class, the
  weights' identity); `facts_s` is the main thread's time, `ready_s` the thread's.
Prints medians per mode; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = ("spin-torch", "spin-driver", "facts-torch", "facts-driver")


def spin_while(thread: threading.Thread, rate: float) -> tuple[float, float]:
    """(elapsed, seconds the main thread did not run) while `thread` runs; `rate`: counts a second alone."""
    count, start = 0, time.perf_counter()
    thread.start()
    while thread.is_alive():
        for _ in range(1000):
            count += 1
    elapsed = time.perf_counter() - start
    return elapsed, max(elapsed - count / rate, 0.0)


def calibrate(seconds: float = 0.3) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(1000):
            count += 1
    return count / (time.perf_counter() - start)


def child(mode: str, model_dir: str, device: str) -> dict:
    out: dict = {"mode": mode}
    if mode.startswith("spin"):
        t = time.perf_counter()
        import torch

        out["torch_import_s"] = time.perf_counter() - t
        steps: dict = {}

        def init():
            if mode == "spin-driver":
                from attnfallback.cuda_context import device_index, retain_primary_context

                t0 = time.perf_counter()
                steps["driver_why_not"] = retain_primary_context(device_index(device))
                steps["driver_context_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            torch.cuda.init()
            steps["cuda_init_s"] = time.perf_counter() - t0

        rate = calibrate()
        elapsed, blocked = spin_while(threading.Thread(target=init), rate)
        out.update(steps, thread_s=elapsed, blocked_s=blocked)
    else:
        os.environ["ATTNFALLBACK_CUDA_CONTEXT"] = mode.split("-", 1)[1]
        os.environ["ATTNFALLBACK_LEAN_IMPORTS"] = "on"
        t = time.perf_counter()
        from attnfallback.cuda_context import mode as context_mode
        from attnfallback.model_facts import read_facts
        from attnfallback.scoring import job

        warm = job._start_in_background(job._warm_device, device, context_mode())
        t_facts = time.perf_counter()
        read_facts(model_dir, auto_class="AutoModelForCausalLM")
        out["facts_s"] = time.perf_counter() - t_facts
        out["device_detail"] = warm.result()
        out["both_s"] = time.perf_counter() - t
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="bench/results/cuda_context.json")
    p.add_argument("--child", choices=MODES, default=None)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.device)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cuda-context-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "bytecode")

    def run(mode: str) -> dict:
        t = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--model-dir", args.model_dir, "--device", args.device],
                              capture_output=True, text=True, env=env, timeout=300)
        if done.returncode != 0:
            return {"mode": mode, "exit": done.returncode, "error": done.stderr[-1500:]}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["wall_s"] = round(time.perf_counter() - t, 3)
        return result

    untimed = [run("facts-torch"), run("spin-driver")]  # the bytecode, every module both kinds import
    runs = [run(mode) for _ in range(args.repeats) for mode in MODES]
    summary = {}
    for mode in MODES:
        ok = [r for r in runs if r["mode"] == mode and "error" not in r]
        keys = ("blocked_s", "cuda_init_s", "driver_context_s", "thread_s") if mode.startswith("spin") else ("facts_s", "both_s")
        summary[mode] = {k: round(statistics.median(r[k] for r in ok), 3) for k in keys if ok and all(k in r for r in ok)}
        if mode.startswith("facts") and ok:
            summary[mode]["ready_s"] = round(statistics.median(r["device_detail"]["ready_s"] for r in ok), 3)
        print(f"{mode}: {summary[mode]} ({len(ok)} of {args.repeats} ran)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"untimed": untimed, "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
