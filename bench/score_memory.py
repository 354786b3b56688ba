"""Peak memory of `attnfallback score` on many rows (issue 5, growth: under 2 GB for 200k rows).

Builds a 2-layer random BERT (tests/conftest.py's tiny model), writes N seeded texts as JSONL,
runs `attnfallback score` on them in a child process and reads the child's peak RSS from the
kernel (the same figure as /usr/bin/time -v's "Maximum resident set size"). Prints one line and
writes JSON.

    python bench/score_memory.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from conftest import build_tiny_model
    from scoring_helpers import add_sentence_config, seeded_texts

    with tempfile.TemporaryDirectory(prefix="score-memory-") as tmp:
        tmp = Path(tmp)
        model = add_sentence_config(build_tiny_model(tmp / "tiny", "bert"))
        source = tmp / "in.jsonl"
        with open(source, "w", encoding="utf-8") as fh:
            for text in seeded_texts(args.rows, seed=7, max_words=40):
                fh.write(json.dumps({"text": text}) + "\n")
        command = [sys.executable, "-m", "attnfallback.cli.app", "score", str(model), "--input", str(source),
                   "--output", str(tmp / "out.parquet"), "--device", args.device, "--json"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"score failed (exit {done.returncode}): {done.stderr[-2000:]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux
        result = json.loads(done.stdout)
    summary = {"rows": args.rows, "rows_in": result["rows_in"], "rows_written": result["rows_written"],
               "rows_skipped": result["rows_skipped"], "tokens": result["tokens"], "wall_s": round(wall, 2),
               "peak_rss_kb": peak_kb, "peak_rss_gb": round(peak_kb / 1e6, 3), "device": args.device, "argv": sys.argv[1:]}
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"score_memory-{args.rows}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"{args.rows:,} rows: {summary['rows_written']:,} written, {summary['rows_skipped']} skipped, "
          f"peak RSS {summary['peak_rss_gb']:.2f} GB, {wall:.1f} s; written to {out}")


if __name__ == "__main__":
    main()
