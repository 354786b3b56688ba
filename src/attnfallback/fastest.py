"""Policy `fastest`: measure the viable candidates on this device and keep the fastest.

The loader calls `choose_fastest` once the first candidate has loaded and verified. The model is
switched in place to each other candidate (never re-read), which must pass the verification
forward, and timed on a calibration sample within the policy's time budget; the fastest stays.
Compilation (flex_attention, FlashAttention-4's first call) is the warm-up pass: reported as
`compile_s`, never counted in tokens/s, but spent from the budget, so candidates that compile are
measured last; the budget decides whether a candidate starts, so the last one measured may run a
little past it. Compilation already paid by the loader's verification forward shows in
`timing.verify_s`, not here. The choice is cached in a small JSON file keyed by (GPU class, model identity,
model class, dtype, candidate set, package versions, workload shape), so later shards on the same
class load, verify and skip the measurement.

Sample: the `sample` argument, else `policy.extra["fastest_sample"]`, else
$ATTNFALLBACK_FASTEST_SAMPLE (a length distribution such as `long`), else `short`. It may be a
length distribution, a list of token lengths, or a list of texts (a job's own inputs).
Cache directory: `cache_dir`, else $ATTNFALLBACK_CACHE, else ~/.cache/attnfallback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from attnfallback import impls as impl_registry
from attnfallback.bench import Timer, measure, workload_for

log = logging.getLogger("attnfallback")

ENV_CACHE = "ATTNFALLBACK_CACHE"
ENV_SAMPLE = "ATTNFALLBACK_FASTEST_SAMPLE"
CACHE_SCHEMA = "attnfallback.fastest/1"
DEFAULT_SAMPLE = "short"
MAX_REPEATS = 5  # a median of five passes is steady enough to rank candidates
# Tokens in the calibration sample: a few passes of it fit the budget with room for warm-ups.
SAMPLE_TOKENS = {"cuda": 131_072, "cpu": 4_096}


def cache_directory(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $ATTNFALLBACK_CACHE, else ~/.cache/attnfallback."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "attnfallback"


def cache_key(decision, candidates: list[str], workload_tag: str) -> dict:
    """What the choice depends on. A change in any of these measures again."""
    device = decision.device
    return {
        "schema": CACHE_SCHEMA,
        "gpu_class": device.gpu_class or device.name or device.kind,
        "model": decision.facts.identity,
        "model_class": decision.facts.model_class,
        "dtype": decision.dtype,
        "candidates": sorted(candidates),
        "versions": dict(sorted(decision.versions.items())),
        "workload": workload_tag,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_path(directory: Path, digest: str) -> Path:
    return directory / f"fastest-{digest}.json"


def read_cache(path: Path, key: dict) -> dict | None:
    """The cached entry for `key`, or None (absent, unreadable, or for another key)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("fastest: ignoring unreadable cache file %s (%s)", path, e)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or entry.get("chosen") not in key["candidates"]:
        return None
    return entry


