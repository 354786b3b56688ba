"""The model-zoo matrix as a Markdown table, from the JSON that
`ATTNFALLBACK_ZOO_REPORT=zoo.json python -m pytest tests/test_zoo_gpu.py -m gpu` (or test_zoo.py) writes.

    python bench/zoo_table.py bench/results/zoo.json > docs/zoo-gpu.md

One line per family and task; per implementation its status and relative L2 error against the
float64 truth, beside the bar (twice eager's own error in that dtype); refusals with their reason.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] in ("pass", "FAIL"):
        return f"{row['status']} {row['rel_l2']:.2e}"
    return row["status"]


def main(path: str) -> None:
    report = json.loads(open(path).read())
    rows = report["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    table = defaultdict(dict)
    for r in rows:
        table[(r["family"], r["task"])][r["impl"]] = r
    for device, env in report.get("environment", {}).items():
        print(f"{device}: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print()
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    print(f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print()
    print("| family | task | " + " | ".join(impls) + " | bar | why not run |")
    print("|---|---|" + "---|" * len(impls) + "---|---|")
    for (family, task), by_impl in sorted(table.items()):
        bar = next((r["bar"] for r in by_impl.values() if r.get("bar") is not None), None)
        notes = "; ".join(r["note"] if r["note"].startswith(f"{i}:") else f"{i}: {r['note']}"
                          for i, r in by_impl.items() if r["status"] in ("unavailable", "skipped"))
        print(f"| {family} | {task} | " + " | ".join(cell(by_impl.get(i)) for i in impls) +
              f" | {'' if bar is None else f'{bar:.2e}'} | {notes[:240]} |")


if __name__ == "__main__":
    main(sys.argv[1])
