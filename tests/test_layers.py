"""The package's layers: every module imports only from those below it.

LAYERS lists the modules bottom up; within a layer, a module may import those listed before it.
Every import counts, those inside functions included (a lazy import that climbs a layer is a
cycle waiting to happen), so the order is also a proof that the import graph has no cycle.
A new module must be placed here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "attnfallback"

LAYERS: list[tuple[str, list[str]]] = [
    ("leaves", ["version", "errors", "envs", "atomic", "arrow_build", "task_names", "data", "policy", "sharding", "bytecode", "lean_imports",
                "fused_triton", "fused_ops",
                "kernel_variants", "sdpa_order", "kernel_warmup", "scoring.limits"]),
    ("facts", ["catalog", "caps", "model_facts", "heads", "events.schema", "events.sink", "events.query", "events"]),
    ("pure decisions", ["impls", "planner", "batching", "decision"]),
    ("one attempt", ["verify"]),
    ("measuring", ["measure", "kernels_seen"]),
    ("choosing", ["fastest"]),
    ("loading", ["loader", "pretrained", "st_compat"]),
    ("scoring", ["scoring.inputs", "scoring.st_config", "scoring.tokenize", "scoring.collate", "scoring.tasks",
                 "scoring.tokenizer_process", "scoring.writer", "scoring.chunks", "scoring.trial", "scoring.pipeline",
                 "scoring.job", "scoring"]),
    ("over scoring", ["bench", "parity"]),
    ("sweeps", ["sweep.config", "sweep.state", "sweep.local", "sweep.ray_engine", "sweep.engines", "sweep.demo", "sweep"]),
    ("command line", ["cli.common", "cli.probe", "cli.plan", "cli.load", "cli.bench", "cli.parity", "cli.events",
                      "cli.score", "cli.sweep", "cli.demo", "cli.app", "cli"]),
    ("the package's front", [""]),
]


def _name(module: str) -> str:
    return f"{PACKAGE}.{module}" if module else PACKAGE


ORDER = {_name(m): i for i, m in enumerate(m for _, modules in LAYERS for m in modules)}
LAYER_OF = {_name(m): layer for layer, modules in LAYERS for m in modules}


def module_of(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = SOURCE.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(module of the package imported, line) for every import in the file, function bodies included."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            found += [(name, node.lineno) for name in submodules or [target]]
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


SOURCES = sorted((SOURCE / PACKAGE).rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = sorted(module_of(p) for p in SOURCES if module_of(p) not in ORDER)
    missing = sorted(name for name in ORDER if not _is_module(name))
    assert not unplaced, f"modules not in tests/test_layers.py's LAYERS: {unplaced}"
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


def test_no_import_climbs_a_layer():
    upward = []
    for path in SOURCES:
        module = module_of(path)
        for target, line in imports_of(path):
            if target in ORDER and module in ORDER and ORDER[target] >= ORDER[module] and target != module:
                upward.append(f"{path.relative_to(SOURCE)}:{line}: {module} ({LAYER_OF[module]}) imports {target} "
                              f"({LAYER_OF[target]})")
    assert not upward, "imports that climb:\n" + "\n".join(upward)


@pytest.mark.parametrize("source,expected", [
    ("from attnfallback.loader import load_model\n", ["attnfallback.loader"]),
    ("def f():\n    from attnfallback import fastest, envs\n", ["attnfallback.fastest", "attnfallback.envs"]),
    ("from . import writer\n", ["attnfallback.scoring.writer"]),
    ("from ..loader import load_model\n", ["attnfallback.loader"]),
    ("import attnfallback.verify as verify\n", ["attnfallback.verify"]),
    ("import torch\n", []),
])
def test_the_walker_sees_every_form_of_import(tmp_path, monkeypatch, source, expected):
    path = SOURCE / PACKAGE / "scoring" / "job.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert [name for name, _ in imports_of(path)] == expected


def _code_strings(path: Path) -> list[tuple[str, int]]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.value, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_every_variable_of_ours_is_named_in_envs_alone():
    import re

    from attnfallback import envs

    name = re.compile(r"ATTNFALLBACK_[A-Z0-9_]+")
    elsewhere = [f"{p.relative_to(SOURCE)}:{line}: {text}" for p in SOURCES if p.name != "envs.py"
                 for text, line in _code_strings(p) if name.fullmatch(text)]
    assert not elsewhere, "variables named outside envs.py:\n" + "\n".join(elsewhere)
    named = {v for k, v in vars(envs).items() if k.isupper() and isinstance(v, str) and name.fullmatch(v)}
    undocumented = sorted(v for v in named if v not in envs.__doc__)
    assert named and not undocumented, f"envs.py's table lacks {undocumented}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
    # a private name is the module's own business: a name another module needs is public, with a docstring
    crossing = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        bound = {}  # local name -> module of the package it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE) and not node.level:
                for alias in node.names:
                    if _private(alias.name):
                        crossing.append(f"{path.relative_to(SOURCE)}:{node.lineno}: from {node.module} import {alias.name}")
                    if _is_module(f"{node.module}.{alias.name}"):
                        bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE) and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and bound[node.value.id] != module_of(path)):
                crossing.append(f"{path.relative_to(SOURCE)}:{node.lineno}: {node.value.id}.{node.attr} ({bound[node.value.id]})")
    assert not crossing, "private names used across modules:\n" + "\n".join(crossing)
