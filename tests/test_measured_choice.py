"""The default policy's measured choice (fastest.choose): its budget follows the shard's size, a
compile is charged against it, the preference order holds within the margin, and the shared cache
survives concurrent writers and ignores corrupt or stale entries with a warning."""

from __future__ import annotations

import json
import logging
import multiprocessing
from datetime import datetime, timedelta, timezone

import pytest

from attnfallback import fastest, kernel_variants, loader
from attnfallback.bench import Measurement
from attnfallback.fastest import Settings
from attnfallback.loader import load_model
from attnfallback.events import NULL_SINK
from attnfallback.policy import Policy

GRACEFUL = Settings(budget_s=None, margin=fastest.GRACEFUL_MARGIN, charge_compiles=True, task="embed")


class FakeBench:
    """Trials that take the seconds given per implementation (tokens fixed); nothing really runs."""

    task = "embed"

    def __init__(self, steady: dict[str, float], *, expected_tokens: int | None, first: dict[str, float] | None = None,
                 tokens: int = 10_000, failing: dict[str, str] | None = None):
        self.steady, self.first = steady, first or {}
        self.expected_tokens, self.tokens = expected_tokens, tokens
        self.failing = failing or {}
        self.description = {"source": "test", "rows": 8}
        self.tried: list[str] = []
        self.switched: list[str] = []

    def tag(self) -> str:
        return "mean_tokens~64"

    def trial(self, impl, seconds):
        self.tried.append(impl)
        if impl in self.failing:
            return None, [self.failing[impl]]
        s = self.steady[impl]
        return Measurement(impl, impl, self.tokens, self.tokens, 1, self.first.get(impl, s), [s, s, s]), []

    def switch(self, impl):
        self.switched.append(impl)
        return []


@pytest.fixture
def loaded(tiny_bert):
    return load_model(str(tiny_bert), policy=Policy.graceful(["sdpa", "eager"]), sink=NULL_SINK)


def test_a_shard_too_small_to_pay_for_measuring_keeps_the_loaded_choice(loaded, tmp_path):
    bench = FakeBench({"sdpa": 0.01, "eager": 0.001}, expected_tokens=20_000)  # ~0.02 s of work: 1 ms of budget
    fastest.choose(loaded, ["sdpa", "eager"], bench, GRACEFUL, cache_dir=tmp_path)
    m = loaded.decision.measured
    assert bench.tried == ["sdpa"] and loaded.decision.used == "sdpa"
    assert m["budget_s"] == pytest.approx(0.05 * 0.02) and "too small" in m["reason"]
    assert m["cache_written"] is False and not loaded.decision.fell_back


def test_a_large_shard_measures_within_two_seconds_and_picks_the_faster(loaded, tmp_path):
    bench = FakeBench({"sdpa": 0.01, "eager": 0.005}, expected_tokens=10**9)
    fastest.choose(loaded, ["sdpa", "eager"], bench, GRACEFUL, cache_dir=tmp_path)
    m = loaded.decision.measured
    assert m["budget_s"] == fastest.GRACEFUL_BUDGET_S and bench.tried == ["sdpa", "eager"]
    assert loaded.decision.used == "eager" and "faster than sdpa by more than 5%" in m["reason"]
    assert m["cache_written"] is True


@pytest.mark.parametrize(("eager_s", "chosen"), [(0.0098, "sdpa"), (0.0090, "eager")])
def test_the_preference_holds_unless_a_later_candidate_is_faster_by_the_margin(loaded, tmp_path, eager_s, chosen):
    bench = FakeBench({"sdpa": 0.01, "eager": eager_s}, expected_tokens=10**9)  # eager 2% or 11% faster
    fastest.choose(loaded, ["sdpa", "eager"], bench, GRACEFUL, cache_dir=tmp_path)
    assert loaded.decision.used == chosen


