"""The fault table: each fault test registers one row (fault or input, how injected, expected).

    @fault("SIGKILL of an event writer", how="...", expected="...")
    def test_event_writer_killed(observe): ...

    @fault_cases(Case("json", "malformed JSON", how="...", expected="...", params=(...)), ...)
    def test_hostile_input(case, observe): ...     # one row per case

docs/reliability.md is generated from these rows (report.py) and checked against them
(test_reliability_doc.py); the observed column is what the last generating run saw, recorded by
each test through the `observe` fixture.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = REPO_ROOT / "docs" / "reliability.md"
GROUPS = ("fault", "input")  # table sections, in this order
GROUP_TITLES = {"fault": "Faults", "input": "Hostile or broken input"}


@dataclass(frozen=True)
class Fault:
    """One row of the table; `test` is the pytest node id (`file::function[case]`)."""

    name: str
    how: str
    expected: str
    test: str
    group: str = "fault"


@dataclass(frozen=True)
class Case:
    """One parametrized case of a test function, with its own row."""

    id: str
    name: str
    how: str
    expected: str
    params: tuple = ()
    group: str | None = None
    marks: tuple = field(default=())


_REGISTRY: dict[str, Fault] = {}
_ORDER: list[str] = []


def _node_id(func, case_id: str | None = None) -> str:
    path = Path(inspect.getsourcefile(func)).resolve().relative_to(REPO_ROOT).as_posix()
    return f"{path}::{func.__name__}" + (f"[{case_id}]" if case_id else "")


def _register(row: Fault) -> None:
    for text, what in ((row.name, "name"), (row.how, "how"), (row.expected, "expected")):
        if not text or "\n" in text:
            raise ValueError(f"{row.test}: the fault's {what} must be one non-empty line")
    if row.group not in GROUPS:
        raise ValueError(f"{row.test}: unknown group {row.group!r}; valid: {', '.join(GROUPS)}")
    same_name = [f for f in _REGISTRY.values() if f.name == row.name and f.test != row.test]
    if same_name:
        raise ValueError(f"fault name {row.name!r} registered twice: {same_name[0].test} and {row.test}")
    if row.test not in _REGISTRY:
        _ORDER.append(row.test)
    _REGISTRY[row.test] = row  # a module imported twice (pytest and report) registers the same row


def fault(name: str, how: str, expected: str, group: str = "fault"):
    """Register the decorated test as the row (name, how, expected)."""

    def decorate(func):
        _register(Fault(name, how, expected, _node_id(func), group))
        func.fault_rows = [name]
        return func

    return decorate


def fault_cases(*cases: Case, argnames: str = "case", group: str = "input"):
    """Parametrize the decorated test over `cases` (the test gets each Case as `case`, or its
    params unpacked into `argnames`), registering one row per case."""

    def decorate(func):
        names = [n.strip() for n in argnames.split(",")]
        values = []
        for c in cases:
            _register(Fault(c.name, c.how, c.expected, _node_id(func, c.id), c.group or group))
            value = c if names == ["case"] else (c.params if len(names) > 1 else c.params[0])
            values.append(pytest.param(value, id=c.id, marks=c.marks) if len(names) == 1
                          else pytest.param(*value, id=c.id, marks=c.marks))
        func.fault_rows = [c.name for c in cases]
        return pytest.mark.parametrize(argnames, values)(func)

    return decorate


def not_a_fault(func):
    """Mark a test of this package that checks the suite itself (it has no row)."""
    func.fault_rows = []
    return func


def test_modules() -> list[str]:
    """Names of this package's test modules, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("test_"))


def load_all() -> list[Fault]:
    """Import every test module of this package and return the registered rows: grouped as
    GROUPS says, then in module order, then in order of definition."""
    package = __name__.rsplit(".", 1)[0]
    modules = [importlib.import_module(f"{package}.{name}") for name in test_modules()]
    files = [Path(m.__file__).resolve().relative_to(REPO_ROOT).as_posix() for m in modules]
    rank = {f: i for i, f in enumerate(files)}
    rows = [_REGISTRY[t] for t in _ORDER]
    position = {t: i for i, t in enumerate(_ORDER)}
    return sorted(rows, key=lambda r: (GROUPS.index(r.group), rank.get(r.test.split("::")[0], len(rank)), position[r.test]))


def unregistered_tests() -> list[str]:
    """Test functions of this package that neither register a row nor say `not_a_fault`."""
    package = __name__.rsplit(".", 1)[0]
    missing = []
    for name in test_modules():
        module = importlib.import_module(f"{package}.{name}")
        for attr, value in vars(module).items():
            if attr.startswith("test_") and callable(value) and getattr(value, "__module__", None) == module.__name__:
                if not hasattr(value, "fault_rows"):
                    missing.append(f"{name}.{attr}")
    return missing
