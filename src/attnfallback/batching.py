"""Token-budget batching: a stable length sort, batches bounded by padded tokens, and the
inverse permutation that puts the outputs back in input order.

Pure functions over lengths (numpy); no torch here, so they are cheap to test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnfallback.model_facts import text_config

# Default token budgets (padded tokens per batch, rows x longest row). Eager materialises the
# L x L attention scores of every head, so it gets a smaller budget and a bound on those cells.
CPU_BATCH_TOKENS = 2048
CUDA_BATCH_TOKENS = 65536
CUDA_EAGER_BATCH_TOKENS = 16384
EAGER_SCORE_BYTES = 1 << 30  # rows x heads x L x L x 4 bytes per batch
FLOOR_DIVISOR = 8  # see plan_batches
OVERHEAD_DIVISOR = 64


# CUDA, non-eager, when the model's feed-forward width is known: the budget that keeps one
# feed-forward activation (tokens x intermediate_size) at this many elements, 1.5 GiB in bf16.
# Fewer, larger batches mean fewer kernel launches per token, which is what a small model's
# forward waits on (H100, BERT-base, 20k texts: 838k tokens/s at 64k tokens a batch, 1.13M at
# 256k; Qwen2-0.5B: 296k at 64k, 308k at 128k; bench/NOTES.md, session 2).
CUDA_FFN_ELEMENTS = 262144 * 3072

# plan_batches prices a batch in tokens: its padded tokens (at least a floor) plus a per-forward
# overhead. What a forward costs beyond its tokens hardly grows with the model, while a token's cost
# grows with its parameters, so for a heavier model the same overhead is fewer tokens and cutting
# where the length drops pays sooner: the floor and overhead are divided by the model's body
# parameters (without its embeddings) over CUT_REFERENCE_PARAMS, from 1 up to CUT_MAX_SCALE. H100,
# Llama-1B (1B in its body): cuts 4x finer took its padding from 12.1% to 4.5% and its loop 3.5%
# faster (bench/NOTES.md, session 24); Qwen2-0.5B gained nothing from 2-8x finer (session 7).
CUT_REFERENCE_PARAMS = 250e6
CUT_MAX_SCALE = 8.0
CUDA_MIN_BATCH_TOKENS = 16384
CUDA_MAX_BATCH_TOKENS = 262144


def default_batch_tokens(device_kind: str, impl: str | None, intermediate_size: int | None = None) -> int:
    """The default padded-token budget for this device, attention implementation and model width.

    CUDA: eager gets its own small budget; otherwise, given the model's feed-forward width, the
    budget holding one feed-forward activation at CUDA_FFN_ELEMENTS (BERT-base 256k tokens,
    Qwen2-0.5B 160k, a 7B model's 14336-wide layers 48k), else 64k.
    """
    if device_kind == "cuda":
        if impl == "eager":
            return CUDA_EAGER_BATCH_TOKENS
        if intermediate_size and intermediate_size > 0:
            budget = CUDA_FFN_ELEMENTS // int(intermediate_size) // 8192 * 8192
            return max(CUDA_MIN_BATCH_TOKENS, min(CUDA_MAX_BATCH_TOKENS, budget))
        return CUDA_BATCH_TOKENS
    return CPU_BATCH_TOKENS


def ffn_width(config) -> int | None:
    """The feed-forward width of a transformers config (its text config), if it says."""
    text = text_config(config)
    for name in ("intermediate_size", "ffn_dim", "n_inner", "d_ff"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    hidden = getattr(text, "hidden_size", None)
    return 4 * hidden if isinstance(hidden, int) and hidden > 0 else None


def eager_max_cells(impl: str | None, num_heads: int | None) -> int | None:
    """For eager: the most rows x L x L cells a batch may hold (None: no such bound)."""
    if impl != "eager":
        return None
    heads = max(int(num_heads or 1), 1)
    return max(EAGER_SCORE_BYTES // (4 * heads), 1)


def body_parameters(model) -> int:
    """The parameters of `model` outside its input and output embeddings (what a padded token
    costs is the body's; the logprob head runs on real positions only)."""
    skip = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            skip.update(id(p) for p in module.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def cut_scale(body_params: int | None) -> float:
    """How many times finer than the defaults plan_batches cuts for a model of `body_params`."""
    if not body_params or body_params <= CUT_REFERENCE_PARAMS:
        return 1.0
    return min(CUT_MAX_SCALE, body_params / CUT_REFERENCE_PARAMS)


def cut_costs(batch_tokens: int, scale: float = 1.0) -> tuple[int, int]:
    """plan_batches' (floor, per-batch overhead) in tokens for this budget and cut scale."""
    scale = max(float(scale), 1.0)
    return max(int(batch_tokens / (FLOOR_DIVISOR * scale)), 1), int(batch_tokens / (OVERHEAD_DIVISOR * scale))


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Row indices sorted longest first; ties keep input order (stable)."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


def inverse_permutation(order: np.ndarray) -> np.ndarray:
    """`inv` such that `sorted_values[inv]` is in input order."""
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order), dtype=order.dtype)
    return inv


@dataclass(frozen=True)
class BatchSlice:
    """Positions [start, stop) of the length-sorted order, padded to `length` tokens."""

    start: int
    stop: int
    length: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.length


def plan_batches(sorted_lengths: np.ndarray, batch_tokens: int, max_cells: int | None = None,
                 max_rows: int | None = None, floor_tokens: int | None = None,
                 overhead_tokens: int | None = None) -> list[BatchSlice]:
    """Batches over lengths sorted longest first, cut where they cost least.

    A batch is padded to its first (longest) row and holds at most `batch_tokens` padded tokens
    (and, for eager, rows x length^2 <= max_cells; at most `max_rows` rows); a row longer than the
    budget gets a batch of its own. A batch costs its padded tokens, but never less than
    `floor_tokens` (default batch_tokens // FLOOR_DIVISOR: below that, a forward costs about
    what launching it costs), plus `overhead_tokens` (default batch_tokens // OVERHEAD_DIVISOR:
    what each forward costs beyond its tokens, so a cut must save more padding than that).

    The cuts are found by dynamic programming over the places where the length drops (a run of
    one length is cut only into full batches): with neither floor nor overhead they give the least
    padding of any cut; with them, a cost close to the least (tests compare with every cut of small
    cases). A long tail is cut where that saves padding, and nothing is cut where it does not.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, found {batch_tokens}")
    default_floor, default_overhead = cut_costs(batch_tokens)
    floor = default_floor if floor_tokens is None else max(int(floor_tokens), 0)
    overhead = default_overhead if overhead_tokens is None else max(int(overhead_tokens), 0)
    lengths = np.maximum(np.asarray(sorted_lengths, dtype=np.int64), 1)
    n = len(lengths)
    if n == 0:
        return []
    run_starts = np.flatnonzero(np.r_[True, lengths[1:] != lengths[:-1]])
    bounds = np.r_[run_starts, n]  # run r holds positions [bounds[r], bounds[r + 1])
    runs = len(run_starts)

    def capacity(length: int) -> int:
        rows = batch_tokens // length
        if max_cells is not None:
            rows = min(rows, max_cells // (length * length))
        if max_rows is not None:
            rows = min(rows, max_rows)
        return max(rows, 1)

    # best[r]: the least cost of the rows from run r's start to the end. Run r first gives as many
    # full batches as it holds; from where they end (`tail`), one batch reaches a later run start
    best = np.zeros(runs + 1)
    step = np.zeros(runs, dtype=np.int64)  # from run r's tail: the run start the next batch ends at
    for r in range(runs - 1, -1, -1):
        length, cap = int(lengths[bounds[r]]), capacity(int(lengths[bounds[r]]))
        full = (bounds[r + 1] - bounds[r]) // cap
        tail = bounds[r] + full * cap  # first position after run r's full batches
        last = int(np.searchsorted(bounds, tail + cap, side="right")) - 1  # furthest run start one batch reaches
        if tail == bounds[r + 1]:
            step[r], tail_cost = r + 1, best[r + 1]
        else:
            ends = np.arange(r + 1, last + 1)
            costs = np.maximum((bounds[ends] - tail) * length, floor) + overhead + best[ends]
            pick = len(costs) - 1 - int(np.argmin(costs[::-1]))  # on ties, the fewer batches
            step[r], tail_cost = int(ends[pick]), costs[pick]
        best[r] = full * (max(cap * length, floor) + overhead) + tail_cost
    batches: list[BatchSlice] = []
    r = 0
    while r < runs:
        length, cap = int(lengths[bounds[r]]), capacity(int(lengths[bounds[r]]))
        start = int(bounds[r])
        while bounds[r + 1] - start >= cap:
            batches.append(BatchSlice(start, start + cap, length))
            start += cap
        nxt = int(step[r])
        if start < bounds[nxt]:
            batches.append(BatchSlice(start, int(bounds[nxt]), length))
        r = nxt
    return batches
