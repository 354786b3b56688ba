"""load_sentence_transformer / load_cross_encoder: the library's own objects, the transformer
inside loaded once, through the fallback, with the decision attached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnfallback import load_cross_encoder, load_sentence_transformer
from attnfallback.errors import AttentionUnavailable
from attnfallback.policy import Policy
from conftest import build_tiny_model
from scoring_helpers import read_events, seeded_texts


@pytest.fixture
def weight_reads(monkeypatch):
    """Every from_pretrained of a model class, by anyone (loader or sentence-transformers)."""
    from transformers import PreTrainedModel

    calls = []
    real = PreTrainedModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(cls.__name__)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    return calls


def test_sentence_transformer_through_the_fallback_reads_weights_once_and_encodes_the_same(weight_reads, tmp_path):
    from sentence_transformers import SentenceTransformer

    from attnfallback.model_facts import default_model_path

    st = load_sentence_transformer("default", Policy.graceful(["flash_attention_2", "eager"]), device="cpu", events=tmp_path, run_id="st")
    assert isinstance(st, SentenceTransformer)
    assert weight_reads == ["BertModel"]
    d = st.attn_decision
    assert d.requested == "flash_attention_2" and d.used == "eager" and d.fell_back
    assert st[0].model.config._attn_implementation == "eager"
    texts = seeded_texts(12, seed=2)
    plain = SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)
    ours = st.encode(texts, convert_to_numpy=True)
    assert np.abs(ours - plain.encode(texts, convert_to_numpy=True)).max() < 1e-5
    assert st.get_max_seq_length() == plain.get_max_seq_length() == 256
    (event,) = read_events(tmp_path)
    assert event["event"] == "attn_impl" and event["used"] == "eager" and event["run_id"] == "st"


def test_strict_policy_fails_before_sentence_transformers_builds_anything(weight_reads):
    with pytest.raises(AttentionUnavailable) as e:
        load_sentence_transformer("default", "strict", prefer=["flash_attention_2"], device="cpu")
    assert e.value.exit_code == 3 and weight_reads == []


def test_cross_encoder_through_the_fallback(tmp_path, weight_reads):
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = build_tiny_model(tmp_path / "ce", "bert-classify", num_labels=1)
    weight_reads.clear()
    ce = load_cross_encoder(model_dir, Policy.graceful(["sdpa"]), device="cpu")
    assert isinstance(ce, CrossEncoder) and weight_reads == ["BertForSequenceClassification"]
    assert ce.attn_decision.used == "sdpa"
    pairs = [("a man plays guitar", "someone makes music"), ("the dog runs", "a red apple")]
    scores = ce.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        want = [model(**tok(a, b, return_tensors="pt")).logits[0, 0].item() for a, b in pairs]
    assert np.abs(np.asarray(scores).reshape(-1) - np.array(want)).max() < 1e-5
