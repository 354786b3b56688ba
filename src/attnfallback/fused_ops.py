"""Fused kernels for the scoring loop's memory-bound steps, where Triton is installed and the model
runs on CUDA.

transformers' eager code for a Llama-like layer runs each RMSNorm as six kernels over float32
copies of the activations and `act(gate) * up` as two; a log-probability head takes a float32 copy
of the logits and reads it four times (bench/NOTES.md, session 15, has what that costs). The
kernels do each in one pass and round to the half type where transformers rounds; their float32
steps (a sum's order, exp and division) may differ in the last bits.

- `token_logprobs(logits, targets)` is the logprob task's head, whichever model.
- `fuse_modules(model, kernels)` replaces the `forward` of module instances (never of a class)
  that are RMSNorms or gated-SiLU MLPs, each class checked first: its own forward and the fused
  one on the same random input must agree, or the class is left as it is, with the reason kept.
  The rotary embedding (`x * cos + rotate_half(x) * sin`, five kernels and a copy) is a function
  of the modeling module, called by name: that global is replaced, checked the same way, so other
  models of the family in the process run it too.

`ATTNFALLBACK_FUSED` (`fused_mode`, on a CUDA device with Triton): auto fuses where this model's
kernels were compiled on this machine or its shared cache before; elsewhere a shard starts their
compile first thing, in a process of its own (`start_compile_process`, `python -m
attnfallback.fused_ops`) that may outlive it, and fuses only where its expected work pays for
waiting for the rest of it (scoring/tasks.py, `wait_pays`); a short shard exits without waiting and
the shards after it fuse. on fuses, compiling in the shard first where needed; off never fuses.
The kernels are injectable (`TorchKernels` computes the same
in PyTorch), so every rule here is testable without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
import types
from dataclasses import dataclass, field

from attnfallback import envs

log = logging.getLogger("attnfallback")

FUSED_FLAG = "_attnfallback_fused"  # set on a module instance whose forward was replaced
# A logprob head's shape as a shard runs it (scoring/tasks.py; the kernel warm-up runs the same):
LOGITS_CHUNK_TOKENS = 4096  # positions per head product (bounds the B x L x vocab logits)
# on CUDA the head's product runs with its outputs padded to a multiple of this many columns:
# cuBLAS takes its fast kernels only for 16-byte-aligned rows, and a vocabulary such as 30,522
# or GPT-2's 50,257 gets an older, slower kernel (bench/NOTES.md, session 24).
HEAD_ALIGN = 64


class TorchKernels:
    """The fused operations in plain PyTorch, rounding where the kernels round: the reference the
    Triton kernels are checked against, and the logprob head where they do not run."""

    name = "torch"

    def token_logprobs(self, logits, targets):
        """log p(target) per row from (rows, vocab) logits, in float32: logit[target] - logsumexp."""
        import torch

        values = logits.float()
        return values.gather(1, targets[:, None])[:, 0] - torch.logsumexp(values, dim=-1)

    def rms_norm(self, x, weight, eps: float):
        """transformers' RMSNorm: float32 variance, the row rounded to x's dtype, times the weight."""
        import torch

        values = x.float()
        normed = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(x.dtype)

    def silu_mul(self, gate, up):
        """SiLU(gate) * up, each rounded to the inputs' dtype as transformers' two kernels do."""
        import torch

        return torch.nn.functional.silu(gate) * up

    def rotary(self, x, cos, sin):
        """transformers' `x * cos + rotate_half(x) * sin` for x (B, H, L, D), cos and sin (B or 1, L, D)."""
        import torch

        half = x.shape[-1] // 2
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)

    def handles_norm(self, x, weight) -> bool:
        return True

    def handles_rotary(self, x, cos, sin) -> bool:
        return x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and x.shape[-1] == cos.shape[-1]


def use_triton_cache(env=None) -> str:
    """Point Triton's kernel cache at <cache directory>/triton-kernels (shared storage lets shards
    on other machines reuse what one compiled), unless the user set TRITON_CACHE_DIR."""
    import os

    env = os.environ if env is None else env
    env.setdefault("TRITON_CACHE_DIR", str(envs.cache_directory(env=env) / "triton-kernels"))
    return env["TRITON_CACHE_DIR"]


