"""Choosing by measurement: time the viable candidates on the run's own work and keep the fastest.

Two callers, one rule. Under the default policy (graceful) on a CUDA GPU, `score` measures its
viable candidates on the shard's own first rows, through the scorer's own forward (a `Bench` it
passes down to the loader); under policy `fastest` any caller measures, on the scorer's bench when
there is one, else on a generic forward over a sample (`ForwardBench`: a length distribution, a list
of lengths, or texts). `strict` never measures: it runs exactly the first preference.

The rule (`choose`):
1. Candidates are the viable implementations, in preference order. The one the loader verified
   is timed first; then those that do not compile; then those that compile (flex_attention,
   FlashAttention-4), each only when the time left covers its predicted compile (the last one
   seen on this GPU class, model and versions, kept in the cache directory; else a prior). A
   compile is a one-shot cost this shard pays, so it is charged in the budget, not in tokens/s.
2. Budget: graceful measures within min(2 s, 5% of the shard's expected time), the expected time
   read from the first candidate's rate over the shard's expected tokens; a shard too small to
   pay for measuring keeps the loader's choice. A bench that says how many passes over its sample
   a trial takes at least (`min_trial_passes`) is not run at all when 5% of the shard's expected
   passes cannot cover two trials, whatever the rate (about 30,000 rows with a 256-row sample padded
   as the run would pad it; several times more where the sample alone pads more: `shard_passes`). `fastest` measures within
   `Policy.fastest_budget_s` (20 s).
   Rates are compared as the run would see them: a bench that knows the run's batching (scoring's
   SampleBench) charges each candidate the padding of the run's own batches, not the sample's (a
   256-row sample batched alone pads several times more under a large budget than under eager's
   small one; bench/NOTES.md, session 13).
3. The preference stays a preference: the earliest-preferred measured candidate is kept unless a
   later one is faster by more than the margin (5% under graceful, none under `fastest`).
4. The choice is cached under a key of (GPU class, model identity, model class, task, dtype,
   candidates, package versions, workload shape) in $ATTNFALLBACK_CACHE (default
   ~/.cache/attnfallback), a directory many shards may share (shared storage included): entries are
   written to a temporary file, flushed to disk and renamed into place, so a reader sees a whole
   entry or none; an entry that is unreadable, for another key, or older than
   $ATTNFALLBACK_CACHE_MAX_AGE_DAYS (30) is ignored with a warning. A later shard with the same key
   verifies the cached choice and skips the measurement; under graceful a cached choice that
   compiles is taken only when its predicted compile fits this shard's budget. Only complete
   measurements are cached, and a `fastest` run's choice serves later graceful shards: calibrate
   once per GPU class with `--policy fastest`.
5. Compiles are predicted from the last one seen (`compile-*.json`); where the kernels are kept on
   disk (FlashAttention-4's cache under the cache directory) the next process is predicted to pay
   only their reading back (KERNEL_LOAD_PRIOR_S).

Everything measured, skipped and why lands in `decision.measured` and so in the `attn_impl` event.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from attnfallback import atomic, envs
from attnfallback import impls as impl_registry
from attnfallback.measure import Measurement, Timer, measure, workload_for
from attnfallback.decision import Attempt
from attnfallback.verify import switch_to

log = logging.getLogger("attnfallback")

ENV_CACHE = envs.CACHE
ENV_SAMPLE = envs.FASTEST_SAMPLE
ENV_MAX_AGE = envs.CACHE_MAX_AGE_DAYS
CACHE_SCHEMA = "attnfallback.fastest/3"  # 3: rates charged the run's padding (Measurement.run_padding)
COMPILE_SCHEMA = "attnfallback.compile/1"
DEFAULT_SAMPLE = "short"
DEFAULT_MAX_AGE_DAYS = 30.0
MAX_REPEATS = 5  # a median of five passes is steady enough to rank candidates
# Tokens in the generic calibration sample: a few passes of it fit the budget with room for warm-ups.
SAMPLE_TOKENS = {"cuda": 131_072, "cpu": 4_096}
GRACEFUL_BUDGET_S = 2.0
GRACEFUL_BUDGET_SHARE = 0.05
GRACEFUL_MARGIN = 0.05
# Predicted first-call compile when none was seen yet on this GPU class (bench/NOTES.md, session 8).
# H200, FlashAttention-4 4.0.0b36: three variants a shard, 2-4 s each.
COMPILE_PRIOR_S = {"flash_attention_4": 8.0, "flex_attention": 20.0}
KERNEL_LOAD_PRIOR_S = 0.1  # reading FlashAttention-4 kernels a process compiled earlier back from disk (H200: 3 in 0.02 s)


class Bench(Protocol):
    """Runs candidates on the work to be done. `trial` switches the model to `impl`, checks it
    (verification: a failure returns (None, reasons)), runs one first pass and steady passes for
    about `seconds`, and leaves the model on `impl`."""

    description: dict  # what the sample is (rows, tokens, mean length, source)
    expected_tokens: int | None  # tokens the run will score, None when unknown

    def tag(self) -> str: ...

    def trial(self, impl: str, seconds: float) -> tuple[Measurement | None, list[str]]: ...

    def switch(self, impl: str) -> list[str]: ...


# --- the cache -------------------------------------------------------------------------------------

cache_directory = envs.cache_directory


def cache_key(decision, candidates: list[str], workload_tag: str, task: str | None = None) -> dict:
    """What the choice depends on. A change in any of these measures again."""
    device = decision.device
    return {
        "schema": CACHE_SCHEMA,
        "gpu_class": device.gpu_class or device.name or device.kind,
        "model": decision.facts.identity,
        "model_class": decision.facts.model_class,
        "task": task,
        "dtype": decision.dtype,
        "candidates": sorted(candidates),
        "versions": dict(sorted(decision.versions.items())),
        "workload": workload_tag,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_path(directory: Path, digest: str) -> Path:
    return directory / f"fastest-{digest}.json"


def _max_age_days() -> float:
    return envs.number(ENV_MAX_AGE, DEFAULT_MAX_AGE_DAYS)


def _age_days(entry: dict) -> float | None:
    try:
        then = datetime.fromisoformat(str(entry["measured_at"]))
    except (KeyError, ValueError):
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - then).total_seconds() / 86400


def read_entry(path: Path, key: dict, schema: str = CACHE_SCHEMA, what: str = "measured-choice cache") -> dict | None:
    """The entry for `key` in `path`, or None: absent (silently), or unreadable, for another key
    or stale (each with a warning: a shard then measures again, and its write replaces it)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: ignoring unreadable file %s (%s)", what, path, e)
        return None
    if not isinstance(entry, dict) or entry.get("schema", entry.get("key", {}).get("schema")) != schema or entry.get("key") != key:
        log.warning("%s: ignoring %s, an entry for another key or format", what, path)
        return None
    age = _age_days(entry)
    if age is None or age > _max_age_days():
        log.warning("%s: ignoring %s, %s", what, path,
                    "with no date" if age is None else f"{age:.0f} days old (more than ${ENV_MAX_AGE}={_max_age_days():g})")
        return None
    return entry


