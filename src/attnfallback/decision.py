"""One attempt's records: what was tried (`Attempt`) and what was decided (`Decision`).

The loader fills them in; the measured choice (fastest.py) adds to them; `Decision.to_dict` is the
body of the `attn_impl` audit event. Pure data: no torch, no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnfallback.caps import DeviceCaps
from attnfallback.model_facts import ModelFacts
from attnfallback.policy import Policy


@dataclass
class Attempt:
    """One step of the decision: an implementation, the stage it reached, and why it failed."""

    impl: str
    stage: str  # plan | load | verify
    ok: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"impl": self.impl, "stage": self.stage, "ok": self.ok, "reasons": list(self.reasons)}


@dataclass
class Decision:
    """What was requested, what runs, and every attempt on the way."""

    requested: str
    used: str | None
    attempts: list[Attempt]
    policy: Policy
    dtype: str
    device: DeviceCaps
    facts: ModelFacts
    versions: dict
    timing: dict = field(default_factory=dict)
    kernels: list[str] | None = None
    kernels_source: str | None = None  # "traced" in this process, or "cache": traced by an earlier one (loader.py)
    measured: dict | None = None  # a measured choice: tokens/s per implementation, skipped, why (fastest.py)

    @property
    def fell_back(self) -> bool:
        """Something other than the first preference runs because the first could not (it failed
        its plan, load or verification). A measured choice among runnable candidates, or a
        candidate left unmeasured for the budget, is not a fallback."""
        if self.used == self.requested:
            return False
        return any(a.impl == self.requested and not a.ok for a in self.attempts)

    @property
    def choice(self) -> str:
        """One sentence: why `used` runs."""
        if self.used is None:
            return "nothing runs"
        if self.measured and self.measured.get("reason"):
            return self.measured["reason"]
        if self.fell_back:
            return f"{self.first_reason}; {self.used} is the first preference that runs"
        if self.used == self.requested:
            return f"{self.used}, the first preference, runs"
        return f"{self.used} is the first preference that runs"

    @property
    def first_reason(self) -> str | None:
        for a in self.attempts:
            if not a.ok and a.reasons:
                return f"{a.impl}: {a.reasons[0]}"
        return None

    def to_dict(self) -> dict:
        """The fields of the `attn_impl` event (without the common envelope)."""
        d = {
            "gpu": {
                "name": self.device.name,
                "class": self.device.gpu_class or self.device.kind,
                "cc": self.device.cc_text,
                "memory_gb": None if self.device.memory_gb is None else round(self.device.memory_gb, 1),
                "index": self.device.host_index,  # which GPU of the host, from this process's own probe
                "uuid": self.device.uuid,
            },
            "model": {
                "id": self.facts.model_id,
                "revision": self.facts.revision,
                "identity": self.facts.identity,
                "dtype": self.dtype,
                "architecture": self.facts.architecture,
            },
            "policy": {"mode": self.policy.mode.value, "prefer": list(self.policy.prefer)},
            "requested": self.requested,
            "used": self.used,
            "fell_back": self.fell_back,
            "choice": self.choice,
            "attempts": [a.to_dict() for a in self.attempts],
            "versions": self.versions,
            "timing": {k: round(v, 4) for k, v in self.timing.items()},
        }
        if self.kernels is not None:
            d["kernels"] = list(self.kernels)
            if self.kernels_source is not None:
                d["kernels_source"] = self.kernels_source
        if self.measured is not None:
            d["measured"] = self.measured
        return d
