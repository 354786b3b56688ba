"""One attempt's primitives: an exception as a reason, the verification forward, switch and verify.

The loader verifies each candidate it loads; the measured choice (fastest.py) and the benchmark
switch a loaded model in place to another implementation and verify it the same way. A reason is
text for the error, the log and the `attn_impl` event; an exception that leaves the device
unusable is never a reason: it propagates, since no other candidate can run after it.
"""

from __future__ import annotations

from attnfallback.errors import is_fatal_device_error
from attnfallback.model_facts import ModelFacts
from attnfallback.sdpa_order import sdpa_order

# Errors a GPU class or a missing kernel explains; anything else is not the attention's fault.
RECOVERABLE = (ValueError, ImportError, RuntimeError, NotImplementedError, AssertionError, TypeError)
VERIFY_BATCH = (2, 8)  # two rows of eight tokens; the second row padded, so masks are exercised


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`: an exception as a reason."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def torch_dtype(name: str):
    """A dtype's name ("bfloat16", "float16", "float32") -> the torch dtype."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def verify_forward(model, facts: ModelFacts, device, inputs_for=None) -> list[str]:
    """A forward pass on a tiny batch; reasons it failed (exception or non-finite output).

    `inputs_for(model, facts) -> (inputs, keep)`: the model's inputs as the caller's own path builds
    them (the scoring task's: pairs with their type ids, its mask form) and the real tokens of its
    outputs; without it, two rows of plain input_ids and attention_mask. Errors it raises (a
    tokenizer that does not match the model) are not the attention's fault: they propagate.
    A CUDA error that leaves the context unusable propagates too: no other candidate can run."""
    import torch

    if inputs_for is None:
        rows, length = VERIFY_BATCH
        vocab = max(facts.vocab_size or 100, 10)
        ids = (torch.arange(rows * length).reshape(rows, length) % (min(vocab, 1000) - 3)) + 3
        mask = torch.ones_like(ids)
        mask[1, length // 2 :] = 0
        inputs, keep = {"input_ids": ids, "attention_mask": mask}, mask.bool()
    else:
        inputs, keep = inputs_for(model, facts)
    try:
        with torch.inference_mode(), sdpa_order(getattr(device, "type", str(device))):
            out = model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()})
    except RECOVERABLE as e:
        if is_fatal_device_error(e):
            raise
        return [f"forward failed: {first_line(e)}"]
    tensor = None
    for name in ("logits", "last_hidden_state"):
        tensor = getattr(out, name, None)
        if tensor is not None:
            break
    if tensor is None:
        tensor = out[0]
    keep = keep.to(device) if keep is not None else None
    if keep is not None and tensor.dim() >= 2 and tensor.shape[:2] == keep.shape:
        tensor = tensor[keep]
    if not torch.isfinite(tensor.float()).all():
        return ["forward produced non-finite outputs (NaN or inf)"]
    return []


def switch_to(loaded, impl: str) -> tuple[str | None, list[str]]:
    """Switch a loaded model in place to `impl` and verify it: (the name transformers runs, reasons it cannot)."""
    try:
        loaded.model.set_attn_implementation(impl)
    except RECOVERABLE as e:
        return None, [f"load failed: {first_line(e)}"]
    reasons = verify_forward(loaded.model, loaded.facts, loaded.device)
    actual = getattr(loaded.model.config, "_attn_implementation", None) or impl
    return actual, reasons