def read_cache(path: Path, key: dict) -> dict | None:
    """A cached choice for `key` (see read_entry) whose chosen candidate is one of its candidates."""
    entry = read_entry(path, key)
    if entry is not None and entry.get("chosen") not in key["candidates"]:
        log.warning("measured-choice cache: ignoring %s, its choice %r is not a candidate", path, entry.get("chosen"))
        return None
    return entry


def write_atomically(path: Path, data: dict, what: str = "measured-choice cache") -> str | None:
    """Write JSON atomically (atomic.py: a reader sees a whole entry or none, concurrent writers
    leave one whole file). Returns the error as text when it cannot be written (nothing is
    raised: a cache is optional)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, data, indent=2, sort_keys=True)
    except OSError as e:
        log.warning("%s: cannot write %s (%s)", what, path, e)
        return str(e)
    return None


def write_cache(path: Path, entry: dict) -> str | None:
    return write_atomically(path, entry)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def compile_key(decision, impl: str) -> dict:
    device = decision.device
    return {"schema": COMPILE_SCHEMA, "gpu_class": device.gpu_class or device.name or device.kind, "impl": impl,
            "model_class": decision.facts.model_class, "head_dim": decision.facts.head_dim, "dtype": decision.dtype,
            "versions": dict(sorted(decision.versions.items()))}


def predicted_compile_s(directory: Path, decision, impl: str) -> tuple[float, str]:
    """(seconds, where the figure comes from) for `impl`'s first-call compile on this model."""
    if impl not in impl_registry.REGISTRY or not impl_registry.REGISTRY[impl].compiles:
        return 0.0, "does not compile"
    key = compile_key(decision, impl)
    entry = read_entry(directory / f"compile-{key_digest(key)}.json", key, COMPILE_SCHEMA)
    if entry is not None and isinstance(entry.get("compile_s"), (int, float)):
        return float(entry["compile_s"]), f"seen {entry.get('measured_at')}"
    return COMPILE_PRIOR_S.get(impl, 5.0), "prior (never seen on this GPU class)"


