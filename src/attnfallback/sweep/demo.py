"""The demo: a 4-shard sweep over the STS-B test sentences with the embedded model.

It prefers flash_attention_2, then sdpa, then eager; every shard decides for itself and leaves an
`attn_impl` event (or, under strict policy, an `attn_unavailable` event and exit 3). At the end it
shows which implementation each shard used and why it fell back, and scores the embeddings the
way the STS benchmark does: cosine of each pair's two sentences, Spearman x100 against the gold
scores (82.03 for all-MiniLM-L6-v2).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from attnfallback.errors import InputError

DEMO_PREFER = ("flash_attention_2", "sdpa", "eager")
DEMO_SHARDS = 4
DEMO_WORKERS = 2
STSB_FILE = "stsb-en-test.csv"


def stsb_path() -> Path:
    """The STS-B English test split shipped inside the package (see data/STSB-LICENSE)."""
    return Path(str(resources.files("attnfallback") / "data" / STSB_FILE))


def read_stsb(path: str | os.PathLike | None = None) -> tuple[list[str], list[str], list[float]]:
    """(sentence1, sentence2, gold score) columns of an STS-B CSV without a header."""
    path = Path(path) if path is not None else stsb_path()
    first, second, gold = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if len(row) != 3:
                raise InputError("not an STS-B row", path=str(path), line=line,
                                 expected="3 fields: sentence1,sentence2,score", found=f"{len(row)} fields")
            try:
                score = float(row[2])
            except ValueError:
                raise InputError("the gold score is not a number", path=str(path), line=line,
                                 expected="a number in [0, 5]", found=repr(row[2])) from None
            first.append(row[0])
            second.append(row[1])
            gold.append(score)
    if not gold:
        raise InputError("no pairs", path=str(path), expected="at least one row", found="an empty file")
    return first, second, gold


def write_sentences(destination: Path, path: str | os.PathLike | None = None) -> int:
    """Every pair's first sentences, then their second sentences, as one `text` column.

    Row k and row k + pairs are the two sentences of pair k. Returns the number of pairs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    first, second, _ = read_stsb(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": first + second}), destination)
    return len(first)


def rank_average(values):
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata does)."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of the 1-based ranks s+1 .. e
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson of average ranks)."""
    import numpy as np

    rx, ry = rank_average(x), rank_average(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


def stsb_spearman(embeddings_path: str | os.PathLike, stsb: str | os.PathLike | None = None) -> float:
    """Spearman x100 of the pairs' cosine similarity against the gold scores, two decimals."""
    import numpy as np
    import pyarrow.parquet as pq

    _, _, gold = read_stsb(stsb)
    table = pq.read_table(embeddings_path)
    if table.num_rows != 2 * len(gold):
        raise InputError("embeddings do not cover every STS-B sentence", path=str(embeddings_path),
                         expected=f"{2 * len(gold)} rows", found=f"{table.num_rows}")
    ids = table.column("id").to_numpy()
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float64)[np.argsort(ids, kind="stable")]
    a, b = vectors[: len(gold)], vectors[len(gold):]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return round(100.0 * spearman(cosine, gold), 2)


@dataclass
class DemoResult:
    out: str
    policy: str
    exit_code: int
    sweep: object  # SweepResult
    pairs: int
    spearman: float | None = None
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out": self.out, "policy": self.policy, "exit_code": self.exit_code, "pairs": self.pairs,
                "stsb_spearman": self.spearman, "reasons": self.reasons, "sweep": self.sweep.to_dict()}


def run_demo(policy: str = "graceful", out: str | os.PathLike | None = None, echo=None,
             workers: int = DEMO_WORKERS, shards: int = DEMO_SHARDS) -> DemoResult:
    """Run the demo sweep; `out` defaults to a fresh ./demo-out/<run id>."""
    from attnfallback.events import new_run_id
    from attnfallback.sweep.config import parse_config
    from attnfallback.sweep.local import run_local

    run_id = f"demo-{new_run_id()}"
    out = Path(out) if out is not None else Path("demo-out") / run_id
    sentences = out / "input" / "stsb-sentences.parquet"
    pairs = write_sentences(sentences)
    config = parse_config({
        "run_id": run_id,
        "output": str(out / "sweep"),
        "events": str(out / "events"),
        "shards": shards,
        "devices": "auto",
        "workers": workers,
        "model": "default",
        "task": "embed",
        "input": str(sentences),
        "text_column": "text",
        "policy": policy,
        "prefer": list(DEMO_PREFER),
    })
    sweep = run_local(config, echo=echo)
    result = DemoResult(str(out), policy, sweep.exit_code, sweep, pairs)
    merged = sweep.merged.get(config.specs[0].name)
    if sweep.exit_code == 0 and merged:
        result.spearman = stsb_spearman(merged["path"])
    for job in sweep.failed:
        result.reasons.append(f"shard {job.shard}: {job.error_text or job.error}")
    return result
