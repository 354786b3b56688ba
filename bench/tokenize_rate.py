"""The tokenizer's own ceiling: rows/s and tokens/s of the fast tokenizer on the bench texts.

    python bench/tokenize_rate.py --rows 8192 --threads 1,4,8,16

For each Rayon thread count (a fresh interpreter each: the pool is fixed at first use):
    encode_ms   `encode_batch_fast` on the rows (the Rust part, GIL released)
    convert_ms  the Encodings turned into lists, then flat arrays (the GIL-held Python part)
and, in this process, what `TextEncoder.encode` and the tokenizer process take for the same rows.
A scorer cannot feed the GPU faster than this; bench/NOTES.md compares it with the forward rate.
Writes bench/results/tokenize_rate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_throughput import REPO, synthetic_texts  # noqa: E402


def measure_here(rows: int, mean_words: float, repeats: int) -> dict:
    import itertools

    import numpy as np
    from tokenizers import Tokenizer

    from attnfallback.model_facts import default_model_path

    tokenizer = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(512)
    texts = synthetic_texts(rows, mean_words, int(mean_words * 8), 0)
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        encodings = tokenizer.encode_batch_fast(texts)
        t1 = time.perf_counter()
        ids = [e.ids for e in encodings]
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))
        t2 = time.perf_counter()
        run = {"encode_ms": (t1 - t0) * 1e3, "convert_ms": (t2 - t1) * 1e3, "tokens": len(flat)}
        if best is None or run["encode_ms"] + run["convert_ms"] < best["encode_ms"] + best["convert_ms"]:
            best = run
    total_s = (best["encode_ms"] + best["convert_ms"]) / 1e3
    return {**{k: round(v, 2) for k, v in best.items()}, "rows_per_s": round(rows / total_s), "tokens_per_s": round(best["tokens"] / total_s)}


def measure_scorer_paths(rows: int, mean_words: float, repeats: int) -> dict:
    from transformers import AutoTokenizer

    from attnfallback.model_facts import default_model_path
    from attnfallback.scoring.tokenize import TextEncoder
    from attnfallback.scoring.tokenizer_process import ProcessEncoder

    texts = [(t,) for t in synthetic_texts(rows, mean_words, int(mean_words * 8), 0)]
    encoder = TextEncoder(AutoTokenizer.from_pretrained(default_model_path()), 512, "single")
    out = {}
    child = ProcessEncoder(encoder)
    try:
        child.encode(texts[:8])
        for name, encode in (("text_encoder_ms", encoder.encode), ("tokenizer_process_ms", child.encode)):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                encode(texts)
                times.append((time.perf_counter() - t0) * 1e3)
            out[name] = round(min(times), 2)
    finally:
        child.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--mean-words", type=float, default=55)
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: measure with this many threads
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure_here(args.rows, args.mean_words, args.repeats)))
        return
    result = {"rows": args.rows, "mean_words": args.mean_words, "cpus": os.cpu_count(), "by_threads": {}}
    for threads in [int(x) for x in args.threads.split(",")]:
        env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
        done = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--mean-words", str(args.mean_words),
                               "--repeats", str(args.repeats), "--one", str(threads)], env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        result["by_threads"][threads] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{threads} threads: {result['by_threads'][threads]}", flush=True)
    result["scorer_paths"] = measure_scorer_paths(args.rows, args.mean_words, args.repeats)
    print(f"scorer paths ({args.rows} rows): {result['scorer_paths']}")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / "tokenize_rate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
