"""What the scoring loop of a logprob shard gains from each lever left, in one process, side by side.

    python bench/loop_levers.py --device cuda --docs 20000 --out bench/results/loop_levers.json
    python bench/loop_levers.py --device cpu --layers 2 --docs 300 --kernels torch --repeats 1   # a dry run

The model (Llama-1B's shape, random weights, bench/zoo_models.py) is loaded once and fused
(fused_ops.py); the documents are the first --docs of bench/end_to_end.py's 50k shard. Each variant
changes one thing of the scorer, and the loop (Scorer.score_chunks over the parts `score` makes,
tokenizing included) runs for each in turn, round-robin, --repeats times, median:

- `base`: as a shard ran before session 24: the head's weight as loaded, the default cuts;
- `aligned`: the head's product on its weight padded to a multiple of 64 outputs (tasks.HEAD_ALIGN);
- `aligned-chunk-N`: and N head positions a chunk (tasks.LOGITS_CHUNK_TOKENS, 4096 by default);
- `shipped`: aligned, and batches cut at the model's cut scale (batching.cut_scale), as a shard runs now;
- `aligned-cuts-xS`: aligned, plan_batches' floor and per-batch overhead S times below their defaults,
  so batches are cut where the length drops more often (less padding, more forwards);
- `aligned-budget-N` (and at the model's cut scale): N padded tokens a batch (the default is the
  model's width's budget).

Then the forward alone under torch.profiler for `base` and `shipped`: GPU time by kind of kernel,
the top kernels, and the share of the wall time the GPU was busy. Warm in-process loops: a
diagnostic for choosing; bench/end_to_end.py is the whole-process verdict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fused_loop import profile_forward, set_fused  # noqa: E402
from score_throughput import make_gpu_only, make_ours, sync  # noqa: E402
from zoo_models import MODELS, build_model, stsb_documents  # noqa: E402

MODEL = "llama-1b-random"


def variants(default_budget: int, default_scale: float, chunks: tuple[int, ...], budgets: tuple[int, ...],
             scales: tuple[float, ...]) -> dict[str, dict]:
    """Variant name -> its settings (align, chunk, budget, cut scale)."""
    base = {"align": 1, "chunk": 4096, "budget": default_budget, "scale": 1.0}
    out = {"base": base, "aligned": {**base, "align": 64},
           "shipped": {**base, "align": 64, "scale": default_scale}}
    for chunk in chunks:
        out[f"aligned-chunk-{chunk}"] = {**base, "align": 64, "chunk": chunk}
    for scale in scales:
        out[f"aligned-cuts-x{scale:g}"] = {**base, "align": 64, "scale": scale}
    for budget in budgets:
        if budget != default_budget:
            out[f"aligned-budget-{budget}"] = {**base, "align": 64, "budget": budget}
            out[f"aligned-budget-{budget}-cuts-x{default_scale:.2g}"] = {**base, "align": 64, "budget": budget, "scale": default_scale}
    return out


def apply(scorer, settings: dict) -> None:
    """Put `scorer` in the variant's state."""
    from attnfallback.scoring import tasks

    scorer.task.align_head(settings["align"])
    tasks.LOGITS_CHUNK_TOKENS = settings["chunk"]
    scorer.batch_tokens = settings["budget"]
    scorer.cut_scale = settings["scale"]
    scorer.floor_tokens = scorer.overhead_tokens = None


