"""Timing attention implementations on one loaded model: workloads, passes, measurements.

    workload = workload_for(loaded, "short")
    measurement, reasons = measure(loaded, "sdpa", workload, seconds=5)
    measurement.tokens_per_s, measurement.compile_s

`measure` switches the model in place to an implementation (which must pass the verification
forward first), runs one untimed warm-up pass over the whole workload (kernel compilation,
autotuning: reported as `warmup_s`, and `compile_s` = warm-up minus a steady pass), then timed
passes until `seconds` are spent (at least `min_repeats`); tokens/s is real (unpadded) tokens over
the median pass. Inputs are texts (tokenized here) or synthetic token ids drawn from a length
distribution: `short` (mean ~64), `long` (mean ~2.4k, max 8k), or `normal:MEAN:STD:MAX`, clipped
to what the model accepts. `score` measures through its own forward instead (scoring's SampleBench
gives fastest.py the same `Measurement`); this module is what a caller without one measures on.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from attnfallback.batching import default_batch_tokens, eager_max_cells, plan_batches
from attnfallback.errors import UsageError
from attnfallback.model_facts import text_config
from attnfallback.sdpa_order import sdpa_order
from attnfallback.verify import first_line, switch_to

log = logging.getLogger("attnfallback")

# A named distribution is a normal clipped to [MIN_LENGTH, max]; the clipping moves the mean a
# little, so the report gives the sample's own mean.
LENGTH_PRESETS = {"short": "normal:64:32:512", "long": "normal:2400:1200:8192"}
MIN_LENGTH = 4
SEED = 0

# Tokens in a synthetic sample by default: enough for a stable median, small enough for a CPU.
SAMPLE_TOKENS = {"cuda": 262_144, "cpu": 8_192}

Timer = Callable[[str, Callable[[], None]], float]
"""`timer(impl, run) -> seconds`: runs one pass (call `run()`) and says how long it took.

The default synchronises the device around a wall clock; tests inject their own to make one
implementation look faster than another without timing anything.
"""


@dataclass(frozen=True)
class LengthDist:
    """A normal distribution of sequence lengths, clipped to [MIN_LENGTH, max_length]."""

    mean: float
    std: float
    max_length: int
    name: str

    def sample(self, count: int, seed: int = SEED, limit: int | None = None) -> np.ndarray:
        """`count` lengths (seeded, so every implementation and shard sees the same ones)."""
        rng = np.random.default_rng(seed)
        upper = self.max_length if limit is None else min(self.max_length, limit)
        drawn = rng.normal(self.mean, self.std, size=count)
        return np.clip(np.rint(drawn), MIN_LENGTH, max(upper, MIN_LENGTH)).astype(np.int64)


def parse_lengths(text: str) -> LengthDist:
    """`short`, `long` or `normal:MEAN:STD:MAX` -> LengthDist (exit 2 on anything else)."""
    spec = LENGTH_PRESETS.get(text.strip().lower(), text.strip())
    parts = spec.split(":")
    expected = f"short, long or normal:MEAN:STD:MAX (e.g. normal:512:128:2048), found {text!r}"
    if len(parts) != 4 or parts[0] != "normal":
        raise UsageError(f"malformed length distribution: expected {expected}")
    try:
        mean, std, top = float(parts[1]), float(parts[2]), int(parts[3])
    except ValueError:
        raise UsageError(f"malformed length distribution: expected numbers in {expected}") from None
    if not (mean >= 1 and std >= 0 and top >= MIN_LENGTH and math.isfinite(mean) and math.isfinite(std)):
        raise UsageError(f"malformed length distribution: expected MEAN >= 1, STD >= 0, MAX >= {MIN_LENGTH}; {expected}")
    return LengthDist(mean, std, top, text.strip())


def model_max_positions(model) -> int | None:
    """The longest sequence the model's positions allow (None: no limit known)."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def shape_tag(mean_length: float) -> str:
    """A coarse name of a workload's shape: its mean length to the nearest power of two (what a
    measured choice is cached under)."""
    return f"mean_tokens~{2 ** round(math.log2(max(mean_length, 1.0)))}"


