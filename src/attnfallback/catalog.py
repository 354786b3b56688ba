"""GPU classes and the names they go by: short names, nvidia-smi names, RunPod GPU type ids."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from attnfallback.errors import UnknownNameError

_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}


@dataclass(frozen=True)
class GpuClass:
    """One GPU class: name, compute capability (major, minor), native bf16, memory in GB."""

    name: str
    compute_capability: tuple[int, int]
    bf16: bool
    memory_gb: float
    aliases: tuple[str, ...]


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t and t not in _VENDOR_WORDS]


@lru_cache(maxsize=1)
def classes() -> dict[str, GpuClass]:
    """All known GPU classes by canonical name, in the data file's order."""
    raw = tomllib.loads(resources.files("attnfallback.data").joinpath("gpus.toml").read_text())
    out = {}
    for name, entry in raw.items():
        major, minor = (int(x) for x in str(entry["cc"]).split("."))
        out[name] = GpuClass(name, (major, minor), bool(entry["bf16"]), float(entry["memory_gb"]), tuple(entry["aliases"]))
    return out


@lru_cache(maxsize=1)
def _alias_index() -> dict[str, str]:
    index = {}
    for cls in classes().values():
        for alias in (cls.name, *cls.aliases):
            index[_normalise(alias)] = cls.name
            stripped = "".join(_tokens(alias))
            if stripped:
                index.setdefault(stripped, cls.name)
    return index


def find(name: str) -> GpuClass | None:
    """The class a GPU name belongs to, or None. Exact aliases first, then name tokens
    ("NVIDIA A100-SXM4-80GB" -> A100 through its token "a100")."""
    index = _alias_index()
    hit = index.get(_normalise(name))
    if hit:
        return classes()[hit]
    tokens = _tokens(name)
    candidates = tokens + [a + b for a, b in zip(tokens, tokens[1:])]
    for tok in sorted(candidates, key=len, reverse=True):
        if tok in index:
            return classes()[index[tok]]
    return None


def lookup(name: str) -> GpuClass:
    """Like `find`, but an unknown name is an error listing the known classes."""
    cls = find(name)
    if cls is None:
        raise UnknownNameError("GPU class", name, list(classes()))
    return cls
