"""Evidence for the attention choice on this GPU (issue 6), in one process:

1. parity of flash_attention_4 and sdpa against eager on the embedded model (`default`) over the
   STS-B test sentences in bf16, with the calibrated tolerance and the STS-B Spearman per
   implementation;
2. the attention kernels each implementation's verification forward ran (torch.profiler);
3. bench (tokens/s, compile apart) for the `short` and `long` length distributions, on `default`
   (512 positions: `long` is clipped there) and on a random Qwen2-0.5B-shape reward model
   (24 layers, 32k positions) unless --no-qwen;
4. which implementation policy `fastest` picks for each, measured from an empty cache, and a
   second load of the first case answered by the cache.

    python bench/parity_report.py [--rows N] [--seconds 3] [--budget 20] [--no-qwen]

Prints a table last and writes bench/results/parity_report-<UTC time>.json. A section that fails
is recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

IMPLS = ["flash_attention_4", "sdpa", "eager"]
DEVICE, DTYPE = "cuda", "bfloat16"  # --device/--dtype change them for a smoke run elsewhere
DISTRIBUTIONS = ["short", "long"]
QWEN_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                  vocab_size=151936, max_position_embeddings=32768, num_labels=1, pad_token_id=0)


def build_qwen_reward_model(directory: Path) -> Path:
    """A random Qwen2-0.5B-shape sequence classifier (one label) saved in bf16."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForSequenceClassification(Qwen2Config(**QWEN_SHAPE)).to(torch.bfloat16)
    model.save_pretrained(directory)
    return directory


def section(results: dict, name: str, fn):
    """Run one part of the report; record its error instead of losing the rest."""
    t0 = time.perf_counter()
    print(f"[{name}] ...", file=sys.stderr, flush=True)
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - one failed section must not cost the others
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def run_parity_section(rows: int | None) -> dict:
    from attnfallback.parity import read_texts, run_parity

    stsb = Path(str(resources.files("attnfallback.data") / "stsb-en-test.csv"))
    texts = read_texts(stsb, rows=rows)
    report = run_parity("default", texts, task="embed", impls=IMPLS[:2], reference="eager", dtype=DTYPE, device=DEVICE)
    return report.to_dict()


def run_kernels_section() -> dict:
    from attnfallback.kernels_seen import attention_kernels
    from attnfallback.loader import load_model
    from attnfallback.events import NULL_SINK
    from attnfallback.verify import switch_to
    from attnfallback.policy import Policy

    loaded = load_model("default", policy=Policy.graceful(["sdpa"]), dtype=DTYPE, device=DEVICE, sink=NULL_SINK)
    seen = {}
    for impl in IMPLS:
        actual, reasons = switch_to(loaded, impl)
        seen[impl] = {"reasons": reasons} if reasons else {"actual": actual, "kernels": attention_kernels(loaded.model, loaded.facts, loaded.device)}
    return seen


def run_bench_section(models: dict, seconds: float) -> dict:
    from attnfallback.bench import run_bench

    out = {}
    for label, (model, auto_class) in models.items():
        for dist in DISTRIBUTIONS:
            key = f"{label}/{dist}"
            print(f"  bench {key}", file=sys.stderr, flush=True)
            try:
                report = run_bench(model, impls=IMPLS, lengths=dist, seconds=seconds, dtype=DTYPE, device=DEVICE, auto_class=auto_class)
                out[key] = report.to_dict()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                out[key] = {"error": f"{type(e).__name__}: {e}"}
    return out


