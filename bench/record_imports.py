"""Record the modules a scoring shard imports, for the bytecode prefix's fill (bytecode.SHARD_MODULES).

Runs `attnfallback score` as a user does, once per task, each in a fresh process, and writes the
union of the modules it imported (those with Python source), in the order first seen,
after those already in the list (`--merge`). Other model families' modules are left out: a shard
loads one family. The models are not the benchmarks' (bench/zoo_models.py's ModernBERT, XLM-R and
Llama): a two-layer BERT for embed (MiniLM's family), Qwen3-0.6B's reward shape with one layer for pairs and classify,
a two-layer Qwen2 for logprob.

    python bench/record_imports.py --device cpu --merge
    python bench/record_imports.py --device cuda --merge --out "$OUT/shard_modules.txt"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from attnfallback.bytecode import FAMILY_MODULE, SHARD_MODULES, shard_modules  # noqa: E402
from zoo_models import build_model, copy_tokenizer, sentence_config, stsb_documents, write_input  # noqa: E402

HEADER = ("# The modules a scoring shard imports, in import order: bench/record_imports.py, on this\n"
          "# project's CPU machine and on the lent GPU's image (bytecode.py fills its prefix with these).\n")


def tiny_embedder(directory: Path) -> Path:
    """A two-layer BERT with the MiniLM tokenizer and a sentence-transformers pooling config (the
    embedded model's family; the lent GPU's image lacks its weights)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    BertModel(config).save_pretrained(directory)
    return sentence_config(copy_tokenizer(directory), 64)


def tiny_causal_lm(directory: Path) -> Path:
    """A two-layer Qwen2 with the MiniLM tokenizer (not a benchmark's family)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048, pad_token_id=0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return copy_tokenizer(directory)


# The command line in this process, then the modules it holds: sys.modules keeps them in the order
# they were first imported, and names those that `-X importtime` does not report (transformers
# loads some of its modules through their loaders directly).
PROGRAM = """
import json, sys
from attnfallback.cli.app import main
code = main(sys.argv[2:])
names = [n for n, m in list(sys.modules.items()) if str(getattr(m, "__file__", "") or "").endswith(".py")]
open(sys.argv[1], "w").write(json.dumps(names))
sys.exit(code)
"""


def record(model: str, task: str, workdir: Path, device: str) -> tuple[list[str], dict]:
    rows = 64
    docs = stsb_documents(rows, 3.0)
    data = write_input(workdir / f"{task}.jsonl", docs, task)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPYCACHEPREFIX")}
    env.update(ATTNFALLBACK_CACHE=str(workdir / "cache"), PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    listing = workdir / f"{task}.modules.json"
    cmd = [sys.executable, "-c", PROGRAM, str(listing), "score", model, "--task", task, "--input", str(data),
           "--output", str(workdir / f"{task}.parquet"), "--device", device]
    cmd += ["--quiet", "--json"] if task != "embed" else []  # embed: the progress bar and the summary
    if task == "pairs":
        cmd += ["--text-columns", "a,b"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    facts = {"model": model, "task": task, "exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 2)}
    if proc.returncode != 0:
        facts["error"] = proc.stderr[-1500:]
        return [], facts
    names = json.loads(listing.read_text())
    facts["modules"] = len(names)
    return names, facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(SHARD_MODULES), help="the list to write (default: the package's)")
    parser.add_argument("--merge", action="store_true", help="keep the modules already in --out, first")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="record-imports-"))
    workdir.mkdir(parents=True, exist_ok=True)
    reward = str(build_model("qwen3-0.6b-reward-random", workdir / "qwen3", layers=1))
    runs = [(str(tiny_embedder(workdir / "bert")), "embed"), (reward, "pairs"), (reward, "classify"),
            (str(tiny_causal_lm(workdir / "qwen2")), "logprob")]
    names = shard_modules(args.out) if args.merge else []
    report = []
    for model, task in runs:
        found, facts = record(model, task, workdir, args.device)
        report.append(facts)
        print(json.dumps(facts)[:2000], flush=True)
        names.extend(found)
    if any(f["exit"] != 0 for f in report):
        print("not written: a run failed", file=sys.stderr)
        return 1
    kept = [n for n in dict.fromkeys(names) if not FAMILY_MODULE.match(n) and not n.startswith("__main__")]
    Path(args.out).write_text(HEADER + "\n".join(kept) + "\n", encoding="utf-8")
    print(f"{len(kept)} modules written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
