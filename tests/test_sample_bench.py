"""`score`'s measuring sample (scoring/trial.py SampleBench): candidates are ranked by the rate the
run would see. A few hundred rows batched alone pad far more than a run's parts, and by how much
depends on each implementation's budget, so a trial's rate is its padded tokens per second charged
the run's own padding."""

from __future__ import annotations

import random

import pytest

from attnfallback import fastest
from attnfallback.fastest import Settings
from attnfallback.measure import Measurement
from attnfallback.scoring import ScoreJob, Scorer
from attnfallback.scoring.trial import SampleBench
from scoring_helpers import seeded_texts

GRACEFUL = Settings(budget_s=None, margin=fastest.GRACEFUL_MARGIN, charge_compiles=True, task="embed")


def _mixed_lengths(n: int, seed: int = 3) -> list[tuple[str]]:
    """Mostly short rows and a few long ones, as a shard's first rows are: one long row pads a
    batch cut only by budget to its length."""
    rng = random.Random(seed)
    texts = seeded_texts(n, seed=seed, max_words=12)
    for i in rng.sample(range(n), 4):
        texts[i] = " ".join(seeded_texts(8, seed=i, min_words=20, max_words=30))
    return [(t,) for t in texts]


@pytest.fixture(scope="module")
def scorer(tiny_bert):
    return Scorer.from_job(ScoreJob(model=str(tiny_bert), device="cpu", measure="off"))


def _bench(scorer, budget: int, expected_rows: int | None = 50_000) -> SampleBench:
    scorer.job.batch_tokens = scorer.batch_tokens = budget  # the job's: a trial's switch reads its budget again
    scorer.max_cells = None
    return SampleBench(scorer, _mixed_lengths(256), expected_rows)


def test_a_sample_batched_alone_pads_more_than_the_run_would(scorer):
    bench = _bench(scorer, 65_536)
    _, batches = scorer._batched(bench._encoded)
    sample_padding = sum(b.cells for b in batches) / bench.tokens
    assert sample_padding > 2  # under a large budget the floor keeps the sample in few batches, padded to long rows
    assert bench.run_padding() < 1.1  # a part of 8,192 rows sorted together: batches of like lengths
    small = _bench(scorer, 2_048)  # a small budget cuts the sample finely: its padding is about the run's
    _, batches = scorer._batched(small._encoded)
    assert sum(b.cells for b in batches) / small.tokens < 1.1 and small.run_padding() <= 1.05
    assert bench.run_rows() == scorer.job.part_rows
    assert _bench(scorer, 65_536, expected_rows=1_000).run_rows() == 1_000  # a shard smaller than a part


def test_a_trial_is_ranked_by_the_rate_the_run_would_see(scorer):
    bench = _bench(scorer, 65_536)
    trial, reasons = bench.trial("sdpa", 0.01)
    assert not reasons
    assert trial.run_padding == pytest.approx(bench.run_padding())
    assert trial.tokens_per_s == pytest.approx(trial.padded_tokens / trial.run_padding / trial.median_s)
    assert trial.tokens_per_s > 1.5 * trial.sample_tokens_per_s  # the sample's extra padding is not charged
    assert trial.to_dict()["sample_tokens_per_s"] == trial.sample_tokens_per_s


def test_a_shard_worth_fewer_passes_than_its_tokens_say_is_too_small_to_measure(scorer):
    """50k rows of the sample's lengths are ~195 passes of its real tokens but ~60 of its padded
    batch: 5% of that cannot pay for two trials of three passes."""
    bench = _bench(scorer, 65_536)
    assert bench.shard_passes() < 0.5 * bench.expected_tokens / bench.tokens
    why = fastest._too_small_to_compare(bench)
    assert why and "too small to pay for measuring" in why
    assert fastest._too_small_to_compare(_bench(scorer, 65_536, expected_rows=400_000)) is None


def test_packed_batches_pad_nothing(scorer):
    bench = _bench(scorer, 65_536)
    scorer.pack = True
    try:
        assert bench.run_padding() == 1.0
    finally:
        scorer.pack = False


class PaddedBench:
    """Two candidates timed on a sample they pad differently: sdpa (one large batch, 5 padded
    tokens a real one) is slower per real token of the sample than eager (finely cut batches), but
    faster per padded token, and the run pads both about alike."""

    task = "embed"
    expected_tokens = None
    description = {"source": "test", "rows": 256}

    def __init__(self):
        self.switched: list[str] = []

    def tag(self) -> str:
        return "mean_tokens~64"

    def trial(self, impl, seconds):
        cells, median, run = {"sdpa": (5_000, 0.010, 1.05), "eager": (1_200, 0.008, 1.02)}[impl]
        return Measurement(impl, impl, 1_000, cells, 1, median, [median] * 3, run_padding=run), []

    def switch(self, impl):
        self.switched.append(impl)
        return []


def test_the_choice_follows_the_run_s_rates_not_the_sample_s(tiny_bert, tmp_path):
    from attnfallback.events import NULL_SINK
    from attnfallback.loader import load_model
    from attnfallback.policy import Policy

    loaded = load_model(str(tiny_bert), policy=Policy.graceful(["sdpa", "eager"]), sink=NULL_SINK)
    fastest.choose(loaded, ["sdpa", "eager"], PaddedBench(), GRACEFUL, cache_dir=tmp_path)
    measured = loaded.decision.measured
    assert measured["sample_tokens_per_s"]["eager"] > 1.2 * measured["sample_tokens_per_s"]["sdpa"]
    assert measured["tokens_per_s"]["sdpa"] > 2 * measured["tokens_per_s"]["eager"]
    assert measured["chosen"] == "sdpa" and loaded.decision.used == "sdpa"
    assert measured["padding"] == {"sdpa": {"sample": 5.0, "run": 1.05}, "eager": {"sample": 1.2, "run": 1.02}}