_WARMING: dict = {}  # "future": kernels compiling on a background thread (warm_in_background)


def triton_kernels():
    """The Triton kernels (fused_triton.py), imported here: Triton is needed only from this call.
    Waits for a compile `warm_in_background` started (what it could not compile compiles at use)."""
    future = _WARMING.get("future")
    if future is not None:
        try:
            future.result(timeout=120)
        except Exception as e:  # noqa: BLE001 - the checks before use compile again and say what fails
            log.debug("the fused kernels' background compile failed: %s", e)
    waited = finish_triton_prepare()
    if waited > 0.01:
        log.debug("waited %.2f s for Triton's installation hash", waited)
    use_triton_cache()
    from attnfallback.fused_triton import TritonKernels

    return TritonKernels()


def warm_in_background(dtype: str, norm_widths: tuple, vocab: int | None, env=None, device: str = "cuda") -> bool:
    """Compile the kernels a model of these shapes runs, on a daemon thread beside the shard's own
    work (2.3 s on a fresh cache in session 15's runs), and mark them compiled in the cache.
    `dtype`: the model's as a torch name, or auto. One compile of the same shapes a process.
    Returns whether one runs or ran (Triton installed; without CUDA it compiles nothing)."""
    import threading
    from concurrent.futures import Future

    if unavailable_reason("cuda", env) is not None:
        return False
    if compiling_here(dtype, norm_widths, vocab, device):
        return True
    widths = tuple(sorted({int(w) for w in norm_widths if w}))
    _WARMING.setdefault("started", set()).add((dtype, widths, vocab, _same_device(device)))
    use_triton_cache(env)  # the environment is written here, not beside other threads' reads
    future: Future = Future()

    def run():
        try:
            compile_and_mark(dtype, widths, vocab, device, env)
            future.set_result(None)
        except BaseException as e:  # noqa: BLE001 - handed to triton_kernels() and warm_failure()
            future.set_exception(e)

    _WARMING["future"] = future
    threading.Thread(target=run, name="attnfallback-fused-compile", daemon=True).start()
    return True


_PREPARED: dict = {}  # "thread", and once it ends "seconds" or "error" (prepare_triton_in_background)


def prepare_triton_in_background(env=None) -> bool:
    """Compute Triton's installation hash (`triton_key`: its compiler's sources and libtriton.so,
    hashed once a process, at the first kernel's cache lookup) on a daemon thread while the model
    loads, so the fuse step finds compiled kernels without paying for it. The hash and the reads
    release the GIL. Returns whether it started (the kernels could run: see unavailable_reason)."""
    import threading

    if unavailable_reason("cuda", env) is not None or "thread" in _PREPARED:
        return False
    use_triton_cache(env)  # the environment is written here, not beside other threads' reads

    def run():
        started = time.perf_counter()
        try:
            installation_key()()
        except Exception as e:  # noqa: BLE001 - the first kernel's lookup computes it, or says what fails
            _PREPARED["error"] = f"{type(e).__name__}: {e}"
        _PREPARED["seconds"] = round(time.perf_counter() - started, 3)

    thread = threading.Thread(target=run, name="attnfallback-triton-key", daemon=True)
    _PREPARED["thread"] = thread
    thread.start()
    return True


def installation_key():
    """Triton's cached `triton_key` function (triton.runtime.cache in Triton 3.2 and later,
    triton.compiler.compiler before)."""
    import importlib

    for module in ("triton.runtime.cache", "triton.compiler.compiler"):
        try:
            found = getattr(importlib.import_module(module), "triton_key", None)
        except ImportError:
            continue
        if callable(found):
            return found
    raise LookupError("this Triton has no triton_key in triton.runtime.cache or triton.compiler.compiler")


