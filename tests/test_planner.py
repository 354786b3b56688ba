"""Planner tables per GPU class, with and without each flash package, all injected (no CUDA)."""

from __future__ import annotations

import pytest

from attnfallback.caps import DeviceCaps, SoftwareCaps
from attnfallback.errors import AttentionUnavailable, UnknownNameError
from attnfallback.model_facts import ModelFacts, ModelRef
from attnfallback.planner import plan, resolve_dtype
from attnfallback.policy import DEFAULT_PREFER, Policy

ALL_ATTN = frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"})
BARE = SoftwareCaps(torch="2.11.0", cuda="13.0", transformers="5.23.0", transformers_attn=ALL_ATTN)
FULL = BARE.with_installed(["flash-attn", "flash-attn-3", "flash-attn-4"])


def facts(head_dim=64, flash=True, sdpa=True, flex=True, cls="BertModel") -> ModelFacts:
    return ModelFacts(
        ref=ModelRef("x", "local", "/x"), architecture=cls, model_type="bert", model_class=cls, head_dim=head_dim,
        num_layers=2, hidden_size=head_dim * 4, vocab_size=100, supports_flash=flash, supports_sdpa=sdpa,
        supports_flex=flex, is_encoder_decoder=False, identity="sha256:0", revision=None,
    )


def device(name: str) -> DeviceCaps:
    return DeviceCaps.cpu() if name == "CPU" else DeviceCaps.from_class(name)


# (GPU class, installed packages, implementation chosen from the default preference list)
TABLE = [
    ("H100", FULL, "flash_attention_4"),
    ("H100", BARE.with_installed(["flash-attn-3"]), "flash_attention_3"),
    ("H100", BARE.with_installed(["flash-attn"]), "flash_attention_2"),
    ("H100", BARE, "sdpa"),
    ("B200", FULL, "flash_attention_4"),
    ("A100", FULL, "flash_attention_2"),
    ("A100", BARE.with_installed(["flash-attn-4", "flash-attn-3"]), "sdpa"),
    ("A6000", FULL, "flash_attention_2"),
    ("A6000", BARE, "sdpa"),
    ("RTX4090", FULL, "flash_attention_2"),
    ("L4", FULL, "flash_attention_2"),
    ("L4", BARE, "sdpa"),
    ("T4", FULL, "sdpa"),
    ("T4", BARE, "sdpa"),
    ("V100", FULL, "sdpa"),
    ("CPU", FULL, "sdpa"),
    ("CPU", BARE, "sdpa"),
]


@pytest.mark.parametrize("gpu,software,expected", TABLE)
def test_plan_table(gpu, software, expected):
    p = plan(facts(), device(gpu), software, Policy.graceful(), "auto", enforce_strict=False)
    assert p.chosen == expected
    # every candidate before the chosen one carries at least one reason; the chosen carries none
    order = [c.impl for c in p.candidates]
    for c in p.candidates[: order.index(expected)]:
        assert c.reasons, f"{c.impl} rejected without a reason on {gpu}"
    assert p.candidates[order.index(expected)].reasons == ()


def test_default_preference_is_flash_first_then_sdpa_then_eager():
    assert DEFAULT_PREFER == ("flash_attention_4", "flash_attention_3", "flash_attention_2", "sdpa", "eager")


def test_t4_reason_names_the_compute_capability():
    p = plan(facts(), device("T4"), FULL, Policy.graceful(["flash_attention_2", "sdpa"]), "auto", enforce_strict=False)
    assert p.chosen == "sdpa"
    assert "compute capability 7.5 < 8.0 required by flash_attention_2" in p.candidates[0].reasons
    assert p.dtype == "float16"  # no native bf16 on a T4


def test_missing_package_reason():
    p = plan(facts(), device("H100"), BARE, Policy.graceful(["flash_attention_2", "sdpa"]), "auto", enforce_strict=False)
    assert p.candidates[0].reasons == ("package flash_attn is not installed",)


def test_cpu_rejects_flash_with_every_reason():
    p = plan(facts(), DeviceCaps.cpu(), BARE, Policy.graceful(["flash_attention_2", "sdpa"]), "auto", enforce_strict=False)
    reasons = p.candidates[0].reasons
    assert any("no CUDA GPU" in r for r in reasons)
    assert any("flash_attn is not installed" in r for r in reasons)
    assert any("float32" in r for r in reasons)


