"""bench: length distributions, workloads, and the measurement's bookkeeping (warm-up apart, median
of repeats, implementations that cannot run reported). Speeds come from an injected timer: no test
here times anything."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnfallback import bench, measure
from attnfallback.cli.app import main
from attnfallback.errors import UsageError


class ScriptedTimer:
    """Runs each pass for real but reports scripted seconds: warm-up first, then steady passes."""

    def __init__(self, warmup: dict[str, float], steady: dict[str, list[float]]):
        self.warmup = warmup
        self.steady = {k: list(v) for k, v in steady.items()}
        self.calls: list[str] = []

    def __call__(self, impl, run):
        run()
        first = impl not in self.calls
        self.calls.append(impl)
        if first:
            return self.warmup[impl]
        values = self.steady[impl]
        return values.pop(0) if len(values) > 1 else values[0]


def test_named_and_explicit_length_distributions():
    short, long = measure.parse_lengths("short"), measure.parse_lengths("long")
    assert (short.mean, short.max_length) == (64, 512) and (long.mean, long.max_length) == (2400, 8192)
    custom = measure.parse_lengths("normal:300:50:1024")
    assert (custom.mean, custom.std, custom.max_length, custom.name) == (300, 50, 1024, "normal:300:50:1024")
    for bad in ("medium", "normal:64:32", "normal:a:1:2", "uniform:1:2:3", "normal:64:-1:512", "normal:64:1:2"):
        with pytest.raises(UsageError) as info:
            measure.parse_lengths(bad)
        assert info.value.exit_code == 2 and "normal:MEAN:STD:MAX" in str(info.value)


def test_length_samples_are_seeded_and_clipped():
    long = measure.parse_lengths("long")
    a, b = long.sample(2000), long.sample(2000)
    assert np.array_equal(a, b) and a.min() >= measure.MIN_LENGTH and a.max() <= 8192
    assert 2200 < a.mean() < 2700  # ~2.4k: the clipping moves it a little
    clipped = long.sample(500, limit=512)
    assert clipped.max() == 512 and (clipped == 512).mean() > 0.85


def test_synthetic_workload_is_sorted_longest_first_and_batched_within_budget():
    dist = measure.parse_lengths("normal:40:20:100")
    work = measure.synthetic_workload(dist, vocab_size=30522, limit=64, count=50)
    lengths = work.lengths
    assert list(lengths) == sorted(lengths, reverse=True) and lengths.max() <= 64
    assert work.description["clipped_to"] == 64 and work.description["tokens"] == int(lengths.sum()) == work.tokens
    assert all(((s >= 1000) & (s < 30522)).all() for s in work.sequences)
    batches = work.batches("cpu", "sdpa", pad_id=0, batch_tokens=256)
    assert sum(b["input_ids"].shape[0] for b in batches) == 50
    assert all(b["input_ids"].numel() <= max(256, b["input_ids"].shape[1]) for b in batches)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == work.tokens
    assert work.tag() == f"mean_tokens~{2 ** round(np.log2(work.mean_length))}"


def test_bench_reports_median_and_warmup_apart_and_the_implementations_that_cannot_run(tiny_bert):
    timer = ScriptedTimer(warmup={"sdpa": 5.0, "eager": 0.3}, steady={"sdpa": [0.9, 0.1, 0.1, 0.2], "eager": [0.25]})
    report = bench.run_bench(str(tiny_bert), impls=["flash_attention_2", "sdpa", "eager"], lengths="normal:16:4:32",
                             seconds=0.3, sequences=12, timer=timer)
    sdpa, eager = report.results["sdpa"], report.results["eager"]
    assert sdpa.repeat_s == [0.9, 0.1, 0.1] and sdpa.median_s == 0.1  # stopped once 0.3 s were timed
    assert sdpa.tokens_per_s == pytest.approx(sdpa.tokens / 0.1) and sdpa.warmup_s == 5.0
    assert sdpa.compile_s == pytest.approx(4.9)  # the warm-up's excess over a steady pass
    assert eager.repeat_s == [0.25] * 3 and eager.compile_s == pytest.approx(0.05)  # at least min_repeats
    assert sdpa.tokens == eager.tokens == report.workload["tokens"] and report.workload["sequences"] == 12
    assert report.fastest == "sdpa"
    assert "package flash_attn is not installed" in report.unavailable["flash_attention_2"]
    data = report.to_dict()
    assert data["results"]["eager"]["relative_to_fastest"] == pytest.approx(0.1 / 0.25)
    assert timer.calls.count("sdpa") == 4 and timer.calls.count("eager") == 4


def test_a_failing_forward_is_reported_not_raised(tiny_bert):
    def timer(impl, run):
        if impl == "eager":
            raise RuntimeError("CUDA out of memory. Tried to allocate 12.00 GiB")
        run()
        return 0.01

    report = bench.run_bench(str(tiny_bert), impls=["sdpa", "eager"], lengths="normal:16:4:32", seconds=0.01, sequences=4, timer=timer)
    assert list(report.results) == ["sdpa"]
    assert report.unavailable["eager"] == ["warm-up failed: RuntimeError: CUDA out of memory. Tried to allocate 12.00 GiB"]


def test_bench_command_on_texts_from_a_file(tiny_bert, tmp_path, capsys, monkeypatch):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": "hello " * (i + 1)}) + "\n" for i in range(10)))
    monkeypatch.setattr(measure, "wall_timer", lambda device: lambda impl, run: (run(), 0.01)[1])
    code = main(["bench", str(tiny_bert), "--impls", "sdpa,eager", "--input", str(path), "--seconds", "0.02", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and set(data["results"]) == {"sdpa", "eager"}
    assert data["workload"]["source"] == str(path) and data["workload"]["sequences"] == 10
    assert data["workload"]["tokens"] == sum(i + 1 + 2 for i in range(10))  # [CLS] hello... [SEP]
    assert data["results"]["sdpa"]["repeats"] >= 2
    code = main(["bench", str(tiny_bert), "--impls", "sdpa", "--seconds", "0.02", "--rows", "3"])
    assert code == 0 and "tokens/s" in capsys.readouterr().out


def test_bench_command_rejects_both_inputs_and_bad_distributions(tiny_bert, tmp_path, capsys):
    assert main(["bench", str(tiny_bert), "--input", str(tmp_path / "x.jsonl"), "--lengths", "short"]) == 2
    assert main(["bench", str(tiny_bert), "--lengths", "medium"]) == 2
    assert main(["bench", str(tiny_bert), "--seconds", "0"]) == 2
    assert "normal:MEAN:STD:MAX" in capsys.readouterr().err