def finish_triton_prepare(timeout: float = 30.0) -> float:
    """Wait for `prepare_triton_in_background`'s hash (the first kernel would compute it again
    beside it); seconds waited, 0 where none started."""
    thread = _PREPARED.get("thread")
    if thread is None or not thread.is_alive():
        return 0.0
    started = time.perf_counter()
    thread.join(timeout)
    return time.perf_counter() - started


def compiling_here(dtype: str, norm_widths: tuple, vocab: int | None, device: str = "cuda") -> bool:
    """Whether this process started a compile of these shapes, on its thread or in a process of
    its own (`auto`, started before the load, stands for the dtype it resolves to)."""
    return _started_like(_WARMING.get("started", ()), dtype, norm_widths, vocab, device) is not None or \
        _started_like(_PROCESSES, dtype, norm_widths, vocab, device) is not None


def _started_like(started, dtype: str, norm_widths: tuple, vocab: int | None, device: str):
    widths = tuple(sorted({int(w) for w in norm_widths if w}))
    return next((shapes for shapes in started if shapes[1] == widths and shapes[2] == vocab
                 and shapes[3] == _same_device(device) and shapes[0] in (dtype, "auto")), None)


def _same_device(device) -> str:
    text = str(device)
    return "cuda" if text in ("auto", "cuda", "cuda:0") else text


def gpu_dtype(dtype: str):
    """A job's dtype name as a torch dtype on a GPU (`auto`: what planner.resolve_dtype picks there,
    bfloat16 where the GPU has it, else float16)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def _target_and_dtype(dtype: str, device: str):
    """The CUDA device and torch dtype a compile is for."""
    import torch

    return torch.device("cuda" if device in ("auto", "cuda") else device), gpu_dtype(dtype)


def compile_and_mark(dtype: str, norm_widths: tuple, vocab: int | None, device: str = "cuda", env=None) -> bool:
    """Compile the kernels for these shapes here and mark them compiled in the cache; False (and
    nothing marked) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return False
    from attnfallback.fused_triton import TritonKernels

    target, chosen = _target_and_dtype(dtype, device)
    widths = tuple(sorted({int(w) for w in norm_widths if w}))
    TritonKernels().warm(chosen, widths, vocab, device=target)
    mark_compiled(compile_key(device_label(target), chosen, widths, vocab), env)
    return True


_PROCESSES: dict = {}  # (dtype, widths, vocab, device) -> the compile process this process started
COMPILING_STALE_S = 600.0  # a compile lock older than this is a dead process's: taken over


def start_compile_process(dtype: str, norm_widths: tuple, vocab: int | None, device: str = "cuda", env=None) -> str:
    """Under auto, compile the kernels in a process of its own, at low priority, that may outlive
    this one. A shard starts it first thing, from its model's config.json, so that by the time the
    model has loaded the kernels are compiled (or nearly: a long shard waits for the rest,
    `wait_for_compile`), and a short shard neither shares its interpreter with the compile nor
    waits for it at its end (session 18: 1.2-2.7 s on an H100 with a thread). The process takes
    the cache's lock for its key, so one compile runs per key on shared storage, and does nothing
    where the kernels are compiled. Returns "started", "started before", or why not."""
    import os
    import subprocess
    import sys

    env = os.environ if env is None else env
    mode = fused_mode(env)
    if mode != "auto":
        return f"{envs.FUSED}={mode}" + (": the shard compiles them itself" if mode == "on" else "")
    reason = unavailable_reason("cuda", env)
    if reason is not None:
        return reason
    widths = tuple(sorted({int(w) for w in norm_widths if w}))
    shapes = (dtype, widths, vocab, _same_device(device))
    if shapes in _PROCESSES:
        return "started before"
    use_triton_cache(env)
    folder = envs.cache_directory(env=env) / "triton-kernels"
    command = [sys.executable, "-m", "attnfallback.fused_ops", "--dtype", dtype, "--widths", ",".join(map(str, widths)),
               "--vocab", str(vocab or 0), "--device", str(device)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "attnfallback-compile.log", "ab") as log_file:
            _PROCESSES[shapes] = subprocess.Popen(command, env=dict(env), stdin=subprocess.DEVNULL, stdout=log_file,
                                                  stderr=log_file, start_new_session=True, close_fds=True)
    except OSError as e:
        return f"the compile process did not start: {e}"
    return "started"


