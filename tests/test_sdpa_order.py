"""The SDPA kernel order scoring runs under: flash, memory-efficient, cuDNN, math (CUDA only)."""

from __future__ import annotations

import torch

from attnfallback.sdpa_order import ENV, ORDER, describe, sdpa_order
from torch.nn.attention import SDPBackend

WANTED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


def priority() -> list[int]:
    return list(torch._C._get_sdp_priority_order())


def test_on_cuda_cudnn_comes_after_flash_and_efficient_and_is_restored(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    before = priority()
    with sdpa_order("cuda"):
        assert priority()[:4] == [int(b) for b in WANTED]
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert priority() == before
    assert ORDER == ("flash", "efficient", "cudnn", "math") and describe() == "flash, efficient, cudnn, math"


def test_other_devices_and_the_opt_out_change_nothing(monkeypatch):
    before = priority()
    with sdpa_order("cpu"):
        assert priority() == before
    monkeypatch.setenv(ENV, "torch")
    with sdpa_order("cuda"):
        assert priority() == before
    assert describe() == "torch's own"
