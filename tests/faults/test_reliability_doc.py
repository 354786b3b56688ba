"""docs/reliability.md cannot drift from the fault suite: its rows are the registered faults, each
row's test exists, and every test of the suite has a row."""

from __future__ import annotations

import importlib
import inspect

from .registry import DOC_PATH, REPO_ROOT, load_all, not_a_fault, unregistered_tests
from .report import COMMAND, parse


def _test_exists(node_id: str) -> bool:
    path, _, name = node_id.partition("::")
    function, _, case = name.partition("[")
    case = case.rstrip("]")
    package = __name__.rsplit(".", 1)[0]
    module = importlib.import_module(f"{package}.{path.rsplit('/', 1)[-1].removesuffix('.py')}")
    if inspect.getsourcefile(module) != str(REPO_ROOT / path):
        return False
    func = getattr(module, function, None)
    if func is None or not callable(func):
        return False
    if not case:
        return True
    ids = [p.id for mark in getattr(func, "pytestmark", []) if mark.name == "parametrize" for p in mark.args[1]]
    return case in ids


@not_a_fault
def test_doc_rows_equal_the_registered_faults():
    assert DOC_PATH.is_file(), f"{DOC_PATH} is missing: run `{COMMAND}`"
    documented = [(r["Fault or input"], r["How injected"], r["Expected"], r["Test"]) for r in parse(DOC_PATH.read_text(encoding="utf-8"))]
    # the doc holds each cell on one line: compare with runs of white space as one space
    registered = [tuple(" ".join(text.split()) for text in (f.name, f.how, f.expected, f.test)) for f in load_all()]
    stale = [r for r in documented if r not in registered]
    missing = [r for r in registered if r not in documented]
    assert not stale and not missing, (f"docs/reliability.md is out of date (run `{COMMAND}`):\n"
                                       f"  rows no test registers: {stale}\n  registered rows not in the doc: {missing}")
    assert documented == registered, f"rows out of order: run `{COMMAND}`"


@not_a_fault
def test_every_row_has_a_test_and_an_observation():
    rows = parse(DOC_PATH.read_text(encoding="utf-8"))
    assert rows
    for row in rows:
        assert _test_exists(row["Test"]), f"{row['Test']} does not exist"
        assert row["Observed"] and row["Observed"] != "not run", f"{row['Test']}: nothing observed"


@not_a_fault
def test_every_fault_test_registers_a_row():
    assert unregistered_tests() == []
