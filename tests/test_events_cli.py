"""`attnfallback events ...` through the CLI main: output formats, exit codes, bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from events_helpers import KNOWN_MIX, T4_REASON, FleetGroup, expected_by_class, write_fleet, write_known_fleet

from attnfallback.cli.app import main


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cli-fleet")
    write_known_fleet(directory)
    return directory


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["events", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_summary_json_matches_the_mix(capsys, fleet_dir):
    code, out, err = run(capsys, "summary", fleet_dir, "--format", "json")
    assert code == 0, err
    rows = {r["gpu_class"]: r for r in json.loads(out)}
    for gpu_class, want in expected_by_class(KNOWN_MIX).items():
        got = rows[gpu_class]
        assert (got["shards"], got["fell_back"], got["strict_failures"]) == \
            (want["shards"], want["fell_back"], want["strict_failures"])
        assert got["rate"] == pytest.approx(want["rate"])
    assert rows["T4"]["top_reason"] == T4_REASON


def test_summary_csv_and_table(capsys, fleet_dir):
    code, out, _ = run(capsys, "summary", fleet_dir, "--format", "csv", "--by", "host")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["host"]: int(r["shards"]) for r in rows} == {"pod-h100": 40, "pod-a6000": 25, "pod-t4": 13}
    code, out, _ = run(capsys, "summary", fleet_dir)
    assert code == 0
    header, rule, *body = out.splitlines()
    assert header.split()[:5] == ["gpu_class", "shards", "fell_back", "rate", "strict_failures"]
    t4 = next(line for line in body if line.startswith("T4"))
    assert t4.split()[1:5] == ["13", "10", "76.9%", "3"]
    assert "78 shards: 10 fell back (12.8%), 3 strict failure(s)" in out


def test_fallbacks_csv_lists_each_shard(capsys, fleet_dir):
    code, out, _ = run(capsys, "fallbacks", fleet_dir, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["outcome"] for r in rows].count("fell_back") == 10
    assert [r["outcome"] for r in rows].count("unavailable") == 3
    assert {(r["requested"], r["used"]) for r in rows if r["outcome"] == "fell_back"} == {("flash_attention_2", "sdpa")}
    assert "kernels" in rows[0] and all(T4_REASON in r["reasons"] for r in rows)
    code, out, _ = run(capsys, "fallbacks", fleet_dir, "--no-failures", "--format", "json")
    assert code == 0 and len(json.loads(out)) == 10


def test_runs_and_sql(capsys, tmp_path):
    write_fleet(tmp_path / "a", [FleetGroup("H100", 3)], run_id="run-a")
    write_fleet(tmp_path / "b", [FleetGroup("T4", 2, used="sdpa")], run_id="run-b")
    code, out, err = run(capsys, "runs", tmp_path / "a", tmp_path / "b", "--format", "json")
    assert code == 0, err
    assert {r["run_id"]: (r["shards"], r["fell_back"]) for r in json.loads(out)} == {"run-a": (3, 0), "run-b": (2, 2)}
    code, out, err = run(capsys, "sql", str(tmp_path / "*"), "SELECT used, count(*) AS n FROM shards GROUP BY used ORDER BY used",
                         "--format", "json")
    assert code == 0, err
    assert json.loads(out) == [{"used": "flash_attention_2", "n": 3}, {"used": "sdpa", "n": 2}]


@pytest.mark.parametrize("statement", [
    "COPY (SELECT * FROM events) TO '{out}/x.csv'",
    "ATTACH '{out}/x.db' AS o",
    "INSTALL httpfs",
    "CREATE TABLE t AS SELECT * FROM events",
])
def test_sql_refuses_writes_with_exit_2(capsys, fleet_dir, tmp_path, statement):
    before = files_under(tmp_path) | files_under(fleet_dir)
    code, out, err = run(capsys, "sql", fleet_dir, statement.format(out=tmp_path))
    assert code == 2
    assert "refused" in err and out == ""
    assert files_under(tmp_path) | files_under(fleet_dir) == before


def test_bad_input_exits_2_with_a_clear_message(capsys, tmp_path):
    code, _, err = run(capsys, "summary", tmp_path / "missing")
    assert code == 2 and "does not exist" in err and str(tmp_path / "missing") in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "fallbacks", tmp_path / "empty")
    assert code == 2 and "no events" in err
    code, _, err = run(capsys, "summary", tmp_path / "empty", "--format", "xml")
    assert code == 2 and "table, json, csv" in err
    code, _, err = run(capsys, "summary", tmp_path / "empty", "--by", "colour")
    assert code == 2 and "gpu_class" in err


def test_torn_lines_are_reported_and_strict_read_fails(capsys, tmp_path):
    paths = write_fleet(tmp_path, [FleetGroup("T4", 3, used="sdpa")], run_id="r")
    with open(paths[1], "ab") as handle:
        handle.write(b'{"schema":"attnfallback.event/1","ev')
    (tmp_path / "README.md").write_text("not events\n")
    code, out, err = run(capsys, "summary", tmp_path, "--format", "json")
    assert code == 0
    assert json.loads(out)[0]["shards"] == 3
    assert f"{paths[1]}:4: torn last line" in err
    assert "README.md: not a .jsonl file" in err
    code, out, err = run(capsys, "summary", tmp_path, "--strict-read")
    assert code == 2 and f"{paths[1]}:4" in err and out == ""


def test_plot_writes_a_png(capsys, fleet_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rates.png"
    code, _, err = run(capsys, "plot", fleet_dir, "--out", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    code, _, err = run(capsys, "plot", fleet_dir, "--out", tmp_path / "rates.txt")
    assert code == 2 and ".png" in err
