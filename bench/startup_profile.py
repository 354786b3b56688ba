"""Where a cold shard's fixed cost goes: fresh processes, each timed from spawn to exit, for the
imports and set-up both `attnfallback score` and its baselines pay, and `score` itself with its
phases, Python's import log (-X importtime) and a profile of its main thread.

    python bench/startup_profile.py --model modernbert-base-random --rows 1000 --out bench/results/startup.json

Steps (each --repeats times, in turn, after one untimed `import torch` so the page cache is warm):
- `python`: the interpreter alone;
- `torch`, `torch+cuda` (import, then CUDA's context and one tensor on the GPU), `transformers`,
  `model-class` (transformers' class for the model, imported, not loaded), `sentence-transformers`;
- `ours`: `attnfallback score` on the rows with --json (its phases), `ours-no-warm-thread` (the same,
  CUDA's context made when the model loads rather than on a thread beside the imports);
- `ours-importtime` and `ours-profile`: one run each, their logs written beside --out;
- `model-class-pycache-prefix`, `sentence-transformers-pycache-prefix`: the imports twice with
  $PYTHONPYCACHEPREFIX in the work directory (bytecode written on the first, read on the second),
  beside `bytecode`: whether the packages ship compiled bytecode at all.
With --later-shard, only `score` as a later shard runs: one untimed shard fills a cache, then
`ours` --repeats times, the import log and the profile, all on that cache (bytecode, kernels and
measured choices as a machine's second shard finds them).
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_models import MODELS, build_model, json_tail, stsb_documents, write_input  # noqa: E402

NO_WARM_THREAD = ("import sys, attnfallback.scoring.job as job; job._warm_device = lambda *a: {}; "
                  "from attnfallback.cli.app import main; sys.argv[0] = 'attnfallback'; main()")


def timed(cmd: list[str], env: dict, timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, proc


def import_steps(model_class_module: str, device: str) -> dict[str, str]:
    cuda = "import torch; torch.cuda.init(); torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
    steps = {"python": "pass", "torch": "import torch", "transformers": "import transformers",
             "model-class": f"import transformers, importlib; importlib.import_module('{model_class_module}')",
             "sentence-transformers": "import sentence_transformers"}
    if device.startswith("cuda"):
        steps["torch+cuda"] = cuda
    return steps


BYTECODE_PROBE = """
import json, os, sys, importlib.util
out = {"dont_write_bytecode": sys.flags.dont_write_bytecode, "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
       "pycache_prefix": sys.pycache_prefix, "python": sys.version.split()[0]}
for name in ("torch", "transformers", "sentence_transformers", "sympy", "scipy", "numpy", "tokenizers", "safetensors",
             "huggingface_hub", "jinja2"):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        continue
    root = os.path.dirname(spec.origin)
    py = pyc = 0
    for d, _, files in os.walk(root):
        py += sum(f.endswith(".py") for f in files)
        pyc += sum(f.endswith(".pyc") for f in files)
    out[name] = {"dir": root, "py": py, "pyc": pyc, "writable": os.access(root, os.W_OK)}