def test_a_candidate_that_compiles_is_measured_only_when_its_compile_fits_the_budget(loaded, tmp_path, monkeypatch):
    monkeypatch.setitem(fastest.impl_registry.REGISTRY, "eager",
                        fastest.impl_registry.REGISTRY["eager"].__class__(**{**fastest.impl_registry.REGISTRY["eager"].__dict__, "compiles": True}))
    monkeypatch.setitem(fastest.COMPILE_PRIOR_S, "eager", 3.0)
    bench = FakeBench({"sdpa": 0.01, "eager": 0.001}, expected_tokens=10**9)
    fastest.choose(loaded, ["sdpa", "eager"], bench, GRACEFUL, cache_dir=tmp_path)
    m = loaded.decision.measured
    assert bench.tried == ["sdpa"] and loaded.decision.used == "sdpa"
    assert "compiles (about 3 s, prior" in m["skipped"]["eager"] and "eager not measured" in m["reason"]
    assert not loaded.decision.fell_back  # left unmeasured, not failed

    fastest.remember_compile(tmp_path, loaded.decision, "eager", 0.2)  # seen cheap here (its kernels on disk)
    loaded.decision.used = "sdpa"
    again = FakeBench({"sdpa": 0.01, "eager": 0.001}, expected_tokens=10**9, first={"eager": 0.201})
    fastest.choose(loaded, ["sdpa", "eager"], again, GRACEFUL, cache_dir=tmp_path)
    assert again.tried == ["sdpa", "eager"] and loaded.decision.used == "eager"
    assert loaded.decision.measured["compile_s"]["eager"] == pytest.approx(0.2)


def test_a_candidate_failing_its_trial_is_an_attempt_with_its_reason(loaded, tmp_path):
    bench = FakeBench({"sdpa": 0.01, "eager": 0.001}, expected_tokens=10**9, failing={"eager": "a forward on this shard's rows failed: boom"})
    fastest.choose(loaded, ["sdpa", "eager"], bench, GRACEFUL, cache_dir=tmp_path)
    assert loaded.decision.used == "sdpa" and bench.switched == ["sdpa"]  # back from the failed candidate
    (failed,) = [a for a in loaded.decision.attempts if a.impl == "eager"]
    assert not failed.ok and "boom" in failed.reasons[0]


def test_a_cached_choice_is_switched_to_without_measuring(loaded, tmp_path):
    fastest.choose(loaded, ["sdpa", "eager"], FakeBench({"sdpa": 0.01, "eager": 0.005}, expected_tokens=10**9), GRACEFUL, cache_dir=tmp_path)
    loaded.decision.used = "sdpa"
    later = FakeBench({"sdpa": 0.001, "eager": 0.01}, expected_tokens=10**9)  # would pick sdpa if it measured
    fastest.choose(loaded, ["sdpa", "eager"], later, GRACEFUL, cache_dir=tmp_path)
    assert later.tried == [] and later.switched == ["eager"] and loaded.decision.used == "eager"
    assert loaded.decision.measured["cache"] == "hit" and "cached measurement" in loaded.decision.measured["reason"]


@pytest.mark.parametrize("damage", ["corrupt", "stale", "other-key"])
def test_a_corrupt_stale_or_foreign_cache_entry_is_ignored_with_a_warning(loaded, tmp_path, caplog, damage):
    fastest.choose(loaded, ["sdpa", "eager"], FakeBench({"sdpa": 0.01, "eager": 0.005}, expected_tokens=10**9), GRACEFUL, cache_dir=tmp_path)
    (path,) = tmp_path.glob("fastest-*.json")
    entry = json.loads(path.read_text())
    if damage == "corrupt":
        path.write_text(path.read_text()[:40])
    elif damage == "stale":
        entry["measured_at"] = (datetime.now(timezone.utc) - timedelta(days=31)).isoformat()
        path.write_text(json.dumps(entry))
    else:
        entry["key"]["model"] = "another model"
        path.write_text(json.dumps(entry))
    loaded.decision.used = "sdpa"
    bench = FakeBench({"sdpa": 0.001, "eager": 0.01}, expected_tokens=10**9)
    with caplog.at_level(logging.WARNING, logger="attnfallback"):
        fastest.choose(loaded, ["sdpa", "eager"], bench, GRACEFUL, cache_dir=tmp_path)
    assert bench.tried == ["sdpa", "eager"] and loaded.decision.used == "sdpa"  # measured again
    assert any("ignoring" in r.message for r in caplog.records)
    assert json.loads(path.read_text())["chosen"] == "sdpa"  # and the entry replaced


