"""Who imports what in a shard's process: read `python -X importtime` output and report, for each
named package, the chain of imports that first pulled it in, and the slowest top-level imports.

    python3 -X importtime -m attnfallback.cli.app score ... 2> importtime.txt
    python bench/import_chains.py importtime.txt --packages scipy,pandas,sklearn,narwhals --out chains.json

`-X importtime` writes one line per module when its import ends, so children come before their
parent, the depth shown by the name's indentation: a module's importer is the first later line
of smaller depth.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


def parse(text: str) -> list[dict]:
    """The modules in the order their imports ended: name, depth, self and cumulative microseconds."""
    entries = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            entries.append({"name": m.group(4), "depth": len(m.group(3)) // 2, "self_us": int(m.group(1)),
                            "cumulative_us": int(m.group(2))})
    return entries


def chain(entries: list[dict], index: int) -> list[str]:
    """The module at `index` and the imports that led to it, outermost first."""
    names, depth = [entries[index]["name"]], entries[index]["depth"]
    for later in entries[index + 1:]:
        if later["depth"] < depth:
            names.append(later["name"])
            depth = later["depth"]
            if depth == 0:
                break
    return names[::-1]


def report(entries: list[dict], packages: list[str], top: int = 25) -> dict:
    found = {}
    for package in packages:
        at = next((i for i, e in enumerate(entries) if e["name"] == package or e["name"].startswith(package + ".")), None)
        if at is None:
            found[package] = None
            continue
        path = chain(entries, at)
        outermost = next(n for n in path if n == package or n.startswith(package + "."))  # where the package was entered
        entered = next(e for e in entries[at:] if e["name"] == outermost)
        modules = [e for e in entries if e["name"] == package or e["name"].startswith(package + ".")]
        found[package] = {"chain": path, "modules": len(modules), "first_import_s": round(entered["cumulative_us"] / 1e6, 3)}
    roots = sorted((e for e in entries if e["depth"] == 0), key=lambda e: -e["cumulative_us"])[:top]
    return {"modules": len(entries), "total_s": round(sum(e["self_us"] for e in entries) / 1e6, 3), "packages": found,
            "slowest_top_level": [{"name": e["name"], "cumulative_s": round(e["cumulative_us"] / 1e6, 3)} for e in roots]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("importtime", help="a file of `python -X importtime` output (the process's stderr)")
    parser.add_argument("--packages", default="scipy,pandas,sklearn,narwhals,joblib,PIL,torchvision,triton")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = report(parse(Path(args.importtime).read_text(errors="replace")), [p for p in args.packages.split(",") if p])
    print(f"{result['modules']} modules, {result['total_s']} s importing")
    for package, entry in result["packages"].items():
        print(f"  {package}: " + ("not imported" if entry is None else
                                  f"{entry['modules']} modules, {entry['first_import_s']} s, via {' > '.join(entry['chain'])}"))
    for entry in result["slowest_top_level"][:10]:
        print(f"  {entry['cumulative_s']:7.3f} s  {entry['name']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
