"""Policy `fastest`: picks the faster of two candidates made different by an injected timer, counts
compilation apart, keeps within its budget, caches the choice under a key that moves with every
input it depends on, and a cache hit skips the measurement."""

from __future__ import annotations

import dataclasses
import json

import pytest

from attnfallback import fastest, loader, verify
from attnfallback.events import set_default_sink, validate
from attnfallback.loader import load_model
from attnfallback.events import NULL_SINK
from attnfallback.policy import Policy

SAMPLE = [12, 16, 20, 24] * 4  # token lengths: a small calibration sample keeps the real passes cheap
SAMPLE_DIST = "normal:16:4:32"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for var in ("ATTNFALLBACK_EVENTS", "ATTNFALLBACK_POLICY", "ATTNFALLBACK_PREFER", "ATTNFALLBACK_RUN_ID",
                "ATTNFALLBACK_SHARD", fastest.ENV_SAMPLE):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(fastest.ENV_CACHE, str(tmp_path / "cache"))
    yield
    set_default_sink(None)


class InjectedSpeeds:
    """A timer: each pass runs for real, and takes the seconds given for its implementation."""

    def __init__(self, steady: dict[str, float], warmup: dict[str, float] | None = None):
        self.steady = steady
        self.warmup = warmup or {}
        self.calls: list[str] = []

    def __call__(self, impl, run):
        run()
        first = impl not in self.calls
        self.calls.append(impl)
        return self.warmup.get(impl, self.steady[impl]) if first else self.steady[impl]


def graceful(model_dir, prefer=("sdpa", "eager")):
    return load_model(str(model_dir), policy=Policy.graceful(list(prefer)), sink=NULL_SINK)


@pytest.mark.parametrize("faster", ["eager", "sdpa"])
def test_fastest_picks_the_faster_of_two_candidates(tiny_bert, tmp_path, faster):
    loaded = graceful(tiny_bert)
    slower = "sdpa" if faster == "eager" else "eager"
    timer = InjectedSpeeds({faster: 0.01, slower: 0.05})
    fastest.choose_fastest(loaded, ["sdpa", "eager"], sample=SAMPLE, cache_dir=tmp_path / f"c-{faster}", timer=timer)
    d = loaded.decision
    assert d.used == faster and loaded.model.config._attn_implementation == faster
    m = d.measured
    assert m["cache"] == "miss" and m["chosen"] == faster and m["cache_written"] is True
    assert m["tokens_per_s"][faster] == pytest.approx(5 * m["tokens_per_s"][slower])
    assert set(timer.calls) == {"sdpa", "eager"}
    switched = [a for a in d.attempts if a.impl == "eager"]
    assert switched and switched[0].ok and switched[0].stage == "verify"  # the switched candidate was verified


def test_compile_time_is_counted_apart_from_speed(tiny_bert, tmp_path):
    loaded = graceful(tiny_bert)
    timer = InjectedSpeeds({"sdpa": 0.02, "eager": 0.04}, warmup={"sdpa": 3.0})  # sdpa compiles, then runs faster
    fastest.choose_fastest(loaded, ["sdpa", "eager"], sample=SAMPLE, cache_dir=tmp_path, timer=timer)
    m = loaded.decision.measured
    assert loaded.decision.used == "sdpa"
    assert m["compile_s"]["sdpa"] == pytest.approx(2.98) and m["compile_s"]["eager"] == 0
    assert m["tokens_per_s"]["sdpa"] == pytest.approx(2 * m["tokens_per_s"]["eager"])


