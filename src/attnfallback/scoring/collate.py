"""Batches for the forward: rows right-padded (`pad_rows`) or packed into one padding-free
sequence (`pack_rows`), when packing is possible, and the facts about the model's inputs they need."""

from __future__ import annotations

import inspect

import numpy as np

from attnfallback.errors import UsageError
from attnfallback.model_facts import text_config
from attnfallback.scoring.tokenize import Encoded

# Implementations whose transformers path honours cu_seq_lens_q/k (varlen): a batch may be packed
# into one padding-free sequence. Anything else would attend across the packed rows.
PACKING_IMPLS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
PACKING_MODES = ("auto", "off")  # --packing


def check_packing_mode(mode: str) -> str:
    """`mode` if it is a packing mode, else a UsageError naming the modes."""
    if mode not in PACKING_MODES:
        raise UsageError(f"--packing must be {' or '.join(PACKING_MODES)}, found {mode!r}")
    return mode


def supports_varlen(impl: str | None) -> bool:
    """True when `impl` keeps the rows of a packed batch apart (cu_seq_lens)."""
    return impl in PACKING_IMPLS


def pad_rows(encoded: Encoded, rows: np.ndarray, length: int, pad_id: int, with_types: bool) -> dict[str, np.ndarray]:
    """Right-padded int64 arrays for `rows` of `encoded`: input_ids, attention_mask (and token_type_ids)."""
    flat_ids, flat_types, offsets = encoded.flat()
    lens = encoded.lengths[rows]
    positions = np.arange(length, dtype=np.int64)
    mask = positions[None, :] < lens[:, None]
    index = offsets[rows][:, None] + positions[None, :]
    np.minimum(index, max(len(flat_ids) - 1, 0), out=index)
    out = {
        "input_ids": np.where(mask, flat_ids[index] if len(flat_ids) else 0, pad_id).astype(np.int64, copy=False),
        "attention_mask": mask.astype(np.int64),
    }
    if with_types:
        if flat_types is None:
            out["token_type_ids"] = np.zeros((len(rows), length), dtype=np.int64)
        else:
            out["token_type_ids"] = np.where(mask, flat_types[index] if len(flat_types) else 0, 0).astype(np.int64, copy=False)
    return out


def pack_rows(encoded: Encoded, rows: np.ndarray, with_types: bool) -> dict[str, np.ndarray]:
    """`rows` of `encoded` concatenated into one padding-free sequence of shape (1, T).

    position_ids restart at 0 for every row; `cu_seqlens` (int32, n + 1) are the rows' boundaries
    the varlen kernels take; `_segment` (T,) is each token's row, `_lengths` (n,) each row's
    length: what pooling needs."""
    flat_ids, flat_types, offsets = encoded.flat()
    lens = encoded.lengths[rows].astype(np.int64)
    cu = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    segment = np.repeat(np.arange(len(rows), dtype=np.int64), lens)
    positions = np.arange(int(cu[-1]), dtype=np.int64) - cu[:-1][segment]
    index = offsets[rows][segment] + positions
    out = {
        "input_ids": flat_ids[index][None, :],
        "position_ids": positions[None, :],
        "cu_seqlens": cu.astype(np.int32),
        "_segment": segment,
        "_lengths": lens,
    }
    if with_types:
        types = flat_types[index] if flat_types is not None else np.zeros_like(index)
        out["token_type_ids"] = types[None, :]
    return out


def has_local_attention(config) -> bool:
    """Whether some layers attend within a window (sliding_window, ModernBERT's local_attention)."""
    text = text_config(config)
    layer_types = getattr(text, "layer_types", None) or ()
    return bool(getattr(text, "sliding_window", None) or getattr(text, "local_attention", None)
                or any("sliding" in str(t) or "local" in str(t) for t in layer_types))


def takes_token_types(model, tokenizer) -> bool:
    """Whether the model is given token type ids: its forward takes them and its tokenizer emits
    them (`model_input_names`), as the tokenizer's own call would. RoBERTa, XLM-R and GPT-2 take
    the argument but their tokenizers emit none: their type table has one row (GPT-2 would even
    look types up in its word embeddings)."""
    if not accepts_argument(model.forward, "token_type_ids"):
        return False
    names = getattr(tokenizer, "model_input_names", None)
    return names is None or "token_type_ids" in names


def accepts_argument(fn, name: str) -> bool:
    """Whether `fn`'s signature names the parameter `name`."""
    params = inspect.signature(fn).parameters
    return name in params


def accepts_kwargs(fn) -> bool:
    """Whether `fn` takes arbitrary keyword arguments (**kwargs)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