def kernels_persist(impl: str, env=None) -> bool:
    """Whether `impl`'s compiled kernels are kept on disk for later processes (FlashAttention-4's
    cache, which the loader turns on under the cache directory)."""
    env = os.environ if env is None else env
    return impl == "flash_attention_4" and env.get("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED") == "1"


def remember_compile(directory: Path, decision, impl: str, seconds: float) -> None:
    """Keep what `impl`'s first call cost here, and what the next process should expect: the same,
    or, where the kernels were kept on disk, about the cost of reading them back."""
    key = compile_key(decision, impl)
    upcoming = min(seconds, KERNEL_LOAD_PRIOR_S) if kernels_persist(impl) else seconds
    write_atomically(directory / f"compile-{key_digest(key)}.json",
                     {"schema": COMPILE_SCHEMA, "key": key, "compile_s": round(upcoming, 4), "observed_s": round(seconds, 4),
                      "measured_at": _now()})


def _cached_compile_refusal(loaded, bench: Bench, chosen: str, current: str | None, directory: Path) -> str | None:
    """Why a cached choice that compiles is not taken on this shard (None: take it). Its predicted
    compile is charged against this shard's budget, read from one trial of the loaded candidate."""
    compile_s, source = predicted_compile_s(directory, loaded.decision, chosen)
    if compile_s <= 0 or current is None:
        return None
    trial, _ = bench.trial(current, 0.0)
    expected_s = bench.expected_tokens / trial.tokens_per_s if trial is not None and bench.expected_tokens else None
    budget = graceful_budget(expected_s)
    if compile_s <= budget:
        return None
    return (f"kept {current}: the cached choice {chosen} compiles on its first call (about {compile_s:.2g} s, {source}), "
            f"more than this shard's budget of {budget:.2g} s")


# --- the rule --------------------------------------------------------------------------------------

@dataclass
class Settings:
    """How one choice is measured: budget (None: graceful's min(2 s, 5% of the expected time)),
    margin, and whether candidates that compile need the budget to cover their compile."""

    budget_s: float | None
    margin: float
    charge_compiles: bool
    task: str | None = None
    extra_key: dict = field(default_factory=dict)


def measuring_order(current: str | None, candidates: list[str]) -> list[str]:
    """The loaded one first (no switch needed), then the others, those that compile last."""
    rest = [c for c in candidates if c != current]
    compiles = [c for c in rest if c in impl_registry.REGISTRY and impl_registry.REGISTRY[c].compiles]
    return ([current] if current in candidates else []) + [c for c in rest if c not in compiles] + compiles



