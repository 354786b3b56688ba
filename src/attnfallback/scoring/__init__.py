"""Sharded, resumable scoring: inputs -> batching -> pipeline (tokenize || forward) -> writer.

    from attnfallback.scoring import ScoreJob, run_score, Scorer
    result = run_score(ScoreJob(model="default", input="texts.jsonl", output="emb.parquet"))
    scorer = Scorer.from_job(ScoreJob(model="default"))      # model loaded once (Ray actors)
    scorer.score_table(table)                               # id + output columns, same order

Nothing heavy is imported until a name is used.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "ScoreJob": "attnfallback.scoring.job",
    "ScoreResult": "attnfallback.scoring.job",
    "run_score": "attnfallback.scoring.job",
    "Scorer": "attnfallback.scoring.pipeline",
    "TASKS": "attnfallback.scoring.tasks",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attnfallback.scoring' has no attribute {name!r}")
    return getattr(import_module(module), name)
