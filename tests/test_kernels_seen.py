"""Which attention kernels ran: the name-to-label mapping on synthetic op and kernel names (CPU),
None off CUDA, and on a GPU the labels of a real verification forward."""

from __future__ import annotations

import pytest

from attnfallback.kernels_seen import attention_kernels, label_for, labels_from_names

# Names as torch.profiler reports them: ATen ops (CPU side) and CUDA kernels.
SDPA_EFFICIENT = [
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_efficient_attention_forward",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)",
    "aten::linear",
    "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn",
]
SDPA_FLASH = ["aten::_scaled_dot_product_flash_attention", "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, false, false, false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)"]
SDPA_CUDNN = ["aten::_scaled_dot_product_cudnn_attention", "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0"]
SDPA_MATH = ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math", "aten::matmul", "aten::_softmax",
             "void (anonymous namespace)::softmax_warp_forward<float, float, float, 7, false, false>(float*, float const*, int, int, int, bool const*, int, bool)"]
FLASH_ATTN_2 = ["flash_attn::_flash_attn_varlen_forward",
                "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::half_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::half_t> >, false, true, false, false, true, true, false, false>(flash::Flash_fwd_params)"]
FLASH_ATTN_3 = ["void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >, cute::tuple<cute::C<128>, cute::C<128>, cute::C<64> >, 64, cutlass::bfloat16_t, float, cutlass::arch::Sm90, false, false, false, true, false, false, false, true, false, true, false, false> > > >(flash::FlashAttnFwdSm90<...>::Params)"]
FLASH_ATTN_4 = ["kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__tensorptrbf16gmemalign16odiv8_0"]
EAGER = ["aten::matmul", "aten::bmm", "aten::softmax", "aten::_softmax", "aten::matmul",
         "void (anonymous namespace)::softmax_warp_forward<c10::BFloat16, c10::BFloat16, float, 4, false, false>(...)"]


@pytest.mark.parametrize(
    "names, expected",
    [
        (SDPA_EFFICIENT, ["sdpa:efficient"]),
        (SDPA_FLASH, ["sdpa:flash"]),
        (SDPA_CUDNN, ["sdpa:cudnn"]),
        (SDPA_MATH, ["sdpa:math"]),  # its softmax is not eager: a fused op said which path ran
        (FLASH_ATTN_2, ["flash_attention_2"]),
        (FLASH_ATTN_3, ["flash_attention_3"]),  # CuTe types in the name, and still not FA4
        (FLASH_ATTN_4, ["flash_attention_4"]),
        (EAGER, ["eager"]),
        (["aten::linear", "aten::gelu", "aten::layer_norm"], []),
        (SDPA_EFFICIENT + SDPA_MATH, ["sdpa:efficient", "sdpa:math"]),  # a silent drop to math in some layers shows
    ],
)
def test_kernel_names_map_to_labels(names, expected):
    assert labels_from_names(names) == expected


def test_pytorch_flash_is_sdpa_not_the_flash_attn_package():
    assert label_for("void pytorch_flash::flash_fwd_kernel<...>(pytorch_flash::Flash_fwd_params)") == "sdpa:flash"
    assert label_for("void flash::flash_fwd_kernel<...>(flash::Flash_fwd_params)") == "flash_attention_2"
    assert label_for("aten::_scaled_dot_product_flash_attention_for_cpu") == "sdpa:cpu"
    assert label_for("aten::scaled_dot_product_attention") is None  # the dispatcher itself says nothing


