"""The Python API as a transformers user expects it: policy names, auto classes as classes, a
drop-in `from_pretrained`, and type information shipped with the package."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest

import attnfallback
from attnfallback.errors import UnknownNameError, UsageError
from attnfallback.loader import load_model
from attnfallback.policy import Mode


def test_load_model_takes_a_policy_name_and_an_auto_class_as_a_class(tiny_qwen2):
    import transformers

    loaded = load_model(tiny_qwen2, policy="strict", prefer=["eager"], auto_class=transformers.AutoModelForCausalLM, device="cpu")
    assert loaded.decision.policy.mode is Mode.STRICT and loaded.decision.used == "eager"
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    by_name = load_model(tiny_qwen2, policy="graceful", prefer="sdpa,eager", auto_class="AutoModelForCausalLM", device="cpu")
    assert by_name.decision.policy.mode is Mode.GRACEFUL and type(by_name.model) is type(loaded.model)


def test_load_model_refuses_an_unknown_policy_name_or_a_class_that_is_not_transformers():
    with pytest.raises(UnknownNameError, match="graceful, strict, fastest"):
        load_model("default", policy="lenient")
    with pytest.raises(UsageError, match="auto_class must be a transformers auto class"):
        load_model("default", auto_class=dict)


def test_from_pretrained_is_a_drop_in_with_the_decision_attached():
    import torch
    from transformers import BertModel

    model = attnfallback.from_pretrained("default", attn_implementation=["flash_attention_2", "eager"], dtype=torch.float32,
                                         device_map="cpu")
    assert isinstance(model, BertModel) and not model.training
    decision = model.attnfallback_decision
    assert decision.requested == "flash_attention_2" and decision.used == "eager" and decision.fell_back
    assert model.config._attn_implementation == "eager"
    one = attnfallback.from_pretrained("default", attn_implementation="sdpa", policy="strict", device="cpu")
    assert one.attnfallback_decision.used == "sdpa" and one.attnfallback_decision.policy.mode is Mode.STRICT


def test_from_pretrained_passes_config_attributes_and_refuses_what_it_cannot_honour(tiny_bert):
    from attnfallback.errors import NewHeadError

    with pytest.raises(NewHeadError):  # a classifier on an encoder checkpoint: a random head
        attnfallback.from_pretrained(tiny_bert, auto_class="AutoModelForSequenceClassification", num_labels=1, device="cpu")
    model = attnfallback.from_pretrained(tiny_bert, auto_class="AutoModelForSequenceClassification", num_labels=1,
                                         allow_new_head=True, device="cpu")
    assert model.config.num_labels == 1 and model.classifier.out_features == 1
    with pytest.raises(UsageError, match="device_map must name one device"):
        attnfallback.from_pretrained(tiny_bert, device_map={"": 0})


def test_the_package_ships_py_typed():
    assert (resources.files("attnfallback") / "py.typed").is_file()
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["attnfallback"]
