"""The fused kernels (src/attnfallback/fused_ops.py) against the model's own code, in one process.

    python bench/fused_loop.py --device cuda --models llama-1b-random,qwen3-0.6b-reward-random --docs 20000 \\
        --out bench/results/fused_loop.json
    python bench/fused_loop.py --device cpu --models llama-1b-random --layers 2 --docs 300 --kernels torch   # a dry run

1. Triton's cold compile: each kernel's first call in an empty TRITON_CACHE_DIR (what a first shard
   on a fresh machine pays, before anything else in this process touched Triton), and its next call.
2. Each kernel (the head's log-probabilities, RMSNorm, SiLU-mul, the rotary embedding) against PyTorch's way on these models' shapes: milliseconds (CUDA events, median of
   20), the largest difference and the share of bit-equal outputs.
3. Per model (random weights of a real shape, bench/zoo_models.py; documents of STS-B sentences):
   the scoring loop (Scorer.score_chunks, tokenizing included; the model loaded once), fused and
   unfused in turn, --repeats each, median; then the forward alone under torch.profiler, GPU time
   by kind of kernel (matrix products, attention, Triton, reductions, elementwise, copies).

Warm in-process loops: a diagnostic of where the loop's time goes; bench/end_to_end.py's
`ours-unfused` variant is the whole-process verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_throughput import as_row, make_gpu_only, make_ours, sync  # noqa: E402
from zoo_models import MODELS, build_model, stsb_documents  # noqa: E402

KINDS = (("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "cublas")),
         ("attention", ("flash", "fmha", "attention", "efficient")),
         ("triton (fused)", ("_token_logprobs_kernel", "_rms_norm_kernel", "_silu_mul_kernel", "_rotary_kernel")),
         ("reductions", ("reduce",)),
         ("copies", ("copy", "cat", "index", "gather", "scatter")),
         ("elementwise", ("elementwise", "vectorized", "unrolled")))


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, marks in KINDS:
        if any(m in lowered for m in marks):
            return kind
    return "other"


def timed_ms(fn, device: str, repeats: int = 20) -> float:
    import torch

    fn()
    sync(device)
    if device != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def compare(ours, theirs) -> dict:
    a, b = ours.float(), theirs.float()
    return {"max_difference": float((a - b).abs().max()), "bit_equal": round(float((a == b).float().mean()), 5)}


def cold_compile(kernels, device: str) -> dict:
    """Each kernel's first call and its next (seconds, synchronized)."""
    import torch

    out = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(64, 30522, generator=g).to(device, torch.bfloat16)
    targets = torch.randint(0, 30522, (64,), generator=g).to(device)
    x = torch.randn(64, 2048, generator=g).to(device, torch.bfloat16)
    w = torch.ones(2048, device=device, dtype=torch.bfloat16)
    gate = torch.randn(64, 8192, generator=g).to(device, torch.bfloat16)
    calls = {"token_logprobs": lambda: kernels.token_logprobs(logits, targets),
             "rms_norm": lambda: kernels.rms_norm(x, w, 1e-5),
             "silu_mul": lambda: kernels.silu_mul(gate, gate)}
    for name, call in calls.items():
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            call()
            sync(device)
            seconds.append(round(time.perf_counter() - t0, 4))
        out[name] = {"first_s": seconds[0], "next_s": seconds[1]}
    return out


