"""Does the checkpoint carry the weights of the model that was built from it?

transformers builds whatever model the auto class names and initialises at random every parameter
the checkpoint lacks (its "newly initialized" load report): a classifier head on an embedding
checkpoint, an LM head on an encoder. Outputs of such a model are made up. `check_loaded` turns
transformers' own loading report (`output_loading_info=True`) into a refusal naming the missing
weights and what needed them, unless the user allows a new head; and it refuses a causal LM asked
of a model whose attention is not causal (BERT's LM head predicts masked tokens, not the next one).
"""

from __future__ import annotations

import logging
from attnfallback.errors import NewHeadError

log = logging.getLogger("attnfallback")

MAX_NAMED = 8  # missing weights named in the message; the rest counted
# Parameters the embedding task never reads (it pools the hidden states): a checkpoint saved from
# an MLM or a classifier may lack the pooler, and the embeddings are right all the same.
UNUSED_BY_AUTO_CLASS = {"AutoModel": ("pooler",)}
WHAT_FITS = {
    "AutoModelForSequenceClassification": "a checkpoint trained for it (a *ForSequenceClassification model: a "
                                          "classifier, reward model or cross-encoder)",
    "AutoModelForCausalLM": "a causal language model checkpoint (with its LM head, or embeddings tied to it)",
}


def missing_weights(loading_info: dict | None, auto_class: str) -> tuple[list[str], list[str]]:
    """(missing parameters that matter, missing ones the auto class's use never reads), sorted."""
    names = sorted((loading_info or {}).get("missing_keys") or ())
    unused_roots = UNUSED_BY_AUTO_CLASS.get(auto_class, ())
    unused = [n for n in names if n.split(".", 1)[0] in unused_roots]
    return [n for n in names if n not in unused], unused


def causal_flags(model) -> list[bool]:
    """The `is_causal` flags of the model's attention modules (empty where none carries one)."""
    return [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def _what(task: str | None, auto_class: str) -> str:
    return f"task {task}" if task else auto_class


def check_loaded(model, loading_info: dict | None, *, model_id: str, auto_class: str, task: str | None = None,
                 allow_new_head: bool = False) -> list[str]:
    """Refuse (NewHeadError) a model that the checkpoint does not fully carry, or a "causal LM" that
    is not causal; with `allow_new_head`, only warn. Returns the parameters made up (allowed)."""
    cls = type(model).__name__
    what = _what(task, auto_class)
    if auto_class == "AutoModelForCausalLM":
        flags = causal_flags(model)
        # none causal: an encoder (a multimodal LM's vision tower is not causal, its language model is)
        if flags and not any(flags):
            raise NewHeadError(
                f"{model_id}: {what} needs a causal language model, and {cls} is not one (its attention sees "
                f"the tokens after each position, so it gives no next-token log-probabilities); use {WHAT_FITS[auto_class]}",
                task=task, model_class=cls)
    missing, unused = missing_weights(loading_info, auto_class)
    if unused:
        log.info("%s: the checkpoint has no weights for %s (not used by %s)", model_id, _named(unused), what)
    if not missing:
        return []
    if allow_new_head:
        log.warning("%s: %s initialised at random (allowed by --allow-new-head): %s", model_id, cls, _named(missing))
        return missing
    fits = WHAT_FITS.get(auto_class, "a checkpoint of this architecture")
    raise NewHeadError(
        f"{model_id}: the checkpoint carries no weights for {len(missing)} parameter(s) of {cls} that {what} "
        f"needs ({_named(missing)}); transformers would initialise them at random and every output would be made "
        f"up. Use {fits}, or pass --allow-new-head (allow_new_head=True) if random weights are what you mean",
        missing=missing, task=task, model_class=cls)

