"""Synthetic event logs of a known fleet, for the events tests and bench/events_scale.py (not part
of the library: tests import it through tests/events_helpers.py).

    write_fleet(tmp, [FleetGroup("H100", 40), FleetGroup("T4", 10, used="sdpa")], run_id="sweep-1")

Each shard gets `shard_start`, the decisive record (`attn_impl`, or `attn_unavailable` for a
strict failure) and `shard_done`, shaped like the loader's records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from attnfallback.events.sink import EventSink

# name, compute capability, memory (GB): enough to look like the loader's `gpu` object.
GPU_FACTS = {
    "H100": ("NVIDIA H100 80GB HBM3", "9.0", 79.6),
    "A100": ("NVIDIA A100-SXM4-80GB", "8.0", 79.3),
    "A6000": ("NVIDIA RTX A6000", "8.6", 47.5),
    "L4": ("NVIDIA L4", "8.9", 22.5),
    "T4": ("Tesla T4", "7.5", 14.6),
    "V100": ("Tesla V100-SXM2-16GB", "7.0", 15.8),
}

DEFAULT_PREFER = ("flash_attention_2", "sdpa", "eager")


def plan_reason(gpu_class: str, impl: str) -> str:
    """The reason the planner would give for `impl` not running on `gpu_class` (synthetic)."""
    cc = GPU_FACTS.get(gpu_class, ("", "?", 0))[1]
    if impl == "flash_attention_2":
        return f"compute capability {cc} < 8.0 required by flash_attention_2"
    if impl == "flash_attention_3":
        return f"compute capability {cc} != 9.0 required by flash_attention_3"
    return f"package for {impl} not installed"


@dataclass
class FleetGroup:
    """`shards` shards on `gpu_class`: `used` None with `strict=True` is a strict failure."""

    gpu_class: str
    shards: int
    used: str | None = None  # None: the first preference (no fallback)
    strict: bool = False
    prefer: tuple[str, ...] = DEFAULT_PREFER
    model_id: str = "sentence-transformers/all-MiniLM-L6-v2"
    host: str | None = None
    reason: str | None = None  # default: plan_reason(gpu_class, prefer[0])
    kernels: list[str] | None = None
    rows: int = 1000
    tokens: int = 64000
    seconds: float = 2.5
    extra: dict = field(default_factory=dict)


def decision_fields(group: FleetGroup) -> tuple[str, dict]:
    """The event kind and fields of one shard's decisive record."""
    requested = group.prefer[0]
    name, cc, memory = GPU_FACTS.get(group.gpu_class, (group.gpu_class, None, None))
    used = None if group.strict else (group.used or requested)
    attempts = []
    if group.strict or used != requested:
        reason = group.reason or plan_reason(group.gpu_class, requested)
        attempts.append({"impl": requested, "stage": "plan", "ok": False, "reasons": [reason]})
    if used is not None:
        attempts.append({"impl": used, "stage": "verify", "ok": True, "reasons": []})
    fields = {
        "gpu": {"name": name, "class": group.gpu_class, "cc": cc, "memory_gb": memory},
        "model": {"id": group.model_id, "revision": "0" * 40, "dtype": "bfloat16" if cc and cc >= "8" else "float16",
                  "architecture": "BertModel"},
        "policy": {"mode": "strict" if group.strict else "graceful", "prefer": list(group.prefer)},
        "requested": requested,
        "used": used,
        "fell_back": used != requested,
        "attempts": attempts,
        "versions": {"attnfallback": "0.1.0", "torch": "2.11.0", "transformers": "5.23.0",
                     "flash_attn": None, "cuda": "12.8"},
        "timing": {"load_s": 1.25, "verify_s": 0.05},
    }
    if group.kernels is not None:
        fields["kernels"] = list(group.kernels)
    fields.update(group.extra)
    if group.strict:
        fields["error"] = f"attention implementation {requested} is unavailable (strict policy)"
        return "attn_unavailable", fields
    return "attn_impl", fields


def write_fleet(directory, groups: list[FleetGroup], run_id: str = "synthetic-run",
                first_shard: int = 0, total: int | None = None) -> list[Path]:
    """Write one shard file per shard of `groups` (in order) and return their paths."""
    total = total if total is not None else first_shard + sum(g.shards for g in groups)
    paths = []
    index = first_shard
    for group in groups:
        kind, fields = decision_fields(group)
        for _ in range(group.shards):
            sink = EventSink(directory, run_id=run_id, shard=f"{index}/{total}", fsync=False)
            host = {"host": group.host} if group.host else {}
            sink.emit("shard_start", **host)
            sink.emit(kind, **host, **fields)
            if kind == "attn_impl":
                sink.emit("shard_done", **host, rows=group.rows, tokens=group.tokens,
                          seconds=group.seconds, non_finite=0)
            sink.close()
            paths.append(sink.path)
            index += 1
    return paths
