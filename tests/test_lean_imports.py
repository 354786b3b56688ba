"""Transformers' optional imports kept out of reading a model's facts: hidden only when switched
on, importable again after, and a model whose code needs one still loads."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from attnfallback import envs, lean_imports


@pytest.fixture
def probe_package(tmp_path, monkeypatch):
    (tmp_path / "lean_probe_pkg").mkdir()
    (tmp_path / "lean_probe_pkg" / "__init__.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield "lean_probe_pkg"
    sys.modules.pop("lean_probe_pkg", None)


def test_hidden_only_when_switched_on_and_importable_after(probe_package):
    with lean_imports.hidden((probe_package,), env={}) as marked:
        assert marked == [] and importlib.util.find_spec(probe_package) is not None
    with lean_imports.hidden((probe_package,), env={envs.LEAN_IMPORTS: "on"}) as marked:
        assert marked == [probe_package]
        assert importlib.util.find_spec(probe_package) is None
        with pytest.raises(ImportError) as caught:
            importlib.import_module(probe_package)
        assert lean_imports.needed_hidden(caught.value, (probe_package,))
    assert importlib.import_module(probe_package).VALUE == 7


def test_a_package_already_imported_is_left_alone(probe_package):
    module = importlib.import_module(probe_package)
    with lean_imports.hidden((probe_package,), env={envs.LEAN_IMPORTS: "on"}) as marked:
        assert marked == [] and sys.modules[probe_package] is module


def test_needed_hidden_follows_the_chain():
    try:
        try:
            raise ModuleNotFoundError("import of PIL halted; None in sys.modules", name="PIL")
        except ImportError as inner:
            raise RuntimeError("Failed to import transformers.models.x") from inner
    except RuntimeError as outer:
        assert lean_imports.needed_hidden(outer)
    assert not lean_imports.needed_hidden(ModuleNotFoundError("No module named 'foo'", name="foo"))
    assert not lean_imports.needed_hidden(ValueError("bad config"))


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_qwen2"])
def test_a_shard_process_reads_facts_without_the_unused_packages(model, request):
    """A fresh process, as a shard: with the switch on, reading the facts (an encoder's, and a
    causal LM's, whose generation code imports scikit-learn where installed) imports none of them
    and the facts are the same as with it off."""
    path = request.getfixturevalue(model)
    code = ("import json, sys; from attnfallback.model_facts import read_facts; f = read_facts(sys.argv[1]); "
            "print(json.dumps({'cls': f.model_class, 'id': f.identity, "
            f"'loaded': sorted(n for n in {lean_imports.UNUSED_BY_TEXT!r} if n in sys.modules)}}))")
    assert "sklearn" in lean_imports.UNUSED_BY_TEXT
    runs = {}
    for setting in ("on", "off"):
        env = {**os.environ, envs.LEAN_IMPORTS: setting}
        proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["on"]["loaded"] == []
    assert (runs["on"]["cls"], runs["on"]["id"]) == (runs["off"]["cls"], runs["off"]["id"])


def test_a_model_whose_code_needs_a_hidden_package_still_reads(tiny_bert, probe_package, monkeypatch):
    from attnfallback import model_facts

    monkeypatch.setenv(envs.LEAN_IMPORTS, "on")
    monkeypatch.setattr(lean_imports, "UNUSED_BY_TEXT", (probe_package,))
    real = model_facts.model_class_for
    found = []

    def needs_the_package(config, auto_class="AutoModel"):
        try:
            found.append(importlib.import_module(probe_package).VALUE)
        except ImportError as e:
            found.append(None)
            raise RuntimeError("Failed to import the model's code") from e
        return real(config, auto_class)

    monkeypatch.setattr(model_facts, "model_class_for", needs_the_package)
    assert model_facts.read_facts(str(tiny_bert)).model_class == "BertModel"
    assert found == [None, 7]  # hidden on the first try, read again with it visible


def test_other_errors_are_not_retried(tiny_bert, monkeypatch):
    from attnfallback import model_facts

    monkeypatch.setenv(envs.LEAN_IMPORTS, "on")
    calls = []

    def broken(config, auto_class="AutoModel"):
        calls.append(1)
        raise ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn")

    monkeypatch.setattr(model_facts, "model_class_for", broken)
    with pytest.raises(ModuleNotFoundError):
        model_facts.read_facts(str(tiny_bert))
    assert calls == [1]