def padding_of(scorer, texts: list[str], part_rows: int) -> dict:
    """Padded positions over tokens for these texts in the parts a shard makes, as the scorer batches them."""
    from attnfallback.scoring.chunks import Chunk
    from attnfallback.scoring.job import FIRST_PART_ROWS, part_sizes

    tokens = cells = batches = start = 0
    for size in part_sizes(part_rows, FIRST_PART_ROWS):
        if start >= len(texts):
            break
        chunk = Chunk(0, list(range(start, min(start + size, len(texts)))), [(t,) for t in texts[start:start + size]])
        prepared = scorer.prepare(chunk)
        tokens += int(prepared.encoded.lengths.sum())
        cells += sum(b.cells for b in prepared.batches)
        batches += len(prepared.batches)
        start += size
    return {"padding": round(cells / max(tokens, 1) - 1, 4), "batches": batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a dry run)")
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--profile-docs", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunks", default="")
    ap.add_argument("--budgets", default="32768")
    ap.add_argument("--scales", default="2,8,16")
    ap.add_argument("--kernels", default="triton", choices=["triton", "torch"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="bench/results/loop_levers.json")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="levers-"))

    import torch

    from attnfallback.fused_ops import TorchKernels, triton_kernels
    from attnfallback.scoring import ScoreJob, Scorer

    kernels = triton_kernels() if args.kernels == "triton" else TorchKernels()
    model_dir = build_model(MODEL, workdir / MODEL, device=args.device, layers=args.layers)
    job = ScoreJob(model=str(model_dir), task=MODELS[MODEL], device=args.device,
                   dtype="bfloat16" if args.device == "cuda" else "float32", prefer="sdpa", quiet=True)
    scorer = Scorer.from_job(job)
    fused = set_fused(scorer, True, kernels)
    texts = stsb_documents(50000, 4.0, seed=50000)[: args.docs]  # end_to_end.py's 50k shard begins so
    tokens = int(scorer.encoder.encode([(t,) for t in texts]).lengths.sum())
    table = variants(scorer.batch_tokens, scorer.cut_scale, tuple(int(c) for c in args.chunks.split(",") if c),
                     tuple(int(b) for b in args.budgets.split(",") if b), tuple(float(x) for x in args.scales.split(",") if x))
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "model": MODEL, "docs": len(texts), "tokens": tokens, "impl": scorer.decision.used, "fused": fused,
              "vocab": scorer.task.vocab_size, "cut_scale": scorer.cut_scale, "argv": sys.argv[1:], "variants": table}
    loops = {}
    for name, settings in table.items():
        apply(scorer, settings)
        report.setdefault("padding", {})[name] = padding_of(scorer, texts, job.part_rows)
        loops[name] = make_ours(scorer, texts, part_rows=job.part_rows)
        loops[name]()  # warm-up: this variant's shapes
    seconds: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(args.repeats):
        for name, settings in table.items():
            apply(scorer, settings)
            sync(args.device)
            t0 = time.perf_counter()
            loops[name]()
            sync(args.device)
            seconds[name].append(round(time.perf_counter() - t0, 4))
    base = statistics.median(seconds["base"])
    report["loop_s"] = seconds
    report["tokens_per_s"] = {n: round(tokens / statistics.median(s), 1) for n, s in seconds.items()}
    report["against_base"] = {n: round(base / statistics.median(s), 4) for n, s in seconds.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{report['device']}; {MODEL} logprob, {len(texts)} docs, {tokens:,} tokens, {report['impl']}, vocab {report['vocab']}")
    for name in table:
        pad = report["padding"][name]
        print(f"  {name:24} {report['tokens_per_s'][name]:>11,.0f} tok/s  x{report['against_base'][name]:.3f}  "
              f"padding {pad['padding']:.1%} in {pad['batches']} batches  {seconds[name]}", flush=True)
    for name in ("base", "shipped"):
        apply(scorer, table[name])
        report[f"profile_{name}"] = entry = profile_forward(make_gpu_only(scorer, texts[: args.profile_docs]), args.device, top_n=25)
        print(f"  forward {name}: {entry['total_ms']:.1f} ms in kernels of {entry['wall_ms']:.1f} ms wall (busy {entry['busy']:.1%}); "
              + ", ".join(f"{k} {v:.1%}" for k, v in entry["share"].items()))
        for row in entry["top"][:12]:
            print(f"      {row['ms']:9.2f} ms {row['share']:6.1%} {row['calls']:5}x  {row['kernel']}")
    # the head's outputs both ways, on the same batches
    forward = make_gpu_only(scorer, texts[:512])
    apply(scorer, table["base"])
    plain = forward()
    apply(scorer, table["aligned"])
    aligned = forward()
    report["aligned_max_difference"] = max(float((a["logprob_sum"] - b["logprob_sum"]).abs().max()) for a, b in zip(plain, aligned))
    print(f"  logprob_sum, largest difference aligned vs base: {report['aligned_max_difference']:.4g}")
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
