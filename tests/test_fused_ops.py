"""The fused kernels' rules (fused_ops.py), without a GPU: which modules are replaced, that each class
is checked against its own forward first, what is left and why, that nothing changes the numbers,
and when the kernels do not run at all. The Triton kernels themselves: the `gpu` tests below."""

from __future__ import annotations

import sys

import pytest
import torch

import zoo
from attnfallback.fused_ops import (
    FUSED_FLAG,
    ROTARY,
    TorchKernels,
    checked_logprob_kernel,
    fuse_modules,
    is_gated_silu_mlp,
    is_rms_norm,
    triton_kernels,
    unavailable_reason,
    unfuse_modules,
    use_triton_cache,
)
from attnfallback.scoring.tasks import LogprobTask, fuse_kernels

DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")
# the norms whose code is transformers' Llama RMSNorm; Gemma's scale by (1 + weight) in float32
SAME_NORM = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
GATED_SILU = {"llama", "mistral", "qwen2", "qwen3"}  # phi3 fuses gate and up into one projection


@pytest.fixture(autouse=True)
def _rotary_functions_restored():
    """The rotary function is a modeling module's global: no test leaves it replaced."""
    import sys

    yield
    for name, module in list(sys.modules.items()):
        function = getattr(module, ROTARY, None) if name.startswith("transformers.models.") else None
        if getattr(function, FUSED_FLAG, False):
            setattr(module, ROTARY, function.__wrapped__)


def causal_lm(family: str, dtype=torch.bfloat16):
    f = zoo.FAMILIES[family]
    tokenizer = zoo.tokenizer_for(f)
    config = zoo.make_config(f, tokenizer, "cpu", "logprob")
    torch.manual_seed(0)
    model = zoo.model_class(f, "logprob")(config).eval().to(dtype)
    ids = torch.randint(5, config.vocab_size, (2, 11))
    return model, ids


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("family", DECODERS)
def test_each_decoder_family_fuses_what_it_shares_and_keeps_its_numbers(family):
    model, ids = causal_lm(family)
    before = logits(model, ids)
    report = fuse_modules(model, TorchKernels())
    norms = [m for m in model.modules() if is_rms_norm(m)]
    mlps = [m for m in model.modules() if is_gated_silu_mlp(m)]
    fused = sum(report.fused.values())
    if family in SAME_NORM:
        assert norms and all(getattr(m, FUSED_FLAG, False) for m in norms)
    elif norms:  # Gemma's norms: checked, found different, left with the reason
        assert not any(getattr(m, FUSED_FLAG, False) for m in norms)
        assert "differs from the module's own forward" in report.left[type(norms[0]).__name__]
    assert all(getattr(m, FUSED_FLAG, False) for m in mlps) and bool(mlps) == (family in GATED_SILU)
    home = sys.modules[type(model).__module__]
    rotary = f"{home.__name__}.{ROTARY}"
    assert (rotary in report.fused) == (family != "gpt2")  # every family here but GPT-2 rotates the same way
    assert getattr(getattr(home, ROTARY, None), FUSED_FLAG, False) == (family != "gpt2")
    assert fused == sum(getattr(m, FUSED_FLAG, False) for m in model.modules()) + (rotary in report.fused)
    assert torch.equal(logits(model, ids), before)  # TorchKernels rounds as transformers does
    assert unfuse_modules(model) == fused
    assert not any("forward" in vars(m) for m in model.modules())
    assert not getattr(getattr(home, ROTARY, None), FUSED_FLAG, False)
    assert torch.equal(logits(model, ids), before)


def test_a_rotary_function_that_computes_in_float32_is_left():
    """ModernBERT's rotary embedding multiplies in float32 and rounds once: not the fused kernel's
    roundings, so its module keeps its own function."""
    f = zoo.FAMILIES["modernbert"]
    tokenizer = zoo.tokenizer_for(f)
    model = zoo.model_class(f, "embed")(zoo.make_config(f, tokenizer, "cpu", "embed")).eval().to(torch.bfloat16)
    report = fuse_modules(model, TorchKernels())
    key = f"{type(model).__module__}.{ROTARY}"
    assert key not in report.fused and "differs from the module's own forward" in report.left[key]
    assert not getattr(getattr(sys.modules[type(model).__module__], ROTARY), FUSED_FLAG, False)


def test_fusing_twice_replaces_nothing_more():
    model, _ = causal_lm("llama")
    first = fuse_modules(model, TorchKernels())
    forwards = {id(m): m.forward for m in model.modules() if getattr(m, FUSED_FLAG, False)}
    second = fuse_modules(model, TorchKernels())
    assert second.fused == first.fused
    assert {id(m): m.forward for m in model.modules() if getattr(m, FUSED_FLAG, False)} == forwards


class OffByOne(TorchKernels):
    name = "off-by-one"

    def rms_norm(self, x, weight, eps):
        return super().rms_norm(x, weight, eps) + 1


class Broken(TorchKernels):
    name = "broken"

    def silu_mul(self, gate, up):
        raise RuntimeError("no kernel for this GPU")