def wait_for_compile(key: str, dtype: str, norm_widths: tuple, vocab: int | None, device: str = "cuda",
                     timeout: float = 10.0, env=None) -> float | None:
    """Wait, up to `timeout` seconds, for the compile process this process started for these
    shapes, then for another process's lock on `key` (a shard beside it on the shared cache);
    the seconds waited, or None where this process started none."""
    import subprocess

    child = _PROCESSES.get(_started_like(_PROCESSES, dtype, norm_widths, vocab, device))
    if child is None:
        return None
    start = time.perf_counter()
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start
    lock = _compiling_lock(key, env)
    while lock.exists() and not is_compiled(key, env) and time.perf_counter() - start < timeout:
        time.sleep(0.05)
    return time.perf_counter() - start


def _compiling_lock(key: str, env=None):
    return envs.cache_directory(env=env) / "triton-kernels" / f"attnfallback-compiling-{key}.lock"


def take_compile_lock(key: str, env=None) -> bool:
    """Take the cache's lock for compiling `key` (False: another process holds it); a lock older
    than COMPILING_STALE_S is a dead process's and is taken over."""
    import os

    lock = _compiling_lock(key, env)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        if time.time() - lock.stat().st_mtime > COMPILING_STALE_S:
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    return True


def main(argv=None) -> int:
    """`python -m attnfallback.fused_ops --dtype D --widths W,W --vocab V --device cuda`: the
    process `start_compile_process` starts. Exit 0 whatever it finds (no GPU, compiled, locked)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description="compile the fused kernels for a model's shapes into the cache")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--widths", default="")
    parser.add_argument("--vocab", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    try:
        os.nice(10)  # behind the shard that started it
    except OSError:
        pass
    import torch

    widths, vocab = tuple(sorted({int(w) for w in args.widths.split(",") if w})), args.vocab or None
    said = f"{args.dtype} {widths} {vocab}"
    if not torch.cuda.is_available():
        print(f"fused kernels not compiled (no CUDA): {said}", flush=True)
        return 0
    target, chosen = _target_and_dtype(args.dtype, args.device)
    key = compile_key(device_label(target), chosen, widths, vocab)
    if is_compiled(key):
        print(f"fused kernels compiled before: {said}", flush=True)
        return 0
    if not take_compile_lock(key):
        print(f"fused kernels compiling in another process: {said}", flush=True)
        return 0
    try:
        started = time.perf_counter()
        compile_and_mark(args.dtype, widths, vocab, args.device)
        print(f"fused kernels compiled in {time.perf_counter() - started:.2f} s: {said}", flush=True)
    finally:
        _compiling_lock(key).unlink(missing_ok=True)
    return 0


def finish_background_compile(timeout: float = 60.0) -> float:
    """Wait for this process's background compile to end (its marker written, so the next shard
    fuses; a daemon thread in CUDA calls is not left to the interpreter's exit). Seconds waited."""
    future = _WARMING.get("future")
    if future is None or future.done():
        return 0.0
    start = time.perf_counter()
    try:
        future.result(timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a failed or slow compile is the next shard's to redo
        log.debug("the fused kernels' background compile did not finish: %s", e)
    return time.perf_counter() - start


def warm_failure() -> str | None:
    """Why this process's background compile failed (None: it did not, or has not finished)."""
    future = _WARMING.get("future")
    if future is None or not future.done() or future.exception() is None:
        return None
    error = future.exception()
    return f"{type(error).__name__}: {error}"


def fused_mode(env=None) -> str:
    """$ATTNFALLBACK_FUSED: auto (fuse where this model's kernels are compiled on this machine or
    its shared cache; else compile them in a process of their own, for the shards after it, and
    for this one where its work pays for the wait), on (fuse, compiling first where needed), off."""
    return envs.choice(envs.FUSED, ("auto", "on", "off"), "auto", env)


def device_label(device=None) -> str:
    """The GPU's name and compute capability (what a compiled kernel is for)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} cc {major}.{minor}"


def compile_key(device: str, dtype, norm_widths: tuple, vocab: int | None) -> str:
    """What the compiled kernels of a model depend on: the GPU, the versions of Triton and torch,
    the kernels' source, the dtype, the norm widths and the vocabulary."""
    import hashlib
    import json
    from importlib import metadata

    versions = []
    for package in ("triton", "torch"):
        try:
            versions.append(metadata.version(package))
        except metadata.PackageNotFoundError:
            versions.append(None)
    text = json.dumps([device, versions, _kernels_source(), str(dtype), sorted({int(w) for w in norm_widths if w}), vocab])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def _kernels_source() -> str:
    """sha256 of fused_triton.py, read once a process."""
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(__file__).with_name("fused_triton.py").read_bytes()).hexdigest()


