"""The loader on this CPU with the embedded model: fallback with reasons, strict failure,
a verification failure moving to the next candidate without re-reading the weights, events."""

from __future__ import annotations

import json

import pytest
import torch

from attnfallback import loader
from attnfallback.errors import AttentionUnavailable, RemoteCodeError
from attnfallback.events import validate
from attnfallback.loader import load_model
from attnfallback.policy import Policy

AMPERE_ERROR = "FlashAttention only supports Ampere GPUs or newer."


@pytest.fixture
def count_weight_reads(monkeypatch):
    calls = []
    real = loader.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args[2])  # the implementation asked for
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "from_pretrained", counting)
    return calls


def read_events(directory):
    records = []
    for path in sorted(directory.rglob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def test_flash_attention_2_falls_back_to_sdpa_with_the_reason(tmp_path, count_weight_reads):
    loaded = load_model("default", policy=Policy.graceful(["flash_attention_2", "sdpa", "eager"]), events=tmp_path, run_id="r1", shard="3/8")
    d = loaded.decision
    assert d.requested == "flash_attention_2" and d.used == "sdpa" and d.fell_back
    assert [(a.impl, a.stage, a.ok) for a in d.attempts] == [("flash_attention_2", "plan", False), ("sdpa", "verify", True)]
    assert "package flash_attn is not installed" in d.attempts[0].reasons
    assert loaded.model.config._attn_implementation == "sdpa"
    assert not loaded.model.training
    assert d.dtype == "float32" and next(loaded.model.parameters()).dtype == torch.float32
    assert count_weight_reads == ["sdpa"]
    (event,) = read_events(tmp_path)
    assert validate(event) == []
    assert event["event"] == "attn_impl" and event["run_id"] == "r1" and event["shard"] == "3/8"
    assert event["requested"] == "flash_attention_2" and event["used"] == "sdpa" and event["fell_back"] is True
    assert event["model"]["identity"].startswith("sampled-sha256:") and event["model"]["dtype"] == "float32"


def test_clean_choice_logs_info_and_an_unexpected_fallback_one_warning(caplog, monkeypatch, tmp_path):
    caplog.set_level("INFO", logger="attnfallback")
    load_model("default", policy=Policy.graceful(["sdpa", "eager"]))
    assert [r.levelname for r in caplog.records] == ["INFO"]
    caplog.clear()
    # on this CPU, passing over flash_attention_2 (GPU-only) is expected: info, and the event still says fell_back
    loaded = load_model("default", policy=Policy.graceful(["flash_attention_2", "sdpa"]), events=tmp_path, run_id="r")
    assert loaded.decision.fell_back
    assert [r.levelname for r in caplog.records] == ["INFO"]
    message = caplog.records[0].getMessage()
    assert "requested flash_attention_2, using sdpa" in message and "no CUDA GPU" in message
    (event,) = read_events(tmp_path)
    assert event["fell_back"] is True and event["used"] == "sdpa"
    caplog.clear()
    # sdpa failing its verification here is not expected: a warning
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError(AMPERE_ERROR)))
    load_model("default", policy=Policy.graceful(["flash_attention_2", "sdpa", "eager"]))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "requested flash_attention_2, using eager" in warnings[0].getMessage()


def test_a_fallback_from_gpu_only_kernels_is_expected_only_without_a_cuda_gpu():
    from attnfallback.caps import DeviceCaps
    from attnfallback.loader import Attempt, Decision, fallback_expected
    from attnfallback.model_facts import read_facts

    facts = read_facts("default")
    passed_over = [Attempt("flash_attention_4", "plan", False, ["package flash_attn_4 is not installed"]),
                   Attempt("kernels-community/flash-attn", "plan", False, ["package kernels is not installed"]),
                   Attempt("sdpa", "verify", True)]

    def decision(device, attempts):
        return Decision("flash_attention_4", "sdpa", attempts, Policy.graceful(), "float32", device, facts, {})

    assert fallback_expected(decision(DeviceCaps.cpu(), passed_over))
    assert not fallback_expected(decision(DeviceCaps.from_class("H100"), passed_over))  # a GPU is here: warn
    assert not fallback_expected(decision(DeviceCaps.from_class("T4"), passed_over[:1] + passed_over[2:]))
    on_cpu = [Attempt("flex_attention", "load", False, ["load failed"]), Attempt("sdpa", "verify", True)]
    assert not fallback_expected(decision(DeviceCaps.cpu(), on_cpu))  # flex runs on CPUs: its failure is news


def test_strict_failure_writes_attn_unavailable_and_raises(tmp_path, count_weight_reads):
    with pytest.raises(AttentionUnavailable) as info:
        load_model("default", policy=Policy.strict(["flash_attention_2", "sdpa"]), events=tmp_path, run_id="r2")
    assert info.value.exit_code == 3
    assert "package flash_attn is not installed" in info.value.reasons["flash_attention_2"]
    assert count_weight_reads == []  # decided before loading
    (event,) = read_events(tmp_path)
    assert event["event"] == "attn_unavailable" and event["requested"] == "flash_attention_2" and event["used"] is None
    assert validate(event) == []