def test_a_kernel_that_disagrees_or_fails_leaves_the_class_as_it_is():
    model, ids = causal_lm("llama")
    before = logits(model, ids)
    report = fuse_modules(model, OffByOne())
    assert "LlamaRMSNorm" not in report.fused and "differs" in report.left["LlamaRMSNorm"]
    assert "max difference 1.01 of" in report.left["LlamaRMSNorm"]
    assert report.fused["LlamaMLP"] == model.config.num_hidden_layers
    unfuse_modules(model)
    report = fuse_modules(model, Broken())
    assert "LlamaMLP" not in report.fused
    assert report.left["LlamaMLP"] == "the fused silu_mul failed: RuntimeError: no kernel for this GPU"
    assert torch.equal(logits(model, ids), before)


def test_a_norm_is_checked_with_a_weight_other_than_ones():
    """A freshly built model's norm weights are all ones: a kernel that ignored the weight would
    pass a check made with them alone."""

    class IgnoresWeight(TorchKernels):
        def rms_norm(self, x, weight, eps):
            return super().rms_norm(x, torch.ones_like(weight), eps)

    model, _ = causal_lm("llama")
    assert all(bool((m.weight == 1).all()) for m in model.modules() if is_rms_norm(m))
    report = fuse_modules(model, IgnoresWeight())
    assert "LlamaRMSNorm" in report.left


def test_a_module_with_its_own_forward_already_is_left_alone():
    model, _ = causal_lm("llama")
    hooked = model.model.norm
    own = hooked.forward
    hooked.forward = lambda x: own(x)  # e.g. accelerate's hook
    fuse_modules(model, TorchKernels())
    assert not getattr(hooked, FUSED_FLAG, False)
    assert unfuse_modules(model) == 2 * model.config.num_hidden_layers + model.config.num_hidden_layers + 1  # and the rotary
    assert "forward" in vars(hooked)


