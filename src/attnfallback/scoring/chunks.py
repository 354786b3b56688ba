"""What the scorer's worker thread hands the forward: a chunk of rows, its batches on the host, and
the chunk tokenized and batched (`PreparedChunk`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from attnfallback.scoring.tokenize import Encoded


@dataclass
class Chunk:
    """Rows of one part: their ids and texts (and lines, for error messages)."""

    index: int
    ids: list
    texts: list[tuple[str, ...]]
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class HostBatch:
    """One batch on the host, ready to copy: rows are positions in the chunk. Padded to
    `length` tokens a row, or packed into one sequence (`cells` = `tokens`, no padding)."""

    rows: np.ndarray
    length: int
    tensors: dict
    tokens: int
    cells: int = 0  # token positions the forward computes (rows x length when padded)


@dataclass
class PreparedChunk:
    """A chunk (or a piece of one) tokenized and batched. `encoded` holds the piece's rows, `rows`
    says which positions of the chunk those are (None: all of them, in order), and `last` whether
    it completes its chunk."""

    chunk: Chunk
    encoded: Encoded
    order: np.ndarray
    batches: list[HostBatch]
    prepare_s: float = 0.0
    rows: np.ndarray | None = None
    last: bool = True

    def positions(self) -> np.ndarray:
        """Chunk positions of the outputs, which come in length-sorted order."""
        return self.order if self.rows is None else self.rows[self.order]