def run_fastest_section(models: dict, budget: float) -> dict:
    import dataclasses

    from attnfallback.loader import load_model
    from attnfallback.events import NULL_SINK
    from attnfallback.policy import Policy

    out = {}
    with tempfile.TemporaryDirectory(prefix="fastest-cache-") as cache:
        os.environ["ATTNFALLBACK_CACHE"] = cache
        first = None
        for label, (model, auto_class) in models.items():
            for dist in DISTRIBUTIONS:
                key = f"{label}/{dist}"
                print(f"  fastest {key}", file=sys.stderr, flush=True)
                policy = dataclasses.replace(Policy.fastest(IMPLS), fastest_budget_s=budget, extra={"fastest_sample": dist})
                try:
                    t0 = time.perf_counter()
                    loaded = load_model(model, policy=policy, dtype=DTYPE, device=DEVICE, auto_class=auto_class, sink=NULL_SINK)
                    out[key] = {"used": loaded.decision.used, "load_s": time.perf_counter() - t0, "measured": loaded.decision.measured,
                                "attempts": [a.to_dict() for a in loaded.decision.attempts]}
                    first = first or (key, model, auto_class, policy)
                    del loaded
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    out[key] = {"error": f"{type(e).__name__}: {e}"}
        if first is not None:
            key, model, auto_class, policy = first
            t0 = time.perf_counter()
            again = load_model(model, policy=policy, dtype=DTYPE, device=DEVICE, auto_class=auto_class, sink=NULL_SINK)
            out[f"{key} (again)"] = {"used": again.decision.used, "load_s": time.perf_counter() - t0, "measured": again.decision.measured}
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(results: dict) -> None:
    env = results.get("environment", {})
    print(f"\n== {env.get('gpu')} | torch {env.get('torch')} | transformers {env.get('transformers')} | flash-attn-4 {env.get('flash_attn_4')}")
    p = results.get("parity", {})
    if "error" in p:
        print(f"parity: {p['error']}")
    elif p:
        cal = p["calibration"] or {}
        print(f"\nparity vs eager, {p['dtype']}, {p['texts']} STS-B sentences ({p['rows']} pairs); tolerance {p['tolerance']:.2e} "
              f"(eager {p['dtype']} vs fp32: {cal.get('rel_l2_vs_fp32', float('nan')):.2e}; {cal.get('note', '')})")
        print(f"{'impl':<20}{'rel L2':>10}{'max abs':>10}{'min cos':>10}{'spearman':>10}{'kendall':>9}{'top10':>7}{'STS-B rho':>11}  verdict")
        print(f"{'eager (reference)':<20}{'':>10}{'':>10}{'':>10}{'':>10}{'':>9}{'':>7}{fmt(p['reference_label_spearman'], '.4f'):>11}")
        for name, r in p["results"].items():
            print(f"{name:<20}{r['rel_l2']:>10.2e}{r['max_abs']:>10.2e}{r['min_cosine']:>10.6f}{r['spearman']:>10.5f}{r['kendall']:>9.4f}"
                  f"{r['top_k_agreement']:>7.2f}{fmt(r.get('label_spearman'), '.4f'):>11}  {'within' if r['within_tolerance'] else 'OVER'}")
        for name, reasons in p["unavailable"].items():
            print(f"{name:<20}not run: {'; '.join(reasons)}")
    k = results.get("kernels", {})
    if k:
        print(f"\nkernels of the verification forward (default, {DTYPE})")
        for name, r in k.items():
            if "kernels" in r:
                shown = "not recorded off CUDA" if r["kernels"] is None else (", ".join(r["kernels"]) or "no attention kernel seen")
            else:
                shown = "not run: " + "; ".join(r.get("reasons", [r.get("error", "")]))
            print(f"  {name:<20}{shown}")
    b = results.get("bench", {})
    if b:
        print(f"\nbench ({DTYPE}; tokens/s = real tokens over the median pass; compile = warm-up minus a steady pass)")
        print(f"{'model/lengths':<22}{'sequences':>10}{'mean len':>9}{'impl':>20}{'tokens/s':>13}{'vs sdpa':>9}{'compile s':>11}")
        for key, r in b.items():
            if "error" in r:
                print(f"{key:<22}error: {r['error']}")
                continue
            w = r["workload"]
            sdpa = r["results"].get("sdpa", {}).get("tokens_per_s")
            for name, m in sorted(r["results"].items(), key=lambda kv: -kv[1]["tokens_per_s"]):
                ratio = m["tokens_per_s"] / sdpa if sdpa else None
                print(f"{key:<22}{w['sequences']:>10}{w['mean_length']:>9.0f}{name:>20}{m['tokens_per_s']:>13,.0f}{fmt(ratio, '.2f'):>9}{m['compile_s']:>11.2f}")
            for name, reasons in r["unavailable"].items():
                print(f"{key:<22}{'':>19}{name:>20}  not run: {'; '.join(reasons)[:90]}")
    f = results.get("fastest", {})
    if f:
        print("\npolicy fastest (budget per load; cache empty at first)")
        for key, r in f.items():
            if "error" in r:
                print(f"  {key:<28}error: {r['error']}")
                continue
            m = r["measured"] or {}
            speeds = ", ".join(f"{n} {v:,.0f}" for n, v in (m.get("tokens_per_s") or {}).items())
            compiles = ", ".join(f"{n} {v:.2f}" for n, v in (m.get("compile_s") or {}).items())
            print(f"  {key:<28}picks {r['used']:<18} cache {m.get('cache')}, load {r['load_s']:.1f} s; tokens/s: {speeds}; compile s: {compiles}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None, help="STS-B pairs for parity (default: all 1379)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per implementation in bench")
    ap.add_argument("--budget", type=float, default=20.0, help="policy fastest's time budget per load")
    ap.add_argument("--no-qwen", action="store_true", help="skip the Qwen2-0.5B-shape model")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: parity,kernels,bench,fastest")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from attnfallback.caps import probe

    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, args.dtype
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("parity_report needs a CUDA GPU (or --device cpu --dtype float32 for a smoke run)")
    caps = probe(DEVICE)
    results: dict = {"environment": {"gpu": caps.device.name, **caps.software.to_dict()}, "args": vars(args)}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    models = {"default": ("default", "AutoModel")}
    tmp = tempfile.TemporaryDirectory(prefix="qwen-shape-")
    if not args.no_qwen:
        section(results, "qwen_model", lambda: str(build_qwen_reward_model(Path(tmp.name) / "qwen2-0.5b-shape")))
        if isinstance(results["qwen_model"], str):
            models["qwen2-0.5b-shape"] = (results["qwen_model"], "AutoModelForSequenceClassification")
    if "parity" not in skip:
        section(results, "parity", lambda: run_parity_section(args.rows))
    if "kernels" not in skip:
        section(results, "kernels", run_kernels_section)
    if "bench" not in skip:
        section(results, "bench", lambda: run_bench_section(models, args.seconds))
    if "fastest" not in skip:
        section(results, "fastest", lambda: run_fastest_section(models, args.budget))
    tmp.cleanup()

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or f"bench/results/parity_report-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print_tables(results)
    print(f"\nfull results: {out}")


if __name__ == "__main__":
    main()