def test_torch_token_logprobs_are_log_softmax_at_the_target():
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(6, 50, generator=g) * 5).to(torch.bfloat16)
    targets = torch.randint(0, 50, (6,), generator=g)
    expected = torch.log_softmax(values.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(TorchKernels().token_logprobs(values, targets), expected, rtol=0, atol=1e-5)


def test_the_logprob_kernel_is_checked_before_use():
    kernel, why = checked_logprob_kernel(TorchKernels(), "cpu", 97)
    assert kernel is not None and why is None

    class Shifted(TorchKernels):
        def token_logprobs(self, logits, targets):
            return super().token_logprobs(logits, targets) - 0.01

    kernel, why = checked_logprob_kernel(Shifted(), "cpu", 97)
    assert kernel is None and why.startswith("the fused log-probabilities differ from PyTorch's by 0.01")


def test_the_logprob_task_takes_the_checked_kernel_and_says_so():
    model, ids = causal_lm("llama", torch.float32)
    tokenizer = zoo.tokenizer_for(zoo.FAMILIES["llama"])
    task = LogprobTask(model, tokenizer, None)
    assert task.describe()["fused_head"] is False
    report = fuse_kernels(model, task, torch.device("cpu"), kernels=TorchKernels())
    assert report["logprob_head"] == "fused" and task.describe()["fused_head"] is True
    assert report["kernels"] == "torch" and report["fused"]["LlamaRMSNorm"] == 2 * model.config.num_hidden_layers + 1


def test_when_the_kernels_do_not_run(monkeypatch):
    assert unavailable_reason(torch.device("cpu"), env={}) == "the model runs on cpu, the kernels are CUDA's"
    assert unavailable_reason(torch.device("cuda"), env={"ATTNFALLBACK_FUSED": "off"}) == "turned off (ATTNFALLBACK_FUSED=off)"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert unavailable_reason(torch.device("cuda"), env={}) == "Triton is not installed"
    model, _ = causal_lm("llama")
    report = fuse_kernels(model, LogprobTask(model, zoo.tokenizer_for(zoo.FAMILIES["llama"]), None), torch.device("cpu"))
    assert report == {"kernels": None, "why_not": "the model runs on cpu, the kernels are CUDA's"}
    assert not any(getattr(m, FUSED_FLAG, False) for m in model.modules())


def test_no_background_compile_without_cuda_or_when_turned_off(monkeypatch):
    from attnfallback import fused_ops

    assert fused_ops.warm_in_background("auto", (64,), 100, env={"ATTNFALLBACK_FUSED": "off"}) is False
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert fused_ops.warm_in_background("auto", (64,), 100, env={}) is False
    assert "future" not in fused_ops._WARMING


@pytest.mark.gpu
def test_gpu_the_background_compile_is_joined_before_the_kernels_are_used(tmp_path):
    """In a fresh process: the five variants a Llama-like logprob model runs are in the cache when
    `triton_kernels()` returns (norms of its width and head width, SiLU-mul, the rotary, the head), and the
    compile is marked for the shards after it."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("import pathlib, sys; from attnfallback import fused_ops as f; "
            "assert f.warm_in_background('auto', (2048, 64), 30522); f.triton_kernels(); "
            "print(len(list(pathlib.Path(sys.argv[1]).rglob('*.cubin'))))")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), ATTNFALLBACK_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "triton")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == 5
    assert len(list((tmp_path / "cache" / "triton-kernels").glob("attnfallback-compiled-*.json"))) == 1  # the next shard fuses


@pytest.mark.gpu
def test_gpu_the_compile_process_marks_the_kernels_compiled(tmp_path, monkeypatch):
    """The process of its own compiles the five variants, writes the marker the next shard reads,
    and a second one for the same key finds them compiled."""
    import os

    pytest.importorskip("triton")
    from attnfallback import fused_ops

    monkeypatch.setattr(fused_ops, "_PROCESSES", {})
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), ATTNFALLBACK_CACHE=str(tmp_path / "cache"))
    env.pop("ATTNFALLBACK_FUSED", None)
    key = fused_ops.compile_key(fused_ops.device_label(torch.device("cuda")), torch.bfloat16, (2048, 64), 30522)
    assert fused_ops.start_compile_process("bfloat16", (2048, 64), 30522, "cuda", env) == "started"
    waited = fused_ops.wait_for_compile(key, "bfloat16", (2048, 64), 30522, "cuda", 120, env)
    log = (tmp_path / "cache" / "triton-kernels" / "attnfallback-compile.log").read_text()
    assert waited is not None and fused_ops.is_compiled(key, env), log
    assert "fused kernels compiled in" in log and not fused_ops._compiling_lock(key, env).exists()
    assert len(list((tmp_path / "triton").rglob("*.cubin"))) == 5
    monkeypatch.setattr(fused_ops, "_PROCESSES", {})
    assert fused_ops.start_compile_process("bfloat16", (2048, 64), 30522, "cuda", env) == "started"
    fused_ops.wait_for_compile(key, "bfloat16", (2048, 64), 30522, "cuda", 120, env)
    assert "fused kernels compiled before" in (tmp_path / "cache" / "triton-kernels" / "attnfallback-compile.log").read_text()


def _fake_triton(monkeypatch, where: str, calls: list, raising: bool = False):
    """A Triton whose `triton_key` (in `where`) counts its computations, cached as Triton caches it."""
    import functools
    import types

    @functools.lru_cache()
    def triton_key():
        calls.append(1)
        if raising:
            raise RuntimeError("libtriton.so unreadable")
        return "3.x-hashes"

    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    for name in ("triton.runtime", "triton.compiler"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType(where)
    module.triton_key = triton_key
    monkeypatch.setitem(sys.modules, where, module)
    return triton_key


@pytest.mark.parametrize("where", ["triton.runtime.cache", "triton.compiler.compiler"])
def test_triton_s_installation_hash_is_computed_once_beside_the_load(monkeypatch, tmp_path, where):
    from attnfallback import fused_ops

    calls = []
    key = _fake_triton(monkeypatch, where, calls)
    monkeypatch.setattr(fused_ops, "_PREPARED", {})
    monkeypatch.setattr(fused_ops, "unavailable_reason", lambda device, env=None: None)
    env = {"ATTNFALLBACK_CACHE": str(tmp_path)}
    assert fused_ops.installation_key() is key
    assert fused_ops.prepare_triton_in_background(env)
    assert not fused_ops.prepare_triton_in_background(env)  # one a process
    fused_ops.finish_triton_prepare(5)
    assert calls == [1] and key() == "3.x-hashes" and calls == [1]  # the first kernel's lookup finds it cached
    assert "error" not in fused_ops._PREPARED and fused_ops._PREPARED["seconds"] >= 0
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "triton-kernels")  # written before the thread starts
    assert fused_ops.finish_triton_prepare(5) == 0.0


def test_a_triton_without_the_hash_or_kernels_that_cannot_run_prepare_nothing(monkeypatch, tmp_path):
    from attnfallback import fused_ops

    monkeypatch.setattr(fused_ops, "_PREPARED", {})
    env = {"ATTNFALLBACK_CACHE": str(tmp_path), "ATTNFALLBACK_FUSED": "off"}
    assert not fused_ops.prepare_triton_in_background(env) and fused_ops._PREPARED == {}
    assert fused_ops.finish_triton_prepare() == 0.0
    _fake_triton(monkeypatch, "triton.runtime.cache", [], raising=True)
    monkeypatch.setattr(fused_ops, "unavailable_reason", lambda device, env=None: None)
    assert fused_ops.prepare_triton_in_background(env)
    fused_ops.finish_triton_prepare(5)
    assert fused_ops._PREPARED["error"] == "RuntimeError: libtriton.so unreadable"  # the first kernel says it again
    monkeypatch.delitem(sys.modules, "triton.runtime.cache")
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", None)  # an import that fails
    with pytest.raises(LookupError, match="no triton_key"):
        fused_ops.installation_key()


@pytest.mark.gpu
def test_gpu_the_installation_hash_computed_beside_the_load_is_the_one_the_kernels_use(tmp_path):
    """In a fresh process: the thread computes triton_key once, and running a compiled kernel after
    it computes nothing more (Triton's lru_cache has one miss)."""
    import os
    import subprocess

    pytest.importorskip("triton")
    script = (
        "import torch, time\n"
        "from attnfallback import fused_ops\n"
        "assert fused_ops.prepare_triton_in_background()\n"
        "fused_ops.finish_triton_prepare(60)\n"
        "kernels = fused_ops.triton_kernels()\n"
        "x = torch.randn(4, 64, device='cuda', dtype=torch.bfloat16)\n"
        "kernels.rms_norm(x, torch.ones(64, device='cuda', dtype=torch.bfloat16), 1e-6)\n"
        "torch.cuda.synchronize()\n"
        "info = fused_ops.installation_key().cache_info()\n"
        "print(info.misses, info.hits, fused_ops._PREPARED.get('error'), fused_ops._PREPARED['seconds'])\n"
    )
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), ATTNFALLBACK_CACHE=str(tmp_path / "cache"))
    env.pop("ATTNFALLBACK_FUSED", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    misses, hits, error, seconds = done.stdout.split()
    assert (misses, error) == ("1", "None") and int(hits) >= 1, done.stdout
    print(f"triton_key computed beside the load in {seconds} s")


def test_one_background_compile_a_process_for_the_same_shapes(monkeypatch, tmp_path):
    from attnfallback import fused_ops

    monkeypatch.setattr(fused_ops, "unavailable_reason", lambda device, env=None: None)
    monkeypatch.setitem(fused_ops._WARMING, "started", set())
    monkeypatch.setitem(fused_ops._WARMING, "future", None)
    env = {"ATTNFALLBACK_CACHE": str(tmp_path)}
    assert fused_ops.warm_in_background("auto", (64, 16), None, env) is True
    first = fused_ops._WARMING["future"]
    assert first.result(timeout=30) is None  # no CUDA here: nothing compiled, nothing marked
    assert fused_ops.warm_in_background("auto", (16, 64, None), None, env) is True
    assert fused_ops._WARMING["future"] is first  # the same shapes: not again
    assert fused_ops.warm_in_background("auto", (128, 16), 100, env) is True
    assert fused_ops._WARMING["future"] is not first  # another model's shapes compile anew
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "triton-kernels")  # set before the thread starts
    assert not list(tmp_path.rglob("attnfallback-compiled-*"))
    assert fused_ops.warm_failure() is None


