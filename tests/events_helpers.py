"""A synthetic fleet of known composition, shared by the events tests; the fleet writer itself
(bench/synthetic_fleet.py) is the events benchmark's too, kept out of the library."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parents[1] / "bench")
sys.path.insert(0, BENCH)
try:
    from synthetic_fleet import FleetGroup, decision_fields, plan_reason, write_fleet  # noqa: F401 - for the events tests
finally:
    sys.path.remove(BENCH)

T4_REASON = plan_reason("T4", "flash_attention_2")

# The mix of the issue: 40 H100 and 25 A6000 shards on flash_attention_2, 10 T4 shards falling
# back to sdpa, 3 strict failures (on T4 as well).
KNOWN_MIX = [
    FleetGroup("H100", 40, host="pod-h100"),
    FleetGroup("A6000", 25, host="pod-a6000"),
    FleetGroup("T4", 10, used="sdpa", host="pod-t4"),
    FleetGroup("T4", 3, strict=True, host="pod-t4"),
]


def expected_by_class(groups: list[FleetGroup]) -> dict[str, dict]:
    """What the summary by GPU class must say, computed from the groups."""
    out: dict[str, dict] = {}
    for g in groups:
        row = out.setdefault(g.gpu_class, {"shards": 0, "fell_back": 0, "strict_failures": 0})
        row["shards"] += g.shards
        if g.strict:
            row["strict_failures"] += g.shards
        elif g.used not in (None, g.prefer[0]):
            row["fell_back"] += g.shards
    for row in out.values():
        row["rate"] = row["fell_back"] / row["shards"]
    return out


def write_known_fleet(directory: Path, run_id: str = "sweep-1", groups=None) -> list[Path]:
    return write_fleet(directory, groups or KNOWN_MIX, run_id=run_id)
