"""Policy parsing and the environment, the GPU catalog's aliases, and software probing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from attnfallback import catalog
from attnfallback.caps import DeviceCaps, SoftwareCaps, probe_software
from attnfallback.errors import UnknownNameError
from attnfallback.policy import Mode, Policy, parse_dtype, parse_prefer


def test_policy_from_arguments_beats_environment():
    env = {"ATTNFALLBACK_POLICY": "strict", "ATTNFALLBACK_PREFER": "sdpa,eager"}
    assert Policy.resolve(env=env).mode is Mode.STRICT
    assert Policy.resolve(env=env).prefer == ("sdpa", "eager")
    p = Policy.resolve(mode="graceful", prefer="eager", env=env)
    assert p.mode is Mode.GRACEFUL and p.prefer == ("eager",)
    assert Policy.resolve(env={}).prefer[0] == "flash_attention_4"


def test_policy_constructors():
    assert Policy.strict(["sdpa"]).is_strict
    assert not Policy.graceful(["sdpa"]).is_strict
    assert Policy.fastest("sdpa,eager").mode is Mode.FASTEST


@pytest.mark.parametrize("bad", ["flash_attention_5", "sdpa,nope", ""])
def test_unknown_implementation_lists_valid(bad):
    with pytest.raises(UnknownNameError) as info:
        parse_prefer(bad)
    assert "flash_attention_2" in str(info.value) and "eager" in str(info.value)


def test_unknown_mode_lists_valid():
    with pytest.raises(UnknownNameError) as info:
        Policy.resolve(mode="lenient", env={})
    assert "graceful" in str(info.value) and "strict" in str(info.value)


def test_kernels_hub_ids_pass_and_duplicates_drop():
    assert parse_prefer("kernels-community/flash-attn,sdpa,sdpa") == ("kernels-community/flash-attn", "sdpa")


def test_dtype_aliases():
    assert parse_dtype("bf16") == "bfloat16" and parse_dtype("torch.float16") == "float16"


@pytest.mark.parametrize(
    "name,cls",
    [
        ("H100", "H100"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("A6000", "A6000"),
        ("NVIDIA RTX A6000", "A6000"), ("NVIDIA GeForce RTX 4090", "RTX4090"), ("NVIDIA L4", "L4"), ("T4", "T4"),
        ("Tesla T4", "T4"), ("Tesla V100-SXM2-16GB", "V100"), ("NVIDIA A100-SXM4-80GB", "A100"), ("nvidia a10g", "A10G"),
        ("NVIDIA L40S", "L40S"), ("NVIDIA B200", "B200"), ("NVIDIA GeForce RTX 5090", "RTX5090"),
    ],
)
def test_catalog_aliases(name, cls):
    assert catalog.lookup(name).name == cls


def test_catalog_facts_match_design():
    cc = {n: c.compute_capability for n, c in catalog.classes().items()}
    assert cc["H100"] == (9, 0) and cc["B200"] == (10, 0) and cc["A100"] == (8, 0) and cc["A6000"] == (8, 6)
    assert cc["L4"] == (8, 9) and cc["RTX5090"] == (12, 0) and cc["T4"] == (7, 5) and cc["V100"] == (7, 0)
    assert not catalog.lookup("T4").bf16 and catalog.lookup("L4").bf16


def test_unknown_gpu_lists_known():
    with pytest.raises(UnknownNameError) as info:
        catalog.lookup("X100")
    assert "H100" in info.value.valid and info.value.exit_code == 2


def test_device_from_class_injects_without_cuda():
    dev = DeviceCaps.from_class("NVIDIA RTX A6000")
    assert dev.kind == "cuda" and dev.compute_capability == (8, 6) and dev.gpu_class == "A6000"


def test_probe_software_on_this_machine():
    sw = probe_software(env={"HF_HUB_OFFLINE": "1"})
    assert sw.torch and sw.transformers
    assert sw.hub_offline
    assert "sdpa" in sw.transformers_attn


def test_assume_installed_and_unknown_package():
    sw = SoftwareCaps(torch="2.11").with_installed(["flash-attn", "fa4"])
    assert sw.flash_attn == "assumed" and sw.flash_attn_4 == "assumed" and sw.flash_attn_3 is None
    with pytest.raises(UnknownNameError):
        sw.with_installed(["flash-attn-9"])


def test_a_namespace_flash_attn_from_fa4_is_not_flash_attn_2(tmp_path, monkeypatch):
    # FA4's wheel provides flash_attn/cute and the distribution flash-attn-4, not flash-attn.
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    meta = tmp_path / "flash_attn_4-4.0.0b36.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn-4\nVersion: 4.0.0b36\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        sw = probe_software(env={}, refresh=True)
        assert sw.flash_attn_4 == "4.0.0b36"
        assert sw.flash_attn is None
    finally:
        monkeypatch.undo()
        probe_software(refresh=True)


def test_import_is_light():
    code = "import sys, attnfallback, attnfallback.cli.app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
