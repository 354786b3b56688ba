"""The query engine: views, summary counts, fallbacks, bad input, read-only SQL."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from events_helpers import KNOWN_MIX, T4_REASON, FleetGroup, decision_fields, expected_by_class, write_fleet, write_known_fleet

from attnfallback.errors import InputError, UsageError
from attnfallback.events import EventSink, open_log
from attnfallback.events.query import check_read_only


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fleet")
    write_known_fleet(directory)
    return directory


@pytest.fixture(scope="module")
def fleet_log(fleet_dir):
    with open_log(fleet_dir) as log:
        yield log


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --- counts -------------------------------------------------------------------------------

def test_summary_by_gpu_class_is_exact(fleet_log):
    expected = expected_by_class(KNOWN_MIX)
    rows = {r["gpu_class"]: r for r in fleet_log.summary().to_pylist()}
    assert set(rows) == set(expected)
    for gpu_class, want in expected.items():
        got = rows[gpu_class]
        assert {k: got[k] for k in ("shards", "fell_back", "strict_failures")} == \
            {k: want[k] for k in ("shards", "fell_back", "strict_failures")}, gpu_class
        assert got["rate"] == pytest.approx(want["rate"], abs=1e-12)
    t4 = rows["T4"]
    assert (t4["top_reason"], t4["top_reason_shards"]) == (T4_REASON, t4["fell_back"] + t4["strict_failures"])
    assert rows["H100"]["top_reason"] is None and rows["H100"]["top_reason_shards"] == 0


def test_shards_view_has_one_row_per_shard_with_work_done(fleet_log):
    shards = fleet_log.shards().to_pylist()
    total = sum(g.shards for g in KNOWN_MIX)
    assert len(shards) == total
    assert len({(s["run_id"], s["shard"]) for s in shards}) == total
    strict = [s for s in shards if s["strict_failure"]]
    assert len(strict) == sum(g.shards for g in KNOWN_MIX if g.strict)
    assert all(s["used"] is None and not s["fell_back"] and not s["done"] and s["rows"] is None for s in strict)
    done = [s for s in shards if s["done"]]
    assert all((s["rows"], s["tokens"], s["seconds"]) == (1000, 64000, 2.5) for s in done)
    assert [s["shard"] for s in shards[:3]] == [f"{i}/{total}" for i in range(3)]  # natural order


def test_summary_by_run_model_and_host(tmp_path):
    write_fleet(tmp_path, [FleetGroup("H100", 6, host="h1", model_id="m/a"),
                           FleetGroup("T4", 4, used="eager", host="h2", model_id="m/b")], run_id="run-a")
    write_fleet(tmp_path, [FleetGroup("T4", 5, used="sdpa", host="h2", model_id="m/a"),
                           FleetGroup("V100", 1, strict=True, host="h3", model_id="m/a")], run_id="run-b")
    log = open_log(tmp_path)
    by_run = {r["run"]: r for r in log.summary(by="run").to_pylist()}
    assert {k: (v["shards"], v["fell_back"], v["strict_failures"]) for k, v in by_run.items()} == \
        {"run-a": (10, 4, 0), "run-b": (6, 5, 1)}
    by_model = {r["model"]: (r["shards"], r["fell_back"]) for r in log.summary(by="model").to_pylist()}
    assert by_model == {"m/a": (12, 5), "m/b": (4, 4)}
    by_host = {r["host"]: r["rate"] for r in log.summary(by="host").to_pylist()}
    assert by_host == {"h1": 0.0, "h2": 1.0, "h3": 0.0}
    runs = {r["run_id"]: r for r in log.runs().to_pylist()}
    assert (runs["run-a"]["shards"], runs["run-a"]["done"], runs["run-a"]["rows"]) == (10, 10, 10_000)
    assert (runs["run-b"]["strict_failures"], runs["run-b"]["gpu_classes"]) == (1, "T4,V100")
    with pytest.raises(UsageError, match="gpu_class"):
        log.summary(by="colour")


def test_fallbacks_list_requested_used_reasons_and_kernels(tmp_path):
    groups = KNOWN_MIX + [FleetGroup("L4", 2, used="kernels-community/flash-attn", kernels=["kernels-community/flash-attn@v1"])]
    write_known_fleet(tmp_path, groups=groups)
    log = open_log(tmp_path)
    rows = log.fallbacks().to_pylist()
    fell = [r for r in rows if r["outcome"] == "fell_back"]
    failed = [r for r in rows if r["outcome"] == "unavailable"]
    assert len(fell) == 12 and len(failed) == 3
    t4 = [r for r in fell if r["gpu_class"] == "T4"]
    assert len(t4) == 10
    assert all((r["requested"], r["used"], r["reason"]) == ("flash_attention_2", "sdpa", T4_REASON) for r in t4)
    assert all(r["reasons"] == [f"flash_attention_2 (plan): {T4_REASON}"] for r in t4)
    assert all(r["kernels"] is None for r in t4)
    l4 = [r for r in fell if r["gpu_class"] == "L4"]
    assert [r["kernels"] for r in l4] == [["kernels-community/flash-attn@v1"]] * 2
    assert all(r["used"] is None and r["policy_mode"] == "strict" for r in failed)
    assert log.fallbacks(include_failures=False).num_rows == 12


def test_a_retried_shard_counts_by_its_latest_decision(tmp_path):
    write_fleet(tmp_path, [FleetGroup("T4", 1, strict=True)], run_id="r", total=1)
    write_fleet(tmp_path, [FleetGroup("T4", 1, used="sdpa")], run_id="r", total=1)  # same shard, later
    (row,) = open_log(tmp_path).summary().to_pylist()
    assert (row["shards"], row["fell_back"], row["strict_failures"]) == (1, 1, 0)


# --- bad input ----------------------------------------------------------------------------

def write_lines(path: Path, lines: list[bytes], newline_at_end: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"\n".join(lines) + (b"\n" if newline_at_end else b"")
    path.write_bytes(data)


def test_malformed_lines_are_skipped_counted_and_located(tmp_path):
    sink = EventSink(tmp_path, run_id="r", shard="0/1")
    good = [json.dumps(sink.emit("shard_start", n=i)).encode() for i in range(3)]
    sink.path.unlink()
    path = tmp_path / "r" / "0-of-1.jsonl"
    write_lines(path, [
        good[0],
        b'{"schema": "attnfallback.event/1", "event": ',   # 2 malformed
        b"",                                                 # 3 blank: ignored
        b"[1, 2, 3]",                                        # 4 not an object
        b'{"schema": "other/1", "event": "x", "run_id": "r", "shard": "0/1"}',  # 5 not ours
        b'{"schema": "attnfallback.event/1", "run_id": "r", "shard": "0/1"}',   # 6 no kind
        b'{"note": "caf\xe9"}',                              # 7 not UTF-8
        good[1],
        good[2],
        b'{"schema": "attnfallback.event/1", "event": "shard_do',  # 10 torn
    ], newline_at_end=False)
    log = open_log(tmp_path)
    assert log.events == 3
    assert [(u.line, u.problem.split(" ")[0]) for u in log.unreadable] == \
        [(2, "malformed"), (4, "not"), (5, "not"), (6, "no"), (7, "invalid"), (10, "torn")]
    assert all(Path(u.path) == path for u in log.unreadable)
    assert log.sql("SELECT list(line ORDER BY line) AS l FROM events").column("l").to_pylist() == [[1, 8, 9]]
    with pytest.raises(InputError) as error:
        open_log(tmp_path, strict_read=True)
    assert (error.value.path, error.value.line) == (str(path), 2)
    assert f"{path}:2" in str(error.value) and "5 more" in str(error.value)


def test_a_torn_line_is_never_an_event(tmp_path):
    sink = EventSink(tmp_path, run_id="r")
    sink.emit("shard_start")
    with open(sink.path, "ab") as handle:
        handle.write(b'{"schema":"attnfallback.event/1","event":"attn_impl","run_id":"r","sha')
    log = open_log(tmp_path)
    assert log.sql("SELECT count(*) AS n FROM events WHERE event IS NULL OR run_id IS NULL").column("n")[0].as_py() == 0
    assert log.sql("SELECT count(*) AS n FROM attn_impl").column("n")[0].as_py() == 0
    assert log.events == 1 and len(log.unreadable) == 1


def test_newer_schema_is_read_for_known_fields_with_a_warning(tmp_path, caplog):
    write_fleet(tmp_path, [FleetGroup("T4", 2, used="sdpa")], run_id="old")
    sink = EventSink(tmp_path, run_id="new", shard="0/1")
    sink.emit("shard_start")
    line = json.loads(sink.path.read_text())
    sink.path.write_text("")
    _, fields = decision_fields(FleetGroup("T4", 1, used="eager"))
    line.update(fields, event="attn_impl", schema="attnfallback.event/2", new_field={"x": 1})
    sink.path.write_text(json.dumps(line) + "\n")
    with caplog.at_level(logging.WARNING, logger="attnfallback.events"):
        log = open_log(tmp_path)
    assert any("attnfallback.event/2" in w for w in log.warnings)
    assert any("attnfallback.event/2" in r.getMessage() for r in caplog.records)
    assert log.unreadable == []
    used = sorted(log.sql("SELECT used FROM attn_impl").column("used").to_pylist())
    assert used == ["eager", "sdpa", "sdpa"]


def test_files_that_are_not_jsonl_are_reported_not_parsed(tmp_path):
    write_fleet(tmp_path, [FleetGroup("H100", 2)], run_id="r")
    event_line = (tmp_path / "r" / "0-of-2.jsonl").read_text().splitlines()[0]
    (tmp_path / "r" / "copy.json").write_text(event_line + "\n")
    (tmp_path / "notes.txt").write_text("hello\n")
    log = open_log(tmp_path)
    assert log.events == 6 and log.files == 2
    assert sorted(Path(s.path).name for s in log.skipped_files) == ["copy.json", "notes.txt"]


def test_missing_or_empty_directories_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        open_log(tmp_path / "nope")
    with pytest.raises(UsageError, match="matches"):
        open_log(str(tmp_path / "nope-*"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no events"):
        open_log(tmp_path / "empty")
    (tmp_path / "empty" / "r").mkdir()
    (tmp_path / "empty" / "r" / "0-of-1.jsonl").write_bytes(b"")
    with pytest.raises(InputError, match="1 .jsonl file"):
        open_log(tmp_path / "empty")
    write_lines(tmp_path / "bad" / "r" / "0.jsonl", [b"{oops"])
    with pytest.raises(InputError, match="unreadable"):
        open_log(tmp_path / "bad")


def test_several_directories_and_globs(tmp_path):
    write_fleet(tmp_path / "a", [FleetGroup("H100", 3)], run_id="run-a")
    write_fleet(tmp_path / "b", [FleetGroup("T4", 2, used="sdpa")], run_id="run-b")
    both = open_log(tmp_path / "a", tmp_path / "b")
    assert both.shards().num_rows == 5
    assert open_log(str(tmp_path / "*")).shards().num_rows == 5
    # The same files reached twice are read once.
    assert open_log(tmp_path, tmp_path / "a", str(tmp_path / "a" / "run-a" / "*.jsonl")).events == 15


# --- read-only SQL ------------------------------------------------------------------------

REFUSED = [
    "COPY (SELECT * FROM events) TO '{out}/x.csv'",
    "COPY events TO '{out}/y.parquet' (FORMAT parquet)",
    "ATTACH '{out}/x.db' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "INSERT INTO events SELECT * FROM events",
    "UPDATE events SET run_id = 'x'",
    "DELETE FROM events",
    "DROP VIEW events",
    "PRAGMA database_list",
    "SET enable_external_access = true",
    "EXPORT DATABASE '{out}/dump'",
    "CALL pragma_version()",
    "SELECT 1; COPY (SELECT 1) TO '{out}/z.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/w.csv'",
    "/* hi */ COPY (SELECT 1) TO '{out}/c.csv'",
    "WITH a AS (SELECT 1) INSERT INTO events SELECT * FROM a",
]


@pytest.mark.parametrize("statement", REFUSED)
def test_writing_statements_are_refused_and_create_nothing(fleet_log, tmp_path, statement):
    out = tmp_path / "out"
    out.mkdir()
    before = files_under(tmp_path)
    with pytest.raises(UsageError, match="refused|one SQL statement"):
        fleet_log.sql(statement.format(out=out))
    assert files_under(tmp_path) == before
    assert fleet_log.sql("SELECT count(*) AS n FROM events").column("n")[0].as_py() == fleet_log.events


def test_the_connection_itself_cannot_touch_files(fleet_log, tmp_path):
    # Statements that pass the check but would read files are stopped by DuckDB's own lock.
    (tmp_path / "secret.csv").write_text("a\n1\n")
    with pytest.raises(UsageError, match="SQL failed"):
        fleet_log.sql(f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')")
    with pytest.raises(Exception):
        fleet_log.con.execute(f"COPY (SELECT 1) TO '{tmp_path / 'direct.csv'}'")
    assert not (tmp_path / "direct.csv").exists()


@pytest.mark.parametrize("statement", [
    "SELECT count(*) FROM shards",
    "  with t as (select * from attn_impl) select used, count(*) from t group by used",
    "DESCRIBE shards",
    "SHOW TABLES",
    "SUMMARIZE attn_impl",
    "EXPLAIN SELECT * FROM events",
    "FROM decisions LIMIT 1",
    "-- a comment\nSELECT 1",
    "(SELECT 1)",
])
def test_reading_statements_run(fleet_log, statement):
    check_read_only(statement)
    assert fleet_log.sql(statement).num_rows >= 1


def test_sql_errors_are_usage_errors(fleet_log):
    with pytest.raises(UsageError, match="SQL"):
        fleet_log.sql("SELECT no_such_column FROM events")
    with pytest.raises(UsageError, match="parse"):
        fleet_log.sql("SELEC 1")
    with pytest.raises(UsageError, match="empty"):
        fleet_log.sql("   ")
