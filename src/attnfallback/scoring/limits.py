"""What a loaded model's tables can take, and the ids of a tokenized chunk checked against them.

    limits = model_limits(model)     # vocabulary rows, token type rows, usable positions
    limits.violation(encoded, with_types=True)   # None, or the first id out of range and its row

A tokenizer that does not match its model (a vocabulary larger than the embedding table, type ids
for a model with one token type, rows longer than the position table) makes the embedding lookup
index out of range: an IndexError on the CPU, a device-side assert that kills the CUDA context on a
GPU. The checks here run on the host, before the first forward, as a max over arrays the batches
are padded from anyway.

Positions: an absolute position table (BERT's `position_embeddings`, GPT-2's `wpe`) limits a row's
length; RoBERTa-like models (RoBERTa, XLM-R, CamemBERT, MPNet) number positions from
padding_idx + 1, so of max_position_embeddings rows the first padding_idx + 1 are never used by a
token (XLM-R: 514 rows, 512 tokens). Rotary and relative positions have no table and no limit here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TYPE_TABLE_NAMES = ("token_type_embeddings",)
POSITION_TABLE_NAMES = ("position_embeddings", "wpe", "embed_positions")


@dataclass(frozen=True)
class Violation:
    """One id a model's table cannot take: which limit, its value, what was found, in which row."""

    what: str  # "token id" | "token type id" | "position"
    limit: int
    found: int
    row: int  # position in the encoded rows
    table: str  # the table and where its size comes from, for the message

    def message(self, model: str) -> str:
        if self.what == "position":
            return (f"the row is {self.found} tokens long, beyond the {self.limit} positions {model} can take "
                    f"({self.table}); the tokenizer's max length does not match the model")
        return (f"{self.what} {self.found} is beyond {model}'s {self.table} (expected {self.what}s < {self.limit}, "
                f"found {self.found}); the tokenizer does not match the model")


@dataclass(frozen=True)
class ModelLimits:
    """Sizes of the tables a model indexes with its inputs; None where it has no such table."""

    model: str  # the model's class name, for messages
    vocab: int | None
    type_vocab: int | None
    positions: int | None  # tokens a row may hold (table rows less the offset)
    position_offset: int = 0  # the first position id a token gets (RoBERTa-like: padding_idx + 1)
    position_table: str = ""  # how `positions` was found, for messages

    def violation(self, ids: np.ndarray, types: np.ndarray | None, offsets: np.ndarray, lengths: np.ndarray) -> Violation | None:
        """The first id out of range in rows given flat (all ids concatenated, each row's offset)."""
        if self.vocab is not None and len(ids):
            if int(ids.max()) >= self.vocab or int(ids.min()) < 0:
                at = int(np.argmax((ids >= self.vocab) | (ids < 0)))
                return Violation("token id", self.vocab, int(ids[at]), _row_of(offsets, at),
                                 f"vocabulary ({self.vocab} rows of input embeddings)")
        if types is not None and len(types):
            limit = self.type_vocab if self.type_vocab is not None else None
            if limit is not None and (int(types.max()) >= limit or int(types.min()) < 0):
                at = int(np.argmax((types >= limit) | (types < 0)))
                return Violation("token type id", limit, int(types[at]), _row_of(offsets, at),
                                 f"token type table (type_vocab_size {limit})")
        if self.positions is not None and len(lengths) and int(lengths.max()) > self.positions:
            row = int(np.argmax(lengths > self.positions))
            return Violation("position", self.positions, int(lengths[row]), row, self.position_table)
        return None


def _row_of(offsets: np.ndarray, flat_index: int) -> int:
    return int(np.searchsorted(offsets, flat_index, side="right")) - 1


def model_limits(model) -> ModelLimits:
    """The limits of a loaded transformers model, read from its embedding modules."""
    import torch

    vocab = None
    try:
        table = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        table = None
    if isinstance(table, torch.nn.Embedding):
        vocab = int(table.num_embeddings)
    type_rows: list[int] = []
    positions: list[tuple[int, int, str]] = []  # (usable rows, offset, description)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Embedding):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in TYPE_TABLE_NAMES:
            type_rows.append(int(module.num_embeddings))
        elif leaf in POSITION_TABLE_NAMES:
            rows = int(module.num_embeddings)
            offset = getattr(module, "offset", None)
            if isinstance(offset, int) and offset > 0:  # OPT, BART: a learned table shifted by `offset`
                positions.append((rows - offset, offset, f"a position table of {rows} rows, offset {offset}"))
            elif module.padding_idx is not None:  # RoBERTa-like: positions start at padding_idx + 1
                first = int(module.padding_idx) + 1
                positions.append((rows - first, first, f"max_position_embeddings {rows} less the padding offset "
                                  f"{first}: positions start at padding_idx + 1"))
            else:
                positions.append((rows, 0, f"max_position_embeddings {rows}"))
    usable, offset, description = min(positions) if positions else (None, 0, "")
    return ModelLimits(type(model).__name__, vocab, min(type_rows) if type_rows else None, usable, offset, description)


def clip_max_length(requested: int, limits: ModelLimits) -> tuple[int, str | None]:
    """`requested` tokens per row, clipped to the positions the model can take; the message if clipped."""
    if limits.positions is None or requested <= limits.positions:
        return requested, None
    return limits.positions, (f"--max-length {requested} is beyond the {limits.positions} positions {limits.model} can "
                              f"take ({limits.position_table}); rows are truncated at {limits.positions} tokens")