def test_a_failed_background_compile_is_the_reason_given(monkeypatch):
    from concurrent.futures import Future

    from attnfallback import fused_ops
    from attnfallback.scoring import tasks

    failed = Future()
    failed.set_exception(RuntimeError("ptxas died"))
    monkeypatch.setitem(fused_ops._WARMING, "future", failed)
    monkeypatch.setattr(tasks, "device_label", lambda device=None: "Fake GPU cc 9.0")
    model, _ = causal_lm("llama")
    task = LogprobTask(model, zoo.tokenizer_for(zoo.FAMILIES["llama"]), None)
    assert tasks.not_compiled_yet(model, task, "cuda", {}) == "the fused kernels' compile failed: RuntimeError: ptxas died"


def test_a_broken_cache_leaves_the_shard_unfused_not_failed(monkeypatch):
    from attnfallback.scoring import tasks

    def broken(*args, **kwargs):
        raise PermissionError("read-only cache")

    monkeypatch.setattr(tasks, "unavailable_reason", lambda device, env=None: None)
    monkeypatch.setattr(tasks, "not_compiled_yet", broken)
    model, _ = causal_lm("llama")
    report = fuse_kernels(model, LogprobTask(model, zoo.tokenizer_for(zoo.FAMILIES["llama"]), None), "cuda")
    assert report == {"kernels": None, "why_not": "the fused kernels' cache could not be read: PermissionError: read-only cache"}


def test_the_logprob_forward_runs_the_task_s_kernel(tiny_qwen2, tmp_path):
    """The head's log-probabilities come from `task.token_logprobs`: a kernel off by 0.01 a token
    moves each row's sum by 0.01 times its tokens."""
    import pyarrow.parquet as pq

    from attnfallback.scoring import ScoreJob, Scorer
    from attnfallback.scoring.job import run_score
    from scoring_helpers import write_jsonl

    class Shifted(TorchKernels):
        def token_logprobs(self, logits, targets):
            return super().token_logprobs(logits, targets) - 0.01

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a short text"}, {"text": "another one, longer than the first"}])
    job = ScoreJob(model=str(tiny_qwen2), input=str(data), output=str(tmp_path / "a.parquet"), task="logprob", device="cpu", quiet=True)
    scorer = Scorer.from_job(job)
    run_score(job, scorer=scorer)
    scorer.task.token_logprobs = Shifted().token_logprobs
    shifted_job = ScoreJob(**{**job.__dict__, "output": str(tmp_path / "b.parquet")})
    run_score(shifted_job, scorer=scorer)
    a, b = pq.read_table(tmp_path / "a.parquet").to_pydict(), pq.read_table(tmp_path / "b.parquet").to_pydict()
    for plain, moved, tokens in zip(a["logprob_sum"], b["logprob_sum"], a["tokens"]):
        assert tokens > 0 and moved == pytest.approx(plain - 0.01 * tokens, abs=1e-4)


def test_what_compiled_kernels_depend_on():
    from attnfallback.fused_ops import compile_key

    key = compile_key("H200 cc 9.0", torch.bfloat16, (2048, 64), 30522)
    assert key == compile_key("H200 cc 9.0", torch.bfloat16, (64, None, 2048), 30522)  # order and absent widths aside
    others = [compile_key("A6000 cc 8.6", torch.bfloat16, (2048, 64), 30522), compile_key("H200 cc 9.0", torch.float16, (2048, 64), 30522),
              compile_key("H200 cc 9.0", torch.bfloat16, (1024, 64), 30522), compile_key("H200 cc 9.0", torch.bfloat16, (2048, 64), None)]
    assert len({key, *others}) == 5


