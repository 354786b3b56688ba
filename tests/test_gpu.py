"""On a CUDA GPU (marked `gpu`, skipped elsewhere): the recipe's two cases on real hardware.
Without flash-attn, flash_attention_2 falls back to sdpa with the package reason; with
FlashAttention-4 installed, flash_attention_4 is chosen and verified."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnfallback.caps import probe_device, probe_software
from attnfallback.events import set_default_sink, validate
from attnfallback.loader import load_model
from attnfallback.policy import Policy

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def bert_hd64(tmp_path_factory):
    from tests.conftest import build_tiny_model

    # head_dim 64, the BERT-base head size, which every flash kernel supports
    return build_tiny_model(tmp_path_factory.mktemp("bert-hd64"), "bert", hidden_size=256, num_attention_heads=4, intermediate_size=512)


@pytest.fixture(autouse=True)
def _reset_sink():
    yield
    set_default_sink(None)


def test_device_is_probed_from_the_catalog():
    dev = probe_device("cuda")
    assert dev.kind == "cuda" and dev.compute_capability is not None
    print("probed:", json.dumps(dev.to_dict()))
    assert dev.gpu_class is not None


def test_auto_dtype_on_this_gpu(bert_hd64):
    dev = probe_device("cuda")
    loaded = load_model(bert_hd64, policy=Policy.graceful(["sdpa"]), device="cuda")
    assert loaded.decision.dtype == ("bfloat16" if dev.bf16 else "float16")
    assert next(loaded.model.parameters()).device.type == "cuda"


@pytest.mark.skipif(probe_software().flash_attn is not None, reason="flash-attn is installed here")
def test_flash_attention_2_without_flash_attn_falls_back_to_sdpa(bert_hd64, tmp_path):
    loaded = load_model(bert_hd64, policy=Policy.graceful(["flash_attention_2", "sdpa", "eager"]), device="cuda", events=tmp_path, run_id="gpu", shard="0/1")
    d = loaded.decision
    print("decision:", json.dumps(d.to_dict()))
    assert d.used == "sdpa" and d.fell_back
    assert d.attempts[0].impl == "flash_attention_2" and d.attempts[0].stage == "plan"
    assert "package flash_attn is not installed" in d.attempts[0].reasons
    if probe_device("cuda").compute_capability >= (8, 0):
        assert d.attempts[0].reasons == ["package flash_attn is not installed"]
    (event,) = [json.loads(line) for p in tmp_path.rglob("*.jsonl") for line in p.read_text().splitlines()]
    assert validate(event) == [] and event["gpu"]["class"] == probe_device("cuda").gpu_class


@pytest.mark.skipif(probe_software().flash_attn is not None, reason="flash-attn is installed here")
def test_strict_flash_attention_2_exits_3_on_the_command_line(bert_hd64):
    done = subprocess.run(
        [sys.executable, "-m", "attnfallback.cli.app", "load", str(bert_hd64), "--prefer", "flash_attention_2,sdpa", "--policy", "strict"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 3, done.stderr
    assert "package flash_attn is not installed" in done.stderr


@pytest.mark.skipif(probe_software().flash_attn_4 is None, reason="flash-attn-4 is not installed (../shared/gpu/fa4-kit.sh)")
def test_flash_attention_4_is_chosen_and_verified(bert_hd64, tmp_path):
    loaded = load_model(bert_hd64, policy=Policy.graceful(["flash_attention_4", "sdpa", "eager"]), device="cuda", events=tmp_path, run_id="gpu-fa4")
    d = loaded.decision
    print("decision:", json.dumps(d.to_dict()))
    assert d.used == "flash_attention_4" and not d.fell_back
    assert [(a.impl, a.stage, a.ok) for a in d.attempts] == [("flash_attention_4", "verify", True)]
    assert loaded.model.config._attn_implementation == "flash_attention_4"


@pytest.mark.skipif(probe_software().flash_attn_4 is None, reason="flash-attn-4 is not installed (../shared/gpu/fa4-kit.sh)")
def test_flash_attention_4_strict_passes(bert_hd64):
    loaded = load_model(bert_hd64, policy=Policy.strict(["flash_attention_4"]), device="cuda")
    assert loaded.decision.used == "flash_attention_4"


@pytest.mark.skipif(probe_software().flash_attn_4 is None, reason="flash-attn-4 is not installed")
def test_flash_attention_4_in_fp32_is_rejected_at_plan(bert_hd64):
    loaded = load_model(bert_hd64, dtype="float32", policy=Policy.graceful(["flash_attention_4", "sdpa"]), device="cuda")
    assert loaded.decision.used == "sdpa"
    assert any("float32" in r for r in loaded.decision.attempts[0].reasons)


def test_padded_sdpa_batches_run_the_memory_efficient_kernel_not_cudnn(bert_hd64, monkeypatch):
    """Under sdpa_order the padded verification batch runs memory-efficient attention: cuDNN, which
    PyTorch tries first on Hopper, builds a graph for every new batch shape (bench/NOTES.md, session 5)."""
    from attnfallback.sdpa_order import ENV

    monkeypatch.delenv(ENV, raising=False)
    loaded = load_model(bert_hd64, policy=Policy.graceful(["sdpa"]), device="cuda")
    print("kernels:", loaded.decision.kernels)
    assert loaded.decision.kernels == ["sdpa:efficient"]


def test_a_gpu_shard_warms_its_own_device_beside_the_imports(bert_hd64, tmp_path):
    from attnfallback.scoring import ScoreJob, run_score

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(8)))
    result = run_score(ScoreJob(model=str(bert_hd64), input=str(data), output=str(tmp_path / "out.parquet"), device="cuda",
                                quiet=True))
    detail = result.phases["device_detail"]
    assert detail["context"] == "torch" and detail["cublas_s"] > 0 and detail["ready_s"] >= detail["torch_import_s"]


def test_the_kernel_warm_up_runs_every_step_on_the_gpu_and_leaves_sdpas_order_as_it_was(bert_hd64, tmp_path, monkeypatch):
    """A Llama-1B plan's kernels, each step without error; torch's SDPA flags afterwards as before;
    a shard with the warm-up on waits for it and scores."""
    import torch

    from attnfallback.kernel_warmup import plan_from_config
    from attnfallback.scoring import ScoreJob, job, run_score

    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    plan = plan_from_config({"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
                             "intermediate_size": 8192, "vocab_size": 30522}, "logprob")
    detail = job._warm_device("cuda", "auto", plan)
    print("warm-up:", json.dumps(detail))
    assert not [k for k in detail if k.endswith("_error")], detail
    assert detail["kernels_products_s"] > 0 and detail["kernels_attention_s"] > 0 and detail["kernels_elementwise_s"] > 0
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == flags
    monkeypatch.delenv("ATTNFALLBACK_KERNEL_WARMUP", raising=False)  # on by default
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(8)))
    result = run_score(ScoreJob(model=str(bert_hd64), input=str(data), output=str(tmp_path / "out.parquet"), device="cuda", quiet=True))
    assert result.rows_written == 8 and "warmup_wait_s" in result.phases
    assert result.phases["device_detail"]["kernels_s"] > 0
