"""The kernel warm-up: a model's widths from its config.json, and its kernels run before the model is there."""

from __future__ import annotations

import json

import pytest
import torch
import zoo

from attnfallback import kernel_warmup
from attnfallback.kernel_warmup import KernelPlan, plan_from_config
from attnfallback.scoring import ScoreJob, job as job_module

LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 8192, "vocab_size": 30522}


def test_a_llama_config_gives_each_distinct_product_of_its_layers_and_the_logprob_head():
    plan = plan_from_config(LLAMA_1B, "logprob")
    assert plan == KernelPlan(hidden=2048, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=30522)
    assert plan.products()[:4] == [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]
    assert plan.products()[4:] == [(3072, 2048), (16384, 2048)]  # the fused layouts: query-key-value, gate-up
    assert plan.head_product() == (30528, 2048)  # the vocabulary padded to 64 columns, as the task runs it
    assert plan_from_config(LLAMA_1B, "embed").head_product() is None  # only a logprob task runs the head


@pytest.mark.parametrize("name", sorted(zoo.FAMILIES))
def test_the_plan_covers_every_product_of_a_familys_layers(name):
    """Each family of the conformance matrix, its real code: every matrix product outside the
    embeddings (Linear, and GPT-2's Conv1D) is one the plan runs."""
    from transformers.pytorch_utils import Conv1D

    family = zoo.FAMILIES[name]
    config = zoo.make_config(family, zoo.tokenizer_for(family), "cpu", "embed")
    with torch.device("meta"):
        model = zoo.model_class(family, "embed")(config)
    products = {(m.out_features, m.in_features) if isinstance(m, torch.nn.Linear) else (m.nf, m.weight.shape[0])
                for path, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and "embeddings" not in path}
    assert products, name
    assert products <= set(plan_from_config(config.to_dict(), "embed").products()), name


def test_the_heads_shape_is_the_one_the_logprob_task_runs():
    """The warm-up's head product is the padded weight a logprob task makes of a model's head."""
    from transformers import AutoModelForCausalLM

    from attnfallback.fused_ops import HEAD_ALIGN
    from attnfallback.scoring.tasks import LogprobTask

    family = zoo.FAMILIES["llama"]
    tokenizer = zoo.tokenizer_for(family)
    model = AutoModelForCausalLM.from_config(zoo.make_config(family, tokenizer, "cpu", "logprob"))
    task = LogprobTask(model, tokenizer, None)
    assert task.vocab_size % HEAD_ALIGN  # a vocabulary the task pads
    plan = plan_from_config(model.config.to_dict(), "logprob")
    assert plan.head_product() == (task.align_head(HEAD_ALIGN), model.config.hidden_size)


def test_row_counts_stop_where_the_widest_activation_would_pass_the_cap():
    assert plan_from_config(LLAMA_1B, "logprob").token_counts() == [48, 8192, 65536]  # widest 8,192
    wide = plan_from_config({**LLAMA_1B, "intermediate_size": 28672}, "logprob")  # a 70B model's feed-forward
    assert wide.token_counts() == [48, 8192]


@pytest.mark.parametrize("config, expected", [
    ({"text_config": {"hidden_size": 1024, "num_attention_heads": 16, "head_dim": 128, "num_key_value_heads": 8}},
     KernelPlan(1024, 16, 8, 128, 4096, None)),  # a nested text model; head width given; no FFN width: 4x
    ({"d_model": 768, "n_head": 12, "ffn_dim": 3072}, KernelPlan(768, 12, 12, 64, 3072, None)),
    ({"hidden_size": 768, "num_attention_heads": 12, "num_key_value_heads": 5}, KernelPlan(768, 12, 12, 64, 3072, None)),
])
def test_other_config_spellings_give_their_widths(config, expected):
    assert plan_from_config(config, "embed") == expected


@pytest.mark.parametrize("config", [{}, {"hidden_size": 768}, {"hidden_size": 770, "num_attention_heads": 12},
                                    {"hidden_size": True, "num_attention_heads": 12}, {"hidden_size": "768", "num_attention_heads": 12}])
def test_a_config_without_usable_widths_plans_nothing(config):
    assert plan_from_config(config, "embed") is None


def test_the_warm_up_is_on_unless_turned_off():
    assert kernel_warmup.enabled({})
    assert kernel_warmup.enabled({"ATTNFALLBACK_KERNEL_WARMUP": "no"})  # not a value it knows: the default
    assert not kernel_warmup.enabled({"ATTNFALLBACK_KERNEL_WARMUP": "OFF"})


def test_every_step_runs_on_a_device_of_this_machine(monkeypatch):
    monkeypatch.setattr(kernel_warmup, "LARGE_TOKENS", (256,))
    plan = KernelPlan(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100)
    detail = kernel_warmup.run(plan, torch.device("cpu"), torch.float32)
    assert sorted(detail) == ["attention_s", "elementwise_s", "products_s"], detail  # no step's error
    assert all(seconds >= 0 for seconds in detail.values())


def test_a_step_that_fails_is_reported_and_the_others_still_run():
    plan = KernelPlan(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=None)
    detail = kernel_warmup.run(plan, torch.device("meta"), torch.float32)  # a meta tensor has no value to read
    assert "products_s" in detail and "attention_s" in detail
    assert detail["elementwise_error"].startswith(("RuntimeError", "NotImplementedError")), detail


def test_a_gpu_shard_plans_its_warm_up_from_its_local_config_unless_turned_off(tiny_qwen2, tmp_path, monkeypatch):
    job = ScoreJob(model=str(tiny_qwen2), input="in.jsonl", output=str(tmp_path / "o.parquet"), task="logprob", device="cuda")
    config = job_module._local_config(job)
    assert config == json.loads((tiny_qwen2 / "config.json").read_text())
    monkeypatch.setenv("ATTNFALLBACK_KERNEL_WARMUP", "off")
    assert job_module._kernel_plan(job, config) is None
    monkeypatch.delenv("ATTNFALLBACK_KERNEL_WARMUP")
    plan = job_module._kernel_plan(job, config)
    assert plan is not None and plan.hidden == config["hidden_size"] and plan.vocab == config["vocab_size"]
    assert job_module._kernel_plan(ScoreJob(**{**job.__dict__, "task": "nonsense"}), config) is None  # validate_job's to report
    assert job_module._local_config(ScoreJob(**{**job.__dict__, "model": str(tmp_path / "nowhere")})) is None
    assert job_module._local_config(ScoreJob(**{**job.__dict__, "model": "org/hub-model"})) is None


def test_the_warm_up_runs_in_the_shard_and_is_waited_for_before_the_load(tiny_qwen2, tmp_path, monkeypatch):
    """On this machine (no CUDA) the warm-up thread runs no kernels; the shard still waits for the
    thread before its first forward and says so in its phases."""
    monkeypatch.delenv("ATTNFALLBACK_KERNEL_WARMUP", raising=False)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of the input"}) + "\n" for i in range(6)))
    result = job_module.run_score(ScoreJob(model=str(tiny_qwen2), input=str(data), output=str(tmp_path / "out.parquet"),
                                           task="logprob", device="auto", quiet=True))
    assert result.rows_written == 6
    assert result.phases["warmup_wait_s"] >= 0 and result.phases["device_detail"]["context"] == "none"


def test_the_warm_up_thread_without_cuda_runs_no_kernels():
    plan = plan_from_config(LLAMA_1B, "logprob")
    detail = job_module._warm_device("cuda", "auto", plan)
    assert detail["context"] == "none" and not any(key.startswith("kernels") for key in detail)