def test_auto_fuses_only_where_a_shard_compiled_the_kernels_before(tmp_path, monkeypatch):
    """A first shard on a fresh cache runs unfused; once a compile is marked in the cache (which
    may be shared), the model's shards fuse."""
    from attnfallback import fused_ops
    from attnfallback.scoring import tasks

    monkeypatch.setattr(tasks, "device_label", lambda device=None: "Fake GPU cc 9.0")
    env = {"ATTNFALLBACK_CACHE": str(tmp_path)}
    model, _ = causal_lm("llama")
    task = LogprobTask(model, zoo.tokenizer_for(zoo.FAMILIES["llama"]), None)
    assert tasks.not_compiled_yet(model, task, "cuda", env) == "the fused kernels are not compiled on this machine yet"
    fused_ops.mark_compiled(tasks._compile_key(model, task, "cuda"), env)
    assert tasks.not_compiled_yet(model, task, "cuda", env) is None
    assert tasks.not_compiled_yet(model, task, "cuda", {"ATTNFALLBACK_CACHE": str(tmp_path / "other")}) is not None
    assert tasks.not_compiled_yet(model, task, "cuda", {"ATTNFALLBACK_FUSED": "on"}) is None  # on: fuse, compiling first


def test_a_compile_started_before_the_load_stands_for_the_dtype_it_resolves_to(monkeypatch):
    from attnfallback import fused_ops

    monkeypatch.setitem(fused_ops._WARMING, "started", {("auto", (64, 2048), 30522, "cuda")})
    assert fused_ops.compiling_here("bfloat16", (2048, 64, None), 30522, "cuda:0")
    assert fused_ops.compiling_here("auto", (64, 2048), 30522, "auto")
    assert not fused_ops.compiling_here("bfloat16", (2048, 64), None, "cuda")  # no head: other kernels
    assert not fused_ops.compiling_here("bfloat16", (1024, 64), 30522, "cuda")
    assert not fused_ops.compiling_here("bfloat16", (2048, 64), 30522, "cuda:1")


def test_the_compile_runs_in_a_process_of_its_own_once_a_process(tmp_path, monkeypatch):
    """The process starts once for the same shapes, logs what it did (on a machine without CUDA:
    nothing compiled, nothing marked) and is what a long shard waits for."""
    import os

    from attnfallback import fused_ops

    monkeypatch.setattr(fused_ops, "unavailable_reason", lambda device, env=None: None)
    monkeypatch.setattr(fused_ops, "_PROCESSES", {})
    env = dict(os.environ, ATTNFALLBACK_CACHE=str(tmp_path / "cache"))
    env.pop("TRITON_CACHE_DIR", None)
    env.pop("ATTNFALLBACK_FUSED", None)
    assert fused_ops.start_compile_process("auto", (64, 16), 100, "cuda", env) == "started"
    assert fused_ops.start_compile_process("auto", (16, 64), 100, "cuda:0", env) == "started before"
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton-kernels")
    assert fused_ops.compiling_here("bfloat16", (64, 16), 100, "cuda")
    assert fused_ops.wait_for_compile("k", "bfloat16", (64, 16), None, "cuda", 60, env) is None  # no head: not that process
    waited = fused_ops.wait_for_compile("k", "bfloat16", (64, 16), 100, "cuda", 60, env)
    assert waited is not None and waited < 60
    (child,) = fused_ops._PROCESSES.values()
    assert child.returncode == 0
    log = (tmp_path / "cache" / "triton-kernels" / "attnfallback-compile.log").read_text()
    assert "fused kernels not compiled (no CUDA): auto (16, 64) 100" in log
    assert not list((tmp_path / "cache").rglob("attnfallback-compiled-*"))


def test_no_compile_process_unless_auto_and_possible(tmp_path, monkeypatch):
    from attnfallback import fused_ops

    monkeypatch.setattr(fused_ops, "_PROCESSES", {})
    env = {"ATTNFALLBACK_CACHE": str(tmp_path)}
    assert fused_ops.start_compile_process("auto", (64,), None, "cuda", {**env, "ATTNFALLBACK_FUSED": "off"}) == "ATTNFALLBACK_FUSED=off"
    assert fused_ops.start_compile_process("auto", (64,), None, "cuda", {**env, "ATTNFALLBACK_FUSED": "on"}) == \
        "ATTNFALLBACK_FUSED=on: the shard compiles them itself"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert fused_ops.start_compile_process("auto", (64,), None, "cuda", env) == "Triton is not installed"
    assert fused_ops._PROCESSES == {} and not (tmp_path / "triton-kernels").exists()


def test_one_compile_holds_a_key_s_lock_and_a_dead_one_s_is_taken_over(tmp_path):
    import os

    from attnfallback import fused_ops

    env = {"ATTNFALLBACK_CACHE": str(tmp_path)}
    assert fused_ops.take_compile_lock("k1", env)
    assert not fused_ops.take_compile_lock("k1", env)  # a shard beside it on the shared cache starts no second compile
    assert fused_ops.take_compile_lock("k2", env)
    lock = fused_ops._compiling_lock("k1", env)
    old = lock.stat().st_mtime - fused_ops.COMPILING_STALE_S - 1
    os.utime(lock, (old, old))
    assert fused_ops.take_compile_lock("k1", env)
    assert lock.read_text().strip() == str(os.getpid())