def _marker(key: str, env=None):
    return envs.cache_directory(env=env) / "triton-kernels" / f"attnfallback-compiled-{key}.json"


def mark_compiled(key: str, env=None) -> bool:
    """Record that the kernels of `key` are compiled into this cache (written after a compile);
    False where the cache cannot be written (the shard goes on: the next one compiles again)."""
    from attnfallback import atomic

    path = _marker(key, env)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {"key": key})
    except OSError as e:
        log.debug("the fused kernels' compile is not marked in %s: %s", path.parent, e)
        return False
    return True


def is_compiled(key: str, env=None) -> bool:
    """Whether a shard compiled the kernels of `key` into this cache before."""
    return _marker(key, env).is_file()


def config_text(raw: dict) -> dict:
    """A config.json's text model: its `text_config` where it has one (a multimodal model), else itself."""
    return raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw


def config_shapes(raw: dict) -> tuple[tuple[int | None, int | None], int | None]:
    """(hidden width, head width) and vocabulary size from a model's config.json: what the kernels
    are compiled for (`warm_in_background`)."""
    text = config_text(raw)
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None)
    ints = [v if isinstance(v, int) and v > 0 else None for v in (hidden, head_dim, text.get("vocab_size"))]
    return (ints[0], ints[1]), ints[2]


def unavailable_reason(device, env=None) -> str | None:
    """Why the fused kernels do not run for a model on `device` (None: they do)."""
    if fused_mode(env) == "off":
        return f"turned off ({envs.FUSED}=off)"
    if getattr(device, "type", str(device)) != "cuda":
        return f"the model runs on {getattr(device, 'type', device)}, the kernels are CUDA's"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


@dataclass
class FusionReport:
    """What `fuse_modules` replaced and what it left: class name -> count, class name -> reason."""

    kernels: str
    fused: dict[str, int] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"kernels": self.kernels, "fused": dict(self.fused), "left": dict(self.left)}


