"""Shared fixtures: tiny random models built from configs (no hub), and CUDA detection for `gpu` tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Variables that steer a run from the environment; a developer's shell must not leak them into
# tests (ATTNFALLBACK_DEFAULT_MODEL_DIR is kept: a GPU image without the package needs it).
AMBIENT_VARS = ("ATTNFALLBACK_EVENTS", "ATTNFALLBACK_POLICY", "ATTNFALLBACK_PREFER", "ATTNFALLBACK_RUN_ID", "ATTNFALLBACK_SHARD",
                "ATTNFALLBACK_FUSED")


@pytest.fixture(autouse=True)
def _isolated_from_the_environment(monkeypatch):
    """No ambient policy or events location, and no default event sink left by a test."""
    for var in AMBIENT_VARS:
        monkeypatch.delenv(var, raising=False)
    # in-process runs of the command line must not redirect this interpreter's bytecode
    # (test_bytecode.py turns it on in its own processes)
    monkeypatch.setenv("ATTNFALLBACK_BYTECODE", "off")
    yield
    from attnfallback.events import set_default_sink

    set_default_sink(None)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from attnfallback.model_facts import default_model_path

    return default_model_path()


def build_tiny_model(directory: Path, kind: str = "bert", **overrides) -> Path:
    """A 2-layer random model of the given kind, saved with the MiniLM tokenizer (vocab 30522)."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
    )

    from attnfallback.model_facts import default_model_path

    torch.manual_seed(0)
    if kind.startswith("bert"):
        cfg = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=512)
        cfg.update(overrides)
        config = BertConfig(**cfg)
        model = BertForSequenceClassification(config) if kind == "bert-classify" else BertModel(config)
    else:
        cfg = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=2048, pad_token_id=0)
        cfg.update(overrides)
        config = Qwen2Config(**cfg)
        model = Qwen2ForSequenceClassification(config) if kind == "qwen2-classify" else Qwen2ForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    try:
        src = default_model_path()
    except Exception:  # an image without the embedded model: a model without a tokenizer still loads
        return directory
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def nan_bert(tmp_path_factory) -> Path:
    """A tiny sentence-transformers BERT whose token "piano" embeds as NaN: rows holding it give NaN."""
    from scoring_helpers import add_sentence_config, poison_token

    model_dir = add_sentence_config(build_tiny_model(tmp_path_factory.mktemp("nan-bert"), "bert"))
    poison_token(model_dir, "piano")
    return model_dir