def pick(candidates: list[str], tokens_per_s: dict[str, float], margin: float) -> tuple[str, str]:
    """(chosen, why): the earliest-preferred measured candidate, unless a later one is faster by
    more than `margin`."""
    measured = [c for c in candidates if c in tokens_per_s]
    chosen = measured[0]
    for other in measured[1:]:
        if tokens_per_s[other] > tokens_per_s[chosen] * (1 + margin):
            chosen = other
    rates = ", ".join(f"{c} {tokens_per_s[c]:,.0f}" for c in measured)
    if chosen == measured[0]:
        return chosen, f"measured tokens/s {rates}: kept {chosen}, the first preference measured" + (
            f" (no other faster by more than {margin:.0%})" if margin and len(measured) > 1 else "")
    return chosen, f"measured tokens/s {rates}: {chosen} is faster than {measured[0]} by more than {margin:.0%}"


def graceful_budget(expected_s: float | None) -> float:
    """min(2 s, 5% of the shard's expected time); 2 s when the expected time is unknown."""
    if expected_s is None or not math.isfinite(expected_s):
        return GRACEFUL_BUDGET_S
    return min(GRACEFUL_BUDGET_S, GRACEFUL_BUDGET_SHARE * expected_s)


def _too_small_to_compare(bench) -> str | None:
    """Why graceful's budget, 5% of the shard's expected time, can never cover two trials of the
    bench's sample, whatever the rate (a trial takes at least `min_trial_passes` passes, the shard
    `bench.shard_passes()` of them where the bench says, else expected_tokens / sample tokens);
    None when it might, or when the bench does not say."""
    min_passes = getattr(bench, "min_trial_passes", None)
    expected, sample = getattr(bench, "expected_tokens", None), getattr(bench, "tokens", None)
    if not min_passes or not expected or not sample:
        return None
    passes = bench.shard_passes() if hasattr(bench, "shard_passes") else None
    affordable = GRACEFUL_BUDGET_SHARE * (passes if passes is not None else expected / sample)
    if affordable >= 2 * min_passes:
        return None
    return (f"the shard is too small to pay for measuring another candidate: 5% of its expected time is about "
            f"{affordable:.2g} passes over the {bench.description.get('rows', '?')}-row sample, and comparing two takes "
            f"at least {2 * min_passes}")


