"""Which attention kernels actually ran: sdpa is itself a dispatcher.

PyTorch's sdpa picks a flash, cuDNN, memory-efficient or math kernel per call (by shapes, mask,
dtype and GPU), and a silent drop to the math kernel is a slowdown no log shows. On CUDA,
`attention_kernels` runs the loader's verification forward again, recording the ops it dispatches
(a TorchDispatchMode: sdpa's choice shows as its `_scaled_dot_product_*_attention` op, at no
start-up cost), and only when those name no attention under torch.profiler with its CUDA kernels
(a flash package that launches its kernels outside the dispatcher); it maps the names to labels
such as `sdpa:efficient`, `sdpa:cudnn` or `flash_attention_4`. On other devices it returns None
(the detail is absent, not empty).

The verification batch is tiny and padded (see verify.VERIFY_BATCH), so it shows the kernel chosen
for padded inputs; pass `forward=` to profile a real batch instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from attnfallback.verify import verify_forward

log = logging.getLogger("attnfallback")

# (label, pattern) in the order they are tried; the first match names an op or kernel. ATen op
# names (the CPU side of the trace) are the reliable ones; kernel names back them up.
RULES: tuple[tuple[str, re.Pattern], ...] = tuple(
    (label, re.compile(pattern, re.IGNORECASE))
    for label, pattern in (
        ("sdpa:flash", r"_scaled_dot_product_flash_attention(?!_for_cpu)|pytorch_flash::"),
        ("sdpa:efficient", r"_scaled_dot_product_efficient_attention|_efficient_attention_forward|fmha_cutlassF|PyTorchMemEffAttention"),
        ("sdpa:cudnn", r"_scaled_dot_product_cudnn_attention|cudnn.*(sdpa|fprop|fmha|flash)|sm\d+_flash_fprop"),
        ("sdpa:math", r"_scaled_dot_product_attention_math"),
        ("sdpa:cpu", r"_scaled_dot_product_flash_attention_for_cpu"),
        # FA3's kernels carry CuTe types in their template arguments, so FA3 is tried before FA4.
        ("flash_attention_3", r"FlashAttnFwdSm90|flash_attn_3|flash_attn_interface|flash::enable_sm90"),
        ("flash_attention_4", r"flash_attn_?cute|kernel_cutlass_kernel_flash|FlashAttentionForwardSm\d+|flash_attn_4"),
        ("flash_attention_2", r"flash_attn::|flash_attn_2_cuda|(?<!pytorch_)flash::flash_fwd|^flash_fwd"),
        ("flex_attention", r"flex_attention|FlexAttention"),
    )
)
SDPA_OP = "aten::scaled_dot_product_attention"
SOFTMAX = re.compile(r"(^aten::_?softmax$)|softmax_warp_forward|SoftMaxForward|cunn_SoftMax", re.IGNORECASE)
LABEL_ORDER = ("flash_attention_4", "flash_attention_3", "flash_attention_2", "sdpa:flash", "sdpa:cudnn",
               "sdpa:efficient", "sdpa:math", "sdpa:cpu", "flex_attention", "eager")


def label_for(name: str) -> str | None:
    """The attention label of one op or kernel name, or None when it is not attention."""
    for label, pattern in RULES:
        if pattern.search(name):
            return label
    return None


def labels_from_names(names: Iterable[str]) -> list[str]:
    """Attention labels for the op and kernel names of one traced forward.

    When no fused attention op or kernel ran but a softmax did, the attention was computed the
    eager way (matmul, softmax, matmul): `eager`.
    """
    names = list(names)
    found = {label for label in map(label_for, names) if label is not None}
    if not found and any(SOFTMAX.search(n) for n in names):
        found.add("eager")
    return [label for label in LABEL_ORDER if label in found]


def dispatched_names(run: Callable[[], object]) -> list[str]:
    """Names of the ops `run()` sends through the dispatcher ("aten::_softmax", a flash package's
    registered ops), in order. A dispatch mode sees each op below autograd, where sdpa has already
    chosen its kernel; unlike the profiler it costs nothing to start (session 13's first shards spent
    0.5-0.8 s in the profiler's ops-only trace)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names: list[str] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            names.append(func._schema.name)
            if func._schema.name == SDPA_OP:
                # under inference_mode the mode meets sdpa before it picks its kernel; its own
                # decomposition (what runs there anyway) dispatches the chosen op, seen here too
                with self:
                    result = func.decompose(*args, **kwargs)
                if result is not NotImplemented:
                    return result
            return func(*args, **kwargs)

    with Recorder():
        run()
    return names


def traced_names(run: Callable[[], object], device, *, kernels: bool = True) -> list[str]:
    """Names of the ops (and, with `kernels`, the CUDA kernels) that ran during `run()` under
    torch.profiler. Tracing kernels starts CUDA's profiling interface, tenths of a second the
    first time in a process; the ops alone cost milliseconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if kernels else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize(device)
    return [event.name for event in prof.events()]


def attention_kernels(model, facts, device, *, forward: Callable[[], object] | None = None) -> list[str] | None:
    """Labels of the attention kernels that ran in the verification forward (CUDA only, else None).

    [] means the trace showed no attention at all; None also when the profiler cannot run here.
    """
    if getattr(device, "type", str(device)) != "cuda":
        return None
    run = forward or (lambda: verify_forward(model, facts, device))
    try:
        # sdpa's choice shows in its ATen op's name; kernels are traced only when the ops say nothing
        try:
            labels = labels_from_names(dispatched_names(run))
        except Exception as e:  # noqa: BLE001 - code that does not run under a dispatch mode: the profiler sees it
            log.debug("attention kernels: the dispatch mode failed (%s: %s); tracing", type(e).__name__, e)
            labels = []
        if labels:
            return labels
        return labels_from_names(traced_names(run, device))
    except Exception as e:  # noqa: BLE001 - the profiler is a diagnostic; never fail a load over it
        log.warning("attention kernels: torch.profiler failed (%s: %s); not recorded", type(e).__name__, e)
        return None
