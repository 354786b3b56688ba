"""Shard specs `I/N` (0-based I) and the deterministic selection of rows by row number."""

from __future__ import annotations

import re
from dataclasses import dataclass

from attnfallback.errors import UsageError

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, row_number: int) -> bool:
        """Row r belongs to shard r mod N: N shards cover every row exactly once."""
        return row_number % self.count == self.index


def parse_shard(text: str | None) -> Shard:
    """`I/N` with 0 <= I < N; None means the whole input (0/1)."""
    if text is None:
        return Shard(0, 1)
    m = _SHARD.fullmatch(str(text))
    if not m:
        raise UsageError(f"malformed shard {text!r}: expected I/N with 0 <= I < N, e.g. 3/8")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise UsageError(f"malformed shard {text!r}: expected I/N with 0 <= I < N (found I={index}, N={count})")
    return Shard(index, count)