def test_verification_failure_moves_on_without_rereading_weights(monkeypatch, count_weight_reads):
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def ampere_only(*args, **kwargs):
        raise RuntimeError(AMPERE_ERROR)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", ampere_only)
    loaded = load_model("default", policy=Policy.graceful(["sdpa", "eager"]))
    d = loaded.decision
    assert d.used == "eager" and d.fell_back
    assert d.attempts[0].impl == "sdpa" and d.attempts[0].stage == "verify" and not d.attempts[0].ok
    assert AMPERE_ERROR in d.attempts[0].reasons[0]
    assert loaded.model.config._attn_implementation == "eager"
    assert count_weight_reads == ["sdpa"]  # eager reached through set_attn_implementation
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real_sdpa)


def test_verification_failure_under_strict_raises(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(AMPERE_ERROR)))
    with pytest.raises(AttentionUnavailable) as info:
        load_model("default", policy=Policy.strict(["sdpa", "eager"]))
    assert any(AMPERE_ERROR in r for r in info.value.reasons["sdpa"])


def test_non_finite_output_fails_verification(monkeypatch):
    def nan_attention(q, k, v, *args, **kwargs):
        return torch.full_like(q, float("nan"))

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", nan_attention)
    loaded = load_model("default", policy=Policy.graceful(["sdpa", "eager"]))
    assert loaded.decision.used == "eager"
    assert "non-finite" in loaded.decision.attempts[0].reasons[0]


def test_load_failure_is_recorded_and_next_candidate_loads(monkeypatch, tiny_bert):
    real = loader.from_pretrained

    def fail_for_sdpa(facts, auto_class, impl, *rest):
        if impl == "sdpa":
            raise ImportError("sdpa kernel missing in this build")
        return real(facts, auto_class, impl, *rest)

    monkeypatch.setattr(loader, "from_pretrained", fail_for_sdpa)
    loaded = load_model(tiny_bert, policy=Policy.graceful(["sdpa", "eager"]))
    assert loaded.decision.used == "eager"
    assert loaded.decision.attempts[0].stage == "load" and "sdpa kernel missing" in loaded.decision.attempts[0].reasons[0]


def test_no_events_location_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = load_model("default", policy=Policy.graceful(["sdpa"]))
    assert loaded.sink is None
    assert list(tmp_path.rglob("*")) == []


def test_events_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFALLBACK_EVENTS", str(tmp_path))
    monkeypatch.setenv("ATTNFALLBACK_RUN_ID", "env-run")
    load_model("default", policy=Policy.graceful(["sdpa"]))
    (event,) = read_events(tmp_path)
    assert event["run_id"] == "env-run" and event["used"] == "sdpa"


def test_causal_lm_and_classifier_load(tiny_qwen2, tmp_path):
    from tests.conftest import build_tiny_model

    lm = load_model(tiny_qwen2, auto_class="AutoModelForCausalLM", policy=Policy.graceful(["flash_attention_2", "sdpa"]))
    assert lm.decision.used == "sdpa" and lm.facts.architecture == "Qwen2ForCausalLM"
    clf_dir = build_tiny_model(tmp_path / "clf", "bert-classify")
    clf = load_model(clf_dir, auto_class="AutoModelForSequenceClassification", policy=Policy.graceful(["eager"]))
    assert clf.decision.used == "eager" and not clf.decision.fell_back


def test_dtype_stays_fixed_across_attempts(monkeypatch, tiny_bert):
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(AMPERE_ERROR)))
    loaded = load_model(tiny_bert, dtype="bfloat16", policy=Policy.graceful(["sdpa", "eager"]))
    assert loaded.decision.used == "eager" and loaded.decision.dtype == "bfloat16"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_remote_code_refused_by_default(tiny_bert, tmp_path):
    import shutil

    model_dir = tmp_path / "remote"
    shutil.copytree(tiny_bert, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeError) as info:
        load_model(model_dir)
    assert info.value.exit_code == 2 and "--trust-remote-code" in str(info.value)


def test_local_identity_changes_with_the_weights(tiny_bert, tmp_path):
    import shutil

    from attnfallback.model_facts import read_facts

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    assert read_facts(copy).identity == read_facts(tiny_bert).identity
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert read_facts(copy).identity != read_facts(tiny_bert).identity


def test_a_measured_choice_is_not_a_fallback_and_a_failed_first_preference_is():
    from attnfallback.caps import DeviceCaps
    from attnfallback.loader import Attempt, Decision
    from attnfallback.model_facts import read_facts

    facts = read_facts("default")
    h100 = DeviceCaps.from_class("H100")
    ran = Decision("flash_attention_4", "sdpa", [Attempt("sdpa", "verify", True), Attempt("flash_attention_4", "verify", True)],
                   Policy.graceful(), "bfloat16", h100, facts, {})
    ran.measured = {"tokens_per_s": {"flash_attention_4": 3.0e6, "sdpa": 4.7e6}, "reason": "measured: sdpa faster"}
    assert not ran.fell_back and ran.choice == "measured: sdpa faster"  # both ran; sdpa was measured faster
    unmeasured = Decision("flash_attention_4", "sdpa", [Attempt("sdpa", "verify", True)], Policy.graceful(), "bfloat16", h100, facts, {})
    unmeasured.measured = {"tokens_per_s": {"sdpa": 4.7e6}, "skipped": {"flash_attention_4": "its first call compiles"}}
    assert not unmeasured.fell_back  # left out for the budget: it did not fail
    failed = Decision("flash_attention_4", "sdpa", [Attempt("flash_attention_4", "verify", False, ["forward failed: boom"]),
                                                    Attempt("sdpa", "verify", True)], Policy.graceful(), "bfloat16", h100, facts, {})
    assert failed.fell_back and "boom" in failed.choice
