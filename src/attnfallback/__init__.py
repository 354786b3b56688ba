"""attnfallback: portable transformer scorers.

    from attnfallback import load_model, Policy
    loaded = load_model("default", policy=Policy.graceful(prefer=["flash_attention_2", "sdpa", "eager"]))
    loaded.decision.used, loaded.decision.fell_back, loaded.decision.attempts

    import attnfallback                  # or, as with transformers:
    model = attnfallback.from_pretrained("default", attn_implementation=["flash_attention_2", "sdpa"])
    model.attnfallback_decision.used

Nothing heavy happens at import: torch and transformers load when a function needs them.
"""

from __future__ import annotations

from importlib import import_module

from attnfallback.version import __version__

_EXPORTS = {
    "load_model": "attnfallback.loader",
    "from_pretrained": "attnfallback.pretrained",
    "LoadedModel": "attnfallback.loader",
    "Decision": "attnfallback.loader",
    "Attempt": "attnfallback.loader",
    "Policy": "attnfallback.policy",
    "Mode": "attnfallback.policy",
    "AttnImpl": "attnfallback.policy",
    "probe": "attnfallback.caps",
    "DeviceCaps": "attnfallback.caps",
    "SoftwareCaps": "attnfallback.caps",
    "plan": "attnfallback.planner",
    "read_facts": "attnfallback.model_facts",
    "emit_event": "attnfallback.events",
    "load_sentence_transformer": "attnfallback.st_compat",
    "load_cross_encoder": "attnfallback.st_compat",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attnfallback' has no attribute {name!r}")
    return getattr(import_module(module), name)
