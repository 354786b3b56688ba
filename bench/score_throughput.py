"""Scoring throughput, every variant in one process, same seeded data, same model, same device.

    python bench/score_throughput.py --device cpu --model default --data stsb
    python bench/score_throughput.py --device cuda --model bert-base-random --texts 20000 [--prefer sdpa] [--compare-packing]
    python bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 6000 --repeats 2
    python bench/score_throughput.py --device cuda --model qwen2-0.5b-random --texts 400 --mean-words 555 \
        --max-words 1900 --impls flash_attention_4,sdpa,eager --attention-bound --hf-impl sdpa --skip hf-dataset-order-bs32
    python bench/score_throughput.py --device cuda --model bert-base-random --texts 100000 --growth 1000,10000,100000
(bench/h100.sh runs them on the lent H100 in the order its calls allow; bench/NOTES.md has the figures.)

Variants (tokenization included unless said otherwise; model load excluded everywhere):
    st-encode-bs32 / st-encode-bs256   sentence-transformers `encode` (embedding models only)
    hf-dataset-order-bs32              plain transformers, input order, padded batches of 32
    hf-sorted-budget                   plain transformers, length-sorted token-budget batches, one thread
    attnfallback-score                 the `score` pipeline (Scorer.score_chunks + Arrow tables)
    forward-only-sorted                the forward alone on pre-tokenized sorted batches already on the
                                       device (on cuda: the GPU-only rate, the ceiling the pipeline is
                                       measured against)
`--impls a,b` repeats the last two for each attention implementation (set_attn_implementation, with
the budget and packing the pipeline would give it). Diagnostics: `--compare-packing` (packed
implementations also padded), `--attention-bound` (the forward with attention replaced by V: the
most any implementation can gain), `--prepared-ahead` (the pipeline on chunks tokenized before the
clock starts), `--switch-intervals` (under other GIL switch intervals). `--growth N,M,..` instead
runs `run_score` end to end on the first N, M, .. texts, the model loaded once.
On cuda it also measures the bf16 matmul rate (the second ceiling) and reports model FLOP use.

Random-weight models are built from configs (no hub) with the MiniLM tokenizer (vocab 30522):
bert-base-random = BERT-base shape (12 layers, hidden 768, 12 heads) with a sentence-transformers
mean-pooling config; qwen2-0.5b-random = Qwen2-0.5B shape (24 layers, hidden 896, 14 heads, 2 KV heads,
intermediate 4864) as a 1-label sequence classifier (a reward model), vocab_size 30522 to match
the MiniLM tokenizer (the real model has 151,936: only the embedding table differs in size).
transformers 5 loads that tokenizer for a qwen2 model as a Qwen2Tokenizer, which splits the
MiniLM vocabulary into about one token per character (about 4.3 tokens per word here): the
defaults below are set in words so that the token lengths match the workloads (mean ~64 tokens
for BERT, ~270 for the reward model; 580 words ~ 2.4k tokens for the long one).

Each variant runs once to warm up, then --repeats times interleaved; the median is reported.
Prints a table of tokens/s and ratios last; writes bench/results/score_throughput-*.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_models import copy_tokenizer, sentence_config, stsb_sentences  # noqa: E402
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three music river morning garden window language computer experiment "
    "measurement structure transformer attention sentence embedding benchmark throughput implementation"
).split()


# --- data ----------------------------------------------------------------------------------------

def synthetic_texts(n: int, mean_words: float, max_words: int, seed: int) -> list[str]:
    """Variable-length texts: word counts log-normal around `mean_words`, capped at `max_words`."""
    rng = random.Random(seed)
    sigma = 0.6
    mu = math.log(max(mean_words, 1.0)) - sigma * sigma / 2
    texts = []
    for _ in range(n):
        words = min(max(int(rng.lognormvariate(mu, sigma)), 1), max_words)
        texts.append(" ".join(rng.choice(WORDS) for _ in range(words)))
    return texts


def stsb_texts() -> list[str]:
    """Both sentences of every STS-B test pair (packaged copy, else ../shared)."""
    return stsb_sentences()


# --- models --------------------------------------------------------------------------------------

def build_random_model(kind: str, directory: Path) -> Path:
    """A random-weight model of a real shape, saved with the MiniLM tokenizer (no hub)."""
    import torch
    from transformers import BertConfig, BertModel, Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    if kind == "bert-base-random":
        model = BertModel(BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=512))
    elif kind == "qwen2-0.5b-random":
        model = Qwen2ForSequenceClassification(Qwen2Config(
            vocab_size=30522, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            intermediate_size=4864, max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True,
            num_labels=1, pad_token_id=0))
    else:
        raise SystemExit(f"unknown model {kind}")
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    if kind == "bert-base-random":
        sentence_config(directory, 768)
    return directory


# --- variants ------------------------------------------------------------------------------------

def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_st_variant(model_dir: str, device: str, dtype, impl: str, batch_size: int, texts: list[str]):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device=device, local_files_only=True,
                             model_kwargs={"dtype": dtype, "attn_implementation": impl})

    def run():
        st.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    return run


def make_hf_dataset_order(scorer, texts: list[str], batch_size: int):
    """The loop most people write: input order, pad each batch of 32, copy each output back."""
    import torch

    tok, task, device, max_length = scorer.loaded.tokenizer, scorer.task, scorer.device, scorer.max_length

    def run():
        outs = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                batch = {k: v.to(device) for k, v in enc.items()}
                result = task.forward(batch)
                outs.append({k: v.cpu() for k, v in result.items()})
        return outs
    return run


def make_hf_sorted(scorer, texts: list[str]):
    """Plain transformers with the same length-sorted token-budget batches, no threads, no pinning."""
    import numpy as np
    import torch

    from attnfallback.batching import length_order, plan_batches

    tok, task, device, max_length = scorer.loaded.tokenizer, scorer.task, scorer.device, scorer.max_length

    def run():
        enc = tok(texts, truncation=True, max_length=max_length, padding=False)
        lengths = np.array([len(x) for x in enc["input_ids"]])
        order = length_order(lengths)
        outs = []
        with torch.inference_mode():
            for s in plan_batches(lengths[order], scorer.batch_tokens, scorer.max_cells):
                rows = order[s.start:s.stop]
                feats = [{k: enc[k][i] for k in enc.keys()} for i in rows]
                batch = tok.pad(feats, return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items()}
                result = task.forward(batch)
                outs.append({k: v.cpu() for k, v in result.items()})
        return outs
    return run


def as_row(text) -> tuple:
    """A text, or a pair already as a tuple, as the one row a Chunk holds."""
    return text if isinstance(text, tuple) else (text,)


def make_ours(scorer, texts: list[str], part_rows: int, prepared_ahead: bool = False, tokenizer_process: str = "auto",
              first_part_rows: int | None = None):
    """The pipeline. prepared_ahead: every chunk (and piece) tokenized and batched before the clock
    starts, so the worker thread only hands them over: what the tokenizing thread's CPU and GIL
    time costs the forward thread is the difference to the plain variant. tokenizer_process: the
    pipeline's (auto: on CUDA, tokenizing in a child process) or off (in the worker thread)."""
    from attnfallback.scoring.job import FIRST_PART_ROWS, part_sizes
    from attnfallback.scoring.chunks import Chunk
    from attnfallback.scoring.pipeline import build_table

    schema = scorer.output_schema
    chunks, start = [], 0
    for i, size in enumerate(part_sizes(part_rows, first_part_rows or FIRST_PART_ROWS)):  # the parts `score` makes
        if start >= len(texts):
            break
        stop = min(start + size, len(texts))
        chunks.append(Chunk(i, list(range(start, stop)), [as_row(t) for t in texts[start:stop]]))
        start = stop
    cache: dict = {}
    real_prepare_pieces = scorer.prepare_pieces

    def cached_prepare_pieces(chunk):
        key = (chunk.index, chunk.ids[0] if chunk.ids else None, len(chunk))
        if key not in cache:
            cache[key] = list(real_prepare_pieces(chunk))
        return iter(cache[key])

    def run():
        rows = 0
        if prepared_ahead:
            scorer.prepare_pieces = cached_prepare_pieces
        before, scorer.tokenizer_process = scorer.tokenizer_process, tokenizer_process
        try:
            for result in scorer.score_chunks(iter(chunks)):
                rows += build_table(schema, result.chunk.ids, result).num_rows
        finally:
            scorer.__dict__.pop("prepare_pieces", None)
            scorer.tokenizer_process = before
        assert rows == len(texts)
    if prepared_ahead:
        run()  # fills the cache (the warm-up run repeats this)
    return run


