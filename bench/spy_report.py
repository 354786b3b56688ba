"""Where a whole `attnfallback score` process spends its wall time, every thread and child process,
from py-spy's sampled stacks (`py-spy record --threads --idle --subprocesses --format raw`).

    py-spy record --threads --idle --subprocesses --rate 200 --format raw -o /tmp/spy.txt -- \
        python -m attnfallback.cli.app score MODEL --task logprob --input in.jsonl --output out.parquet
    python bench/spy_report.py /tmp/spy.txt --rate 200 --roots run_score,read_facts,from_job,verify_forward --out spy.json

Unlike cProfile (bench/shard_profile.py) a sampler sees every thread, costs Python-heavy code no more
than C++ or the GPU, and needs no hook that torch.profiler can take. The report gives: seconds per
process and thread (with --idle a thread's samples add up to its lifetime); each root's seconds and
its callees' seconds under it (a call tree, largest first; a function recursing under itself counts
once); and the imports: the seconds under the outermost module each thread was importing, by its top
package, and the seconds spent in each package's own module bodies (the innermost module frame).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_WHO = re.compile(r"^(process \d+:.*|thread \(.*\).*)$")


def parse_line(line: str) -> tuple[str, list[tuple[str, str]], int] | None:
    """One raw line -> (who: process and thread, frames outermost first as (name, file), count);
    None for a blank or malformed line."""
    line = line.rstrip("\n")
    stack, _, count = line.rpartition(" ")
    if not stack or not count.isdigit():
        return None
    parts = stack.split(";")
    who: list[str] = []
    while parts and _WHO.match(parts[0]):
        who.append(parts.pop(0))
    frames = []
    for part in parts:
        m = _FRAME.match(part)
        frames.append((m.group("name"), m.group("file")) if m else (part, ""))
    return " / ".join(_short(w) for w in who) or "?", frames, int(count)


def _short(who: str) -> str:
    """'process 12:"python -m ..."' -> 'process 12'; 'thread (13): name' stays."""
    return who.split(":", 1)[0] if who.startswith("process ") else who


def module_of(path: str) -> str:
    """A source path -> its dotted module ('torch/distributed/tensor/__init__.py' -> 'torch.distributed.tensor')."""
    path = path.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/", "/src/"):
        if marker in path:
            path = path.rsplit(marker, 1)[1]
            break
    path = path[:-3] if path.endswith(".py") else path
    parts = [p for p in path.split("/") if p]
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path


def _top(module: str, depth: int) -> str:
    return ".".join(module.split(".")[:depth])


def load(path: str) -> list[tuple[str, list[tuple[str, str]], int]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [p for p in (parse_line(line) for line in fh) if p is not None]


def report(samples, rate: float, roots: list[str], depth: int = 3, package_depth: int = 2) -> dict:
    """The report's data (see the module docstring), seconds at `rate` samples a second."""
    per = 1.0 / rate
    threads: dict[str, float] = defaultdict(float)
    trees: dict[str, dict] = {}
    outer_imports: dict[str, float] = defaultdict(float)
    own_imports: dict[str, float] = defaultdict(float)
    for who, frames, count in samples:
        seconds = count * per
        threads[who] += seconds
        # a module body run by an import (not the script's or runpy's main module): its caller is importlib's
        imports = [i for i, (name, _) in enumerate(frames) if name == "<module>" and i > 0 and "importlib" in frames[i - 1][1]]
        if imports:
            outer_imports[_top(module_of(frames[imports[0]][1]), package_depth)] += seconds
            own_imports[_top(module_of(frames[imports[-1]][1]), package_depth)] += seconds
        names = [name for name, _ in frames]
        for root in roots:
            if root not in names:
                continue
            tree = trees.setdefault(root, {"s": 0.0, "callees": {}})
            tree["s"] += seconds
            node = tree
            seen = {root}
            start = names.index(root) + 1
            for name, file in frames[start:start + depth]:
                label = f"{name} ({module_of(file)})" if file else name
                if name in seen:
                    continue
                seen.add(name)
                node = node["callees"].setdefault(label, {"s": 0.0, "callees": {}})
                node["s"] += seconds

    def rounded(node: dict) -> dict:
        kids = sorted(node["callees"].items(), key=lambda kv: -kv[1]["s"])
        return {"s": round(node["s"], 3), "callees": {k: rounded(v) for k, v in kids}}

    def ranked(table: dict[str, float], least: float) -> dict[str, float]:
        return {k: round(v, 3) for k, v in sorted(table.items(), key=lambda kv: -kv[1]) if v >= least}

    return {"rate": rate, "threads_s": ranked(threads, 0.0), "roots": {r: rounded(trees[r]) for r in roots if r in trees},
            "imports_outermost_s": ranked(outer_imports, per), "imports_own_s": ranked(own_imports, per)}


def _print_tree(label: str, node: dict, indent: int, least: float) -> None:
    print(f"{'  ' * indent}{node['s']:8.3f} s  {label}")
    for child, sub in node["callees"].items():
        if sub["s"] >= least:
            _print_tree(child, sub, indent + 1, least)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", help="py-spy's --format raw output")
    ap.add_argument("--rate", type=float, required=True, help="py-spy's --rate (samples a second)")
    ap.add_argument("--roots", default="run_score,read_facts,from_job,load_model,verify_forward,score_chunks,_warm_device",
                    help="comma-separated function names")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--least", type=float, default=0.02, help="leave out callees under this many seconds")
    ap.add_argument("--out", help="write the report as JSON")
    args = ap.parse_args(argv)
    try:
        samples = load(args.raw)
    except OSError as e:
        print(f"spy_report: cannot read {args.raw}: {e}", file=sys.stderr)
        return 2
    if not samples:
        print(f"spy_report: {args.raw} holds no samples", file=sys.stderr)
        return 2
    data = report(samples, args.rate, [r for r in args.roots.split(",") if r], args.depth)
    print("threads:")
    for who, s in data["threads_s"].items():
        print(f"  {s:8.3f} s  {who[:160]}")
    for root, node in data["roots"].items():
        _print_tree(root, node, 0, args.least)
    for key in ("imports_outermost_s", "imports_own_s"):
        print(f"{key}:")
        for pkg, s in list(data[key].items())[:25]:
            print(f"  {s:8.3f} s  {pkg}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