def test_cache_hit_skips_the_measurement(tiny_bert, tmp_path):
    first = graceful(tiny_bert)
    fastest.choose_fastest(first, ["sdpa", "eager"], sample=SAMPLE, cache_dir=tmp_path, timer=InjectedSpeeds({"sdpa": 0.05, "eager": 0.01}))
    (cache_file,) = tmp_path.glob("fastest-*.json")
    assert json.loads(cache_file.read_text())["chosen"] == "eager"

    second = graceful(tiny_bert)  # a later shard on the same class
    untouched = InjectedSpeeds({"sdpa": 0.01, "eager": 0.05})  # would pick sdpa if it measured
    fastest.choose_fastest(second, ["sdpa", "eager"], sample=SAMPLE, cache_dir=tmp_path, timer=untouched)
    assert untouched.calls == []
    assert second.decision.used == "eager" and second.model.config._attn_implementation == "eager"
    m = second.decision.measured
    assert m["cache"] == "hit" and m["cache_key"] == first.decision.measured["cache_key"]
    assert m["tokens_per_s"] == first.decision.measured["tokens_per_s"]


def test_cache_key_changes_with_every_input_it_depends_on(tiny_bert):
    from attnfallback.caps import DeviceCaps

    d = graceful(tiny_bert).decision
    base = fastest.cache_key(d, ["sdpa", "eager"], "mean_tokens~64")
    digest = fastest.key_digest(base)
    assert fastest.key_digest(fastest.cache_key(d, ["eager", "sdpa"], "mean_tokens~64")) == digest  # order does not matter
    newer_torch = dataclasses.replace(d, versions={**d.versions, "torch": "9.9.9"})
    newer_flash = dataclasses.replace(d, versions={**d.versions, "flash_attn_4": "4.0.1"})
    variants = [
        fastest.cache_key(newer_torch, ["sdpa", "eager"], "mean_tokens~64"),
        fastest.cache_key(newer_flash, ["sdpa", "eager"], "mean_tokens~64"),
        fastest.cache_key(dataclasses.replace(d, dtype="bfloat16"), ["sdpa", "eager"], "mean_tokens~64"),
        fastest.cache_key(dataclasses.replace(d, device=DeviceCaps.from_class("H100")), ["sdpa", "eager"], "mean_tokens~64"),
        fastest.cache_key(d, ["sdpa", "eager", "flex_attention"], "mean_tokens~64"),
        fastest.cache_key(d, ["sdpa", "eager"], "mean_tokens~2048"),
    ]
    digests = {fastest.key_digest(k) for k in variants}
    assert digest not in digests and len(digests) == len(variants)


def test_a_cache_entry_for_other_versions_is_not_a_hit(tiny_bert, tmp_path, monkeypatch):
    first = graceful(tiny_bert)
    fastest.choose_fastest(first, ["sdpa", "eager"], sample=SAMPLE, cache_dir=tmp_path, timer=InjectedSpeeds({"sdpa": 0.05, "eager": 0.01}))
    later = graceful(tiny_bert)
    later.decision.versions = {**later.decision.versions, "transformers": "5.99.0"}
    timer = InjectedSpeeds({"sdpa": 0.01, "eager": 0.05})
    fastest.choose_fastest(later, ["sdpa", "eager"], sample=SAMPLE, cache_dir=tmp_path, timer=timer)
    assert later.decision.measured["cache"] == "miss" and timer.calls and later.decision.used == "sdpa"
    assert len(list(tmp_path.glob("fastest-*.json"))) == 2


def test_a_candidate_failing_verification_is_recorded_and_not_chosen(tiny_bert, tmp_path, monkeypatch):
    loaded = graceful(tiny_bert)
    real = verify.verify_forward

    def eager_fails(model, facts, device):
        if model.config._attn_implementation == "eager":
            return ["forward produced non-finite outputs (NaN or inf)"]
        return real(model, facts, device)

    monkeypatch.setattr(verify, "verify_forward", eager_fails)
    timer = InjectedSpeeds({"sdpa": 0.05, "eager": 0.01})
    fastest.choose_fastest(loaded, ["sdpa", "eager"], sample=SAMPLE, cache_dir=tmp_path, timer=timer)
    assert loaded.decision.used == "sdpa" and loaded.model.config._attn_implementation == "sdpa"
    failed = [a for a in loaded.decision.attempts if a.impl == "eager"]
    assert failed[0].ok is False and "non-finite" in failed[0].reasons[0]
    assert "eager" not in timer.calls and list(loaded.decision.measured["tokens_per_s"]) == ["sdpa"]


