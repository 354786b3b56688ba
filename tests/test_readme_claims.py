"""What the README says holds: every command takes --json, the files its examples read ship with
the repository, and install hints are printed as written."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import typer

from attnfallback.cli.app import build_app, main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def leaf_commands(command, path=()):
    """(path, click command) of every command that runs something, sub-commands included."""
    children = getattr(command, "commands", None)
    if not children:
        yield path, command
        return
    for name, child in children.items():
        yield from leaf_commands(child, (*path, name))


def test_every_command_takes_json():
    root = typer.main.get_command(build_app())
    missing = [" ".join(path) for path, command in leaf_commands(root)
               if not any("--json" in getattr(p, "opts", ()) for p in command.params)]
    assert missing == []


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory) -> Path:
    from events_helpers import write_known_fleet

    directory = tmp_path_factory.mktemp("json-fleet")
    write_known_fleet(directory)
    return directory


@pytest.mark.parametrize("args", [("summary",), ("fallbacks",), ("runs",), ("sql", "SELECT count(*) AS n FROM shards")])
def test_events_json_is_format_json(fleet_dir, capsys, args):
    name, *rest = args
    assert main(["events", name, str(fleet_dir), *rest, "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["events", name, str(fleet_dir), *rest, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected and expected
    assert main(["events", name, str(fleet_dir), *rest, "--json", "--format", "csv"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_events_plot_json_names_the_file(fleet_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["events", "plot", str(fleet_dir), "--out", str(tmp_path / "rate.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"wrote": str(tmp_path / "rate.png")}


def test_the_ray_install_hint_survives_the_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["score", "--help"]) == 0
    assert "pip install attnfallback[ray]" in capsys.readouterr().out


def readme_inputs() -> list[str]:
    """Every file the README's examples read: `--input X` and `input = "X"`."""
    text = README.read_text(encoding="utf-8")
    found = re.findall(r"--input\s+(\S+)", text) + re.findall(r'^input\s*=\s*"([^"]+)"', text, re.M)
    return sorted({shlex.split(f)[0] for f in found if not f.startswith(("FILE", "<"))})


def test_the_files_the_readme_examples_read_are_there():
    inputs = readme_inputs()
    assert "examples/texts.jsonl" in inputs
    for name in inputs:
        path = REPO / name
        if name.startswith("src/attnfallback/data/"):
            assert path.is_file(), name
        else:
            assert path.is_file() and path.stat().st_size > 0, f"the README reads {name}, which the repository lacks"
    rows = [json.loads(line) for line in (REPO / "examples" / "texts.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and all(isinstance(r["text"], str) and r["text"].strip() for r in rows)
