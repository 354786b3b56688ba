"""sentence-transformers' own objects, with the transformer inside loaded through the fallback.

    from attnfallback import load_sentence_transformer, load_cross_encoder
    st = load_sentence_transformer("default", policy=Policy.strict(["sdpa"]))
    st.encode(["a sentence"])            # the library's SentenceTransformer, unchanged
    st.attn_decision.used                # which attention implementation runs, and why

The weights are read once, by `load_model` (plan, load, verify, `attn_impl` event); while the
library builds its object, its Transformer module is handed that model instead of loading its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

from attnfallback.errors import UsageError

log = logging.getLogger("attnfallback")

_PATCH_LOCK = threading.Lock()


def _transformer_module_class():
    try:
        from sentence_transformers.base.modules.transformer import Transformer
    except ImportError:
        try:
            from sentence_transformers.models import Transformer
        except ImportError:
            raise UsageError("sentence-transformers is not installed: pip install 'attnfallback[st]'") from None
    return Transformer


@contextlib.contextmanager
def _hand_over(model):
    """While active, the first Transformer module built takes `model` instead of reading weights."""
    transformer_cls = _transformer_module_class()
    original = getattr(transformer_cls, "_load_model", None)
    if original is None:
        yield False
        return
    used = []

    def load_preloaded(self, *args, **kwargs):
        if used:
            return original(self, *args, **kwargs)
        used.append(True)
        return model

    with _PATCH_LOCK:
        transformer_cls._load_model = load_preloaded
        try:
            yield used
        finally:
            transformer_cls._load_model = original


def _first_transformer(st_model):
    transformer_cls = _transformer_module_class()
    for module in st_model.modules():
        if isinstance(module, transformer_cls):
            return module
    return None


def _load(kind: str, model, policy, prefer, dtype, device, events, run_id, shard, revision, trust_remote_code, model_kwargs,
          allow_new_head: bool = False, **st_kwargs):
    from attnfallback.loader import load_model
    from attnfallback.policy import as_policy

    policy = as_policy(policy, prefer)
    auto_class = "AutoModel" if kind == "st" else "AutoModelForSequenceClassification"
    extra = dict(model_kwargs or {})
    if kind == "ce" and "num_labels" not in extra:
        from attnfallback.model_facts import read_facts

        facts = read_facts(model, revision=revision, auto_class=auto_class, trust_remote_code=trust_remote_code)
        if not facts.architecture.endswith("ForSequenceClassification"):
            extra["num_labels"] = 1  # what CrossEncoder does for a plain encoder checkpoint
    loaded = load_model(model, revision=revision, auto_class=auto_class, dtype=dtype, device=device, policy=policy,
                        events=events, run_id=run_id, shard=shard, trust_remote_code=trust_remote_code, model_kwargs=extra,
                        allow_new_head=allow_new_head, task="pairs" if kind == "ce" else None)
    ref = loaded.facts.ref
    kwargs: dict[str, Any] = dict(st_kwargs)
    kwargs.setdefault("device", str(loaded.device))
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    if ref.source == "hub":
        kwargs.setdefault("revision", loaded.facts.revision)
    else:
        kwargs.setdefault("local_files_only", True)
    if kind == "st":
        from sentence_transformers import SentenceTransformer as cls
    else:
        from sentence_transformers import CrossEncoder as cls
        if extra.get("num_labels") is not None:
            kwargs.setdefault("num_labels", extra["num_labels"])
    with _hand_over(loaded.model) as used:
        st_model = cls(ref.location, **kwargs)
    module = _first_transformer(st_model)
    if module is not None and getattr(module, "model", None) is not loaded.model:
        # this sentence-transformers version built its module another way: put ours in its place
        log.warning("sentence-transformers loaded its own copy of the weights; replacing it with the verified model")
        module.model = loaded.model
    if not used and module is None:
        log.warning("no Transformer module found in the %s object; attention implementation not guaranteed", cls.__name__)
    st_model.attn_decision = loaded.decision
    st_model.attn_loaded = loaded
    return st_model


def load_sentence_transformer(model: str | os.PathLike = "default", policy=None, *, prefer=None, dtype: str = "auto",
                              device: str = "auto", events=None, run_id: str | None = None, shard: str | None = None,
                              revision: str | None = None, trust_remote_code: bool = False, model_kwargs: dict | None = None,
                              **kw):
    """A `sentence_transformers.SentenceTransformer` whose transformer was loaded through the fallback.

    `policy` is a Policy or a mode name; extra keyword arguments go to SentenceTransformer.
    The decision is on `.attn_decision`.
    """
    return _load("st", model, policy, prefer, dtype, device, events, run_id, shard, revision, trust_remote_code, model_kwargs, **kw)


def load_cross_encoder(model: str | os.PathLike, policy=None, *, prefer=None, dtype: str = "auto", device: str = "auto",
                       events=None, run_id: str | None = None, shard: str | None = None, revision: str | None = None,
                       trust_remote_code: bool = False, model_kwargs: dict | None = None, allow_new_head: bool = False, **kw):
    """A `sentence_transformers.CrossEncoder` whose transformer was loaded through the fallback.

    `policy` is a Policy or a mode name; extra keyword arguments go to CrossEncoder.
    The decision is on `.attn_decision`. A checkpoint without a classifier (a plain encoder) is a
    NewHeadError: its scores would come from a random head; `allow_new_head=True` builds it anyway
    with one label, as CrossEncoder does.
    """
    return _load("ce", model, policy, prefer, dtype, device, events, run_id, shard, revision, trust_remote_code, model_kwargs,
                 allow_new_head, **kw)
