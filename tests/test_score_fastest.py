"""`score --policy fastest` times its candidates on the job's own texts."""

from __future__ import annotations

import json

from attnfallback import fastest
from attnfallback.scoring import ScoreJob, run_score


def test_fastest_measures_on_the_shards_own_texts(tmp_path, monkeypatch):
    data = tmp_path / "in.jsonl"
    texts = [f"row {i} " + "word " * (i % 7) for i in range(30)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    seen = {}
    real = fastest.choose_fastest

    def spy(loaded, viable, **kw):
        seen["sample"] = [" ".join(t) for t in kw["bench"].chunk.texts]  # the scorer's own bench
        seen["viable"] = viable
        return real(loaded, viable, cache_dir=tmp_path / "cache", **kw)

    monkeypatch.setattr(fastest, "choose_fastest", spy)
    monkeypatch.setenv("ATTNFALLBACK_CACHE", str(tmp_path / "cache"))
    result = run_score(ScoreJob(model="default", input=str(data), output=str(tmp_path / "out.parquet"), policy="fastest",
                                prefer="sdpa,eager", shard="1/2", quiet=True))
    assert seen["viable"] == ["sdpa", "eager"]
    assert seen["sample"] == [texts[i] for i in range(1, 30, 2)]  # this shard's rows, in order
    assert result.rows_written == 15
    assert result.decision["used"] in ("sdpa", "eager") and result.decision["measured"]["cache"] in ("miss", "hit")
