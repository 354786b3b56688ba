"""Scale benchmark for the events query tool: 10,000 shards (about 30,000 events).

    python bench/events_scale.py [--shards 10000] [--repeat 3] [--keep DIR]

Generates a synthetic fleet in a temporary directory (one JSONL file per shard, written through
EventSink), then times `attnfallback events summary` and `attnfallback events fallbacks` end to
end, each in a fresh interpreter (start-up, imports, reading every file, DuckDB, printing).
Target: under 2 s each. Writes bench/results/events_scale.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_fleet import FleetGroup, write_fleet  # noqa: E402

TARGET_S = 2.0

# Fractions of the fleet; the rest of the shards go to H100.
MIX = [
    ("A100", 0.20, {}),
    ("A6000", 0.20, {}),
    ("L4", 0.10, {}),
    ("T4", 0.08, {"used": "sdpa"}),
    ("V100", 0.015, {"used": "eager", "reason": "architecture BertModel: sdpa disabled by policy"}),
    ("T4", 0.005, {"strict": True}),
]


def fleet(shards: int, runs: int) -> list[tuple[str, list[FleetGroup]]]:
    """`shards` shards spread over `runs` runs with the MIX above."""
    per_run = shards // runs
    plan = []
    for r in range(runs):
        n = per_run if r < runs - 1 else shards - per_run * (runs - 1)
        groups, used = [], 0
        for gpu, fraction, extra in MIX:
            count = int(round(n * fraction))
            groups.append(FleetGroup(gpu, count, host=f"pod-{gpu.lower()}-{r}", **extra))
            used += count
        groups.insert(0, FleetGroup("H100", n - used, host=f"pod-h100-{r}"))
        plan.append((f"bench-run-{r:02d}", groups))
    return plan


def time_command(args: list[str], repeat: int) -> dict:
    """Wall seconds of `attnfallback ARGS` in a fresh interpreter, `repeat` times."""
    command = [sys.executable, "-m", "attnfallback.cli.app", *args]
    times, cpu, out_bytes = [], [], 0
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
        out_bytes = len(done.stdout)
    return {"command": "attnfallback " + " ".join(args), "runs_s": [round(t, 3) for t in times],
            "min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3),
            "median_cpu_s": round(statistics.median(cpu), 3),
            "stdout_bytes": out_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", help="write the fleet here (kept) instead of a temporary directory")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "events_scale.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="events-scale-") as tmp:
        directory = Path(args.keep or tmp)
        if args.keep and directory.exists() and any(directory.iterdir()):
            raise SystemExit(f"--keep {directory}: not empty (the fleet would be appended to it)")
        start = time.perf_counter()
        files = 0
        for run_id, groups in fleet(args.shards, args.runs):
            files += len(write_fleet(directory, groups, run_id=run_id))
        generate_s = time.perf_counter() - start
        events = sum(1 for p in directory.rglob("*.jsonl") for _ in open(p, "rb"))
        size_mb = sum(p.stat().st_size for p in directory.rglob("*.jsonl")) / 1e6

        d = str(directory)
        results = [
            time_command(["events", "summary", d], args.repeat),
            time_command(["events", "summary", d, "--format", "json"], args.repeat),
            time_command(["events", "fallbacks", d], args.repeat),
            time_command(["events", "fallbacks", d, "--format", "json"], args.repeat),
        ]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "attnfallback.cli.app", "events", "--help"],
                              capture_output=True)
        startup_s = time.perf_counter() - start

    load_average = os.getloadavg()
    report = {
        "shards": files, "events": events, "size_mb": round(size_mb, 2), "generate_s": round(generate_s, 2),
        "cli_startup_s": round(startup_s, 3) if done.returncode == 0 else None,
        "target_s": TARGET_S, "results": results,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1_5_15": [round(x, 2) for x in load_average]},
        "note": "files were just written: page cache warm",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"fleet: {files} shards, {events} events, {size_mb:.1f} MB, generated in {generate_s:.1f} s; "
          f"CLI start-up (events --help) {startup_s:.2f} s; results in {out}")
    print(f"load average {load_average[0]:.1f} on {os.cpu_count()} CPUs (wall times grow with it; CPU time less so)")
    print(f"{'command':<52} {'min s':>7} {'median s':>9} {'cpu s':>7} {'target':>7}")
    for r in results:
        command = r["command"].replace(d, "DIR")
        verdict = "ok" if r["median_s"] < TARGET_S else "SLOW"
        print(f"{command:<52} {r['min_s']:>7.3f} {r['median_s']:>9.3f} {r['median_cpu_s']:>7.3f} {verdict:>7}")


if __name__ == "__main__":
    main()
