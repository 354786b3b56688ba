"""What a run asks for: the attention implementations it prefers, and what to do when they fail.

`graceful` moves down the preference list (production evals); `strict` fails early, with every
reason, unless the first preference runs (paper-grade timing); `fastest` measures the viable
candidates and keeps the fastest. One switch, the same code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum

from attnfallback import envs
from attnfallback.errors import UnknownNameError, UsageError


class AttnImpl(str, Enum):
    """Attention implementations by transformers' own names."""

    FLASH_ATTENTION_4 = "flash_attention_4"
    FLASH_ATTENTION_3 = "flash_attention_3"
    FLASH_ATTENTION_2 = "flash_attention_2"
    SDPA = "sdpa"
    FLEX_ATTENTION = "flex_attention"
    EAGER = "eager"

    def __str__(self) -> str:
        return self.value


class Mode(str, Enum):
    GRACEFUL = "graceful"
    STRICT = "strict"
    FASTEST = "fastest"

    def __str__(self) -> str:
        return self.value


DEFAULT_PREFER: tuple[str, ...] = (
    "flash_attention_4",
    "flash_attention_3",
    "flash_attention_2",
    "sdpa",
    "eager",
)

DTYPES = ("auto", "bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

ENV_POLICY = envs.POLICY
ENV_PREFER = envs.PREFER
ENV_EVENTS = envs.EVENTS
ENV_MEASURE = envs.MEASURE
MEASURE_MODES = ("auto", "on", "off")


def is_kernels_hub_id(name: str) -> bool:
    """A kernels-hub implementation is named like `kernels-community/flash-attn`."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith(".")


def parse_impl(name: str) -> str:
    """Validate one implementation name; kernels-hub ids (`org/repo`) pass as they are."""
    text = str(name).strip()
    try:
        return AttnImpl(text).value
    except ValueError:
        if is_kernels_hub_id(text):
            return text
        raise UnknownNameError(
            "attention implementation", text, [i.value for i in AttnImpl] + ["<org>/<kernel> (kernels hub)"]
        ) from None


def parse_prefer(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A comma-separated string or a list of names -> validated tuple, duplicates dropped."""
    if value is None:
        return DEFAULT_PREFER
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [parse_impl(i) for i in items if str(i).strip()]
    if not names:
        raise UnknownNameError("attention implementation", "", [i.value for i in AttnImpl])
    return tuple(dict.fromkeys(names))


def parse_mode(value: str | Mode) -> Mode:
    try:
        return Mode(str(value).strip().lower())
    except ValueError:
        raise UnknownNameError("policy", str(value), [m.value for m in Mode]) from None


def parse_measure(value: str | None) -> str:
    """`auto` (graceful measures its viable candidates on a CUDA GPU), `on` (on any device) or
    `off` (the preference order alone)."""
    text = "auto" if value is None else str(value).strip().lower() or "auto"
    if text not in MEASURE_MODES:
        raise UnknownNameError("measure mode", str(value), MEASURE_MODES)
    return text


def parse_dtype(value: str | None) -> str:
    """`auto`, `bfloat16`, `float16` or `float32` (bf16/fp16/fp32 accepted)."""
    if value is None:
        return "auto"
    text = str(value).strip().lower().removeprefix("torch.")
    text = _DTYPE_ALIASES.get(text, text)
    if text not in DTYPES:
        raise UnknownNameError("dtype", str(value), DTYPES)
    return text


@dataclass(frozen=True)
class Policy:
    """How a run chooses its attention implementation.

    mode: graceful | strict | fastest; prefer: ordered implementation names;
    verify: run a forward pass after loading; fastest_budget_s: time budget of `fastest`;
    measure: under graceful, `auto` times the viable candidates on a CUDA GPU when the caller
    can run its own work (`score` on the shard's rows; fastest.py has the rule), `on` on any
    device, `off` takes the preference order as it is. strict never measures.
    """

    mode: Mode = Mode.GRACEFUL
    prefer: tuple[str, ...] = DEFAULT_PREFER
    verify: bool = True
    fastest_budget_s: float = 20.0
    extra: Mapping[str, object] = field(default_factory=dict)
    measure: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "mode", parse_mode(self.mode))
        object.__setattr__(self, "prefer", parse_prefer(self.prefer))
        object.__setattr__(self, "measure", parse_measure(self.measure))

    @property
    def is_strict(self) -> bool:
        return self.mode is Mode.STRICT

    @property
    def requested(self) -> str:
        return self.prefer[0]

    @classmethod
    def graceful(cls, prefer: str | Iterable[str] | None = None, **kw) -> Policy:
        return cls(mode=Mode.GRACEFUL, prefer=parse_prefer(prefer), **kw)

    @classmethod
    def strict(cls, prefer: str | Iterable[str] | None = None, **kw) -> Policy:
        return cls(mode=Mode.STRICT, prefer=parse_prefer(prefer), **kw)

    @classmethod
    def fastest(cls, prefer: str | Iterable[str] | None = None, **kw) -> Policy:
        return cls(mode=Mode.FASTEST, prefer=parse_prefer(prefer), **kw)

    @classmethod
    def resolve(
        cls,
        mode: str | Mode | None = None,
        prefer: str | Iterable[str] | None = None,
        verify: bool = True,
        env: Mapping[str, str] | None = None,
        measure: str | None = None,
    ) -> Policy:
        """Arguments first, else ATTNFALLBACK_POLICY / ATTNFALLBACK_PREFER / ATTNFALLBACK_MEASURE,
        else the defaults."""
        mode = mode if mode is not None else envs.value(ENV_POLICY, Mode.GRACEFUL, env)
        prefer = prefer if prefer is not None else envs.value(ENV_PREFER, None, env)
        measure = measure if measure is not None else envs.value(ENV_MEASURE, None, env)
        return cls(mode=parse_mode(mode), prefer=parse_prefer(prefer), verify=verify, measure=parse_measure(measure))

    def with_prefer(self, prefer: Iterable[str]) -> Policy:
        return replace(self, prefer=parse_prefer(prefer))

    def to_dict(self) -> dict:
        return {"mode": self.mode.value, "prefer": list(self.prefer), "verify": self.verify, "measure": self.measure}


def as_policy(policy: Policy | str | None, prefer: str | Iterable[str] | None = None) -> Policy:
    """A Policy, a mode name (graceful | strict | fastest) or None (the environment, else graceful);
    `prefer`, when given, replaces the preference list."""
    if policy is None or isinstance(policy, str):
        return Policy.resolve(mode=policy, prefer=prefer)
    if not isinstance(policy, Policy):
        raise UsageError(f"policy must be a Policy or one of graceful, strict, fastest, found {policy!r}")
    return policy if prefer is None else policy.with_prefer(prefer)


def events_dir_from_env(value: str | os.PathLike | None, env: Mapping[str, str] | None = None) -> str | None:
    """The events directory from an argument, else ATTNFALLBACK_EVENTS, else None (no events)."""
    if value is not None:
        return os.fspath(value)
    return envs.value(ENV_EVENTS, None, env)
