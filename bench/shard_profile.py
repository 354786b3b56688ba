"""Where a shard's main thread spends its time outside the scoring loop: `attnfallback score` run in
this process under cProfile (the command line's own main, so the same phases), then a call tree of
the named functions.

    python bench/shard_profile.py run --prof /tmp/shard.prof -- score MODEL --task logprob --input in.jsonl --output out.parquet
    python bench/shard_profile.py report /tmp/shard.prof --roots load_model,verify_forward,fuse_kernels,choose --out tree.json

`run` writes the profile when the command line ends (it leaves through os._exit, so the profile is
written there) and exits with the command's code. cProfile slows Python-heavy code (imports above
all) more than time spent in torch's C++ and on the GPU, so compare a phase's parts with each other,
not with an unprofiled run. It profiles the main thread only (the load runs there), and says so on
stderr when something replaced the interpreter's profile hook during the run. `report` gives, for
each root (a function name; of several, the one with the most time), its cumulative seconds and its
callees' seconds under it, largest first.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys


def run(prof: str, argv: list[str]) -> int:
    profile = cProfile.Profile()
    real_exit = os._exit

    def exit_with_profile(code: int):
        if sys.getprofile() is not profile:  # torch.profiler, say, took the hook: what ran after is not in the profile
            print(f"shard_profile: the interpreter's profile hook was replaced during the run; {prof} lacks what ran "
                  "after that and the functions running then", file=sys.stderr)
        profile.disable()
        profile.dump_stats(prof)
        real_exit(code)

    os._exit = exit_with_profile  # the command line's clean exit skips interpreter teardown
    sys.argv = ["attnfallback", *argv]
    profile.enable()
    from attnfallback.cli import app

    exit_with_profile(app.main(argv))
    return 0  # not reached


def _label(func: tuple) -> str:
    path, line, name = func
    return f"{name} ({os.path.basename(path)}:{line})" if line else name


def callee_index(stats: pstats.Stats) -> dict[tuple, list[tuple]]:
    """caller -> [(callee, its cumulative seconds under that caller, calls)], from pstats' callers."""
    callees: dict[tuple, list[tuple]] = {}
    # stats.stats: func -> (primitive calls, calls, tottime, cumtime, callers{func: (pc, nc, tt, ct)})
    for func, (_, _, _, _, callers) in stats.stats.items():
        for caller, entry in callers.items():
            callees.setdefault(caller, []).append((func, entry[3], entry[1]))
    return callees


def tree(stats: pstats.Stats, root_name: str, top: int = 15, depth: int = 2, callees: dict | None = None) -> dict | None:
    """The function called `root_name` with the most cumulative time, and its callees."""
    table = stats.stats
    matches = [f for f in table if f[2] == root_name]
    if not matches:
        return None
    root = max(matches, key=lambda f: table[f][3])
    callees = callee_index(stats) if callees is None else callees

    def node(func: tuple, seconds: float, calls: int, level: int) -> dict:
        out = {"function": _label(func), "s": round(seconds, 4), "calls": calls}
        if level < depth:
            children = sorted(callees.get(func, []), key=lambda c: -c[1])[:top]
            out["callees"] = [node(f, s, n, level + 1) for f, s, n in children if s >= 0.002]
        return out

    return node(root, table[root][3], table[root][1], 0)


def report(prof: str, roots: list[str], top: int, depth: int) -> dict:
    stats = pstats.Stats(prof)
    callees = callee_index(stats)
    return {"profile": prof, "total_s": round(stats.total_tt, 3),
            "roots": {r: tree(stats, r, top, depth, callees) for r in roots}}


def _print(node: dict | None, indent: int = 0) -> None:
    if node is None:
        return
    print(f"{'  ' * indent}{node['s']:8.3f} s  {node['calls']:>6}  {node['function']}")
    for child in node.get("callees", []):
        _print(child, indent + 1)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        split = argv.index("--") if "--" in argv else len(argv)
        parser = argparse.ArgumentParser(prog="shard_profile.py run")
        parser.add_argument("--prof", required=True)
        args = parser.parse_args(argv[1:split])
        return run(args.prof, argv[split + 1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("report",))
    parser.add_argument("prof")
    parser.add_argument("--roots", default="run_score,load_model,verify_forward,bench_factory,fuse_kernels,choose")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    data = report(args.prof, [r for r in args.roots.split(",") if r], args.top, args.depth)
    for name, node in data["roots"].items():
        print(f"== {name}")
        _print(node)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
