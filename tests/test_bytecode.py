"""The bytecode cache (bytecode.py): an image whose torch has no compiled bytecode, and whose
interpreter will not write it, gets it under $ATTNFALLBACK_CACHE/bytecode, written by the first
process and read by the next. Each case runs in a fresh interpreter whose `torch` is a stand-in
package without bytecode."""

from __future__ import annotations

import compileall
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

PROGRAM = """
import json, sys
from attnfallback.bytecode import use_bytecode_cache
used = use_bytecode_cache()
import torch
print(json.dumps({"used": used, "cached": torch.__cached__, "stand_in": torch.STAND_IN, "prefix": sys.pycache_prefix}))
"""


@pytest.fixture
def image(tmp_path):
    """A stand-in torch without bytecode, as an image installed with --no-compile."""
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("STAND_IN = True\n")
    return site


def run(site: Path, cache: Path, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTNFALLBACK_", "PYTHONPYCACHEPREFIX"))}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{SRC}", PYTHONDONTWRITEBYTECODE="1", ATTNFALLBACK_CACHE=str(cache), **env_extra)
    proc = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stand_in"] is True
    return out


def test_bytecode_is_written_under_the_cache_then_read(image, tmp_path):
    cache = tmp_path / "cache"
    first = run(image, cache)
    assert first["used"] == str(cache / "bytecode")
    compiled = Path(first["cached"])
    assert compiled.is_file() and compiled.is_relative_to(cache / "bytecode")
    assert not (image / "torch" / "__pycache__").exists()  # nothing written beside the image's sources
    stamp = compiled.stat().st_mtime_ns
    second = run(image, cache)
    assert second["cached"] == first["cached"] and compiled.stat().st_mtime_ns == stamp  # read, not written again


def test_an_image_with_bytecode_is_left_as_it_is(image, tmp_path):
    compileall.compile_dir(str(image), quiet=1)
    out = run(image, tmp_path / "cache")
    assert out["used"] is None and out["prefix"] is None
    assert not (tmp_path / "cache" / "bytecode").exists()


