"""Packed batch shapes that keep a just-in-time kernel on one compiled variant per shard.

FlashAttention-4 (CuTe DSL) compiles its forward kernel on first use of each variant, 1-3 s each
on Hopper, and its variant key (`compile_key` in flash_attn.cute.interface, 4.0.0b36) holds two
facts of a varlen batch's shape besides the model's own (dtype, head_dim, heads, causal, window):

- more than 256 sequences in the batch (`BIN_BATCH_SEARCH_THRESH`): a block-to-sequence lookup
  table is built, a different kernel;
- the longest sequence (times the query heads per KV head) within one query tile (128-192
  positions on sm90, 256 at most): a persistent scheduler, a different kernel.

A scoring shard's length-sorted batches fall on both sides of both lines, so a one-shot shard
compiled up to four variants per attention kind (a sliding-window model has two kinds) where one
would do. `declared_shape` puts every packed batch on the same side of each line: the longest is
declared as at least `MIN_DECLARED_LENGTH` (`max_seqlen` is an upper bound; the extra query tile
of each short row exits at once) and the batch holds at least `MIN_SEQUENCES` sequences (empty
ones appended to `cu_seqlens`: zero positions, no work, no output).

FlashAttention-2 and -3 ship compiled kernels, so their shapes stay as they are. Pure: no torch,
no import of the kernels.
"""

from __future__ import annotations

import numpy as np

from attnfallback import envs

JIT_VARLEN_IMPLS = ("flash_attention_4",)
MIN_SEQUENCES = 257  # BIN_BATCH_SEARCH_THRESH + 1
MIN_DECLARED_LENGTH = 257  # above the largest sm90/sm100 query tile (256) at one query head per KV head
SHAPE_MODES = ("declared", "plain")  # plain: each batch's own shape


def shape_mode(env: dict | None = None) -> str:
    """`declared` unless $ATTNFALLBACK_FLASH_SHAPES says `plain`."""
    return envs.choice(envs.FLASH_SHAPES, SHAPE_MODES, "declared", env)


def declared_shape(impl: str | None, sequences: int, longest: int, mode: str = "declared") -> tuple[int, int]:
    """(the longest length to declare, empty sequences to append) for a packed batch under `impl`."""
    if impl not in JIT_VARLEN_IMPLS or mode == "plain":
        return longest, 0
    return max(longest, MIN_DECLARED_LENGTH), max(MIN_SEQUENCES - sequences, 0)


def padded_boundaries(cu_seqlens: np.ndarray, empty: int) -> np.ndarray:
    """`cu_seqlens` with `empty` zero-length sequences appended (the last boundary repeated)."""
    if empty <= 0:
        return cu_seqlens
    return np.concatenate([cu_seqlens, np.full(empty, cu_seqlens[-1], dtype=cu_seqlens.dtype)])
