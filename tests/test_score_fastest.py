"""`score --policy fastest` times its candidates on the job's own texts."""

from __future__ import annotations

import json

import pytest

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


@pytest.mark.parametrize("budget_share", [20.0, fastest.GRACEFUL_BUDGET_SHARE])
def test_graceful_measures_the_shards_own_rows_through_the_scorer_and_says_why(tmp_path, monkeypatch, budget_share):
    """measure=on is measure=auto's path (a CUDA GPU's) on any device: the scorer's own forward
    over this shard's first rows, the choice and its reason in the result and the attn_impl event.
    With the real 5% share a 40-row shard cannot pay for two trials: nothing is run, and the reason
    says so; with twenty times its time to spend, the candidates are timed."""
    monkeypatch.setattr(fastest, "GRACEFUL_BUDGET_SHARE", budget_share)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} " + "word " * (i % 9)}) + "\n" for i in range(40)))
    monkeypatch.setenv("ATTNFALLBACK_CACHE", str(tmp_path / "cache"))
    seen = []
    real = fastest.choose

    def spy(loaded, viable, bench, settings, **kw):
        seen.append((viable, len(bench.chunk), bench.expected_rows, settings.budget_s, settings.margin))
        return real(loaded, viable, bench, settings, **kw)

    monkeypatch.setattr(fastest, "choose", spy)
    result = run_score(ScoreJob(model="default", input=str(data), output=str(tmp_path / "out.parquet"), prefer="sdpa,eager",
                                measure="on", events=str(tmp_path / "ev"), run_id="m1", quiet=True))
    assert seen == [(["sdpa", "eager"], 40, 40, None, fastest.GRACEFUL_MARGIN)]
    d = result.decision
    assert d["measured"]["sample"]["rows"] == 40 and d["measured"]["sample"]["expected_rows"] == 40
    assert d["choice"] == d["measured"]["reason"] and d["used"] in ("sdpa", "eager") and d["fell_back"] is False
    assert set(result.phases) >= {"before_run_s", "input_s", "facts_s", "load_s", "score_s", "finish_s", "run_s"}
    assert result.phases["load_detail"]["measure_s"] >= 0
    events = [json.loads(line) for p in (tmp_path / "ev").rglob("*.jsonl") for line in p.read_text().splitlines()]
    (attn,) = [e for e in events if e["event"] == "attn_impl"]
    (done,) = [e for e in events if e["event"] == "shard_done"]
    assert attn["choice"] == d["choice"]
    if budget_share == 20.0:
        assert attn["measured"]["tokens_per_s"]
    else:
        assert attn["measured"]["tokens_per_s"] == {} and d["used"] == "sdpa"
        assert "too small to pay for measuring" in d["choice"] and "passes over the 40-row sample" in d["choice"]
    assert done["phases"]["score_s"] == result.phases["score_s"]


def test_strict_and_measure_off_take_no_sample(tmp_path):
    from attnfallback.scoring.inputs import open_input, resolve_spec
    from attnfallback.scoring.job import measuring_sample
    from attnfallback.sharding import parse_shard

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(5)))
    source = open_input(str(data))
    spec = resolve_spec(source, 1, None, None, None)
    shard = parse_shard("0/1")
    assert measuring_sample(ScoreJob(input=str(data), output="o.parquet", policy="strict"), source, spec, shard) is None
    assert measuring_sample(ScoreJob(input=str(data), output="o.parquet", measure="off"), source, spec, shard) is None
    assert measuring_sample(ScoreJob(input=str(data), output="o.parquet"), source, spec, shard) == [(f"t{i}",) for i in range(5)]
