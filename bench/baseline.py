"""What a user would otherwise run, as a whole process: the baseline side of bench/end_to_end.py.

    python bench/baseline.py --kind st-encode --model DIR --input in.jsonl --batch-sizes 32,64,128,256 --device cuda

kinds: st-encode (sentence-transformers `encode`), cross-encoder (sentence-transformers
`CrossEncoder.predict` on the a/b columns), hf-logprob (plain transformers: length-sorted padded
batches, log-softmax, the next tokens' log-probs summed per row), hf-classify (plain transformers
logits, length-sorted batches). The process reads its input (JSONL), imports, loads the model (bf16
on CUDA, sdpa, as the library's defaults are there), then scores every row once per batch size
(after one small warm-up batch), and prints one JSON line: the seconds since its parent started it
($BENCH_SPAWNED_AT, time.time()) to each phase's end, and each batch size's scoring seconds. Its
end-to-end time at a batch size is (start-up to loaded) + (that batch size's scoring): what the
process would have taken had it run that batch size alone, the later batch sizes running warm.
"""

from __future__ import annotations

import argparse
import json
import os
import time

SPAWNED_AT = float(os.environ.get("BENCH_SPAWNED_AT", time.time()))


def since_spawn() -> float:
    return round(time.time() - SPAWNED_AT, 4)


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", required=True, choices=["st-encode", "cross-encoder", "hf-logprob", "hf-classify"])
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--batch-sizes", default="32")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-length", type=int, default=512)
    args = p.parse_args()
    phases = {"python_s": since_spawn()}
    rows = read_rows(args.input)
    phases["read_s"] = since_spawn()

    import torch

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if args.kind in ("st-encode", "cross-encoder"):
        from sentence_transformers import CrossEncoder, SentenceTransformer

        phases["import_s"] = since_spawn()
        if args.kind == "st-encode":
            model = SentenceTransformer(args.model, device=args.device, local_files_only=True, model_kwargs=kwargs)
            texts = [r["text"] for r in rows]

            def score(bs, items):
                return model.encode(items, batch_size=bs, convert_to_numpy=True)
        else:
            model = CrossEncoder(args.model, device=args.device, local_files_only=True, max_length=args.max_length,
                                 model_kwargs=kwargs)
            texts = [(r["a"], r["b"]) for r in rows]

            def score(bs, items):
                return model.predict(items, batch_size=bs, convert_to_numpy=True, show_progress_bar=False)
    else:
        import transformers

        phases["import_s"] = since_spawn()
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        auto = transformers.AutoModelForCausalLM if args.kind == "hf-logprob" else transformers.AutoModelForSequenceClassification
        model = auto.from_pretrained(args.model, **kwargs).to(args.device).eval()
        texts = [r["text"] for r in rows]

        def score(bs, items):
            lengths = [len(t) for t in items]
            order = sorted(range(len(items)), key=lambda i: lengths[i])
            out = [None] * len(items)
            with torch.inference_mode():
                for start in range(0, len(order), bs):
                    idx = order[start:start + bs]
                    enc = tok([items[i] for i in idx], padding=True, truncation=True, max_length=args.max_length,
                              return_tensors="pt").to(args.device)
                    enc.pop("token_type_ids", None)
                    logits = model(**enc).logits.float()
                    if args.kind == "hf-logprob":
                        ids, mask = enc["input_ids"], enc["attention_mask"]
                        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
                        values = (logp * mask[:, 1:]).sum(dim=1)
                    else:
                        values = logits[:, 0]
                    for i, v in zip(idx, values.cpu().tolist()):
                        out[i] = v
            return out
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    phases["loaded_s"] = since_spawn()
    score(8, texts[:8])  # warm-up: the first CUDA kernels and allocations, paid once
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    phases["warm_s"] = since_spawn()
    per_batch_size = {}
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        t0 = time.perf_counter()
        score(bs, texts)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        per_batch_size[bs] = round(time.perf_counter() - t0, 4)
    print("BASELINE " + json.dumps({"kind": args.kind, "rows": len(rows), "phases": phases, "score_s": per_batch_size}), flush=True)


if __name__ == "__main__":
    main()