def _write_many(path: str, tag: int) -> None:
    from pathlib import Path

    for i in range(200):
        assert fastest.write_atomically(Path(path), {"writer": tag, "i": i, "pad": "x" * 4096}) is None


def test_concurrent_writers_leave_one_whole_entry(tmp_path):
    path = tmp_path / "fastest-shared.json"
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_many, args=(str(path), k)) for k in range(3)]
    for w in writers:
        w.start()
    seen = 0
    while any(w.is_alive() for w in writers):
        if path.exists():
            data = json.loads(path.read_text())  # never a torn file
            assert data["pad"] == "x" * 4096
            seen += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert json.loads(path.read_text())["i"] == 199 and not list(tmp_path.glob(".*tmp"))


def test_measuring_loads_a_candidate_that_does_not_compile_first():
    from attnfallback.planner import Candidate

    plan = [Candidate("flash_attention_4", ()), Candidate("flash_attention_2", ("no",)), Candidate("sdpa", ()),
            Candidate("eager", ())]
    assert [c.impl for c in loader._loading_order(plan, measuring=False)] == ["flash_attention_4", "flash_attention_2", "sdpa", "eager"]
    assert [c.impl for c in loader._loading_order(plan, measuring=True)] == ["flash_attention_2", "sdpa", "eager", "flash_attention_4"]


def test_graceful_measures_on_cuda_with_a_bench_and_never_under_strict():
    from attnfallback.caps import DeviceCaps

    h100, cpu = DeviceCaps.from_class("H100"), DeviceCaps.cpu()
    bench = object()
    assert loader._measures(Policy.graceful(), h100, bench, ["flash_attention_4", "sdpa"])
    assert not loader._measures(Policy.graceful(), h100, None, ["flash_attention_4", "sdpa"])  # nothing of the caller's to run
    assert not loader._measures(Policy.graceful(), h100, bench, ["sdpa"])  # nothing to compare
    assert not loader._measures(Policy.strict(), h100, bench, ["flash_attention_4", "sdpa"])
    assert not loader._measures(Policy.graceful(measure="off"), h100, bench, ["flash_attention_4", "sdpa"])
    assert loader._measures(Policy.fastest(), h100, None, ["flash_attention_4", "sdpa"])
    assert not loader._measures(Policy.graceful(), cpu, bench, ["sdpa", "eager"])
    assert loader._measures(Policy.graceful(measure="on"), cpu, bench, ["sdpa", "eager"])


