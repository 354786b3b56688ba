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
CUT_RATIO = 0.85  # see plan_batches


# CUDA, non-eager, when the model's feed-forward width is known: the budget that keeps one
# feed-forward activation (tokens x intermediate_size) at this many elements, 1.5 GiB in bf16.
# Fewer, larger batches mean fewer kernel launches per token, which is what a small model's
# forward waits on (H100, BERT-base, 20k texts: 838k tokens/s at 64k tokens a batch, 1.13M at
# 256k; Qwen2-0.5B: 296k at 64k, 308k at 128k; bench/NOTES.md, session 2).
CUDA_FFN_ELEMENTS = 262144 * 3072
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
                 max_rows: int | None = None, cut_ratio: float = CUT_RATIO) -> list[BatchSlice]:
    """Batches over lengths sorted longest first.

    A batch holds rows while rows x (its first, longest row's length) <= batch_tokens (and, for
    eager, rows x length^2 <= max_cells); a row longer than the budget gets a batch of its own.
    Once a batch holds batch_tokens / 8 padded tokens it also closes before the first row shorter
    than `cut_ratio` x its longest: in the long tail of a chunk, where lengths fall quickly, this
    bounds the padding (measured: 1.45M -> 1.27M padded tokens for 1.16M real ones, 20k texts in
    chunks of 8192, a 64k budget) at the price of more, smaller batches.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, found {batch_tokens}")
    lengths = np.maximum(np.asarray(sorted_lengths, dtype=np.int64), 1)
    n = len(lengths)
    min_fill = max(batch_tokens // 8, 1)
    batches: list[BatchSlice] = []
    start = 0
    while start < n:
        length = int(lengths[start])
        rows = max(batch_tokens // length, 1)
        if max_cells is not None:
            rows = min(rows, max(max_cells // (length * length), 1))
        if max_rows is not None:
            rows = min(rows, max_rows)
        stop = min(start + rows, n)
        first_optional = start + max(min_fill // length, 1)
        if cut_ratio and first_optional < stop:
            shorter = np.flatnonzero(lengths[first_optional:stop] < cut_ratio * length)
            if len(shorter):
                stop = first_optional + int(shorter[0])
        batches.append(BatchSlice(start, stop, length))
        start = stop
    return batches
