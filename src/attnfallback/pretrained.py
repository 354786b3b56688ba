"""A drop-in for transformers' `from_pretrained`: the model, loaded through the fallback.

    import attnfallback
    model = attnfallback.from_pretrained("org/model", attn_implementation=["flash_attention_2", "sdpa"],
                                         auto_class="AutoModelForCausalLM", dtype="bfloat16")
    model.attnfallback_decision.used     # which implementation runs, and why the others did not

`attn_implementation` takes one name, as transformers does, or a list in order of preference.
"""

from __future__ import annotations

import os

from attnfallback.errors import UsageError


def from_pretrained(
    model_id: str | os.PathLike = "default",
    *,
    attn_implementation: str | list[str] | tuple[str, ...] | None = None,
    policy=None,
    auto_class: str | type = "AutoModel",
    dtype=None,
    torch_dtype=None,
    device: str | None = None,
    device_map=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    events: str | os.PathLike | None = None,
    run_id: str | None = None,
    shard: str | None = None,
    allow_new_head: bool = False,
    **model_kwargs,
):
    """Load `model_id` as `auto_class.from_pretrained` would, with the first implementation of
    `attn_implementation` that plans, loads and verifies here (policy graceful unless told
    otherwise: a Policy or "graceful" | "strict" | "fastest"). Returns the transformers model, in
    eval mode on its device, with `.attnfallback_decision` (the Decision) attached.

    `dtype` (or transformers' older `torch_dtype`) is a torch dtype, a name or "auto"; `device` (or
    `device_map` naming one device) "auto", "cpu", "cuda", "cuda:N"; other keyword arguments go to
    transformers' from_pretrained (config attributes such as `num_labels` onto the config)."""
    from attnfallback.loader import load_model
    from attnfallback.policy import parse_dtype

    if dtype is not None and torch_dtype is not None:
        raise UsageError("give dtype or torch_dtype, not both")
    dtype = dtype if dtype is not None else torch_dtype
    if device_map is not None:
        if device is not None:
            raise UsageError("give device or device_map, not both")
        if not isinstance(device_map, str):
            raise UsageError("device_map must name one device (auto, cpu, cuda, cuda:N): the fallback loads the model "
                             f"onto one device; found {device_map!r}")
        device = device_map
    prefer = [attn_implementation] if isinstance(attn_implementation, str) else attn_implementation
    loaded = load_model(model_id, revision=revision, auto_class=auto_class, dtype=parse_dtype(None if dtype is None else str(dtype)),
                        device=device or "auto", policy=policy, prefer=prefer, events=events, run_id=run_id, shard=shard,
                        trust_remote_code=trust_remote_code, model_kwargs=model_kwargs, allow_new_head=allow_new_head)
    model = loaded.model
    model.attnfallback_decision = loaded.decision
    return model
