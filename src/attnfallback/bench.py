"""The `bench` command: tokens per second for each attention implementation that runs here.

    report = run_bench("default", impls=["sdpa", "eager"], lengths="short", seconds=5)
    report.results["sdpa"].tokens_per_s, report.results["sdpa"].compile_s

The model is loaded once and switched in place to each implementation; each is timed by
measure.py (a warm-up pass, then timed passes until `seconds` are spent) over texts from a file or
synthetic token ids drawn from a length distribution (`short`, `long`, `normal:MEAN:STD:MAX`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnfallback.errors import AttentionUnavailable, UsageError
from attnfallback.events import NULL_SINK
from attnfallback.loader import load_model, plan_reasons
from attnfallback.measure import (
    SAMPLE_TOKENS,
    Measurement,
    Timer,
    measure,
    model_max_positions,
    parse_lengths,
    synthetic_workload,
    text_workload,
)
from attnfallback.policy import DEFAULT_PREFER, Policy, parse_dtype, parse_impl


@dataclass
class BenchReport:
    model: dict
    gpu: dict
    dtype: str
    workload: dict
    seconds: float
    results: dict[str, Measurement] = field(default_factory=dict)
    unavailable: dict[str, list[str]] = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @property
    def fastest(self) -> str | None:
        if not self.results:
            return None
        return max(self.results.values(), key=lambda m: m.tokens_per_s).impl

    def to_dict(self) -> dict:
        best = self.fastest
        top = self.results[best].tokens_per_s if best else None
        results = {}
        for name, m in self.results.items():
            d = m.to_dict()
            d["relative_to_fastest"] = m.tokens_per_s / top if top else None
            results[name] = d
        return {
            "model": self.model, "gpu": self.gpu, "dtype": self.dtype, "workload": self.workload, "seconds": self.seconds,
            "results": results, "unavailable": self.unavailable, "fastest": best, "versions": self.versions,
        }


def load_for_comparison(model: str, impls: list[str], *, dtype: str = "auto", device: str = "auto", auto_class: str = "AutoModel",
                        revision: str | None = None, trust_remote_code: bool = False):
    """Load once with the first viable implementation (no events); (loaded, reasons of those that cannot run)."""
    reasons, dtype_name = plan_reasons(model, impls, dtype=dtype, device=device, auto_class=auto_class, revision=revision,
                                       trust_remote_code=trust_remote_code)
    unavailable = {name: r for name, r in reasons.items() if r}
    viable = [name for name in impls if not reasons.get(name)]
    if not viable:
        return None, unavailable
    loaded = load_model(model, revision=revision, auto_class=auto_class, dtype=dtype_name, device=device,
                        policy=Policy.graceful(viable), trust_remote_code=trust_remote_code, sink=NULL_SINK,
                        allow_new_head=True)  # tokens/s: a head initialised at random runs as fast as a trained one
    for attempt in loaded.decision.attempts:
        if not attempt.ok and attempt.stage != "plan":
            unavailable[attempt.impl] = list(attempt.reasons)
    return loaded, unavailable


def run_bench(
    model: str,
    *,
    impls: list[str] | None = None,
    lengths: str | None = None,
    texts: list[str] | None = None,
    text_source: str = "texts",
    seconds: float = 5.0,
    dtype: str = "auto",
    device: str = "auto",
    sequences: int | None = None,
    batch_tokens: int | None = None,
    auto_class: str = "AutoModel",
    revision: str | None = None,
    trust_remote_code: bool = False,
    timer: Timer | None = None,
) -> BenchReport:
    """tokens/s of each viable implementation over `texts` or synthetic `lengths` (default `short`)."""
    if seconds <= 0:
        raise UsageError(f"--seconds must be > 0, found {seconds}")
    if texts is not None and lengths is not None:
        raise UsageError("give either --input or --lengths, not both")
    names = list(dict.fromkeys(parse_impl(i) for i in (impls or DEFAULT_PREFER)))
    dist = parse_lengths(lengths or "short") if texts is None else None
    loaded, unavailable = load_for_comparison(model, names, dtype=parse_dtype(dtype), device=device, auto_class=auto_class,
                                              revision=revision, trust_remote_code=trust_remote_code)
    if loaded is None:
        raise AttentionUnavailable(names[0], unavailable, strict=False)
    if texts is not None:
        workload = text_workload(texts, loaded.tokenizer, limit=model_max_positions(loaded.model), source=text_source)
    else:
        limit = model_max_positions(loaded.model)
        vocab = loaded.facts.vocab_size or 1000
        target = SAMPLE_TOKENS.get(loaded.device.type, SAMPLE_TOKENS["cpu"])
        workload = synthetic_workload(dist, vocab_size=vocab, limit=limit, count=sequences, target_tokens=target)
    decision = loaded.decision.to_dict()
    report = BenchReport(decision["model"], decision["gpu"], loaded.decision.dtype, workload.description, seconds,
                         unavailable=dict(unavailable), versions=decision["versions"])
    for name in names:
        if name in unavailable:
            continue
        result, reasons = measure(loaded, name, workload, seconds=seconds, timer=timer, batch_tokens=batch_tokens)
        if result is None:
            report.unavailable[name] = reasons
        else:
            report.results[name] = result
    return report