def kernel_table(kernels, device: str) -> dict:
    """Each kernel against PyTorch's way (TorchKernels, transformers' RMSNorm module)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from attnfallback.fused_ops import TorchKernels

    reference = TorchKernels()
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = 4096 if device == "cuda" else 256
    table = {}
    for vocab in (30522, 128256):
        logits = (torch.randn(rows, vocab, generator=g) * 4).to(device, torch.bfloat16)
        targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
        table[f"token_logprobs {rows}x{vocab}"] = {
            "fused_ms": timed_ms(lambda: kernels.token_logprobs(logits, targets), device),
            "torch_ms": timed_ms(lambda: reference.token_logprobs(logits, targets), device),
            **compare(kernels.token_logprobs(logits, targets), reference.token_logprobs(logits, targets))}
        del logits
    tokens = 16384 if device == "cuda" else 512
    x = (torch.randn(tokens, 2048, generator=g) * 3).to(device, torch.bfloat16)
    norm = LlamaRMSNorm(2048, eps=1e-5).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(2048, generator=g))
    with torch.inference_mode():
        table[f"rms_norm {tokens}x2048"] = {
            "fused_ms": timed_ms(lambda: kernels.rms_norm(x, norm.weight, 1e-5), device),
            "torch_ms": timed_ms(lambda: norm(x), device), **compare(kernels.rms_norm(x, norm.weight, 1e-5), norm(x))}
    gate = torch.randn(tokens, 8192, generator=g).to(device, torch.bfloat16)
    up = torch.randn(tokens, 8192, generator=g).to(device, torch.bfloat16)
    table[f"silu_mul {tokens}x8192"] = {
        "fused_ms": timed_ms(lambda: kernels.silu_mul(gate, up), device),
        "torch_ms": timed_ms(lambda: reference.silu_mul(gate, up), device),
        **compare(kernels.silu_mul(gate, up), reference.silu_mul(gate, up))}
    batch = 64 if device == "cuda" else 4
    x = (torch.randn(batch, 256, 32, 64, generator=g) * 4).to(device, torch.bfloat16).transpose(1, 2)
    cos, sin = (torch.rand(2, 1, 256, 64, generator=g) * 2 - 1).to(device, torch.bfloat16)
    if kernels.handles_rotary(x, cos, sin):
        table[f"rotary {batch}x32x256x64"] = {
            "fused_ms": timed_ms(lambda: kernels.rotary(x, cos, sin), device),
            "torch_ms": timed_ms(lambda: reference.rotary(x, cos, sin), device),
            **compare(kernels.rotary(x, cos, sin), reference.rotary(x, cos, sin))}
    for row in table.values():
        row["speedup"] = round(row["torch_ms"] / row["fused_ms"], 2) if row["fused_ms"] else None
    return table


def rotary_rounding(kernels, device: str) -> dict:
    """Which rounding the rotary kernel's output matches: its share bit-equal to transformers' way
    (three roundings) and to other orders (one rounding; a fused multiply-add), by half of the head."""
    import torch

    from attnfallback.fused_ops import TorchKernels

    g = torch.Generator(device="cpu").manual_seed(3)
    x = (torch.randn(4, 64, 8, 64, generator=g) * 4).to(device, torch.bfloat16).transpose(1, 2)
    cos, sin = (torch.rand(2, 1, 64, 64, generator=g) * 2 - 1).to(device, torch.bfloat16)
    ours = kernels.rotary(x, cos, sin)
    xf, c, s_ = x.float(), cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    rot = torch.cat((-xf[..., 32:], xf[..., :32]), dim=-1)
    bf = torch.bfloat16
    ways = {"transformers (three roundings)": TorchKernels().rotary(x, cos, sin),
            "one rounding": (xf * c + rot * s_).to(bf),
            "x*cos rounded, then fma": ((xf * c).to(bf).float() + rot * s_).to(bf),
            "rot*sin rounded, then fma": (xf * c + (rot * s_).to(bf).float()).to(bf)}
    results = {name: {"all": round(float((ours == ref).float().mean()), 4),
                   "first half": round(float((ours[..., :32] == ref[..., :32]).float().mean()), 4),
                   "second half": round(float((ours[..., 32:] == ref[..., 32:]).float().mean()), 4)} for name, ref in ways.items()}
    if kernels.name == "triton":  # the kernel with multiply-add contraction allowed, against transformers' way
        contracted = kernels.rotary(x, cos, sin, fp_fusion=True)
        results["kernel with fp fusion vs transformers"] = round(float((contracted == ways["transformers (three roundings)"]).float().mean()), 4)
    return results


def set_fused(scorer, on: bool, kernels) -> dict:
    from attnfallback.fused_ops import TorchKernels, fuse_modules, unfuse_modules

    task = scorer.task
    if not on:
        unfuse_modules(scorer.loaded.model)
        if hasattr(task, "token_logprobs"):
            task.token_logprobs, task.fused_head = TorchKernels().token_logprobs, False
        return {}
    report = fuse_modules(scorer.loaded.model, kernels).describe()
    if hasattr(task, "token_logprobs"):
        task.token_logprobs, task.fused_head = kernels.token_logprobs, True
    return report


def profile_forward(run, device: str, top_n: int = 10) -> dict:
    """GPU time by kind of kernel over one call of `run` (after one untimed), its `top_n` kernels,
    and the share of that call's wall time the GPU spent in kernels (`busy`)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0) if device == "cuda" else event.self_cpu_time_total
        if not us:
            continue
        kinds[kind_of(event.key)] = kinds.get(kind_of(event.key), 0.0) + us
        top.append((us, event.key[:110], event.count))
    total = sum(kinds.values()) or 1.0
    top.sort(reverse=True)
    return {"total_ms": round(total / 1e3, 2), "wall_ms": round(wall * 1e3, 1), "busy": round(total / 1e3 / (wall * 1e3), 3),
            "share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"ms": round(us / 1e3, 2), "share": round(us / total, 3), "kernel": name, "calls": count}
                    for us, name, count in top[:top_n]]}


