"""A sweep whose shards skip rows: the merged output stays in input order, and the table, the
manifest and the events count rows written and rows skipped per shard and list the skipped lines."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from attnfallback.scoring import ScoreJob, run_score
from attnfallback.sweep.state import merge_outputs

ROWS = 40
BAD = {3, 13, 23, 33}  # empty texts: all in shard 1 of 2


def write_input(path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(ROWS):
            f.write(json.dumps({"key": f"x{i}", "text": "" if i in BAD else f"sentence {i} of the input"}) + "\n")
    return path


def test_merge_keeps_input_order_when_rows_are_skipped(tiny_bert, tmp_path):
    source = write_input(tmp_path / "in.jsonl")
    common = dict(model=str(tiny_bert), input=str(source), id_column="key", on_bad_row="skip", device="cpu", quiet=True,
                  prefer=["eager"], part_rows=8)
    outputs = []
    for i in range(2):
        out = tmp_path / f"{i}-of-2.parquet"
        run_score(ScoreJob(output=str(out), shard=f"{i}/2", **common))
        outputs.append(out)
    merged = merge_outputs(outputs, tmp_path / "scores.parquet", ids_are_row_numbers=False)
    assert merged["order"] == "input order (by row number)" and merged["rows"] == ROWS - len(BAD)
    ids = pq.read_table(tmp_path / "scores.parquet").column("id").to_pylist()
    assert ids == [f"x{i}" for i in range(ROWS) if i not in BAD]
    import numpy as np

    single = run_score(ScoreJob(output=str(tmp_path / "single.parquet"), **common))
    assert single.rows_skipped == len(BAD)
    expected, got = pq.read_table(tmp_path / "single.parquet"), pq.read_table(tmp_path / "scores.parquet")
    assert expected.column("id").to_pylist() == ids
    np.testing.assert_allclose(np.asarray(got.column("embedding").to_pylist()),
                               np.asarray(expected.column("embedding").to_pylist()), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def skipping_sweep(tmp_path_factory):
    from attnfallback.sweep.config import load_config
    from attnfallback.sweep.local import run_local

    base = tmp_path_factory.mktemp("sweep-skip")
    write_input(base / "in.jsonl")
    (base / "sweep.toml").write_text("""
output = "out"
run_id = "skip-1"
shards = 2
workers = 2
devices = "cpu"
model = "default"
input = "in.jsonl"
id_column = "key"
on_bad_row = "skip"
prefer = ["sdpa", "eager"]
""")
    config = load_config(base / "sweep.toml")
    return base, config, run_local(config)


def test_sweep_merges_in_input_order_with_skipped_rows(skipping_sweep):
    _, _, result = skipping_sweep
    assert result.exit_code == 0, [j.error_text for j in result.failed]
    merged = result.merged["main"]
    assert merged["order"] == "input order (by row number)"
    assert pq.read_table(merged["path"]).column("id").to_pylist() == [f"x{i}" for i in range(ROWS) if i not in BAD]


def test_sweep_table_and_manifest_show_written_and_skipped_per_shard(skipping_sweep, capsys):
    from attnfallback.cli.sweep import render_sweep, shard_rows

    base, _, result = skipping_sweep
    rows = {r["shard"]: r for r in shard_rows(result)}
    assert (rows["0/2"]["rows"], rows["0/2"]["skipped"]) == (20, 0)
    assert (rows["1/2"]["rows"], rows["1/2"]["skipped"]) == (16, 4)
    render_sweep(result)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("shard"))
    assert "rows" in header.split() and "skipped" in header.split()
    assert "1/2: 4 row(s) skipped, lines 4, 14, 24, 34" in out
    manifest = json.loads((base / "out" / "sweep.json").read_text())
    assert (manifest["jobs"]["main/1/2"]["rows"], manifest["jobs"]["main/1/2"]["skipped"]) == (16, 4)


def test_events_runs_count_rows_written_not_rows_in(skipping_sweep):
    pytest.importorskip("duckdb")
    from attnfallback.events import open_log

    _, config, _ = skipping_sweep
    with open_log(config.events) as log:
        (run,) = log.runs().to_pylist()
        shards = {s["shard"]: s for s in log.shards().to_pylist()}
    assert (run["rows"], run["skipped"]) == (ROWS - len(BAD), len(BAD))
    assert (shards["1/2"]["rows"], shards["1/2"]["skipped"], shards["1/2"]["rows_in"]) == (16, 4, 20)