print(json.dumps(out))
"""


def bytecode_facts(env: dict) -> dict:
    """Whether the interpreter finds compiled bytecode for the big packages, or compiles their
    sources in every process (an image installed with --no-compile on a read-only disk)."""
    proc = subprocess.run([sys.executable, "-c", BYTECODE_PROBE], env=env, capture_output=True, text=True)
    return json_tail(proc.stdout) or {"error": proc.stderr[-500:]}


def top_imports(log: str, n: int = 25) -> list[tuple[str, float, float]]:
    """(module, self s, cumulative s) of the slowest imports in a -X importtime log."""
    rows = []
    for line in log.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        try:
            self_us, cum_us, name = (x.strip() for x in line[len("import time:"):].split("|"))
            rows.append((name, int(self_us) / 1e6, int(cum_us) / 1e6))
        except ValueError:
            continue
    return sorted(rows, key=lambda r: -r[2])[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="modernbert-base-random")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--extra", default="", help="more `score` options, one string")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="bench/results/startup.json")
    p.add_argument("--later-shard", action="store_true", help="only score, on a cache one untimed shard filled")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="startup-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="true")
    task = MODELS[args.model]
    model_dir = build_model(args.model, workdir / args.model, device=args.device)
    data = write_input(workdir / f"rows-{args.rows}.jsonl", stsb_documents(args.rows, 4.0), task)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    model_type = config["model_type"].replace("-", "_")
    module = f"transformers.models.{model_type}.modeling_{model_type}"

    def score_cmd(prefix: list[str], tag: str) -> list[str]:
        cmd = [*prefix, "score", str(model_dir), "--input", str(data), "--output", str(workdir / f"out-{tag}.parquet"),
               "--task", task, "--json", "--quiet", "--device", args.device, *args.extra.split()]
        if task == "pairs":
            cmd += ["--text-columns", "a,b"]
        return cmd

    ours = [sys.executable, "-m", "attnfallback.cli.app"]
    steps: dict[str, list[str]] = {name: [sys.executable, "-c", code] for name, code in import_steps(module, args.device).items()}
    steps["ours"] = score_cmd(ours, "ours")
    steps["ours-no-warm-thread"] = score_cmd([sys.executable, "-c", NO_WARM_THREAD], "ours-nw")
    timed([sys.executable, "-c", "import torch, transformers"], env)  # the page cache, warm for every step alike
    if args.later_shard:
        env = dict(env, ATTNFALLBACK_CACHE=str(workdir / "cache-later"))
        wall, proc = timed([sys.executable, "-X", "importtime", *score_cmd(ours, "fill")[1:]], env)
        (out.parent / f"{out.stem}-first-importtime.log").write_text(proc.stderr)
        first = {"wall_s": round(wall, 3), "exit": proc.returncode, "phases": (json_tail(proc.stdout) or {}).get("phases"),
                 "top_imports": top_imports(proc.stderr)}
        print(f"first shard (fills the cache, under -X importtime): {wall:6.2f} s  exit {proc.returncode}", file=sys.stderr)
        steps = {"ours": steps["ours"]}
    report = {"model": args.model, "rows": args.rows, "device": args.device, "bytecode": bytecode_facts(env), "steps": {}}
    if args.later_shard:
        report["first_shard"] = first
    # compiled bytecode kept where the interpreter may write it (sys.pycache_prefix): the same imports, twice
    prefix = workdir / "pycache"
    for name in () if args.later_shard else ("model-class", "sentence-transformers"):
        for r in range(2):
            prefixed = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
            wall, proc = timed(steps[name], dict(prefixed, PYTHONPYCACHEPREFIX=str(prefix)))
            report["steps"].setdefault(f"{name}-pycache-prefix", {"wall_s": [], "exit": []})["wall_s"].append(round(wall, 3))
            print(f"{name}-pycache-prefix round {r}: {wall:6.2f} s  exit {proc.returncode}", file=sys.stderr, flush=True)
    for r in range(args.repeats):
        for name, cmd in steps.items():
            for f in workdir.glob("out-*.parquet"):
                f.unlink()
            cache = env["ATTNFALLBACK_CACHE"] if args.later_shard else str(workdir / f"cache-{name}-{r}")
            wall, proc = timed(cmd, dict(env, ATTNFALLBACK_CACHE=cache))
            entry = report["steps"].setdefault(name, {"wall_s": [], "exit": []})
            entry["wall_s"].append(round(wall, 3))
            entry["exit"].append(proc.returncode)
            if proc.returncode != 0:
                entry["error"] = (proc.stderr or proc.stdout)[-1500:]
            if name.startswith("ours") and proc.returncode == 0:
                result = json_tail(proc.stdout) or {}
                entry.setdefault("phases", []).append(result.get("phases"))
                entry.setdefault("used", []).append((result.get("decision") or {}).get("used"))
            print(f"{name:24s} round {r}: {wall:6.2f} s  exit {proc.returncode}", file=sys.stderr, flush=True)
    for f in workdir.glob("out-*.parquet"):
        f.unlink()
    _, proc = timed([sys.executable, "-X", "importtime", *score_cmd(ours, "imp")[1:]], env)
    (out.parent / f"{out.stem}-importtime.log").write_text(proc.stderr)
    report["top_imports"] = top_imports(proc.stderr)
    for f in workdir.glob("out-*.parquet"):
        f.unlink()
    stats_file = out.parent / f"{out.stem}.pstats"
    _, proc = timed([sys.executable, "-m", "cProfile", "-o", str(stats_file), "-m", *score_cmd(ours, "prof")[2:]], env)
    if stats_file.exists():
        import io

        text = io.StringIO()
        pstats.Stats(str(stats_file), stream=text).sort_stats("cumulative").print_stats(45)
        (out.parent / f"{out.stem}-profile.txt").write_text(text.getvalue())
    out.write_text(json.dumps(report, indent=1))
    print(f"bytecode: {json.dumps(report['bytecode'])}")
    print(f"\n{args.model}, {args.rows} rows, {args.device}: seconds from spawn to exit (each round)")
    for name, entry in report["steps"].items():
        phases = entry.get("phases") or []
        facts = [ph.get("facts_s") for ph in phases if ph]
        extra = f"  facts_s {facts}" if facts else ""
        print(f"  {name:24s} {entry['wall_s']}{extra}")
    print("slowest imports under `score` (cumulative s):")
    for name, self_s, cum_s in report["top_imports"][:15]:
        print(f"  {cum_s:7.3f}  {self_s:7.3f}  {name}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
