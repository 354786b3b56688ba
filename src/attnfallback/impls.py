"""One entry per attention implementation: what it needs, as a check returning reasons.

Each check is a pure function of (DeviceCaps, SoftwareCaps, ModelFacts, dtype) and returns the
list of reasons the implementation cannot run; an empty list means it can. Reasons are sentences
a person understands; they flow into errors, the CLI and the audit events. Facts encoded here
include the one transformers does not check: compute capability >= 8.0 for flash_attention_2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attnfallback.caps import DeviceCaps, SoftwareCaps
from attnfallback.model_facts import ModelFacts
from attnfallback.policy import is_kernels_hub_id

HALF_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class Implementation:
    """An attention implementation by transformers' name, and its check."""

    name: str
    check: Callable[[DeviceCaps, SoftwareCaps, ModelFacts | None, str], list[str]]
    compiles: bool = False  # pays a compile cost on its first call
    quadratic_memory: bool = False  # materialises the L x L score matrix
    gpu_only: bool = False  # runs on CUDA GPUs only: passing it over on a CPU is expected


def _version_tuple(text: str | None) -> tuple[int, ...]:
    out = []
    for part in (text or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _needs_cuda(name: str, device: DeviceCaps) -> list[str]:
    if device.kind != "cuda":
        return [f"no CUDA GPU (this device is {device.kind})"]
    return []


def _needs_half(name: str, dtype: str) -> list[str]:
    if dtype not in HALF_DTYPES:
        return [f"dtype {dtype} is not float16 or bfloat16, as {name} requires"]
    return []


def _needs_transformers_support(name: str, software: SoftwareCaps) -> list[str]:
    if software.transformers_attn is not None and name not in software.transformers_attn:
        return [f"transformers {software.transformers} does not know {name}"]
    return []


def _model_supports(name: str, facts: ModelFacts | None, flag: str, family: str) -> list[str]:
    if facts is not None and not getattr(facts, flag):
        return [f"{facts.model_class} does not support {family}"]
    return []


def _head_dim_at_most(name: str, facts: ModelFacts | None, limit: int) -> list[str]:
    hd = facts.head_dim if facts else None
    if hd is not None and hd > limit:
        return [f"head_dim {hd} > {limit}, the largest {name} supports"]
    return []


def _package(name: str, version: str | None, package: str) -> list[str]:
    return [] if version else [f"package {package} is not installed"]


def check_flash_attention_4(device, software, facts, dtype) -> list[str]:
    name = "flash_attention_4"
    reasons = _needs_cuda(name, device)
    cc = device.compute_capability
    if cc is not None and cc[0] not in (9, 10):
        reasons.append(f"compute capability {device.cc_text} is not 9.x or 10.x, as {name} requires")
    reasons += _package(name, software.flash_attn_4, "flash-attn-4")
    reasons += _needs_transformers_support(name, software)
    reasons += _needs_half(name, dtype)
    reasons += _model_supports(name, facts, "supports_flash", "flash attention")
    hd = facts.head_dim if facts else None
    if hd is not None and cc is not None:
        if cc[0] == 9 and hd > 256:
            reasons.append(f"head_dim {hd} > 256, the largest {name} supports on sm90")
        if cc[0] == 10 and hd > 128 and hd not in (192, 256):
            reasons.append(f"head_dim {hd} > 128, the largest {name} supports on sm100 (besides 192 and 256)")
    return reasons


def check_flash_attention_3(device, software, facts, dtype) -> list[str]:
    name = "flash_attention_3"
    reasons = _needs_cuda(name, device)
    if device.compute_capability is not None and device.compute_capability != (9, 0):
        reasons.append(f"compute capability {device.cc_text} is not 9.0 (Hopper), as {name} requires")
    reasons += _package(name, software.flash_attn_3, "flash-attn-3 (module flash_attn_interface)")
    reasons += _needs_transformers_support(name, software)
    reasons += _needs_half(name, dtype)
    reasons += _model_supports(name, facts, "supports_flash", "flash attention")
    reasons += _head_dim_at_most(name, facts, 256)
    return reasons


def check_flash_attention_2(device, software, facts, dtype) -> list[str]:
    name = "flash_attention_2"
    reasons = _needs_cuda(name, device)
    if device.compute_capability is not None and device.compute_capability < (8, 0):
        reasons.append(f"compute capability {device.cc_text} < 8.0 required by {name}")
    reasons += _package(name, software.flash_attn, "flash_attn")
    reasons += _needs_half(name, dtype)
    reasons += _model_supports(name, facts, "supports_flash", "flash attention")
    reasons += _head_dim_at_most(name, facts, 256)
    return reasons


def check_sdpa(device, software, facts, dtype) -> list[str]:
    reasons = []
    if _version_tuple(software.torch) < (2, 1):
        reasons.append(f"torch {software.torch} < 2.1 required by sdpa")
    reasons += _model_supports("sdpa", facts, "supports_sdpa", "sdpa")
    reasons += _no_softcapping("sdpa", facts)
    return reasons


def _no_softcapping(name: str, facts) -> list[str]:
    """Attention-logit soft-capping (Gemma 2) is not something `name` computes: transformers 5.17
    runs Gemma 2 under sdpa and leaves the cap out, silently (other numbers than eager's)."""
    config = getattr(facts, "config", None)
    if config is None:
        return []
    text = getattr(config, "get_text_config", lambda: config)()
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap:
        return [f"{name} cannot soft-cap attention logits (attn_logit_softcapping {cap}): its outputs would not be the model's"]
    return []


def check_flex_attention(device, software, facts, dtype) -> list[str]:
    reasons = []
    if _version_tuple(software.torch) < (2, 5):
        reasons.append(f"torch {software.torch} < 2.5 required by flex_attention")
    reasons += _model_supports("flex_attention", facts, "supports_flex", "flex_attention")
    return reasons


def check_eager(device, software, facts, dtype) -> list[str]:
    return []


def check_kernels_hub(name: str):
    """A kernels-hub implementation (`kernels-community/flash-attn`): package and hub needed."""

    def check(device, software, facts, dtype) -> list[str]:
        reasons = _needs_cuda(name, device)
        reasons += _package(name, software.kernels, "kernels")
        if software.hub_offline:
            reasons.append(f"the hub is unreachable offline (HF_HUB_OFFLINE), so kernel {name} cannot be fetched")
        reasons += _needs_half(name, dtype)
        reasons += _model_supports(name, facts, "supports_flash", "flash attention")
        return reasons

    return check


REGISTRY: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("flash_attention_4", check_flash_attention_4, compiles=True, gpu_only=True),
        Implementation("flash_attention_3", check_flash_attention_3, gpu_only=True),
        Implementation("flash_attention_2", check_flash_attention_2, gpu_only=True),
        Implementation("sdpa", check_sdpa),
        Implementation("flex_attention", check_flex_attention, compiles=True),
        Implementation("eager", check_eager, quadratic_memory=True),
    )
}


def get(name: str) -> Implementation:
    """The entry for an implementation name (kernels-hub ids get a generated entry)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if is_kernels_hub_id(name):
        return Implementation(name, check_kernels_hub(name), gpu_only=True)
    from attnfallback.errors import UnknownNameError

    raise UnknownNameError("attention implementation", name, list(REGISTRY))


def reasons_against(name: str, device: DeviceCaps, software: SoftwareCaps, facts: ModelFacts | None, dtype: str) -> list[str]:
    """Why `name` cannot run with these capabilities (empty: it can)."""
    return get(name).check(device, software, facts, dtype)