def test_a_shard_starts_the_compile_process_first_thing_where_something_would_fuse(tiny_qwen2, tiny_bert, tmp_path, monkeypatch):
    """From the local model's config.json: a logprob or RMSNorm model starts it (with the config's
    shapes, the head's vocabulary only for logprob); an encoder with LayerNorms and GELU does not."""
    from attnfallback.scoring import ScoreJob, job as job_module

    started = []
    monkeypatch.setattr(job_module, "start_compile_process", lambda *args, **kwargs: started.append((args, kwargs)) or "started")
    job = ScoreJob(model=str(tiny_qwen2), input="in.jsonl", output=str(tmp_path / "o.parquet"), task="logprob", device="cuda")

    def starts(job, task):
        return job_module._start_fused_compile(job, task, job_module._local_config(job))

    assert starts(job, "logprob")
    assert starts(ScoreJob(**{**job.__dict__, "task": "classify"}), "classify")
    assert not starts(ScoreJob(**{**job.__dict__, "model": str(tiny_bert), "task": "embed"}), "embed")
    assert not starts(ScoreJob(**{**job.__dict__, "model": str(tmp_path / "nowhere")}), "logprob")
    assert started == [(("auto", (32, 8), 30522), {"device": "cuda"}), (("auto", (32, 8), None), {"device": "cuda"})]


def test_triton_compiles_into_the_shared_cache_unless_told_otherwise(tmp_path):
    env = {"ATTNFALLBACK_CACHE": str(tmp_path)}
    assert use_triton_cache(env) == str(tmp_path / "triton-kernels")
    env = {"ATTNFALLBACK_CACHE": str(tmp_path), "TRITON_CACHE_DIR": "/elsewhere"}
    assert use_triton_cache(env) == "/elsewhere"


def test_a_cpu_score_says_why_nothing_is_fused(tiny_qwen2, tmp_path, capsys):
    import json

    from attnfallback.cli.app import main
    from scoring_helpers import read_events, write_jsonl

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a short text"}, {"text": "another one, longer than that"}])
    events = tmp_path / "events"
    code = main(["score", str(tiny_qwen2), "--input", str(data), "--output", str(tmp_path / "out.parquet"), "--task", "logprob",
                 "--device", "cpu", "--json", "--quiet", "--events", str(events)])
    assert code == 0
    why = {"kernels": None, "why_not": "the model runs on cpu, the kernels are CUDA's"}
    assert json.loads(capsys.readouterr().out)["task"]["fused"] == why
    assert [e["fused"] for e in read_events(events) if e["event"] == "shard_done"] == [why]


# --- on a GPU: the Triton kernels themselves ------------------------------------------------------


def _triton():
    import os
    import tempfile

    pytest.importorskip("triton")
    from attnfallback.fused_ops import triton_kernels

    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-tests-"))  # not the user's cache

    return triton_kernels()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [7, 4096, 30522, 151936])
def test_gpu_token_logprobs_match_pytorch(dtype, vocab):
    kernels = _triton()
    g = torch.Generator().manual_seed(vocab)
    values = (torch.randn(37, vocab, generator=g) * 6).to("cuda", dtype)
    values[3, : vocab // 2] = float("-inf")  # masked entries, as a vocabulary cut by a logits processor
    targets = torch.randint(0, vocab, (37,), generator=g).to("cuda")
    targets[3] = vocab - 1
    ours, theirs = kernels.token_logprobs(values, targets), TorchKernels().token_logprobs(values, targets)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5)
    assert kernels.token_logprobs(values[:0], targets[:0]).shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("width,dtype,weight_dtype", [(2048, torch.bfloat16, torch.bfloat16), (128, torch.bfloat16, torch.bfloat16),
                                                      (896, torch.float16, torch.float16), (1000, torch.bfloat16, torch.float32),
                                                      (64, torch.float32, torch.float32)])
def test_gpu_rms_norm_rounds_as_transformers_does(width, dtype, weight_dtype):
    kernels = _triton()
    g = torch.Generator().manual_seed(width)
    x = (torch.randn(3, 50, width, generator=g) * 4).to("cuda", dtype)
    weight = (1 + 0.3 * torch.randn(width, generator=g)).to("cuda", weight_dtype)
    ours, theirs = kernels.rms_norm(x, weight, 1e-6), TorchKernels().rms_norm(x, weight, 1e-6)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if dtype != torch.float32:  # rounded to the half type where transformers rounds: nearly all bit-equal
        assert float((ours == theirs).float().mean()) > 0.99
    torch.testing.assert_close(ours, theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_silu_mul_rounds_as_transformers_does(dtype):
    kernels = _triton()
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(2, 3001, 77, generator=g) * 4).to("cuda", dtype), torch.randn(2, 3001, 77, generator=g).to("cuda", dtype)
    ours, theirs = kernels.silu_mul(gate, up), TorchKernels().silu_mul(gate, up)
    assert float((ours == theirs).float().mean()) > 0.99
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # the rest one rounding apart
    torch.testing.assert_close(ours, theirs, rtol=2 * ulp, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dim,dtype,batch_cos", [(64, torch.bfloat16, 1), (128, torch.bfloat16, 3), (32, torch.float16, 1),
                                                 (256, torch.float32, 3)])
