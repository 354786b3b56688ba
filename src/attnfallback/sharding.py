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
    """`I/N` with 0 <= I < N (0-based: the shards of 4 are 0/4 .. 3/4); None means the whole input (0/1)."""
    if text is None:
        return Shard(0, 1)
    m = _SHARD.fullmatch(str(text))
    if not m:
        raise UsageError(f"malformed shard {text!r}: expected I/N with 0 <= I < N, e.g. 3/8")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise UsageError(f"malformed shard {text!r}: N is the number of shards, at least 1 (e.g. 0/1 for the whole input)")
    if index >= count:
        last = f"{count - 1}/{count}"
        shards = f"the {count} shards are 0/{count} .. {last}" if count > 1 else f"the one shard is {last}"
        suggestion = f" (did you mean {last}?)" if index == count else ""
        raise UsageError(f"malformed shard {text!r}: shards are numbered from 0, so {shards}{suggestion}")
    return Shard(index, count)