def test_head_dim_limits():
    p = plan(facts(head_dim=512), device("H100"), FULL, Policy.graceful(), "bfloat16", enforce_strict=False)
    assert p.chosen == "sdpa"
    assert any("head_dim 512 > 256" in r for r in p.candidates[0].reasons)
    assert any("head_dim 512 > 256" in r for r in p.candidates[2].reasons)
    p = plan(facts(head_dim=192), device("B200"), FULL, Policy.graceful(), "bfloat16", enforce_strict=False)
    assert p.chosen == "flash_attention_4"
    p = plan(facts(head_dim=160), device("B200"), FULL, Policy.graceful(), "bfloat16", enforce_strict=False)
    assert p.chosen == "flash_attention_2"


def test_fp32_rejects_flash():
    p = plan(facts(), device("H100"), FULL, Policy.graceful(), "float32", enforce_strict=False)
    assert p.chosen == "sdpa"


def test_model_without_flash_support():
    p = plan(facts(flash=False, cls="OldModel"), device("H100"), FULL, Policy.graceful(), "auto", enforce_strict=False)
    assert p.chosen == "sdpa"
    assert "OldModel does not support flash attention" in p.candidates[0].reasons


def test_model_without_sdpa_support_falls_to_eager():
    p = plan(facts(flash=False, sdpa=False, cls="OldModel"), DeviceCaps.cpu(), BARE, Policy.graceful(["sdpa", "eager"]), "auto", enforce_strict=False)
    assert p.chosen == "eager"
    assert p.candidates[0].reasons == ("OldModel does not support sdpa",)


def test_transformers_that_does_not_know_fa4():
    old = SoftwareCaps(torch="2.11.0", transformers="5.17.0", flash_attn_4="4.0.0b36", transformers_attn=frozenset({"eager", "sdpa", "flash_attention_2"}))
    p = plan(facts(), device("H100"), old, Policy.graceful(["flash_attention_4", "sdpa"]), "auto", enforce_strict=False)
    assert p.chosen == "sdpa"
    assert "transformers 5.17.0 does not know flash_attention_4" in p.candidates[0].reasons


def test_old_torch_rejects_sdpa_and_flex():
    old = SoftwareCaps(torch="2.0.1", transformers_attn=ALL_ATTN)
    p = plan(facts(), DeviceCaps.cpu(), old, Policy.graceful(["flex_attention", "sdpa", "eager"]), "auto", enforce_strict=False)
    assert p.chosen == "eager"
    assert "torch 2.0.1 < 2.5 required by flex_attention" in p.candidates[0].reasons


def test_kernels_hub_offline():
    sw = BARE.with_installed(["kernels"])
    offline = SoftwareCaps(**{**sw.__dict__, "hub_offline": True})
    p = plan(facts(), device("H100"), offline, Policy.graceful(["kernels-community/flash-attn", "sdpa"]), "auto", enforce_strict=False)
    assert p.chosen == "sdpa"
    assert any("unreachable offline" in r for r in p.candidates[0].reasons)
    p = plan(facts(), device("H100"), sw, Policy.graceful(["kernels-community/flash-attn", "sdpa"]), "auto", enforce_strict=False)
    assert p.chosen == "kernels-community/flash-attn"


def test_strict_raises_with_every_reason():
    with pytest.raises(AttentionUnavailable) as info:
        plan(facts(), device("T4"), BARE, Policy.strict(["flash_attention_2", "sdpa"]), "auto")
    err = info.value
    assert err.exit_code == 3
    assert err.requested == "flash_attention_2"
    assert set(err.reasons["flash_attention_2"]) == {"compute capability 7.5 < 8.0 required by flash_attention_2", "package flash_attn is not installed"}


def test_strict_passes_when_first_preference_runs():
    p = plan(facts(), device("H100"), FULL, Policy.strict(["flash_attention_2", "sdpa"]), "auto")
    assert p.chosen == "flash_attention_2" and not p.fell_back


def test_graceful_with_nothing_viable_raises():
    with pytest.raises(AttentionUnavailable) as info:
        plan(facts(), DeviceCaps.cpu(), BARE, Policy.graceful(["flash_attention_2"]), "auto")
    assert not info.value.strict


@pytest.mark.parametrize("dev,expected", [("H100", "bfloat16"), ("A6000", "bfloat16"), ("T4", "float16"), ("V100", "float16"), ("CPU", "float32")])
def test_auto_dtype(dev, expected):
    assert resolve_dtype("auto", device(dev)) == expected


def test_unknown_dtype_lists_valid():
    with pytest.raises(UnknownNameError) as info:
        resolve_dtype("float8", DeviceCaps.cpu())
    assert "bfloat16" in str(info.value) and info.value.exit_code == 2
