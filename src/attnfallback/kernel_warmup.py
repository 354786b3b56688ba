"""The kernels a transformer scorer's forward runs, run once on its device before the model is there.

A process's first call of each CUDA kernel loads it (CUDA loads modules lazily), and cuBLAS picks
and loads a kernel for each product shape it has not met. A shard's verification forward, two
rows of a few tokens, took 0.42-0.46 s on an H100 in first and later shards alike, where its
Python costs about 0.06 s (bench/NOTES.md, sessions 26 and 27): most of it is probably those first
loads, paid on the main thread between the model's load and its scoring. `plan_from_config`
reads, from a local model's config.json, the widths its layers multiply by; `run` runs what a
layer of those widths runs (the matrix products at a small and a large row count, attention
through SDPA's flash and memory-efficient kernels in the order the forwards use, the embedding
lookup, the norms', activations', rotary's and heads' elementwise and reduction steps) on the
run's warm-up thread, beside the facts phase's imports: torch's ops release the GIL.

$ATTNFALLBACK_KERNEL_WARMUP=off leaves it out (default on: on an H100 it took a Llama-1B shard's
verification from 0.70-1.43 s to 0.24-0.28 s, bench/NOTES.md, session 28). SDPA's
kernel order is process-wide while set (sdpa_order.py), so the caller waits for `run` to end
before any forward of its own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from attnfallback import envs
from attnfallback.fused_ops import HEAD_ALIGN, LOGITS_CHUNK_TOKENS, config_text
from attnfallback.sdpa_order import sdpa_order

SMALL_BATCH = (2, 24)  # rows, tokens: the verification batch's size (verify.py, scoring/trial.py)
LARGE_TOKENS = (8192, 65536)  # the scoring loop's batches: a short last one, and a budget's worth
LARGE_LENGTH = 64  # tokens a row in the large batches (attention kernels depend on the head width, not the length)
MAX_ELEMENTS = 1 << 30  # no activation of the warm-up larger than this (2 GiB in half precision; the loop's are 1.5)


@dataclass(frozen=True)
class KernelPlan:
    """A model's widths, as its config.json gives them."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int | None  # the head's output width (logprob), else None

    def products(self) -> list[tuple[int, int]]:
        """(out, in) of each distinct matrix product of a layer, in the separate and the fused
        layouts families use (ModernBERT's and Phi-3's one query-key-value product, their gate and
        up projections as one): the config does not say which a model's code runs."""
        attention = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        pairs = [(attention, self.hidden), (kv, self.hidden), (self.hidden, attention),
                 (self.intermediate, self.hidden), (self.hidden, self.intermediate),
                 (attention + 2 * kv, self.hidden), (2 * self.intermediate, self.hidden)]
        return list(dict.fromkeys(pairs))

    def token_counts(self) -> list[int]:
        """Row counts a layer's products run at: the verification's and the loop's, none whose
        widest activation passes MAX_ELEMENTS."""
        widest = max(out for out, _ in self.products())
        return [SMALL_BATCH[0] * SMALL_BATCH[1], *(n for n in LARGE_TOKENS if n * widest <= MAX_ELEMENTS)]

    def head_product(self) -> tuple[int, int] | None:
        """(out, in) of a logprob head's product: the vocabulary padded as the task pads it; it runs
        at most LOGITS_CHUNK_TOKENS rows at a time."""
        return (-(-self.vocab // HEAD_ALIGN) * HEAD_ALIGN, self.hidden) if self.vocab else None


def enabled(env: Mapping[str, str] | None = None) -> bool:
    return envs.choice(envs.KERNEL_WARMUP, ("on", "off"), "on", env) == "on"


def _positive(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def plan_from_config(raw: dict, task: str) -> KernelPlan | None:
    """The widths of a config.json's text model (None where it lacks a hidden width or a head
    count, or they do not divide: nothing to warm up)."""
    text = config_text(raw)
    hidden = _positive(text.get("hidden_size") or text.get("d_model") or text.get("n_embd") or text.get("dim"))
    heads = _positive(text.get("num_attention_heads") or text.get("n_head") or text.get("n_heads"))
    if hidden is None or heads is None:
        return None
    head_dim = _positive(text.get("head_dim")) or (hidden // heads if hidden % heads == 0 else None)
    if head_dim is None:
        return None
    kv_heads = _positive(text.get("num_key_value_heads")) or heads
    if heads % kv_heads:
        kv_heads = heads
    intermediate = (_positive(text.get("intermediate_size") or text.get("ffn_dim") or text.get("n_inner") or text.get("hidden_dim"))
                    or 4 * hidden)
    vocab = _positive(text.get("vocab_size")) if task == "logprob" else None
    return KernelPlan(hidden, heads, kv_heads, head_dim, intermediate, vocab)


def _attention(torch, plan: KernelPlan, rows: int, length: int, device, dtype) -> None:
    """SDPA as transformers' layers call it: the key and value heads repeated to the query's, a
    padding mask (the memory-efficient kernel), and causal without a mask (flash)."""
    functional = torch.nn.functional
    q = torch.zeros(rows, plan.heads, length, plan.head_dim, device=device, dtype=dtype)
    kv = torch.zeros(rows, plan.kv_heads, length, plan.head_dim, device=device, dtype=dtype)
    repeated = kv[:, :, None].expand(rows, plan.kv_heads, plan.heads // plan.kv_heads, length, plan.head_dim)
    repeated = repeated.reshape(rows, plan.heads, length, plan.head_dim)
    positions = torch.arange(length, device=device)
    mask = (positions[None, :] <= positions[:, None])[None, None] & (positions < length - 1)[None, None, None]
    mask = mask.expand(rows, 1, length, length)
    with sdpa_order(device.type):
        functional.scaled_dot_product_attention(q, repeated, repeated, attn_mask=mask)
        functional.scaled_dot_product_attention(q, repeated, repeated, is_causal=True)


def _elementwise(torch, plan: KernelPlan, tokens: int, device, dtype) -> None:
    """The steps around the products: embedding lookup, RMSNorm and LayerNorm, activations,
    rotary, pooling and normalizing, a logprob head's log-softmax and gather, the finite check."""
    functional = torch.nn.functional
    ids = torch.arange(tokens, device=device) % 1000
    x = functional.embedding(ids, torch.zeros(1000, plan.hidden, device=device, dtype=dtype)).reshape(1, tokens, plan.hidden)
    weight = torch.ones(plan.hidden, device=device, dtype=dtype)
    values = x.float()
    normed = weight * (values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    normed = functional.layer_norm(normed, (plan.hidden,), weight, weight)
    gate = normed.repeat(1, 1, 2)
    _ = (functional.silu(gate) * gate + functional.gelu(gate) + functional.gelu(gate, approximate="tanh")).tanh()
    half = plan.head_dim // 2
    angles = torch.arange(tokens, device=device, dtype=torch.float32)[None, :, None] * torch.ones(half, device=device)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    rotated = normed[..., : plan.head_dim]
    _ = rotated * cos + torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1) * sin
    lengths = torch.ones(1, 1, device=device).clamp(min=1e-9)
    pooled = (normed * torch.ones(1, tokens, 1, device=device, dtype=dtype)).sum(1) / lengths
    _ = functional.normalize(pooled.float(), p=2, dim=-1)
    logits = normed.reshape(tokens, plan.hidden).float()
    picked = logits.gather(1, ids[:, None] % plan.hidden)[:, 0] - torch.logsumexp(logits, dim=-1)
    torch.zeros(1, device=device).index_add_(0, torch.zeros(tokens, dtype=torch.long, device=device), picked)
    torch.isfinite(logits).all().item()


def run(plan: KernelPlan, device, dtype) -> dict:
    """Run `plan`'s kernels on `device` (a torch.device) in `dtype` (a torch dtype); each step's
    seconds ("products_s", "attention_s", "elementwise_s") or the first line of the error that
    stopped it ("<step>_error": the shard goes on without it)."""
    import torch

    detail: dict = {}

    def step(name: str, work) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                work()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            detail[f"{name}_s"] = time.perf_counter() - started
        except Exception as e:  # noqa: BLE001 - a warm-up that fails costs the shard nothing but its first loads
            text = str(e).strip().splitlines()
            detail[f"{name}_error"] = f"{type(e).__name__}: {text[0] if text else ''}"[:300]

    def products() -> None:
        linear = torch.nn.functional.linear
        weights = {(out, width): torch.zeros(out, width, device=device, dtype=dtype) for out, width in plan.products()}
        for tokens in plan.token_counts():
            inputs = {width: torch.zeros(tokens, width, device=device, dtype=dtype) for _, width in weights}
            for (out, width), weight in weights.items():
                linear(inputs[width], weight)
            del inputs
        head = plan.head_product()
        if head is not None:
            weight = torch.zeros(*head, device=device, dtype=dtype)
            for tokens in (SMALL_BATCH[0] * SMALL_BATCH[1], LOGITS_CHUNK_TOKENS):
                linear(torch.zeros(tokens, head[1], device=device, dtype=dtype), weight)

    def attention() -> None:
        _attention(torch, plan, *SMALL_BATCH, device, dtype)
        for tokens in plan.token_counts()[1:]:
            _attention(torch, plan, tokens // LARGE_LENGTH, LARGE_LENGTH, device, dtype)

    step("products", products)
    step("attention", attention)
    step("elementwise", lambda: _elementwise(torch, plan, SMALL_BATCH[0] * SMALL_BATCH[1], device, dtype))
    if device.type == "cuda":  # the model's load finds the device's memory as it would have without the warm-up
        torch.cuda.empty_cache()
    return detail