@dataclass
class Workload:
    """Token id sequences, longest first, and how they were made."""

    sequences: list[np.ndarray]
    description: dict

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(s) for s in self.sequences], dtype=np.int64)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def mean_length(self) -> float:
        return float(self.lengths.mean()) if self.sequences else 0.0

    def tag(self) -> str:
        return shape_tag(self.mean_length)

    def batches(self, device, impl: str, *, pad_id: int = 0, batch_tokens: int | None = None, num_heads: int | None = None) -> list[dict]:
        """Right-padded batches on `device`, token-budgeted as the scorer does (smaller for eager)."""
        import torch

        kind = getattr(device, "type", str(device))
        budget = batch_tokens or default_batch_tokens(kind, impl)
        out = []
        for piece in plan_batches(self.lengths, budget, eager_max_cells(impl, num_heads)):
            rows = self.sequences[piece.start : piece.stop]
            ids = np.full((len(rows), piece.length), pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), piece.length), dtype=np.int64)
            for j, seq in enumerate(rows):
                ids[j, : len(seq)] = seq
                mask[j, : len(seq)] = 1
            out.append({"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)})
        return out


def _longest_first(sequences: list[np.ndarray]) -> list[np.ndarray]:
    order = np.argsort(-np.asarray([len(s) for s in sequences]), kind="stable")
    return [sequences[i] for i in order]


def synthetic_workload(dist: LengthDist, *, vocab_size: int, limit: int | None, count: int | None = None,
                       target_tokens: int = SAMPLE_TOKENS["cpu"], seed: int = SEED) -> Workload:
    """Random token ids with lengths drawn from `dist` (clipped to `limit`, the model's positions)."""
    if count is None:
        count = max(8, round(target_tokens / max(min(dist.mean, limit or dist.mean), 1)))
    lengths = dist.sample(count, seed=seed, limit=limit)
    rng = np.random.default_rng(seed + 1)
    low = min(1000, max(vocab_size // 2, 1))  # clear of the special tokens at the start of most vocabularies
    sequences = [rng.integers(low, vocab_size, size=int(n), dtype=np.int64) for n in lengths]
    clipped = limit is not None and limit < dist.max_length
    description = {
        "source": "lengths", "distribution": dist.name, "sequences": count, "tokens": int(lengths.sum()),
        "mean_length": float(lengths.mean()), "max_length": int(lengths.max()),
        "clipped_to": limit if clipped else None,
    }
    return Workload(_longest_first(sequences), description)


def text_workload(texts: list[str], tokenizer, *, limit: int | None, source: str = "texts") -> Workload:
    """Token ids of `texts`, truncated to `limit`."""
    if not texts:
        raise UsageError("no texts to benchmark")
    encoded = tokenizer(list(texts), truncation=limit is not None, max_length=limit)["input_ids"]
    sequences = [np.asarray(ids, dtype=np.int64) for ids in encoded]
    lengths = np.asarray([len(s) for s in sequences])
    description = {
        "source": source, "sequences": len(sequences), "tokens": int(lengths.sum()),
        "mean_length": float(lengths.mean()), "max_length": int(lengths.max()), "clipped_to": limit,
    }
    return Workload(_longest_first(sequences), description)


def workload_for(loaded, sample, *, target_tokens: int | None = None) -> Workload:
    """A workload from a length distribution (name, spec or LengthDist), a list of lengths, or texts."""
    limit = model_max_positions(loaded.model)
    vocab = loaded.facts.vocab_size or getattr(loaded.model.config, "vocab_size", None) or 1000
    target = target_tokens or SAMPLE_TOKENS.get(getattr(loaded.device, "type", "cpu"), SAMPLE_TOKENS["cpu"])
    if isinstance(sample, Workload):
        return sample
    if isinstance(sample, str):
        sample = parse_lengths(sample)
    if isinstance(sample, LengthDist):
        return synthetic_workload(sample, vocab_size=vocab, limit=limit, target_tokens=target)
    items = list(sample)
    if items and all(isinstance(x, (int, np.integer)) for x in items):
        rng = np.random.default_rng(SEED + 1)
        low = min(1000, max(vocab // 2, 1))
        lengths = [min(max(int(n), 1), limit or int(n)) for n in items]
        sequences = [rng.integers(low, vocab, size=n, dtype=np.int64) for n in lengths]
        arr = np.asarray(lengths)
        description = {"source": "lengths", "distribution": "given", "sequences": len(arr), "tokens": int(arr.sum()),
                       "mean_length": float(arr.mean()), "max_length": int(arr.max()), "clipped_to": limit}
        return Workload(_longest_first(sequences), description)
    if items and all(isinstance(x, str) for x in items):
        return text_workload(items, loaded.tokenizer, limit=limit)
    raise UsageError("a benchmark sample must be a length distribution, a list of lengths or a list of texts")


def wall_timer(device) -> Timer:
    """The real clock: synchronise the device, run, synchronise, read perf_counter."""

    def timer(impl: str, run: Callable[[], None]) -> float:
        sync = _synchronizer(device)
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - t0

    return timer


def _synchronizer(device) -> Callable[[], None]:
    if getattr(device, "type", None) == "cuda":
        import torch

        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Measurement:
    """One implementation on one workload."""

    impl: str
    actual: str
    tokens: int
    padded_tokens: int
    batches: int
    warmup_s: float
    repeat_s: list[float]
    # Padded tokens per real token in the batches the run itself would hold (None: the sample's own
    # batches are the run's). A small sample batched alone pads far more than a run's parts, and by
    # how much depends on each implementation's budget; see `tokens_per_s`.
    run_padding: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.repeat_s)

    @property
    def sample_tokens_per_s(self) -> float:
        """Real tokens of the sample over the median pass."""
        return self.tokens / self.median_s if self.median_s > 0 else float("inf")

    @property
    def tokens_per_s(self) -> float:
        """The rate candidates are ranked by: the sample's, or, given `run_padding`, the sample's
        padded tokens per second charged the run's own padding (what the run would see)."""
        if self.median_s <= 0:
            return float("inf")
        if self.run_padding:
            return self.padded_tokens / self.run_padding / self.median_s
        return self.sample_tokens_per_s

    @property
    def compile_s(self) -> float:
        """What the first pass cost beyond a steady one (compilation, autotuning, allocation)."""
        return max(0.0, self.warmup_s - self.median_s)

    def to_dict(self) -> dict:
        return {
            "impl": self.impl, "actual": self.actual, "tokens_per_s": self.tokens_per_s, "median_s": self.median_s,
            "repeats": len(self.repeat_s), "repeat_s": self.repeat_s, "warmup_s": self.warmup_s,
            "compile_s": self.compile_s, "tokens": self.tokens, "padded_tokens": self.padded_tokens, "batches": self.batches,
            "sample_tokens_per_s": self.sample_tokens_per_s, "run_padding": self.run_padding,
        }


def _num_heads(model) -> int | None:
    return getattr(text_config(model.config), "num_attention_heads", None)


def measure(loaded, impl: str, workload: Workload, *, seconds: float = 5.0, min_repeats: int = 3, max_repeats: int = 50,
            timer: Timer | None = None, batch_tokens: int | None = None) -> tuple[Measurement | None, list[str]]:
    """Switch `loaded` to `impl` in place, verify, warm up, and time passes over `workload`.

    Returns (measurement, []) or (None, reasons it could not be measured).
    """
    import torch

    actual, reasons = switch_to(loaded, impl)
    if reasons:
        return None, reasons
    timer = timer or wall_timer(loaded.device)
    pad_id = getattr(loaded.model.config, "pad_token_id", None) or 0
    try:
        batches = workload.batches(loaded.device, impl, pad_id=pad_id, batch_tokens=batch_tokens, num_heads=_num_heads(loaded.model))
    except RuntimeError as e:
        return None, [f"cannot place the workload on {loaded.device}: {first_line(e)}"]

    def run() -> None:
        with torch.inference_mode(), sdpa_order(loaded.device.type):
            for batch in batches:
                loaded.model(**batch)

    times: list[float] = []
    try:
        warmup = timer(impl, run)
        while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < seconds):
            times.append(timer(impl, run))
    except RuntimeError as e:  # torch.OutOfMemoryError is one; a kernel refusing a shape another
        del batches
        if getattr(loaded.device, "type", None) == "cuda":
            torch.cuda.empty_cache()
        where = "warm-up" if not times else f"timed pass {len(times) + 1}"
        return None, [f"{where} failed: {first_line(e)}"]
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    return Measurement(impl, actual or impl, workload.tokens, padded, len(batches), warmup, times), []