def test_an_interpreter_that_writes_bytecode_itself_is_left_as_it_is(image, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNFALLBACK_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(PYTHONPATH=f"{image}{os.pathsep}{SRC}", ATTNFALLBACK_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["used"] is None, proc.stderr


@pytest.mark.parametrize("env_extra", [{"ATTNFALLBACK_BYTECODE": "off"}, {"PYTHONPYCACHEPREFIX": "OWN"}])
def test_off_or_the_users_own_prefix_wins(image, tmp_path, env_extra):
    env_extra = {k: (str(tmp_path / "own") if v == "OWN" else v) for k, v in env_extra.items()}
    out = run(image, tmp_path / "cache", **env_extra)
    assert out["used"] is None
    assert not (tmp_path / "cache" / "bytecode").exists()


def test_on_uses_the_cache_even_where_bytecode_exists(image, tmp_path):
    compileall.compile_dir(str(image), quiet=1)
    out = run(image, tmp_path / "cache", ATTNFALLBACK_BYTECODE="on")
    assert out["used"] == str(tmp_path / "cache" / "bytecode")


def test_the_command_line_turns_it_on_for_itself_and_its_children(image, tmp_path):
    cache = tmp_path / "cache"
    program = ("import os, sys; from attnfallback.cli.app import main; code = main(['--help']); "
               "print(os.environ.get('PYTHONPYCACHEPREFIX'), sys.pycache_prefix, os.environ.get('PYTHONDONTWRITEBYTECODE'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNFALLBACK_")}
    env.update(PYTHONPATH=f"{image}{os.pathsep}{SRC}", PYTHONDONTWRITEBYTECODE="1", ATTNFALLBACK_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"{cache / 'bytecode'} {cache / 'bytecode'} None"


PRECOMPILE_PROGRAM = """
import json, sys
from attnfallback import bytecode
bytecode.SHARD_MODULES = {listing!r}
from attnfallback.bytecode import use_bytecode_cache
used = use_bytecode_cache(precompile_min_cores={min_cores})
import importlib.util, pathlib
names = ["torch.nn.functional", "transformers.models.auto.modeling_auto", "transformers.models.llama.modeling_llama", "json.decoder"]
print(json.dumps({{"used": used, "compiled_ahead": {{n: pathlib.Path(importlib.util.cache_from_source(importlib.util.find_spec(n).origin)).is_file() for n in names}}}}))
"""


@pytest.fixture
def big_image(image):
    """A stand-in torch and transformers with submodules, none compiled."""
    for module in ("torch/nn/__init__.py", "torch/nn/functional.py", "transformers/__init__.py",
                   "transformers/models/__init__.py", "transformers/models/auto/__init__.py",
                   "transformers/models/auto/modeling_auto.py", "transformers/models/llama/__init__.py",
                   "transformers/models/llama/modeling_llama.py"):
        path = image / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("VALUE = 1\n")
    return image


# What a shard imports, as bytecode.SHARD_MODULES lists it: a family's modules never are.
LISTED = ["torch", "torch.nn", "torch.nn.functional", "transformers", "transformers.models", "transformers.models.auto",
          "transformers.models.auto.modeling_auto", "transformers.models.llama.modeling_llama", "json", "json.decoder",
          "not_installed.module"]


def precompiled(site: Path, cache: Path, min_cores: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTNFALLBACK_", "PYTHONPYCACHEPREFIX"))}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{SRC}", PYTHONDONTWRITEBYTECODE="1", ATTNFALLBACK_CACHE=str(cache))
    listing = site.parent / "shard_modules.txt"
    listing.write_text("# a comment\n" + "\n".join(LISTED) + "\n")
    program = PRECOMPILE_PROGRAM.format(min_cores=min_cores, listing=str(listing))
    proc = subprocess.run([sys.executable, "-c", program], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_with_cores_to_spare_the_listed_modules_are_compiled_ahead_once_but_model_families(big_image, tmp_path):
    cache = tmp_path / "cache"
    out = precompiled(big_image, cache, min_cores=1)
    assert out["used"] == str(cache / "bytecode")
    assert out["compiled_ahead"] == {"torch.nn.functional": True, "transformers.models.auto.modeling_auto": True,
                                     "transformers.models.llama.modeling_llama": False, "json.decoder": True}
    marks = list((cache / "bytecode").glob(".precompiled-*"))
    assert len(marks) == 1
    stamp = marks[0].stat().st_mtime_ns
    precompiled(big_image, cache, min_cores=1)
    assert [m.stat().st_mtime_ns for m in (cache / "bytecode").glob(".precompiled-*")] == [stamp]  # not again


def test_with_few_cores_imports_compile_as_they_go(big_image, tmp_path):
    out = precompiled(big_image, tmp_path / "cache", min_cores=10_000)
    assert not any(out["compiled_ahead"].values())
    assert not list((tmp_path / "cache" / "bytecode").glob(".precompiled-*"))


def test_bytecode_beside_its_source_is_copied_and_the_rest_compiled(tmp_path, monkeypatch):
    import importlib.util

    from attnfallback.bytecode import precompile

    site = tmp_path / "site"
    for name in ("shipped", "bare"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"NAME = {name!r}\n")
    compileall.compile_dir(str(site / "shipped"), quiet=1)
    monkeypatch.syspath_prepend(str(site))
    prefix = tmp_path / "bytecode"
    prefix.mkdir()
    monkeypatch.setattr(sys, "pycache_prefix", str(prefix))
    facts = precompile(prefix, modules=("shipped", "bare"), workers=2)
    assert facts["copied"] == 1 and facts["compiled"] == 1
    for name in ("shipped", "bare"):
        assert Path(importlib.util.cache_from_source(str(site / name / "__init__.py"))).is_relative_to(prefix)
        assert Path(importlib.util.cache_from_source(str(site / name / "__init__.py"))).is_file()
    assert precompile(prefix, modules=("shipped", "bare"), workers=2) is None  # once


def test_a_cache_that_cannot_be_written_leaves_the_imports_to_compile(tmp_path, monkeypatch, caplog):
    from attnfallback.bytecode import precompile

    (tmp_path / "site" / "stand_in_package").mkdir(parents=True)
    (tmp_path / "site" / "stand_in_package" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setattr(sys, "pycache_prefix", str(not_a_directory / "bytecode"))
    assert precompile(not_a_directory / "bytecode", modules=("stand_in_package",), workers=1) is None
    assert "bytecode not compiled ahead" in caplog.text


def test_module_sources_are_found_without_importing(tmp_path, monkeypatch):
    from attnfallback.bytecode import module_sources

    site = tmp_path / "site"
    (site / "pkg" / "sub").mkdir(parents=True)
    for name in ("pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/leaf.py", "single.py"):
        (site / name).write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(site))
    found = module_sources(["pkg", "pkg.sub", "pkg.sub.leaf", "pkg.missing", "single", "single.attr", "sys", "absent_top"])
    assert found == [str(site / "pkg" / "__init__.py"), str(site / "pkg" / "sub" / "__init__.py"),
                     str(site / "pkg" / "sub" / "leaf.py"), str(site / "single.py")]
    assert "pkg" not in sys.modules


def test_the_shipped_list_is_a_shards_imports():
    from attnfallback.bytecode import FAMILY_MODULE, SHARD_MODULES, shard_modules

    names = shard_modules()
    assert names and SHARD_MODULES.is_file()
    for needed in ("torch", "torch.nn.functional", "transformers", "transformers.modeling_utils",
                   "transformers.models.auto.modeling_auto", "tokenizers", "safetensors", "pyarrow.parquet", "json.decoder",
                   "attnfallback.scoring.pipeline"):
        assert needed in names, needed
    assert not [n for n in names if FAMILY_MODULE.match(n)]
    assert "pandas" not in names  # a shard no longer imports it (arrow_build.py)
