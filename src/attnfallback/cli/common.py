"""Options and output helpers shared by the command modules."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer


def print_json(data: Any) -> None:
    """One JSON object on stdout (for scripts)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def literal_help(text: str) -> str:
    """Help text shown as written. Typer renders help as rich markup when rich is there, and
    markup takes `[ray]` in `pip install attnfallback[ray]` for a style tag and drops it."""
    try:
        from typer.core import DEFAULT_MARKUP_MODE, HAS_RICH
    except ImportError:
        return text
    if not (HAS_RICH and DEFAULT_MARKUP_MODE == "rich"):
        return text
    from rich.markup import escape

    return escape(text)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def stdout_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


PREFER = typer.Option(None, "--prefer", help="Comma-separated implementations, most preferred first.")
POLICY = typer.Option(None, "--policy", help="graceful | strict | fastest (default: $ATTNFALLBACK_POLICY or graceful).")
DTYPE = typer.Option("auto", "--dtype", help="auto | bfloat16 | float16 | float32.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps.")
EVENTS = typer.Option(None, "--events", help="Events directory (default: $ATTNFALLBACK_EVENTS; none: no events).")
RUN_ID = typer.Option(None, "--run-id", help="Run id for the events (default: generated).")
SHARD = typer.Option(None, "--shard", help="Shard I/N, numbered from 0: the shards of 4 are 0/4, 1/4, 2/4, 3/4 (default: the whole input, 0/1).")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
REVISION = typer.Option(None, "--revision", help="Hub revision (commit sha, branch or tag).")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default).")
ALLOW_NEW_HEAD = typer.Option(False, "--allow-new-head", help="Run even where the checkpoint lacks weights of the model the task needs (a classifier or LM head: initialised at random, so its outputs are made up). Off: exit 2 naming them.")
