"""load_model (graceful fallback from flash_attention_2, verification included) against a plain
from_pretrained(attn_implementation="sdpa"), on the same model, interleaved in one process.

    python bench/load_overhead.py [--model default] [--repeats 7] [--device cpu]

Prints a table last and writes bench/results/load_overhead.json. Target: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="bench/results/load_overhead.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoModel

    from attnfallback.loader import load_model
    from attnfallback.model_facts import resolve_ref
    from attnfallback.policy import Policy

    location = resolve_ref(args.model).location
    policy = Policy.graceful(["flash_attention_2", "sdpa", "eager"])

    def plain():
        m = AutoModel.from_pretrained(location, attn_implementation="sdpa", dtype=getattr(torch, args.dtype), local_files_only=True)
        m.to(args.device).eval()
        return m

    unverified = Policy(prefer=policy.prefer, verify=False)
    variants = {
        "plain from_pretrained(sdpa)": plain,
        "load_model graceful fa2->sdpa": lambda: load_model(args.model, policy=policy, device=args.device, dtype=args.dtype).model,
        "  same, verify=False": lambda: load_model(args.model, policy=unverified, device=args.device, dtype=args.dtype).model,
    }
    for fn in variants.values():  # warm caches (file system, imports, the weights' hash) for all
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["load_model graceful fa2->sdpa"] / med["plain from_pretrained(sdpa)"]
    ratio_unverified = med["  same, verify=False"] / med["plain from_pretrained(sdpa)"]
    result = {"ratio_without_verify": ratio_unverified, "model": args.model, "device": args.device, "repeats": args.repeats, "seconds": times, "median_s": med, "ratio": ratio, "target": 1.15}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'variant':<32} {'median s':>9}")
    for k, v in med.items():
        print(f"{k:<32} {v:>9.3f}")
    print(f"ratio load_model / plain: {ratio:.3f} (target <= 1.15); without the verification forward: {ratio_unverified:.3f}")


if __name__ == "__main__":
    main()
