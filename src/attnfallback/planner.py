"""Pure planning: (ModelFacts, DeviceCaps, SoftwareCaps, Policy, dtype) -> Plan.

The planner walks the policy's preference list, keeps every implementation's reasons, and puts
the viable ones first-preferred-first. It decides before anything is loaded, so a fallback never
reads the weights twice. Strict policy turns a non-viable first preference into
`AttentionUnavailable` carrying every reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnfallback import impls
from attnfallback.caps import DeviceCaps, SoftwareCaps
from attnfallback.errors import AttentionUnavailable
from attnfallback.model_facts import ModelFacts
from attnfallback.policy import Policy, parse_dtype


@dataclass(frozen=True)
class Candidate:
    impl: str
    reasons: tuple[str, ...]

    @property
    def viable(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {"impl": self.impl, "viable": self.viable, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class Plan:
    """Candidates in preference order, each with the reasons it cannot run (none if viable)."""

    candidates: tuple[Candidate, ...]
    policy: Policy
    device: DeviceCaps
    dtype: str

    @property
    def requested(self) -> str:
        return self.policy.requested

    @property
    def viable(self) -> list[str]:
        return [c.impl for c in self.candidates if c.viable]

    @property
    def rejected(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.viable]

    @property
    def chosen(self) -> str | None:
        viable = self.viable
        return viable[0] if viable else None

    @property
    def strict_ok(self) -> bool:
        return self.candidates[0].viable

    @property
    def fell_back(self) -> bool:
        return self.chosen != self.requested

    def reasons(self) -> dict[str, list[str]]:
        return {c.impl: list(c.reasons) for c in self.candidates if c.reasons}

    def to_dict(self) -> dict:
        return {
            "requested": self.requested,
            "chosen": self.chosen,
            "fell_back": self.fell_back,
            "strict_ok": self.strict_ok,
            "dtype": self.dtype,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def resolve_dtype(dtype: str | None, device: DeviceCaps) -> str:
    """`auto`: bf16 on a GPU with native bf16, fp16 on an older GPU, fp32 on CPU and MPS."""
    dtype = parse_dtype(dtype)
    if dtype != "auto":
        return dtype
    if device.kind == "cuda":
        return "bfloat16" if device.bf16 else "float16"
    return "float32"


def plan(
    facts: ModelFacts | None,
    device: DeviceCaps,
    software: SoftwareCaps,
    policy: Policy,
    dtype: str | None = "auto",
    enforce_strict: bool = True,
) -> Plan:
    """The ordered candidates with their reasons. Under a strict policy (and enforce_strict),
    a non-viable first preference raises AttentionUnavailable with every reason."""
    dtype = resolve_dtype(dtype, device)
    candidates = tuple(
        Candidate(name, tuple(impls.reasons_against(name, device, software, facts, dtype))) for name in policy.prefer
    )
    result = Plan(candidates=candidates, policy=policy, device=device, dtype=dtype)
    if enforce_strict and policy.is_strict and not result.strict_ok:
        raise AttentionUnavailable(result.requested, result.reasons())
    if enforce_strict and result.chosen is None:
        raise AttentionUnavailable(result.requested, result.reasons(), strict=False)
    return result