def test_a_spent_budget_skips_the_rest_and_caches_nothing(tiny_bert, tmp_path):
    loaded = graceful(tiny_bert)
    fastest.choose_fastest(loaded, ["sdpa", "eager"], sample=SAMPLE, budget_s=0, cache_dir=tmp_path,
                           timer=InjectedSpeeds({"sdpa": 0.05, "eager": 0.01}))
    m = loaded.decision.measured
    assert list(m["tokens_per_s"]) == ["sdpa"] and "time budget" in m["skipped"]["eager"]
    assert m["cache_written"] is False and not list(tmp_path.glob("fastest-*.json"))
    assert loaded.decision.used == "sdpa"


def test_one_viable_candidate_needs_no_measurement(tiny_bert, tmp_path):
    loaded = graceful(tiny_bert)
    timer = InjectedSpeeds({"sdpa": 0.01})
    fastest.choose_fastest(loaded, ["sdpa"], sample=SAMPLE, cache_dir=tmp_path, timer=timer)
    assert loaded.decision.measured["cache"] == "not needed" and timer.calls == []


def test_candidates_that_compile_are_measured_last():
    assert fastest.measuring_order("sdpa", ["flex_attention", "flash_attention_4", "sdpa", "eager"]) == [
        "sdpa", "eager", "flex_attention", "flash_attention_4"]


def test_load_model_under_policy_fastest_records_the_measurement_in_the_event(tiny_bert, tmp_path, monkeypatch):
    from attnfallback import measure

    speeds = InjectedSpeeds({"sdpa": 0.05, "eager": 0.01})
    monkeypatch.setattr(measure, "wall_timer", lambda device: speeds)
    monkeypatch.setenv(fastest.ENV_SAMPLE, SAMPLE_DIST)
    monkeypatch.setitem(fastest.SAMPLE_TOKENS, "cpu", 256)  # a few sequences drawn from it
    loaded = load_model(str(tiny_bert), policy=Policy.fastest(["flash_attention_2", "sdpa", "eager"]), events=tmp_path / "ev", run_id="f1")
    assert loaded.decision.used == "eager"
    (path,) = (tmp_path / "ev").rglob("*.jsonl")
    (event,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert validate(event) == [] and event["used"] == "eager" and event["policy"]["mode"] == "fastest"
    assert event["measured"]["cache"] == "miss" and event["measured"]["sample"]["distribution"] == SAMPLE_DIST
    assert event["measured"]["tokens_per_s"]["eager"] > event["measured"]["tokens_per_s"]["sdpa"]
    assert list((tmp_path / "cache").glob("fastest-*.json"))  # $ATTNFALLBACK_CACHE


@pytest.mark.gpu
def test_fastest_on_the_gpu_measures_then_answers_from_the_cache(tmp_path):
    policy = dataclasses.replace(Policy.fastest(["flash_attention_4", "sdpa", "eager"]), fastest_budget_s=10, extra={"fastest_sample": "short"})
    first = load_model("default", policy=policy, device="cuda", sink=NULL_SINK)
    m = first.decision.measured
    assert m["cache"] == "miss" and first.decision.used == max(m["tokens_per_s"], key=m["tokens_per_s"].get)
    assert first.model.config._attn_implementation == first.decision.used
    again = load_model("default", policy=policy, device="cuda", sink=NULL_SINK)
    assert again.decision.measured["cache"] == "hit" and again.decision.used == first.decision.used


def test_an_unwritable_cache_is_reported_and_the_choice_still_made(tiny_bert, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    loaded = graceful(tiny_bert)
    fastest.choose_fastest(loaded, ["sdpa", "eager"], sample=SAMPLE, cache_dir=blocker, timer=InjectedSpeeds({"sdpa": 0.05, "eager": 0.01}))
    m = loaded.decision.measured
    assert loaded.decision.used == "eager" and m["cache_written"] is False and m["cache_error"]
