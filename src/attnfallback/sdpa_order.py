"""The order in which PyTorch's SDPA tries its kernels, in the forwards this package runs.

On Hopper and newer GPUs PyTorch tries cuDNN attention first, and cuDNN builds an execution graph
for every batch shape it has not run before: 55-100 ms a shape on an H100, against 1-2 ms for the
memory-efficient kernel, which runs those batches as fast (bench/shape_cost.py; bench/NOTES.md,
session 5). A scorer meets new shapes all the time, since every shard's lengths are its own, so
its forwards run under `sdpa_order()`: flash, then memory-efficient, then cuDNN (the shapes and
masks only cuDNN takes among the fast kernels keep it), then math.

ATTNFALLBACK_SDPA_ORDER=torch leaves PyTorch's own order (to compare, or where cuDNN wins).
"""

from __future__ import annotations

import contextlib

from attnfallback import envs

ORDER = ("flash", "efficient", "cudnn", "math")
ENV = envs.SDPA_ORDER


def wanted() -> bool:
    """Whether forwards run under ORDER (not when ATTNFALLBACK_SDPA_ORDER=torch)."""
    return envs.choice(ENV, ("torch", "ours"), "ours") != "torch"


def describe() -> str:
    return "torch's own" if not wanted() else ", ".join(ORDER)


def sdpa_order(device_type: str = "cuda"):
    """A context manager: SDPA tries its kernels in ORDER while it is open (CUDA only; elsewhere,
    or with ATTNFALLBACK_SDPA_ORDER=torch, it changes nothing). The setting is process-wide while
    open, as torch's own `sdpa_kernel` is; it is restored on exit."""
    if device_type != "cuda" or not wanted():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    chosen = [backends[name] for name in ORDER]
    try:
        return sdpa_kernel(chosen, set_priority=True)
    except TypeError:  # a torch without set_priority: leave cuDNN out instead of trying it first
        return sdpa_kernel([b for b in chosen if b is not SDPBackend.CUDNN_ATTENTION])