def with_switch_interval(seconds: float, run):
    """`run` under another GIL switch interval (how long a thread waiting for the GIL waits at most
    before the holder is asked to drop it; 5 ms by default), restored afterwards."""
    def wrapped():
        before = sys.getswitchinterval()
        sys.setswitchinterval(seconds)
        try:
            return run()
        finally:
            sys.setswitchinterval(before)
    return wrapped


def make_gpu_only(scorer, texts: list[str]):
    """Pre-tokenized, length-sorted batches already on the device: the forward pass alone."""
    import torch

    prepared = scorer.prepare(__import__("attnfallback.scoring.chunks", fromlist=["Chunk"]).Chunk(0, list(range(len(texts))), [as_row(t) for t in texts]))
    batches = [{k: v.to(scorer.device) if hasattr(v, "to") else v for k, v in b.tensors.items()} for b in prepared.batches]
    sync(str(scorer.device))

    def run():
        with torch.inference_mode():
            outs = [scorer.task.forward(b) for b in batches]
        sync(str(scorer.device))
        return outs
    return run


NO_ATTENTION = "bench_no_attention"


def register_no_attention() -> None:
    """An attention function that returns V as it is (repeated over query heads): the rest of the
    forward at its full cost, attention at none. Packs too (it never mixes positions)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from attnfallback.scoring import collate

    def no_attention(module, query, key, value, attention_mask, *args, **kwargs):
        if value.shape[1] != query.shape[1]:
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        return value.transpose(1, 2).contiguous(), None

    AttentionInterface.register(NO_ATTENTION, no_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NO_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    if NO_ATTENTION not in collate.PACKING_IMPLS:
        collate.PACKING_IMPLS = collate.PACKING_IMPLS + (NO_ATTENTION,)


def growth_run(scorer, job_kwargs: dict, texts: list[str], n: int, workdir: Path, label: str) -> dict:
    """One `run_score` end to end on the first `n` texts: tokens/s and where the time went (the
    pipeline's own account: prepare on the worker, waiting for it, launching, finishing; and the
    part outside the scoring loop: input checks, the final file)."""
    from attnfallback.scoring import ScoreJob, run_score

    path, out = workdir / f"growth-{n}.jsonl", workdir / f"growth-{n}.parquet"
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts[:n]:
            fh.write(json.dumps({"text": t}) + "\n")
    for key in scorer.timing:
        scorer.timing[key] = 0.0
    t0 = time.perf_counter()
    result = run_score(ScoreJob(input=str(path), output=str(out), **job_kwargs), scorer=scorer)
    wall = time.perf_counter() - t0
    assert result.rows_written == n
    out.unlink()
    loop_s = result.tokens / result.tokens_per_s if result.tokens_per_s else 0.0
    run = {"wall_s": wall, "tokens": result.tokens, "tokens_per_s": result.tokens / wall, "padded_tokens": result.padded_tokens,
           "loop_tokens_per_s": result.tokens_per_s, "outside_loop_s": wall - loop_s, **{k: round(v, 4) for k, v in scorer.timing.items()}}
    print(f"growth {n}{label}: {result.tokens / wall:,.0f} tokens/s end to end, {run}", file=sys.stderr, flush=True)
    return run


def growth_table(first: dict[int, dict], runs: dict[int, list[dict]]) -> dict:
    """Medians per size of the runs after round 0 (kept as `first_run`), and max / min tokens/s."""
    table = {}
    for n, rs in runs.items():
        table[n] = {"texts": n, "tokens": rs[0]["tokens"], "median_wall_s": statistics.median(r["wall_s"] for r in rs),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "loop_tokens_per_s": statistics.median(r["loop_tokens_per_s"] for r in rs),
                    "first_run_tokens_per_s": first[n]["tokens"] / first[n]["wall_s"], "first_run": first[n], "runs": rs}
    rates = [v["tokens_per_s"] for v in table.values()]
    loop_rates = [v["loop_tokens_per_s"] for v in table.values()]
    return {"sizes": table, "max_over_min": max(rates) / min(rates), "loop_max_over_min": max(loop_rates) / min(loop_rates)}


def run_growth(scorer, job_kwargs: dict, texts_for_round, sizes: list[int], repeats: int, workdir: Path,
               variants: list[dict] | None = None) -> dict:
    """`run_score` end to end (input file read, parts written) on the first N texts of a round's
    texts (`texts_for_round(i)`) for each N, the model loaded once: tokens/s per size. Round 0 runs
    every size once, in a process that has not run anything yet (kept as `first_run`); the medians
    come from the rounds after it. With fresh texts each round, every run meets lengths, so batch
    shapes, it has not seen, as each shard of a sweep does.

    `variants` (see `apply_variant`): each round runs every variant in turn, each on texts of its
    own, so that what drifts during the process falls on all of them alike; one table each."""
    variants = variants or [{}]
    first: list[dict[int, dict]] = [{} for _ in variants]
    runs: list[dict[int, list[dict]]] = [{n: [] for n in sizes} for _ in variants]
    for attempt in range(repeats + 1):
        for v, variant in enumerate(variants):
            if len(variants) > 1:
                apply_variant(scorer, variant)
            texts = texts_for_round(attempt * len(variants) + v)
            for n in sizes:
                label = (" (first run)" if not attempt else "") + (f" [{variant_name(variant)}]" if len(variants) > 1 else "")
                run = growth_run(scorer, job_kwargs, texts, n, workdir, label)
                if attempt:
                    runs[v][n].append(run)
                else:
                    first[v][n] = run
    if len(variants) > 1:
        apply_variant(scorer, {})
    tables = [growth_table(f, r) for f, r in zip(first, runs)]
    return tables[0] if len(variants) == 1 else {variant_name(v): t for v, t in zip(variants, tables)}


def greedy_plan(sorted_lengths, batch_tokens: int, max_cells=None, max_rows=None, floor_tokens=None, overhead_tokens=None,
                cut_ratio: float = 0.85):
    """Sessions 1-5's batches, for comparison: each as full as the budget allows, closed early
    (once it holds batch_tokens / 8) before the first row shorter than `cut_ratio` x its longest.
    Takes plan_batches' arguments, so it can stand in for it; the floor and overhead are not used."""
    import numpy as np

    from attnfallback.batching import BatchSlice

    lengths = np.maximum(np.asarray(sorted_lengths, dtype=np.int64), 1)
    n, min_fill, batches, start = len(lengths), max(batch_tokens // 8, 1), [], 0
    while start < n:
        length = int(lengths[start])
        rows = max(batch_tokens // length, 1)
        if max_cells is not None:
            rows = min(rows, max(max_cells // (length * length), 1))
        if max_rows is not None:
            rows = min(rows, max_rows)
        stop = min(start + rows, n)
        first_optional = start + max(min_fill // length, 1)
        if first_optional < stop:
            shorter = np.flatnonzero(lengths[first_optional:stop] < cut_ratio * length)
            if len(shorter):
                stop = first_optional + int(shorter[0])
        batches.append(BatchSlice(start, stop, length))
        start = stop
    return batches


def parse_variants(text: str) -> list[dict]:
    """`floor=16,overhead=0;planner=greedy;lead=8-4-2` -> [{"floor": 16, "overhead": 0}, {"planner": "greedy"},
    {"lead": "8-4-2"}]. lead: the first part whole, or in pieces of 1/8, 1/4, 1/2 of its characters (then the rest)."""
    variants = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        variant = {}
        for item in part.split(","):
            key, _, value = item.partition("=")
            numeric = key in ("floor", "overhead") and value.isdigit()
            lead = key == "lead" and (value == "whole" or all(d.isdigit() and int(d) > 0 for d in value.split("-")))
            if not (numeric or lead or (key == "planner" and value in ("dp", "greedy"))):
                sys.exit(f"--variants: expected floor=N, overhead=N, planner=dp|greedy or lead=whole|N-N-..., found {item!r}")
            variant[key] = int(value) if numeric else value
        variants.append(variant)
    return variants


def variant_name(variant: dict) -> str:
    return ",".join(f"{k}={x}" for k, x in variant.items()) or "default"


def apply_variant(scorer, variant: dict) -> None:
    """Set plan_batches' floor and overhead (divisors of the budget; overhead 0: none) or sessions
    1-5's greedy batches instead; lead=whole prepares the first part whole (sessions 1-6)."""
    from attnfallback.scoring import pipeline
    from attnfallback.batching import plan_batches

    lead = variant.get("lead")
    if lead is None:
        scorer.lead_fractions = pipeline.LEAD_FRACTIONS if scorer.on_cuda else ()
    else:
        scorer.lead_fractions = () if lead == "whole" else tuple(1 / int(d) for d in lead.split("-"))

    scorer.floor_tokens = scorer.batch_tokens // variant["floor"] if "floor" in variant else None
    overhead = variant.get("overhead")
    scorer.overhead_tokens = None if overhead is None else (scorer.batch_tokens // overhead if overhead else 0)
    pipeline.plan_batches = greedy_plan if variant.get("planner") == "greedy" else plan_batches


def matmul_tflops(device: str, seconds: float = 2.0) -> float | None:
    """The bf16 matmul rate this GPU reaches (8192^3), TFLOP/s."""
    import torch

    if not device.startswith("cuda"):
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        count += 10
        torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e12


def model_flops_per_token(model) -> float:
    """2 x parameters outside the embeddings (the matmul work per token; attention scores excluded)."""
    total = 0
    for name, p in model.named_parameters():
        if "embed" in name:
            continue
        total += p.numel()
    return 2.0 * total


# --- main ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="default", choices=["default", "bert-base-random", "qwen2-0.5b-random"])
    ap.add_argument("--data", default=None, choices=["stsb", "synthetic"], help="default: stsb for `default`, else synthetic")
    ap.add_argument("--texts", type=int, default=None, help="synthetic texts (default 20000 on cuda, 2000 on cpu)")
    ap.add_argument("--mean-words", type=float, default=None, help="mean words per text (default 55 ~ 64 tokens; 63 ~ 270 tokens for qwen2)")
    ap.add_argument("--max-words", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--prefer", default=None, help="attention preference for the loader (default: the library's)")
    ap.add_argument("--impls", default=None, help="also run ours and gpu-only with each of these implementations")
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None, help="default: the model's (8192 for qwen2-0.5b-random)")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--hf-impl", default=None, help="attention implementation of the plain-transformers variants (default: score's)")
    ap.add_argument("--part-rows", type=int, default=8192)
    ap.add_argument("--first-part-rows", type=int, default=None, help="the first part's rows (default: score's, 1024)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated variants to leave out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--switch-intervals", default=None,
                    help="e.g. 0.0005,0.0001: also run the pipeline under these GIL switch intervals (seconds)")
    ap.add_argument("--prepared-ahead", action="store_true",
                    help="also run the pipeline on chunks tokenized before the clock starts (what the worker costs)")
    ap.add_argument("--compare-packing", action="store_true", help="where batches are packed, also run them padded")
    ap.add_argument("--compare-tokenizer-thread", action="store_true",
                    help="also run score with --tokenizer-process off (tokenizing in the worker thread)")
    ap.add_argument("--attention-bound", action="store_true",
                    help="also run the forward with attention replaced by a copy of V (the most any implementation can gain)")
    ap.add_argument("--growth", default=None, help="e.g. 1000,10000,100000: only run `run_score` end to end on that many "
                                                   "texts each, model loaded once (growth of tokens/s with the data)")
    ap.add_argument("--growth-texts", default="fresh", choices=["fresh", "same"],
                    help="fresh: each round of --growth scores new texts (new lengths, so new batch shapes, as every "
                         "shard of a sweep brings); same: every round the same texts (sessions 2-4)")
    ap.add_argument("--variants", default=None,
                    help="with --growth: run it for each of these in turn, e.g. 'planner=greedy;floor=8,overhead=0;floor=16' "
                         "(plan_batches' floor and overhead as divisors of the budget, or sessions 1-5's greedy batches)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from attnfallback.verify import torch_dtype
    from attnfallback.scoring import ScoreJob, Scorer

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    is_embedder = args.model in ("default", "bert-base-random")
    data = args.data or ("stsb" if args.model == "default" else "synthetic")
    if data == "stsb":
        texts = stsb_texts()
    else:
        n = args.texts or (20000 if device == "cuda" else 2000)
        mean_words = args.mean_words or (55 if is_embedder else 63)
        texts = synthetic_texts(n, mean_words, args.max_words or int(mean_words * 8), args.seed)

    tmp = tempfile.TemporaryDirectory(prefix="score-bench-")
    model_ref = "default" if args.model == "default" else str(build_random_model(args.model, Path(tmp.name) / args.model))
    task = "embed" if is_embedder else "classify"
    max_length = args.max_length or (None if is_embedder else 8192)
    job = ScoreJob(model=model_ref, task=task, device=device, dtype=dtype, prefer=args.prefer, batch_tokens=args.batch_tokens,
                   max_length=max_length, quiet=True)
    scorer = Scorer.from_job(job)
    model_dir = scorer.loaded.facts.ref.location
    impl = scorer.decision.used
    tokens = int(scorer.encoder.encode([(t,) for t in texts]).lengths.sum())
    skip = set(filter(None, args.skip.split(",")))

    if args.growth:
        sizes = sorted({int(x) for x in args.growth.split(",")})
        if max(sizes) > len(texts):
            sys.exit(f"--growth {max(sizes)} needs --texts >= {max(sizes)}")
        job_kwargs = dict(model=model_ref, task=task, device=device, dtype=dtype, prefer=args.prefer,
                          batch_tokens=args.batch_tokens, max_length=max_length, quiet=True,
                          **({"first_part_rows": args.first_part_rows} if args.first_part_rows else {}))
        if args.growth_texts == "fresh" and data == "synthetic":
            def texts_for_round(attempt: int) -> list[str]:
                return synthetic_texts(max(sizes), mean_words, args.max_words or int(mean_words * 8), args.seed + 1 + attempt)
        else:
            def texts_for_round(attempt: int) -> list[str]:
                return texts
        if args.variants:
            table = run_growth(scorer, job_kwargs, texts_for_round, sizes, args.repeats, Path(tmp.name), parse_variants(args.variants))
            out = Path(args.out) if args.out else REPO / "bench" / "results" / f"score_growth_variants-{args.model}-{device}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"mode": "growth-variants", "model": args.model, "argv": sys.argv[1:], "variants": table}, indent=2))
            print(f"{args.model} on {device}: run_score end to end, model loaded once, variants in turn each round, "
                  f"median of {args.repeats}, tokens/s (padded per real token)")
            print(f"{'variant':<28}" + "".join(f"{n:>22,}" for n in sizes) + f"{'max/min':>9}")
            for name, growth in table.items():
                cells = "".join(f"{v['tokens_per_s']:>13,.0f} ({v['runs'][0]['padded_tokens'] / v['runs'][0]['tokens']:.3f})"
                                for v in growth["sizes"].values())
                print(f"{name:<28}{cells}{growth['max_over_min']:>9.3f}")
            print(f"written to {out}")
            return
        growth = run_growth(scorer, job_kwargs, texts_for_round, sizes, args.repeats, Path(tmp.name))
        result = {"mode": "growth", "growth_texts": args.growth_texts if data == "synthetic" else "same", "model": args.model, "task": task, "device": device, "dtype": dtype, "impl": impl,
                  "packing": scorer.packing_note, "tokenizer": scorer.tokenizer_note, "data": data, "repeats": args.repeats, "argv": sys.argv[1:],
                  "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
                  "versions": scorer.decision.versions, **growth}
        out = Path(args.out) if args.out else REPO / "bench" / "results" / f"score_growth-{args.model}-{device}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"{args.model} ({task}, {dtype}, {impl}, packing {scorer.packing_note}) on {result['device_name']}: "
              f"run_score end to end, model loaded once, median of {args.repeats}, {result['growth_texts']} texts each round")
        print(f"{'texts':>8} {'tokens':>11} {'padded':>11} {'wall s':>8} {'tokens/s':>11} {'loop tokens/s':>14} {'first run':>11}")
        for n, v in growth["sizes"].items():
            print(f"{n:>8,} {v['tokens']:>11,} {v['runs'][0]['padded_tokens']:>11,} {v['median_wall_s']:>8.3f} "
                  f"{v['tokens_per_s']:>11,.0f} {v['loop_tokens_per_s']:>14,.0f} {v['first_run_tokens_per_s']:>11,.0f}")
        print(f"max / min tokens/s: {growth['max_over_min']:.3f} end to end, {growth['loop_max_over_min']:.3f} in the scoring loop")
        print(f"written to {out}")
        return

    variants: dict[str, object] = {}
    if is_embedder:
        for bs in (32, 256):
            name = f"st-encode-bs{bs}"
            if name not in skip:
                variants[name] = make_st_variant(model_dir, device, torch_dtype(dtype), impl, bs, texts)
    def switch(target: str, packing: str = "auto"):
        """The implementation, its packing, and the budget the pipeline would give it (eager: its own)."""
        scorer.use_implementation(target, packing)

    # plain transformers runs on the implementation `score` chose unless --hf-impl says otherwise
    hf_impl = args.hf_impl or impl
    hf_tag = "" if hf_impl == impl else f" [{hf_impl}]"

    to_hf_impl = functools.partial(switch, hf_impl)
    if f"hf-dataset-order-bs{args.hf_batch}" not in skip:
        variants[f"hf-dataset-order-bs{args.hf_batch}" + hf_tag] = (to_hf_impl, make_hf_dataset_order(scorer, texts, args.hf_batch))
    if "hf-sorted-budget" not in skip:
        variants["hf-sorted-budget" + hf_tag] = (to_hf_impl, make_hf_sorted(scorer, texts))
    impls = [i.strip() for i in args.impls.split(",")] if args.impls else [impl]
    ours_names, gpu_names = {}, {}
    packing_notes = {}

    for name_impl in impls:
        switch(name_impl)
        packing_notes[name_impl] = scorer.packing_note
        ways = [("auto", "")]
        if scorer.pack and args.compare_packing:
            ways.append(("off", "padded"))
        for packing, label in ways:
            switch(name_impl, packing)
            tags = ([name_impl] if len(impls) > 1 else []) + ([label] if label else [])
            suffix = f" [{', '.join(tags)}]" if tags else ""
            to_this = functools.partial(switch, name_impl, packing)
            variants["attnfallback-score" + suffix] = (to_this, make_ours(scorer, texts, args.part_rows, first_part_rows=args.first_part_rows))
            if not label:
                ours_names[name_impl] = "attnfallback-score" + suffix
            if args.switch_intervals and not label:
                for interval in [float(x) for x in args.switch_intervals.split(",")]:
                    variants[f"attnfallback-score [switch interval {interval * 1000:g} ms]" + suffix] = (
                        to_this, with_switch_interval(interval, make_ours(scorer, texts, args.part_rows, first_part_rows=args.first_part_rows)))
            if args.prepared_ahead and not label:
                variants["attnfallback-score [prepared ahead]" + suffix] = (to_this, make_ours(scorer, texts, args.part_rows, True, first_part_rows=args.first_part_rows))
            if args.compare_tokenizer_thread and not label:
                variants["attnfallback-score [tokenizer in a thread]" + suffix] = (
                    to_this, make_ours(scorer, texts, args.part_rows, tokenizer_process="off", first_part_rows=args.first_part_rows))
            if "forward-only-sorted" not in skip:
                variants["forward-only-sorted" + suffix] = (to_this, make_gpu_only(scorer, texts))
                if not label:
                    gpu_names[name_impl] = "forward-only-sorted" + suffix
    if args.attention_bound:
        # the forward with attention replaced by a copy of V: what every other layer costs. No
        # attention implementation can make these batches faster than this (Amdahl's bound).
        register_no_attention()
        for packing, label in (("off", "padded"), ("auto", "packed")):
            switch(NO_ATTENTION, packing)
            if packing == "auto" and not scorer.pack:
                continue
            variants[f"forward-only-sorted [no attention, {label}]"] = (functools.partial(switch, NO_ATTENTION, packing),
                                                                     make_gpu_only(scorer, texts))
    switch(impl)

    def call(fn):
        if isinstance(fn, tuple):
            fn[0]()
            fn = fn[1]
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    failures = {}
    for name, fn in list(variants.items()):  # warm-up
        try:
            call(fn)
        except torch.OutOfMemoryError as e:
            failures[name] = f"out of memory: {str(e).splitlines()[0]}"
            del variants[name]
            torch.cuda.empty_cache()
        print(f"warmed {name}", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(call(fn))
    switch(impl)

    # the pipeline's own account of one run (the last): prepare (worker thread), waiting for the
    # worker, launching on the device, finishing chunks (finisher thread on cuda)
    for key in scorer.timing:
        scorer.timing[key] = 0.0
    main_impl = [v for k, v in variants.items() if k.startswith("attnfallback-score")][:1]
    pipeline_timing = None
    if main_impl:
        wall = call(main_impl[0])
        pipeline_timing = {"wall_s": wall, **{k: round(v, 4) for k, v in scorer.timing.items()}}

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: tokens / v for k, v in med.items()}
    flops_per_token = model_flops_per_token(scorer.loaded.model)
    peak = matmul_tflops(device)
    ours_main = ours_names.get(impl) or next(iter(ours_names.values()))
    ratios = {}
    for name in rate:
        if name != ours_main:
            ratios[f"{ours_main} / {name}"] = rate[ours_main] / rate[name]
    for name_impl, gname in gpu_names.items():
        if gname in rate and ours_names[name_impl] in rate:
            ratios[f"{ours_names[name_impl]} / {gname}"] = rate[ours_names[name_impl]] / rate[gname]

    result = {
        "model": args.model, "model_dir": model_dir, "task": task, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "dtype": dtype, "impl": impl, "impls": impls, "data": data,
        "texts": len(texts), "tokens": tokens, "mean_tokens": tokens / len(texts), "batch_tokens": scorer.batch_tokens,
        "max_length": scorer.max_length, "repeats": args.repeats, "seconds": times, "median_s": med, "tokens_per_s": rate,
        "ratios": ratios, "failures": failures, "bf16_matmul_tflops": peak, "model_flops_per_token": flops_per_token,
        "mfu": {k: (v * flops_per_token / 1e12) / peak for k, v in rate.items()} if peak else None,
        "pipeline_timing": pipeline_timing, "versions": scorer.decision.versions, "argv": sys.argv[1:],
        "packing": packing_notes, "tokenizer": scorer.tokenizer_note,
    }
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"score_throughput-{args.model}-{device}-{data}-{len(texts)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"{args.model} ({task}, {dtype}, {impl}, packing {packing_notes.get(impl, '-')}) on {result['device_name']}, {len(texts)} texts, {tokens:,} tokens "
                  f"(mean {tokens / len(texts):.0f}), batch_tokens {scorer.batch_tokens}, median of {args.repeats}")
    if peak:
        console.print(f"bf16 matmul: {peak:.0f} TFLOP/s; model {flops_per_token / 1e9:.2f} GFLOP/token")
    table = Table("variant", "seconds", "tokens/s", f"{ours_main} is x faster" + (" / MFU" if peak else ""), box=None)
    for name in rate:
        rel = rate[ours_main] / rate[name]
        extra = f" / {result['mfu'][name] * 100:.0f}%" if peak else ""
        table.add_row(escape(name), f"{med[name]:.3f}", f"{rate[name]:,.0f}", f"{rel:.2f}{extra}")
    for name, why in failures.items():
        table.add_row(escape(name), "-", "-", escape(why))
    console.print(table)
    for k, v in ratios.items():
        console.print(escape(f"  {k}: {v:.2f}"))
    if pipeline_timing:
        console.print("  pipeline, one more run: " + ", ".join(f"{k} {v:.3f}" for k, v in pipeline_timing.items())
                      + f"; tokenizing {scorer.tokenizer_note}")
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