def choose(loaded, viable: list[str], bench: Bench, settings: Settings, *, cache_dir=None) -> None:
    """Measure `viable` on `bench` by the rule above; switch `loaded` to the choice; record it in
    `loaded.decision.measured` (and an attempt per candidate switched to)."""
    decision = loaded.decision
    failed = {a.impl for a in decision.attempts if not a.ok and a.stage != "plan"}
    candidates = [c for c in dict.fromkeys(viable) if c not in failed]
    current = decision.used
    if current is not None and current not in candidates:
        candidates.insert(0, current)  # transformers resolved a name to another one; keep what runs
    if len(candidates) < 2:
        decision.measured = {"tokens_per_s": {}, "compile_s": {}, "cache": "not needed", "cache_key": None,
                             "reason": f"one viable candidate ({', '.join(candidates) or 'none'}): nothing to compare"}
        decision.measured["note"] = decision.measured["reason"]
        return
    directory = cache_directory(cache_dir)
    key = cache_key(decision, candidates, bench.tag(), settings.task)
    key.update(settings.extra_key)
    digest = key_digest(key)
    path = cache_path(directory, digest)
    entry = read_cache(path, key)
    if entry is not None and settings.charge_compiles and entry["chosen"] != current:
        refusal = _cached_compile_refusal(loaded, bench, entry["chosen"], current, directory)
        if refusal is not None:  # the cached choice would compile more than this shard can pay for
            decision.measured = {"tokens_per_s": entry["tokens_per_s"], "compile_s": entry.get("compile_s", {}),
                                 "cache": "hit, not taken", "cache_key": digest, "cache_file": str(path),
                                 "measured_at": entry.get("measured_at"), "chosen": current, "reason": refusal}
            return
    if entry is not None:
        chosen = entry["chosen"]
        reasons = [] if chosen == current else bench.switch(chosen)
        if not reasons:
            if chosen != current:
                decision.attempts.append(Attempt(chosen, "verify", True, [f"measured choice (cached): {entry['tokens_per_s'][chosen]:,.0f} tokens/s"]))
            decision.used = chosen
            decision.measured = {
                "tokens_per_s": entry["tokens_per_s"], "compile_s": entry.get("compile_s", {}), "cache": "hit",
                "cache_key": digest, "cache_file": str(path), "measured_at": entry.get("measured_at"),
                "sample": entry.get("sample"), "chosen": chosen,
                "reason": f"cached measurement of {entry.get('measured_at')}: {entry.get('reason', chosen)}",
            }
            return
        log.warning("measured-choice cache: the cached choice %s no longer verifies (%s); measuring again", chosen, "; ".join(reasons))
        decision.attempts.append(Attempt(chosen, "verify", False, list(reasons)))
        failed.add(chosen)
        candidates = [c for c in candidates if c != chosen]
        if current is not None:
            bench.switch(current)

    too_small = _too_small_to_compare(bench) if settings.budget_s is None else None
    if too_small is not None:
        decision.measured = {"tokens_per_s": {}, "compile_s": {}, "cache": "miss", "cache_key": digest,
                             "cache_file": str(path), "sample": bench.description, "budget_s": None,
                             "chosen": current, "reason": too_small, "cache_written": False}
        return
    started = time.perf_counter()
    order = measuring_order(current, candidates)
    budget = settings.budget_s
    trials: dict[str, Measurement] = {}
    skipped: dict[str, str] = {}
    predicted: dict[str, dict] = {}
    expected_s = None
    last_tried = current
    trial_cost = 0.0  # what a trial of the sample took: the next one costs about as much
    ran_s = 0.0
    for i, impl in enumerate(order):
        spent = max(time.perf_counter() - started, ran_s)
        left = (budget if budget is not None else GRACEFUL_BUDGET_S) - spent
        if trials and left <= trial_cost:
            skipped[impl] = (f"the time budget for measuring ({budget:.3g} s) does not cover another trial "
                             f"(about {trial_cost:.2g} s)" if left > 0 else
                             f"the time budget for measuring ({budget:.3g} s) was spent before it was measured")
            continue
        if trials and settings.charge_compiles:
            compile_s, source = predicted_compile_s(directory, decision, impl)
            if compile_s > 0:
                predicted[impl] = {"compile_s": compile_s, "source": source}
            if compile_s + trial_cost > left:
                skipped[impl] = (f"its first call compiles (about {compile_s:.2g} s, {source}), more than the "
                                 f"{left:.2g} s of measuring budget left")
                continue
        share = max(left, 0.0) / max(len(order) - i, 1) / 2
        last_tried = impl
        trial, reasons = bench.trial(impl, share)
        if trial is None:
            decision.attempts.append(Attempt(impl, "verify", False, list(reasons)))
            continue
        trials[impl] = trial
        trial_cost = trial.median_s * (1 + len(trial.repeat_s))
        ran_s += trial.warmup_s + sum(trial.repeat_s)
        if impl in impl_registry.REGISTRY and impl_registry.REGISTRY[impl].compiles:
            remember_compile(directory, decision, impl, trial.compile_s)
        if impl != current:
            decision.attempts.append(Attempt(impl, "verify", True, [f"measured {trial.tokens_per_s:,.0f} tokens/s"]))
        if budget is None and expected_s is None:  # graceful: the budget follows the shard's size
            expected_s = bench.expected_tokens / trial.tokens_per_s if bench.expected_tokens else None
            budget = graceful_budget(expected_s)

    tokens_per_s = {impl: t.tokens_per_s for impl, t in trials.items()}
    compile_s = {impl: round(t.compile_s, 4) for impl, t in trials.items()}
    measured = {"tokens_per_s": tokens_per_s, "compile_s": compile_s, "cache": "miss", "cache_key": digest,
                "cache_file": str(path), "sample": bench.description, "budget_s": budget, "expected_shard_s": expected_s,
                "seconds": round(time.perf_counter() - started, 4)}
    padding = {impl: {"sample": round(t.padded_tokens / max(t.tokens, 1), 3), "run": round(t.run_padding, 3)}
               for impl, t in trials.items() if t.run_padding}
    if padding:  # the rates above are the sample's padded tokens/s charged the run's padding
        measured["padding"] = padding
        measured["sample_tokens_per_s"] = {impl: t.sample_tokens_per_s for impl, t in trials.items()}
    if predicted:
        measured["predicted_compile"] = predicted
    if skipped:
        measured["skipped"] = skipped
    if not trials:  # every candidate failed its measurement; keep what the loader verified
        if current is not None and last_tried != current:
            bench.switch(current)
        measured["reason"] = measured["note"] = "no candidate could be measured; kept the loader's choice"
        decision.measured = measured
        return
    chosen, why = pick([c for c in candidates if c not in failed], tokens_per_s, settings.margin)
    if len(trials) == 1 and skipped:
        why = f"kept {chosen}: " + ("the shard is too small to pay for measuring another candidate"
                                   if all("budget" in r and "compiles" not in r for r in skipped.values())
                                   else "; ".join(f"{k} not measured: {v}" for k, v in skipped.items()))
    if last_tried != chosen:
        reasons = bench.switch(chosen)
        if reasons:  # it verified moments ago; refuse to guess, keep the loader's choice
            log.warning("measured choice %s no longer verifies (%s); keeping %s", chosen, "; ".join(reasons), current)
            bench.switch(current)
            chosen, why = current, f"kept {current}: {chosen} no longer verified"
    decision.used = trials[chosen].actual if chosen in trials else chosen
    measured.update(chosen=chosen, reason=why)
    if skipped:
        measured["cache_written"] = False  # a partial measurement is not a result for later shards
    else:
        error = write_cache(path, {"schema": CACHE_SCHEMA, "key": key, "chosen": chosen, "tokens_per_s": tokens_per_s,
                                   "compile_s": compile_s, "sample": bench.description, "measured_at": _now(), "reason": why})
        measured["cache_written"] = error is None
        if error is not None:
            measured["cache_error"] = error
    decision.measured = measured