def model_rows(name: str, args, kernels, workdir: Path) -> dict:
    import torch

    from attnfallback.scoring import ScoreJob, Scorer

    model_dir = build_model(name, workdir / name, device=args.device, layers=args.layers)
    job = ScoreJob(model=str(model_dir), task=MODELS[name], device=args.device,
                   dtype="bfloat16" if args.device == "cuda" else "float32", prefer="sdpa", quiet=True)
    scorer = Scorer.from_job(job)
    texts = stsb_documents(args.docs, 4.0, seed=1)
    if MODELS[name] == "pairs":  # a cross-encoder scores (query, document) pairs: a document's halves
        texts = [(t[: len(t) // 2], t[len(t) // 2:]) for t in texts]
    tokens = int(scorer.encoder.encode([as_row(t) for t in texts]).lengths.sum())
    entry = {"task": MODELS[name], "impl": scorer.decision.used, "docs": len(texts), "tokens": tokens,
             "fused_at_load": scorer.fused}
    loop = make_ours(scorer, texts, part_rows=8192)
    seconds: dict[str, list[float]] = {"unfused": [], "fused": []}
    for state in ("unfused", "fused"):  # warm-up of each
        entry[f"report_{state}"] = set_fused(scorer, state == "fused", kernels)
        loop()
    for _ in range(args.repeats):
        for state in ("unfused", "fused"):
            set_fused(scorer, state == "fused", kernels)
            sync(args.device)
            t0 = time.perf_counter()
            loop()
            sync(args.device)
            seconds[state].append(round(time.perf_counter() - t0, 4))
    entry["loop_s"] = seconds
    for state in ("unfused", "fused"):
        entry[f"{state}_tokens_per_s"] = round(tokens / statistics.median(seconds[state]), 1)
    entry["loop_speedup"] = round(statistics.median(seconds["unfused"]) / statistics.median(seconds["fused"]), 3)
    forward = make_gpu_only(scorer, texts[: args.profile_docs])
    for state in ("unfused", "fused"):
        set_fused(scorer, state == "fused", kernels)
        entry[f"profile_{state}"] = profile_forward(forward, args.device)
    # the outputs of the two ways on the same batches (the task's own columns)
    set_fused(scorer, False, kernels)
    plain = forward()
    set_fused(scorer, True, kernels)
    fused = forward()
    worst = {}
    for a, b in zip(plain, fused):
        for key, value in a.items():
            if hasattr(value, "float"):
                diff = float((value.float() - b[key].float()).abs().max())
                worst[key] = max(worst.get(key, 0.0), diff)
    entry["outputs_max_difference"] = worst
    del scorer, forward, loop
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--models", default="llama-1b-random,qwen3-0.6b-reward-random")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a dry run)")
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--profile-docs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernels", default="triton", choices=["triton", "torch"], help="torch: fused_ops.TorchKernels (a dry run)")
    ap.add_argument("--rotary-only", action="store_true", help="only the rotary kernel's rounding against other orders")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="bench/results/fused_loop.json")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fused-"))
    os.environ["TRITON_CACHE_DIR"] = str(Path(tempfile.mkdtemp(prefix="triton-cold-")))  # empty: the cold compile

    import torch

    from attnfallback.fused_ops import TorchKernels, triton_kernels

    kernels = triton_kernels() if args.kernels == "triton" else TorchKernels()
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "kernels": kernels.name, "argv": sys.argv[1:]}
    if args.kernels == "triton":
        import triton

        report["triton"] = triton.__version__
    report["cold_compile"] = cold_compile(kernels, args.device)
    print(json.dumps(report, indent=1), flush=True)
    if args.rotary_only:
        report["rotary_rounding"] = rotary_rounding(kernels, args.device)
        print(json.dumps(report["rotary_rounding"], indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        return
    report["kernel_table"] = kernel_table(kernels, args.device)
    for name, row in report["kernel_table"].items():
        print(f"{name:32} fused {row['fused_ms']:8.3f} ms  torch {row['torch_ms']:8.3f} ms  {row['speedup']:5.2f}x  "
              f"max diff {row['max_difference']:.3g}  bit-equal {row['bit_equal']:.4f}", flush=True)
    report["models"] = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        entry = report["models"][name] = model_rows(name, args, kernels, workdir)
        out.write_text(json.dumps(report, indent=2))
        print(f"{name} ({entry['task']}, {entry['impl']}, {entry['docs']} docs, {entry['tokens']:,} tokens): loop "
              f"unfused {entry['unfused_tokens_per_s']:,.0f} tok/s, fused {entry['fused_tokens_per_s']:,.0f} tok/s, "
              f"{entry['loop_speedup']:.3f}x; fused at load {entry['fused_at_load']}", flush=True)
        for state in ("unfused", "fused"):
            p = entry[f"profile_{state}"]
            print(f"  forward {state}: {p['total_ms']:.1f} ms GPU; " + ", ".join(f"{k} {v:.1%}" for k, v in p["share"].items()))
            for row in p["top"][:5]:
                print(f"      {row['ms']:9.2f} ms  {row['calls']:5}x  {row['kernel']}")
        print(f"  outputs, largest difference fused vs unfused: {entry['outputs_max_difference']}", flush=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
