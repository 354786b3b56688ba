"""Fixtures of the fault suite: `observe` (what a test saw, for the report's observed column),
the command line in-process, snapshots of directory trees."""

from __future__ import annotations

import re

import pytest

from .tools import CliResult

# A clean environment (no ambient ATTNFALLBACK_* variables, no default event sink left behind)
# comes from tests/conftest.py, whose autouse fixture covers this suite too.


@pytest.fixture
def observe(record_property, tmp_path_factory):
    """`observe("exit 2: ...")`: a note for the observed column of this test's row (temporary
    directories shown as $TMP)."""
    base = str(tmp_path_factory.getbasetemp())

    def note(text: str) -> None:
        text = re.sub(re.escape(base) + r"/[^/\s`']+", "$TMP", str(text))
        record_property("observed", " ".join(text.split()))

    return note


@pytest.fixture
def cli(capsys):
    """Run `attnfallback ARGV...` in this process; returns CliResult(code, out, err)."""
    from attnfallback.cli.app import main

    def run(*argv) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh current directory inside tmp_path (so stray relative writes are seen)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
