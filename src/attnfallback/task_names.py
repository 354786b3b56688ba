"""The scoring tasks and the text columns each reads: the one table every layer imports.

A leaf: it imports nothing from attnfallback, so the scoring code, the sweep configuration and
parity can all take the task names from here.
"""

from __future__ import annotations

TASKS = ("embed", "classify", "pairs", "logprob")
# How many text columns each task reads: exactly 2 for pairs; 1, or prompt+completion for logprob.
TEXT_COLUMNS = {"embed": (1,), "classify": (1,), "pairs": (2,), "logprob": (1, 2)}


def default_text_columns(task: str) -> int:
    """How many text columns `task` reads when none are named: 2 for pairs, else 1."""
    return TEXT_COLUMNS[task][0]
