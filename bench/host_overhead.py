"""Where the host time of a forward goes, per attention implementation, on pre-tokenized batches.

    python bench/host_overhead.py --model qwen2-0.5b-random --texts 6000 --impls flash_attention_4,sdpa
    python bench/host_overhead.py --model bert-base-random --texts 20000 --impls flash_attention_4,sdpa

For each implementation (packed where the pipeline packs), on the batches `score` builds:
    enqueue_s   time to queue every batch's forward (no synchronisation at the end)
    total_s     the same, until the GPU has finished
    busy_s      total_s while another thread runs Python the whole time, as the tokenizing worker
                does during `score` (the GIL is shared)
enqueue_s close to total_s means the host, not the GPU, sets the pace (or the forward waits on the
GPU somewhere); busy_s / total_s is what a Python thread beside the forward costs it.
Also prints the functions with the most host time in one profiled pass (cProfile, tottime).
Writes bench/results/host_overhead-*.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_throughput import REPO, build_random_model, synthetic_texts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2-0.5b-random", choices=["bert-base-random", "qwen2-0.5b-random"])
    ap.add_argument("--texts", type=int, default=6000)
    ap.add_argument("--impls", default="flash_attention_4,sdpa")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of this script only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from attnfallback.scoring import ScoreJob, Scorer
    from attnfallback.scoring.chunks import Chunk

    is_embedder = args.model == "bert-base-random"
    texts = synthetic_texts(args.texts, 55 if is_embedder else 63, (55 if is_embedder else 63) * 8, 0)
    tmp = tempfile.TemporaryDirectory(prefix="host-overhead-")
    model_dir = build_random_model(args.model, Path(tmp.name) / args.model)
    scorer = Scorer.from_job(ScoreJob(model=str(model_dir), task="embed" if is_embedder else "classify", device=args.device,
                                      dtype="bfloat16" if args.device == "cuda" else "float32", max_length=None if is_embedder else 8192, quiet=True))
    chunk = Chunk(0, list(range(len(texts))), [(t,) for t in texts])

    stop = threading.Event()

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def busy():
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i * i

    results = {}
    for impl in [i.strip() for i in args.impls.split(",")]:
        if scorer.loaded.model.config._attn_implementation != impl:
            scorer.loaded.model.set_attn_implementation(impl)
        scorer.refresh_packing()
        prepared = scorer.prepare(chunk)
        batches = [{k: v.to(scorer.device) if hasattr(v, "to") else v for k, v in b.tensors.items()} for b in prepared.batches]
        tokens = sum(b.tokens for b in prepared.batches)

        def forward_all():
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    scorer.task.forward(b)
            enqueued = time.perf_counter() - t0
            sync()
            return enqueued, time.perf_counter() - t0

        forward_all()  # warm-up (kernel compilation)
        enqueue, total, busy_total = [], [], []
        for _ in range(args.repeats):
            e, t = forward_all()
            enqueue.append(e)
            total.append(t)
            stop.clear()
            worker = threading.Thread(target=busy, daemon=True)
            worker.start()
            busy_total.append(forward_all()[1])
            stop.set()
            worker.join()
        profile = cProfile.Profile()
        profile.enable()
        forward_all()
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(15)
        row = {"packing": scorer.packing_note, "batches": len(batches), "tokens": tokens,
               "enqueue_s": statistics.median(enqueue), "total_s": statistics.median(total),
               "busy_s": statistics.median(busy_total), "profile_top": text.getvalue()}
        row["tokens_per_s"] = tokens / row["total_s"]
        results[impl] = row
        print(f"{impl} ({scorer.packing_note}), {len(batches)} batches, {tokens:,} tokens: enqueue {row['enqueue_s']:.3f} s, "
              f"total {row['total_s']:.3f} s ({row['tokens_per_s']:,.0f} tokens/s), with a busy Python thread "
              f"{row['busy_s']:.3f} s (x{row['busy_s'] / row['total_s']:.2f})", flush=True)
        print("\n".join(row["profile_top"].splitlines()[:40]), flush=True)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"host_overhead-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "texts": args.texts, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                               "results": results}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