def test_gpu_rotary_rounds_as_transformers_does(dim, dtype, batch_cos):
    kernels = _triton()
    g = torch.Generator().manual_seed(dim)
    for heads in (1, 8, 32):
        x = (torch.randn(3, 17, heads, dim, generator=g) * 4).to("cuda", dtype).transpose(1, 2)  # as attention makes it
        cos, sin = (torch.rand(2, batch_cos, 17, dim, generator=g) * 2 - 1).to("cuda", dtype)
        assert kernels.handles_rotary(x, cos, sin)
        ours, theirs = kernels.rotary(x, cos, sin), TorchKernels().rotary(x, cos, sin)
        assert ours.shape == theirs.shape and ours.stride() == x.stride()
        if dtype != torch.float32:
            assert float((ours == theirs).float().mean()) > 0.99
        torch.testing.assert_close(ours, theirs)
    odd = dim // 2 + dim // 4  # not a power of two: the module's own code
    assert not kernels.handles_rotary(x[..., :odd], cos[..., :odd], sin[..., :odd])


@pytest.mark.gpu
@pytest.mark.parametrize("family", DECODERS)
def test_gpu_each_decoder_family_fused_by_triton_keeps_its_logprobs(family):
    kernels = _triton()
    model, ids = causal_lm(family)
    model, ids = model.to("cuda"), ids.to("cuda")
    before = torch.log_softmax(logits(model, ids).float(), -1)
    report = fuse_modules(model, kernels)
    if family in SAME_NORM:
        assert not any(name.endswith("RMSNorm") for name in report.left), report.left
    if family in GATED_SILU:
        assert any(name.endswith("MLP") for name in report.fused) and not any(name.endswith("MLP") for name in report.left)
    after = torch.log_softmax(logits(model, ids).float(), -1)
    torch.testing.assert_close(after, before, rtol=0, atol=0.05)


def test_a_shard_that_ends_before_the_background_compile_waits_for_it(tmp_path, monkeypatch):
    """The compile's marker is what lets the next shard fuse, and a daemon thread in CUDA calls is
    not left to the interpreter's exit: the shard waits, after its output is final, and says so."""
    import json
    import time
    from concurrent.futures import Future

    from attnfallback import fused_ops
    from attnfallback.scoring import ScoreJob, run_score

    class StillCompiling(Future):
        """Not done until someone waits for it; then done after 50 ms (no timer racing the shard)."""

        def result(self, timeout=None):
            if not self.done():
                time.sleep(0.05)
                self.set_result(None)
            return super().result(timeout)

    compiling = StillCompiling()
    monkeypatch.setitem(fused_ops._WARMING, "future", compiling)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    monkeypatch.setenv("ATTNFALLBACK_CACHE", str(tmp_path / "cache"))
    result = run_score(ScoreJob(model="default", input=str(data), output=str(tmp_path / "out.parquet"), device="cpu",
                                events=str(tmp_path / "ev"), run_id="w1", quiet=True))
    assert compiling.done() and result.rows_written == 5
    assert 0.05 <= result.phases["compile_wait_s"] <= result.phases["run_s"]
    events = [json.loads(line) for p in (tmp_path / "ev").rglob("*.jsonl") for line in p.read_text().splitlines()]
    (done,) = [e for e in events if e["event"] == "shard_done"]
    assert done["phases"]["compile_wait_s"] == result.phases["compile_wait_s"]
    assert fused_ops.finish_background_compile() == 0.0  # nothing left to wait for
    again = run_score(ScoreJob(model="default", input=str(data), output=str(tmp_path / "again.parquet"), device="cpu", quiet=True))
    assert "compile_wait_s" not in again.phases


def test_a_first_shard_waits_for_the_compile_only_where_its_work_pays(monkeypatch):
    """Under auto, a shard on a fresh cache waits for the background compile when its expected
    work (parameters x tokens) reaches the bound and something would run fused; a short shard, or
    an encoder with nothing to fuse, does not wait."""
    from attnfallback.scoring import tasks

    model, _ = causal_lm("llama")
    task = LogprobTask(model, zoo.tokenizer_for(zoo.FAMILIES["llama"]), None)
    params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(tasks, "FUSE_WAIT_MIN_WORK", params * 1000)
    assert tasks.wait_pays(model, task, 999) is None
    assert tasks.wait_pays(model, task, None) is None
    assert "pays for waiting" in tasks.wait_pays(model, task, 1000)
    f = zoo.FAMILIES["bert"]
    encoder = zoo.model_class(f, "classify")(zoo.make_config(f, zoo.tokenizer_for(f), "cpu", "classify")).eval()
    assert not tasks.fusable(encoder, object())  # LayerNorms and GELU: nothing to fuse, so no wait
    assert tasks.wait_pays(encoder, object(), 10 ** 12) is None
    assert tasks.fusable(model, object())  # RMSNorms and gated-SiLU MLPs without the logprob head


def _fresh_cache_that_compiles(monkeypatch, seconds: float) -> dict:
    """A CUDA-like machine whose kernels are not compiled until someone waits for the background compile."""
    from attnfallback.scoring import tasks

    state = {"compiled": False, "waits": 0}

    def finish(timeout):
        state["waits"] += 1
        state["compiled"] = True
        return seconds

    monkeypatch.setattr(tasks, "unavailable_reason", lambda device, env=None: None)
    monkeypatch.setattr(tasks, "device_label", lambda device=None: "Fake GPU cc 9.0")
    monkeypatch.setattr(tasks, "warm_in_background", lambda *args, **kwargs: True)
    monkeypatch.setattr(tasks, "compiling_here", lambda *args, **kwargs: False)
    monkeypatch.setattr(tasks, "start_compile_process", lambda *args, **kwargs: state.setdefault("spawned", []).append(args) or "started")
    monkeypatch.setattr(tasks, "wait_for_compile", lambda *args, **kwargs: None)  # no process started at the shard's start
    monkeypatch.setattr(tasks, "is_compiled", lambda key, env=None: state["compiled"])
    monkeypatch.setattr(tasks, "finish_background_compile", finish)
    monkeypatch.setattr(tasks, "triton_kernels", TorchKernels)
    monkeypatch.setattr(tasks, "mark_compiled", lambda key, env=None: True)
    monkeypatch.delenv("ATTNFALLBACK_FUSED", raising=False)
    return state