def write_cache(path: Path, entry: dict) -> str | None:
    """Write atomically (temp file + rename); the error as text when it cannot be written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fastest-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(entry, fh, indent=2, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other shards' users read it too
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        log.warning("fastest: cannot write cache file %s (%s)", path, e)
        return str(e)
    return None


def _sample_for(loaded, sample):
    if sample is not None:
        return sample
    extra = getattr(loaded.decision.policy, "extra", None) or {}
    return extra.get("fastest_sample") or os.environ.get(ENV_SAMPLE) or DEFAULT_SAMPLE


def _measuring_order(current: str, candidates: list[str]) -> list[str]:
    """The loaded one first (no switch needed), then the others, those that compile last."""
    rest = [c for c in candidates if c != current]
    compiles = [c for c in rest if c in impl_registry.REGISTRY and impl_registry.REGISTRY[c].compiles]
    return ([current] if current in candidates else []) + [c for c in rest if c not in compiles] + compiles


def choose_fastest(loaded, viable: list[str], *, sample=None, budget_s: float | None = None,
                   cache_dir: str | os.PathLike | None = None, timer: Timer | None = None) -> None:
    """Switch `loaded` to the fastest of `viable` and record the measurement in its decision.

    Sets `decision.used` and `decision.measured` = {"tokens_per_s", "compile_s", "cache"
    ("hit" | "miss"), "cache_key", ...}; appends an attempt per candidate switched to.
    """
    from attnfallback.loader import Attempt
    from attnfallback.parity import switch_to

    decision = loaded.decision
    budget = float(budget_s if budget_s is not None else decision.policy.fastest_budget_s)
    failed = {a.impl: a.reasons for a in decision.attempts if not a.ok and a.stage != "plan"}
    candidates = [c for c in dict.fromkeys(viable) if c not in failed]
    current = decision.used
    if current is not None and current not in candidates:
        candidates.insert(0, current)  # transformers resolved a name to another one; keep what runs
    if len(candidates) < 2:
        decision.measured = {"tokens_per_s": {}, "compile_s": {}, "cache": "not needed", "cache_key": None,
                             "note": f"one viable candidate ({', '.join(candidates) or 'none'}): nothing to compare"}
        return

    device_kind = getattr(loaded.device, "type", "cpu")
    workload = workload_for(loaded, _sample_for(loaded, sample), target_tokens=SAMPLE_TOKENS.get(device_kind, SAMPLE_TOKENS["cpu"]))
    key = cache_key(decision, candidates, workload.tag())
    digest = key_digest(key)
    path = cache_path(cache_directory(cache_dir), digest)

    entry = read_cache(path, key)
    if entry is not None:
        chosen = entry["chosen"]
        actual, reasons = (current, []) if chosen == current else switch_to(loaded, chosen)
        if not reasons:
            if chosen != current:
                decision.attempts.append(Attempt(chosen, "verify", True, [f"fastest (cached): {entry['tokens_per_s'][chosen]:.0f} tokens/s"]))
            decision.used = actual or chosen
            decision.measured = {
                "tokens_per_s": entry["tokens_per_s"], "compile_s": entry["compile_s"], "cache": "hit",
                "cache_key": digest, "cache_file": str(path), "measured_at": entry.get("measured_at"),
                "sample": entry.get("sample"), "chosen": chosen,
            }
            return
        log.warning("fastest: cached choice %s no longer verifies (%s); measuring again", chosen, "; ".join(reasons))
        decision.attempts.append(Attempt(chosen, "verify", False, list(reasons)))
        if current is not None:
            switch_to(loaded, current)

    started = time.perf_counter()
    order = _measuring_order(current, candidates)
    tokens_per_s: dict[str, float] = {}
    compile_s: dict[str, float] = {}
    warmup_s: dict[str, float] = {}
    skipped: dict[str, str] = {}
    actual_of: dict[str, str] = {}
    for i, impl in enumerate(order):
        remaining = budget - (time.perf_counter() - started)
        if remaining <= 0 and tokens_per_s:
            skipped[impl] = f"time budget of {budget:g} s spent before it was measured"
            continue
        share = max(remaining, 0.0) / (len(order) - i)
        result, reasons = measure(loaded, impl, workload, seconds=share / 2, min_repeats=1, max_repeats=MAX_REPEATS, timer=timer)
        if result is None:
            decision.attempts.append(Attempt(impl, "verify", False, list(reasons)))
            continue
        tokens_per_s[impl] = result.tokens_per_s
        compile_s[impl] = result.compile_s
        warmup_s[impl] = result.warmup_s
        actual_of[impl] = result.actual
        if impl != current:
            decision.attempts.append(Attempt(impl, "verify", True, [f"fastest: measured {result.tokens_per_s:.0f} tokens/s"]))

    if not tokens_per_s:  # every candidate failed its measurement; keep what the loader verified
        if current is not None:
            switch_to(loaded, current)
        decision.measured = {"tokens_per_s": {}, "compile_s": {}, "cache": "miss", "cache_key": digest,
                             "note": "no candidate could be measured; kept the loader's choice"}
        return

    chosen = max(tokens_per_s, key=tokens_per_s.get)
    if getattr(loaded.model.config, "_attn_implementation", None) != actual_of[chosen]:
        actual, reasons = switch_to(loaded, chosen)
        if reasons:  # it verified minutes ago; refuse to guess, keep the loader's choice
            log.warning("fastest: %s no longer verifies (%s); keeping %s", chosen, "; ".join(reasons), current)
            switch_to(loaded, current)
            chosen = current
    decision.used = actual_of.get(chosen, chosen)
    measured = {
        "tokens_per_s": tokens_per_s, "compile_s": compile_s, "warmup_s": warmup_s, "cache": "miss",
        "cache_key": digest, "cache_file": str(path), "sample": workload.description, "budget_s": budget,
        "seconds": time.perf_counter() - started, "chosen": chosen,
    }
    if skipped:
        measured["skipped"] = skipped
        measured["cache_written"] = False  # a partial measurement is not a result for later shards
    else:
        error = write_cache(path, {
            "key": key, "chosen": chosen, "tokens_per_s": tokens_per_s, "compile_s": compile_s,
            "sample": workload.description, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        measured["cache_written"] = error is None
        if error is not None:
            measured["cache_error"] = error
    decision.measured = measured