def _norm_eps(module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def is_rms_norm(module) -> bool:
    """An RMSNorm by its shape: no children, one 1-D weight, a float epsilon, no bias."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and not any(True for _ in module.children())
            and weight is not None and weight.dim() == 1 and getattr(module, "bias", None) is None
            and _norm_eps(module) is not None and [n for n, _ in module.named_parameters()] == ["weight"])


def is_gated_silu_mlp(module) -> bool:
    """An MLP `down(act(gate(x)) * up(x))` with a SiLU activation, by its parts."""
    import torch

    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(isinstance(p, torch.nn.Linear) for p in parts)


def _fused_norm_forward(kernels, fallback):
    def forward(self, hidden_states):
        eps = _norm_eps(self)
        if kernels.handles_norm(hidden_states, self.weight):
            return kernels.rms_norm(hidden_states, self.weight, eps)
        return fallback(hidden_states)
    return forward


def _fused_mlp_forward(kernels, fallback):
    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.shape != up.shape or not (gate.is_contiguous() and up.is_contiguous()):
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(kernels.silu_mul(gate, up))
    return forward


FUSIONS = (("rms_norm", is_rms_norm, _fused_norm_forward), ("silu_mul", is_gated_silu_mlp, _fused_mlp_forward))


def _sample_input(module, kind: str):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    param = next(module.parameters())
    width = param.shape[0] if kind == "rms_norm" else module.gate_proj.in_features
    sample = torch.randn(2, 7, width, generator=generator) * 3
    return sample.to(device=param.device, dtype=param.dtype)


def _agreement(ours, theirs, kind: str) -> str | None:
    """None where the fused output is the module's own (to rounding), else how it differs."""
    import torch

    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return f"returns {ours.dtype} {tuple(ours.shape)} where the module's own forward returns {theirs.dtype} {tuple(theirs.shape)}"
    a, b = ours.float(), theirs.float()
    scale = float(b.abs().max()) or 1.0
    worst = float((a - b).abs().max())
    equal = float((a == b).float().mean())
    # a norm rounds as the module does, so nearly all of it is bit-equal; an MLP's down projection
    # spreads a rare rounding difference over a row, so it is held to a relative tolerance instead
    if not torch.isfinite(a).all() or worst > 0.02 * scale or (kind == "rms_norm" and equal < 0.98):
        return f"differs from the module's own forward on a random input (max difference {worst:.3g} of {scale:.3g}, {equal:.1%} equal)"
    return None


def _check(module, candidate, kind: str) -> str | None:
    """How `candidate` differs from `module`'s own forward (None: it does not). A norm is checked
    with its weight as loaded and with a random one (a freshly built model's are all ones)."""
    import torch
    from torch.func import functional_call

    sample = _sample_input(module, kind)
    with torch.inference_mode():
        found = _agreement(candidate(sample), module(sample), kind)
        if found is None and kind == "rms_norm":
            generator = torch.Generator(device="cpu").manual_seed(1)
            weight = (1 + 0.5 * torch.randn(module.weight.shape, generator=generator)).to(module.weight)
            theirs = functional_call(module, {"weight": weight}, (sample,))
            module.forward = candidate
            try:
                ours = functional_call(module, {"weight": weight}, (sample,))
            finally:
                del module.forward
            found = _agreement(ours, theirs, kind)
    return found


ROTARY = "apply_rotary_pos_emb"  # the function a transformers modeling module's attention calls by name


def _fused_rotary(kernels, original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = args[0] if len(args) == 1 else kwargs.get("unsqueeze_dim", 1)
        if (len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or unsqueeze_dim != 1
                or not (kernels.handles_rotary(q, cos, sin) and kernels.handles_rotary(k, cos, sin))):
            return original(q, k, cos, sin, *args, **kwargs)
        return kernels.rotary(q, cos, sin), kernels.rotary(k, cos, sin)

    setattr(apply_rotary_pos_emb, FUSED_FLAG, True)
    return apply_rotary_pos_emb


def _rotary_modules(model) -> dict:
    """The modeling modules of `model`'s classes that define the rotary function, by name."""
    import sys

    found = {}
    for module in model.modules():
        home = sys.modules.get(type(module).__module__)
        if home is not None and callable(getattr(home, ROTARY, None)):
            found[home.__name__] = home
    return found


def _check_rotary(fused, original, model) -> str | None:
    """How the fused rotary function differs from the module's own on random inputs shaped as
    an attention layer passes them (None: it does not)."""
    import torch

    param = next(model.parameters())
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_attention_heads", None) or 4
    dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", 0) // heads)
    if not dim or dim % 2:
        return f"no even head width in the config (found {dim})"
    generator = torch.Generator(device="cpu").manual_seed(2)

    def sample(*shape):
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(device=param.device, dtype=param.dtype)

    q, k = (sample(2, 5, 3, dim) * 4).transpose(1, 2), (sample(2, 5, 1, dim) * 4).transpose(1, 2)
    cos, sin = sample(1, 5, dim), sample(1, 5, dim)
    with torch.inference_mode():
        ours, theirs = fused(q, k, cos, sin), original(q, k, cos, sin)
    for a, b in zip(ours, theirs):
        found = _agreement(a, b, "rms_norm")  # rounded where transformers rounds: held to bit-equality as a norm
        if found is not None:
            return found
    return None


def _fuse_rotary(model, kernels, report: FusionReport) -> None:
    """The rotary function of `model`'s modeling modules, where the fused one agrees with it. It is
    a module's global, so every model of that family in this process runs it (the same numbers)."""
    for name, home in _rotary_modules(model).items():
        original = getattr(home, ROTARY)
        key = f"{name}.{ROTARY}"
        if getattr(original, FUSED_FLAG, False):
            report.fused[key] = 1
            continue
        fused = _fused_rotary(kernels, original)
        try:
            found = _check_rotary(fused, original, model)
        except Exception as e:  # noqa: BLE001
            found = f"the fused rotary failed: {type(e).__name__}: {e}"
        if found is None:
            setattr(home, ROTARY, fused)
            report.fused[key] = 1
        else:
            report.left[key] = found


def fuse_modules(model, kernels) -> FusionReport:
    """Replace the forward of `model`'s RMSNorm and gated-SiLU MLP instances with the fused ones,
    each class first checked on one instance against its own forward, and its modeling module's
    rotary function likewise. Idempotent."""
    report = FusionReport(kernels=kernels.name)
    verdict: dict[tuple[str, type], str | None] = {}
    for module in model.modules():
        if getattr(module, FUSED_FLAG, False):
            report.fused[type(module).__name__] = report.fused.get(type(module).__name__, 0) + 1
            continue
        if "forward" in vars(module):  # someone else's hook (accelerate's) stays where it is
            continue
        for kind, matches, make_forward in FUSIONS:
            if not matches(module):
                continue
            key = (kind, type(module))
            candidate = types.MethodType(make_forward(kernels, module.forward), module)
            if key not in verdict:
                try:
                    verdict[key] = _check(module, candidate, kind)
                except Exception as e:  # noqa: BLE001 - a kernel that fails to build or run leaves the class as it is
                    verdict[key] = f"the fused {kind} failed: {type(e).__name__}: {e}"
            if verdict[key] is None:
                module.forward = candidate
                setattr(module, FUSED_FLAG, True)
                report.fused[type(module).__name__] = report.fused.get(type(module).__name__, 0) + 1
            else:
                report.left[type(module).__name__] = verdict[key]
            break
    _fuse_rotary(model, kernels, report)
    return report


def unfuse_modules(model) -> int:
    """Give every fused instance its class's forward back, and the modeling modules their rotary
    function; returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, FUSED_FLAG, False):
            del module.forward
            delattr(module, FUSED_FLAG)
            count += 1
    for home in _rotary_modules(model).values():
        function = getattr(home, ROTARY)
        if getattr(function, FUSED_FLAG, False):
            setattr(home, ROTARY, function.__wrapped__)
            count += 1
    return count


def checked_logprob_kernel(kernels, device, vocab: int, dtype=None):
    """`kernels.token_logprobs` where it agrees with PyTorch's on random logits of this vocabulary
    and dtype (bfloat16 unless given) on `device` (else None), and why not."""
    import torch

    reference = TorchKernels()
    try:
        generator = torch.Generator(device="cpu").manual_seed(0)
        logits = (torch.randn(5, vocab, generator=generator) * 4).to(device=device, dtype=dtype or torch.bfloat16)
        targets = torch.randint(0, vocab, (5,), generator=generator).to(device)
        ours, theirs = kernels.token_logprobs(logits, targets), reference.token_logprobs(logits, targets)
        worst = float((ours - theirs).abs().max())
    except Exception as e:  # noqa: BLE001
        return None, f"the fused log-probabilities failed: {type(e).__name__}: {e}"
    if not worst <= 1e-4:
        return None, f"the fused log-probabilities differ from PyTorch's by {worst:.3g}"
    return kernels.token_logprobs, None


if __name__ == "__main__":
    import sys

    sys.exit(main())