def test_flash_kernel_cache_goes_under_the_cache_directory_unless_the_user_chose(tmp_path):
    env = {"ATTNFALLBACK_CACHE": str(tmp_path)}
    assert loader.enable_flash_kernel_cache(env) == str(tmp_path / "flash-kernels")
    assert env["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    mine = {"FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "0"}
    loader.enable_flash_kernel_cache(mine)
    assert mine == {"FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "0"}
    off = {"ATTNFALLBACK_FLASH_KERNEL_CACHE": "off"}
    loader.enable_flash_kernel_cache(off)
    assert "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED" not in off


def test_declared_shapes_put_flash_attention_4_batches_on_one_variant():
    import numpy as np

    assert kernel_variants.declared_shape("flash_attention_4", 10, 40) == (257, 247)
    assert kernel_variants.declared_shape("flash_attention_4", 300, 900) == (900, 0)
    assert kernel_variants.declared_shape("flash_attention_2", 10, 40) == (40, 0)  # compiled ahead of time
    assert kernel_variants.declared_shape("flash_attention_4", 10, 40, mode="plain") == (40, 0)
    cu = np.array([0, 3, 7], dtype=np.int32)
    padded = kernel_variants.padded_boundaries(cu, 3)
    assert padded.tolist() == [0, 3, 7, 7, 7, 7] and padded.dtype == np.int32


def test_a_fastest_calibration_serves_later_graceful_shards(loaded, tmp_path):
    calibrating = FakeBench({"sdpa": 0.01, "eager": 0.005}, expected_tokens=None)
    fastest.choose_fastest(loaded, ["sdpa", "eager"], bench=calibrating, cache_dir=tmp_path)
    assert loaded.decision.used == "eager" and loaded.decision.measured["cache_written"] is True
    loaded.decision.used = "sdpa"
    later = FakeBench({"sdpa": 0.001, "eager": 0.01}, expected_tokens=10**9)
    fastest.choose(loaded, ["sdpa", "eager"], later, GRACEFUL, cache_dir=tmp_path)
    assert loaded.decision.measured["cache"] == "hit" and loaded.decision.used == "eager" and later.tried == []


@pytest.fixture
def eager_compiles(monkeypatch):
    eager = fastest.impl_registry.REGISTRY["eager"]
    monkeypatch.setitem(fastest.impl_registry.REGISTRY, "eager", eager.__class__(**{**eager.__dict__, "compiles": True}))
    monkeypatch.setitem(fastest.COMPILE_PRIOR_S, "eager", 3.0)


@pytest.mark.parametrize(("expected_tokens", "taken"), [(20_000, False), (10**9, True)])
def test_a_cached_choice_that_compiles_is_taken_only_when_the_shard_can_pay_for_it(loaded, tmp_path, eager_compiles,
                                                                                   expected_tokens, taken):
    fastest.choose_fastest(loaded, ["sdpa", "eager"], bench=FakeBench({"sdpa": 0.01, "eager": 0.005}, expected_tokens=None),
                           cache_dir=tmp_path)
    fastest.remember_compile(tmp_path, loaded.decision, "eager", 1.5)  # seen here: 1.5 s, fits a 2 s budget
    loaded.decision.used = "sdpa"
    bench = FakeBench({"sdpa": 0.01, "eager": 0.005}, expected_tokens=expected_tokens)
    fastest.choose(loaded, ["sdpa", "eager"], bench, GRACEFUL, cache_dir=tmp_path)
    m = loaded.decision.measured
    if taken:
        assert loaded.decision.used == "eager" and m["cache"] == "hit"
    else:  # ~0.02 s of work: a 1.5 s compile is not worth it
        assert loaded.decision.used == "sdpa" and m["cache"] == "hit, not taken" and "compiles" in m["reason"]


def test_kernels_kept_on_disk_predict_a_cheap_next_compile(loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    fastest.remember_compile(tmp_path, loaded.decision, "flash_attention_4", 9.8)
    assert fastest.predicted_compile_s(tmp_path, loaded.decision, "flash_attention_4")[0] == fastest.KERNEL_LOAD_PRIOR_S
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")
    fastest.remember_compile(tmp_path, loaded.decision, "flash_attention_4", 9.8)
    assert fastest.predicted_compile_s(tmp_path, loaded.decision, "flash_attention_4")[0] == 9.8
    assert fastest.predicted_compile_s(tmp_path, loaded.decision, "sdpa") == (0.0, "does not compile")


def test_a_shard_whose_budget_cannot_cover_two_trials_is_not_measured_at_all():
    """5% of the shard's expected passes over the sample against two trials of at least
    `min_trial_passes` each: decided before any trial, whatever the rate."""
    import types

    def bench(expected_tokens, min_passes=3):
        return types.SimpleNamespace(min_trial_passes=min_passes, tokens=1000, expected_tokens=expected_tokens,
                                     description={"rows": 256})

    why = fastest._too_small_to_compare(bench(100_000))  # 5 passes affordable, 6 needed
    assert why and "5 passes over the 256-row sample" in why and "at least 6" in why
    assert fastest._too_small_to_compare(bench(120_000)) is None
    assert fastest._too_small_to_compare(bench(None)) is None  # expected size unknown: the budget decides later
    assert fastest._too_small_to_compare(types.SimpleNamespace(tokens=1000, expected_tokens=10)) is None  # says nothing