def test_a_long_first_shard_fuses_after_waiting_and_a_short_one_runs_unfused(monkeypatch):
    from attnfallback.scoring import tasks

    state = _fresh_cache_that_compiles(monkeypatch, 0.75)
    model, _ = causal_lm("llama")
    task = LogprobTask(model, zoo.tokenizer_for(zoo.FAMILIES["llama"]), None)
    monkeypatch.setattr(tasks, "FUSE_WAIT_MIN_WORK", sum(p.numel() for p in model.parameters()) * 1000)
    # the device as named to the checks that would say "no CUDA" (patched); the head's check runs here
    short = fuse_kernels(model, task, "cpu", expected_tokens=10)
    assert short["kernels"] is None and short["why_not"] == ("the fused kernels are not compiled on this machine yet: they compile "
                                                             "in a process of their own for the shards after it (ATTNFALLBACK_FUSED=on waits for them)")
    assert state["waits"] == 0 and "waited_s" not in short
    ((dtype, widths, vocab, device, env),) = state["spawned"]
    assert (dtype, vocab, env) == (str(model.dtype).removeprefix("torch."), model.config.vocab_size, None)
    long = fuse_kernels(model, task, "cpu", expected_tokens=5000)
    assert state["waits"] == 1
    assert long["kernels"] == "torch" and long["waited_s"] == 0.75 and "pays for waiting" in long["waited"]
    assert long["fused"] and long["logprob_head"] == "fused"
    unfuse_modules(model)


def test_the_scorer_waits_with_the_shard_s_expected_tokens_and_times_the_wait(tiny_qwen2, monkeypatch, tmp_path):
    """Through `Scorer.from_job` (measuring on, as on a GPU): the fuse step gets the shard's
    expected tokens from its sample, and the wait is `fused_wait_s` in the load's timing, apart
    from the measuring's."""
    from attnfallback.scoring import ScoreJob, Scorer
    from attnfallback.scoring import tasks

    state = _fresh_cache_that_compiles(monkeypatch, 0.5)
    monkeypatch.setattr(tasks, "FUSE_WAIT_MIN_WORK", 1.0)
    monkeypatch.setenv("ATTNFALLBACK_CACHE", str(tmp_path / "cache"))
    texts = [f"row {i} " + "word " * (i % 5) for i in range(12)]
    job = ScoreJob(model=str(tiny_qwen2), input="unused.jsonl", output=str(tmp_path / "out.parquet"), task="logprob",
                   device="cpu", measure="on", quiet=True)
    scorer = Scorer.from_job(job, sample_texts=[(t,) for t in texts], expected_rows=len(texts))
    assert state["waits"] == 1
    assert scorer.fused["waited_s"] == 0.5 and scorer.fused["logprob_head"] == "fused"
    assert scorer.decision.timing["fused_wait_s"] == 0.5
    assert scorer.task.fused_head


def test_the_head_on_aligned_rows_gives_the_heads_own_logits():
    """The head's product on a weight padded with zero rows: the logits are a view of the real
    columns, strided as the padded width, and equal to the head's own."""
    model, _ = causal_lm("llama", torch.float32)
    task = LogprobTask(model, zoo.tokenizer_for(zoo.FAMILIES["llama"]), None)
    vocab = task.vocab_size
    assert task.describe()["head_columns"] == vocab  # on the CPU nothing is padded unless asked
    multiple = 64 if vocab % 64 else 60
    width = task.align_head(multiple)
    assert width % multiple == 0 and vocab < width < vocab + multiple
    hidden = torch.randn(7, model.config.hidden_size)
    with torch.inference_mode():
        ours, theirs = task.head_logits(hidden), task.head(hidden)
    assert ours.shape == theirs.shape == (7, vocab) and ours.stride() == (width, 1)
    assert torch.allclose(ours, theirs, atol=1e-5)
    got = TorchKernels().token_logprobs(ours, torch.arange(7))
    assert torch.allclose(got, TorchKernels().token_logprobs(theirs, torch.arange(7)), atol=1e-5)
    assert task.describe()["head_columns"] == width
    assert task.align_head(1) is None and task.describe()["head_columns"] == vocab


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_logprob_head_runs_on_aligned_rows_and_the_triton_kernel_takes_them():
    model, _ = causal_lm("llama")
    model = model.to("cuda")
    task = LogprobTask(model, zoo.tokenizer_for(zoo.FAMILIES["llama"]), None)
    assert task.describe()["head_columns"] % 64 == 0
    hidden = torch.randn(33, model.config.hidden_size, device="cuda", dtype=model.dtype)
    targets = torch.randint(0, task.vocab_size, (33,), device="cuda")
    with torch.inference_mode():
        logits = task.head_logits(hidden)
        ours = triton_kernels().token_logprobs(logits, targets)
        theirs = TorchKernels().token_logprobs(task.head(hidden), targets)
    assert torch.allclose(ours, theirs, atol=0.05)
