"""What a batch shape costs the first time a process meets it, against the same batch again.

    python bench/shape_cost.py --model bert-base-random --chunks 4
    python bench/shape_cost.py --model qwen2-0.5b-random --chunks 2 --mean-words 63

Every sweep shard brings lengths (so batch shapes) its process has not run before; the growth
runs of score_throughput.py report medians of repeated runs on the same texts, which meet only
shapes they have seen. Here each chunk is a fresh sample of texts (its own seed), prepared as
`score` prepares it (sort, token-budget batches, pinned tensors); every batch runs twice, each
time synchronised: `first_ms` the first forward of that shape, `again_ms` the same batch again.
Variants restrict PyTorch's SDPA backends (`--backends`), so a per-shape cost can be pinned on
one of them. Also lists the attention kernels one forward launches (torch.profiler).
Writes bench/results/shape_cost-*.json.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_throughput import REPO, build_random_model, synthetic_texts  # noqa: E402

BACKENDS = ("default", "ours", "efficient", "cudnn", "flash", "math")


def sdpa_context(name: str):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "ours":  # the order scoring sets (attnfallback.sdpa_order)
        from attnfallback.sdpa_order import sdpa_order

        return sdpa_order("cuda")

    chosen = {"efficient": [SDPBackend.EFFICIENT_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
              "flash": [SDPBackend.FLASH_ATTENTION], "math": [SDPBackend.MATH]}.get(name)
    return contextlib.nullcontext() if chosen is None else sdpa_kernel(chosen)


def attention_kernels(scorer, batch) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        scorer.task.forward(scorer._on_device(batch))
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    words = ("attention", "fmha", "flash", "cudnn", "softmax", "sdpa", "cutlass")
    return sorted(n for n in names if any(w in n.lower() for w in words))[:12]


def timed(scorer, batch, enqueue: list | None = None) -> float:
    """Milliseconds of one synchronised forward; the host's share (until queued) goes to `enqueue`."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        scorer.task.forward(scorer._on_device(batch))
    if enqueue is not None:
        enqueue.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base-random", choices=["bert-base-random", "qwen2-0.5b-random"])
    ap.add_argument("--chunks", type=int, default=4, help="fresh samples per variant")
    ap.add_argument("--rows", type=int, default=1000, help="texts per sample")
    ap.add_argument("--mean-words", type=float, default=None)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--backends", default="default,efficient,cudnn")
    ap.add_argument("--profile", default=None, help="a backend whose first-shape forwards run under cProfile (top host functions)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from attnfallback.scoring import ScoreJob, Scorer
    from attnfallback.scoring.chunks import Chunk

    if not torch.cuda.is_available():
        sys.exit("shape_cost.py needs a CUDA device")
    is_embedder = args.model == "bert-base-random"
    mean_words = args.mean_words or (55 if is_embedder else 63)
    tmp = tempfile.TemporaryDirectory(prefix="shape-cost-")
    model_dir = build_random_model(args.model, Path(tmp.name) / args.model)
    job = ScoreJob(model=str(model_dir), task="embed" if is_embedder else "classify", device="cuda", dtype="bfloat16",
                   prefer="sdpa", batch_tokens=args.batch_tokens, max_length=None if is_embedder else 8192, quiet=True,
                   tokenizer_process="off")
    scorer = Scorer.from_job(job)
    warm = scorer.prepare(Chunk(0, list(range(64)), [(t,) for t in synthetic_texts(64, mean_words, int(mean_words * 8), 999)]))
    for batch in warm.batches:
        timed(scorer, batch)
    result = {"model": args.model, "batch_tokens": args.batch_tokens, "rows": args.rows, "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "variants": {}}
    seed = 1000
    for backend in args.backends.split(","):
        if backend not in BACKENDS:
            sys.exit(f"--backends: {backend!r} is not one of {', '.join(BACKENDS)}")
        firsts, agains, shapes, failed = [], [], 0, None
        first_enqueue, again_enqueue = [], []
        kernels = []
        profiler = cProfile.Profile() if backend == args.profile else None
        try:
            with sdpa_context(backend):
                for _ in range(args.chunks):
                    seed += 1
                    texts = synthetic_texts(args.rows, mean_words, int(mean_words * 8), seed)
                    prepared = scorer.prepare(Chunk(0, list(range(len(texts))), [(t,) for t in texts]))
                    for batch in prepared.batches:
                        if profiler is not None:
                            profiler.enable()
                        firsts.append(timed(scorer, batch, first_enqueue))
                        if profiler is not None:
                            profiler.disable()
                        agains.append(timed(scorer, batch, again_enqueue))
                        shapes += 1
                    if not kernels:
                        kernels = attention_kernels(scorer, prepared.batches[0])
        except Exception as e:  # noqa: BLE001 - a backend that cannot run these shapes is a result too
            failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row = {"batches": shapes, "failed": failed, "kernels": kernels}
        if firsts:
            row.update({"first_ms_total": round(sum(firsts), 2), "again_ms_total": round(sum(agains), 2),
                        "first_ms_median": round(statistics.median(firsts), 3),
                        "again_ms_median": round(statistics.median(agains), 3),
                        "extra_ms_per_new_shape": round((sum(firsts) - sum(agains)) / len(firsts), 3),
                        "first_enqueue_ms_median": round(statistics.median(first_enqueue), 3),
                        "again_enqueue_ms_median": round(statistics.median(again_enqueue), 3)})
        if profiler is not None:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
            row["profile_first_shapes"] = text.getvalue().splitlines()[-30:]
            print("\n".join(row["profile_first_shapes"]))
        result["variants"][backend] = row
        print(f"{backend}: {json.dumps(row)}", flush=True)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"shape_cost-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
