"""What a first shard compiled on import: the bytecode files its process wrote into the prefix after
the fill ahead (bytecode.precompile) had ended, i.e. the modules the shipped list
(attnfallback/data/shard_modules.txt) did not name on this image.

    python bench/bytecode_misses.py /tmp/e2e/cache-llama-1b-random-1000-ours-default [more caches...] --out misses.json

Per cache: the fill's mark and its time, the files written after it (by top-level package, with
their sources' bytes) and the first twenty module names. Nothing is imported from the image's
packages; the prefix mirrors each source's absolute path, so a file's name gives its module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

PACKAGE_DIRS = ("site-packages", "dist-packages")


def module_of(bytecode: Path, prefix: Path) -> tuple[str, str]:
    """(top-level package, dotted module) of a prefix file such as
    <prefix>/usr/lib/python3/dist-packages/torch/nn/x.cpython-312.pyc; "stdlib" for a file outside
    site- and dist-packages (the standard library's, or a source checkout's on PYTHONPATH)."""
    parts = list(bytecode.relative_to(prefix).parts)
    parts[-1] = parts[-1].split(".", 1)[0]
    parts = [p for p in parts if p != "__pycache__"]
    for marker in PACKAGE_DIRS:
        if marker in parts:
            inner = parts[parts.index(marker) + 1:]
            if inner and inner[-1] == "__init__":
                inner = inner[:-1]
            return (inner[0] if inner else "?"), ".".join(inner)
    return "stdlib", ".".join(parts[-2:])


def misses(cache: Path) -> dict:
    prefix = cache / "bytecode"
    marks = sorted(prefix.glob(".precompiled-*"), key=lambda p: p.stat().st_mtime)
    if not marks:
        return {"cache": str(cache), "error": "no fill mark: the prefix was not filled ahead (or not used)"}
    filled_at = marks[-1].stat().st_mtime
    by_package: Counter = Counter()
    source_bytes: Counter = Counter()
    names = []
    total = 0
    for path in prefix.rglob("*.pyc"):
        if path.stat().st_mtime <= filled_at:
            continue
        total += 1
        package, module = module_of(path, prefix)
        by_package[package] += 1
        source = Path("/" + str(path.relative_to(prefix))).with_name(path.name.split(".", 1)[0] + ".py")
        try:
            source_bytes[package] += source.stat().st_size
        except OSError:
            pass
        names.append(module)
    return {"cache": str(cache), "mark": marks[-1].name, "compiled_after_fill": total,
            "by_package": dict(by_package.most_common()), "source_bytes": dict(source_bytes),
            "first_modules": sorted(names)[:20]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caches", nargs="+", help="$ATTNFALLBACK_CACHE directories of finished shards")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = [misses(Path(c)) for c in args.caches]
    for entry in report:
        print(json.dumps({k: entry.get(k) for k in ("cache", "compiled_after_fill", "by_package", "error") if k in entry}))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