# --- the generic bench: a forward over a sample, for callers without a scorer ----------------------

class ForwardBench:
    """`measure.measure` over a workload made from `sample`: the loader's verification forward on
    each candidate, then padded token-budget batches (a caller without its own forward path)."""

    def __init__(self, loaded, sample, timer: Timer | None = None):
        device_kind = getattr(loaded.device, "type", "cpu")
        self.loaded = loaded
        self.workload = workload_for(loaded, sample, target_tokens=SAMPLE_TOKENS.get(device_kind, SAMPLE_TOKENS["cpu"]))
        self.description = self.workload.description
        self.expected_tokens = None
        self.timer = timer

    def tag(self) -> str:
        return self.workload.tag()

    def switch(self, impl: str) -> list[str]:
        return switch_to(self.loaded, impl)[1]

    def trial(self, impl: str, seconds: float):
        return measure(self.loaded, impl, self.workload, seconds=seconds, min_repeats=1, max_repeats=MAX_REPEATS,
                       timer=self.timer)


def _sample_for(loaded, sample):
    if sample is not None:
        return sample
    extra = getattr(loaded.decision.policy, "extra", None) or {}
    return extra.get("fastest_sample") or envs.value(ENV_SAMPLE, DEFAULT_SAMPLE)


def choose_fastest(loaded, viable: list[str], *, sample=None, budget_s: float | None = None,
                   cache_dir: str | os.PathLike | None = None, timer: Timer | None = None, bench: Bench | None = None) -> None:
    """Policy `fastest`: switch `loaded` to the fastest of `viable` (no margin, compiles measured
    while the budget lasts) on `bench`, else on a ForwardBench over the sample."""
    bench = bench or ForwardBench(loaded, _sample_for(loaded, sample), timer)
    budget = float(budget_s if budget_s is not None else loaded.decision.policy.fastest_budget_s)
    choose(loaded, viable, bench, Settings(budget_s=budget, margin=0.0, charge_compiles=False, task=getattr(bench, "task", None)),
           cache_dir=cache_dir)