def test_no_kernels_are_recorded_off_cuda(tiny_bert):
    import torch

    from attnfallback.loader import load_model
    from attnfallback.events import NULL_SINK
    from attnfallback.policy import Policy

    loaded = load_model(str(tiny_bert), policy=Policy.graceful(["sdpa"]), sink=NULL_SINK)
    assert attention_kernels(loaded.model, loaded.facts, torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("impl, allowed", [("sdpa", {"sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math"}), ("eager", {"eager"})])
def test_kernels_of_a_real_verification_forward(tiny_bert, impl, allowed):
    from attnfallback.loader import load_model
    from attnfallback.events import NULL_SINK
    from attnfallback.policy import Policy

    loaded = load_model(str(tiny_bert), policy=Policy.strict([impl]), device="cuda", dtype="bfloat16", sink=NULL_SINK)
    labels = attention_kernels(loaded.model, loaded.facts, loaded.device)
    assert labels and set(labels) <= allowed, labels


@pytest.mark.gpu
def test_flash_attention_4_kernels_are_recognised(tiny_bert):
    from attnfallback.caps import probe_software

    if not probe_software().flash_attn_4:
        pytest.skip("flash-attn-4 is not installed (../shared/gpu/fa4-kit.sh)")
    from attnfallback.loader import load_model
    from attnfallback.events import NULL_SINK
    from attnfallback.policy import Policy

    loaded = load_model(str(tiny_bert), policy=Policy.strict(["flash_attention_4"]), device="cuda", dtype="bfloat16", sink=NULL_SINK)
    assert attention_kernels(loaded.model, loaded.facts, loaded.device) == ["flash_attention_4"]


@pytest.mark.parametrize("op_names, kernel_names, expected, traces", [
    (["aten::_scaled_dot_product_efficient_attention", "aten::linear"], None, ["sdpa:efficient"], 0),
    (["aten::linear", "aten::add"], ["kernel_cutlass_kernel_flash_attncuteflash_fwd"], ["flash_attention_4"], 1),
    (RuntimeError("no dispatch mode here"), ["aten::_scaled_dot_product_cudnn_attention"], ["sdpa:cudnn"], 1),
])
def test_kernels_are_traced_only_when_the_ops_name_no_attention(monkeypatch, op_names, kernel_names, expected, traces):
    import types

    import attnfallback.kernels_seen as ks

    seen = []

    def fake_dispatched(run):
        if isinstance(op_names, Exception):
            raise op_names
        return op_names

    def fake_trace(run, device, *, kernels=True):
        seen.append(kernels)
        return kernel_names

    monkeypatch.setattr(ks, "dispatched_names", fake_dispatched)
    monkeypatch.setattr(ks, "traced_names", fake_trace)
    assert attention_kernels(None, None, types.SimpleNamespace(type="cuda"), forward=lambda: None) == expected
    assert seen == [True] * traces


@pytest.mark.parametrize("impl, expected", [("sdpa", ["sdpa:cpu"]), ("eager", ["eager"])])
def test_the_dispatched_ops_of_a_real_forward_name_its_attention(tiny_bert, impl, expected):
    """On the CPU too: sdpa's decomposition under inference_mode dispatches its chosen op, and the
    outputs are those of the same forward without the recorder."""
    import torch

    from attnfallback.events import NULL_SINK
    from attnfallback.kernels_seen import dispatched_names
    from attnfallback.loader import load_model
    from attnfallback.policy import Policy
    from attnfallback.verify import verify_forward

    loaded = load_model(str(tiny_bert), policy=Policy.strict([impl]), device="cpu", sink=NULL_SINK)
    names = dispatched_names(lambda: verify_forward(loaded.model, loaded.facts, loaded.device))
    assert labels_from_names(names) == expected
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.inference_mode():
        plain = loaded.model(input_ids=ids, attention_mask=mask).last_hidden_state
        recorded = []
        dispatched_names(lambda: recorded.append(loaded.model(input_ids=ids, attention_mask=mask).last_hidden_state))
    assert torch.equal(plain, recorded[0])


def test_a_later_shard_reads_the_kernels_an_earlier_one_traced(tiny_bert, tmp_path, caplog):
    import json

    from attnfallback.events import NULL_SINK
    from attnfallback.loader import kernels_traced_or_cached, load_model
    from attnfallback.policy import Policy

    decision = load_model(str(tiny_bert), policy=Policy.graceful(["sdpa"]), sink=NULL_SINK).decision
    traces = []

    def trace():
        traces.append(1)
        return ["sdpa:flash"]

    assert kernels_traced_or_cached(decision, trace, tmp_path) == (["sdpa:flash"], "traced")
    assert kernels_traced_or_cached(decision, trace, tmp_path) == (["sdpa:flash"], "cache") and len(traces) == 1
    decision.dtype = "bfloat16"  # another key: traced again, beside the first entry
    assert kernels_traced_or_cached(decision, trace, tmp_path) == (["sdpa:flash"], "traced")
    assert len(traces) == 2 and len(list(tmp_path.glob("kernels-*.json"))) == 2
    for path in tmp_path.glob("kernels-*.json"):
        path.write_text("{not json")  # a torn or foreign file: ignored with a warning, traced again
    assert kernels_traced_or_cached(decision, trace, tmp_path) == (["sdpa:flash"], "traced") and len(traces) == 3
    assert "ignoring unreadable file" in caplog.text
    assert kernels_traced_or_cached(decision, lambda: None, tmp_path / "none")[0] is None  # a failed trace is not kept
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").glob("kernels-*.json"))
    entry = json.loads(next(tmp_path.glob("kernels-*.json")).read_text())
    assert entry["labels"] == ["sdpa:flash"] and entry["key"]["used"] == "sdpa"


def test_the_event_says_where_the_kernels_came_from(tiny_bert):
    from attnfallback.events import NULL_SINK
    from attnfallback.loader import load_model
    from attnfallback.policy import Policy

    decision = load_model(str(tiny_bert), policy=Policy.graceful(["sdpa"]), sink=NULL_SINK).decision
    assert "kernels" not in decision.to_dict() and "kernels_source" not in decision.to_dict()  # off CUDA: no trace
    decision.kernels, decision.kernels_source = ["sdpa:flash"], "cache"
    assert decision.to_dict()["kernels"] == ["sdpa:flash"] and decision.to_dict()["kernels_source"] == "cache"
