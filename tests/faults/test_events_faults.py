"""Faults of the event log: writers killed mid-stream, a torn line followed by a resumed writer,
hostile run ids and shard names, and SQL that tries to write, attach or read files."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .registry import fault
from .tools import snapshot

WRITER = Path(__file__).with_name("event_writer.py")
KILL_SEEDS = 20


def start_writer(directory, run_id, shard, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WRITER), str(directory), run_id, shard, *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def progress_by_writer(directory) -> tuple[dict[str, list[int]], list]:
    """seq numbers of the `progress` events read back, per writer, in file order; unreadable lines."""
    from attnfallback.events import open_log

    with open_log(directory) as log:
        rows = log.sql("SELECT record->>'writer' AS writer, (record->>'seq')::BIGINT AS seq "
                       "FROM events WHERE event = 'progress' ORDER BY file, line").to_pylist()
        unreadable = list(log.unreadable)
    seqs: dict[str, list[int]] = {}
    for r in rows:
        seqs.setdefault(r["writer"], []).append(r["seq"])
    return seqs, unreadable


@pytest.mark.slow
@fault("SIGKILL of event writers",
       how=f"{KILL_SEEDS} seeds x 3 writer processes (two appending to one shard file, one to its own) "
           "SIGKILLed together at a random moment 20-150 ms into the stream",
       expected="every acknowledged (emit returned) event read back once, in order, no gaps; "
                "at most one torn line per file, only as its last line, reported")
def test_event_writers_killed_at_random_moments(tmp_path, observe):
    total_acked = total_read = torn = 0
    for seed in range(KILL_SEEDS):
        rng = random.Random(seed)
        directory = tmp_path / f"seed{seed}"
        writers = {"a": start_writer(directory, "kill", "0/2", "--label", "a"),
                   "b": start_writer(directory, "kill", "0/2", "--label", "b"),
                   "c": start_writer(directory, "kill", "1/2", "--label", "c")}
        first = {label: p.stdout.readline() for label, p in writers.items()}  # all are writing
        assert all(line.strip() == "0" for line in first.values()), first
        time.sleep(rng.uniform(0.02, 0.15))
        for p in writers.values():
            p.send_signal(signal.SIGKILL)
        acked = {}
        for label, p in writers.items():
            out, _ = p.communicate()
            assert p.returncode == -signal.SIGKILL
            acked[label] = [0] + [int(x) for x in out.split()]
        seqs, unreadable = progress_by_writer(directory)
        for label, acks in acked.items():
            got = seqs.get(label, [])
            assert got == list(range(len(got))), f"seed {seed}: writer {label} has gaps or duplicates"
            assert len(got) >= len(acks), f"seed {seed}: writer {label} lost acknowledged events"
            total_acked += len(acks)
            total_read += len(got)
        files = {}
        for item in unreadable:
            files.setdefault(item.path, []).append(item.line)
        for path, lines in files.items():
            assert len(lines) == 1, f"seed {seed}: {path} has {len(lines)} unreadable lines"
            assert lines[0] == len(Path(path).read_bytes().split(b"\n")), f"seed {seed}: torn line not last"
        torn += len(unreadable)
    observe(f"{KILL_SEEDS} seeds: {total_acked} acknowledged events, all read back ({total_read} read, "
            f"none out of order); {torn} torn last line(s) reported")


def tear(directory) -> Path:
    """A writer that wrote 5 events, then half of its 6th, and died; the file it left."""
    writer = start_writer(directory, "resume", "0/1", "--tear-after", "5", "--label", "first")
    out, _ = writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL and out.split() == ["0", "1", "2", "3", "4"]
    (path,) = directory.rglob("*.jsonl")
    assert not path.read_bytes().endswith(b"\n")  # the fault really happened
    return path


@fault("Torn event line",
       how="a writer writes 5 events and half of its 6th, then SIGKILLs itself (as a write cut short by a full "
           "disk or a power loss leaves a file)",
       expected="queries still answer from the 5 complete events; the fragment reported on stderr as one "
                "unreadable line naming file:6; --strict-read makes it exit 2 naming file:6")
def test_torn_line_is_reported(tmp_path, cli, observe):
    directory = tmp_path / "events"
    path = tear(directory)
    result = cli("events", "runs", directory, "--format", "json")
    assert result.code == 0 and "torn last line" in result.err and f"{path}:6" in result.err
    seqs, unreadable = progress_by_writer(directory)
    assert seqs == {"first": [0, 1, 2, 3, 4]} and [(u.line, u.problem) for u in unreadable] == [
        (6, "torn last line (incomplete JSON, no newline)")]
    strict = cli("events", "runs", directory, "--strict-read")
    assert strict.code == 2 and f"{path}:6" in strict.error_line
    observe(f"exit 0, 5 events read, stderr `{path.name}:6: torn last line (incomplete JSON, no newline)`; "
            f"--strict-read: exit 2 `{strict.error_line.replace(str(directory), 'DIR')}`")


@fault("Torn event line, then the shard resumes",
       how="after the torn line above, a second writer (same run and shard, as a resumed run) appends 5 events to "
           "the same file",
       expected="all 10 complete events read back, none glued to the fragment; the fragment stays one "
                "unreadable line")
def test_torn_line_then_resumed_writer(tmp_path, observe):
    directory = tmp_path / "events"
    tear(directory)
    second = start_writer(directory, "resume", "0/1", "--limit", "5", "--label", "second")
    second.communicate(timeout=60)
    assert second.returncode == 0
    seqs, unreadable = progress_by_writer(directory)
    observe(f"{sum(map(len, seqs.values()))}/10 complete events read ({seqs}), {len(unreadable)} unreadable line(s)")
    assert seqs == {"first": [0, 1, 2, 3, 4], "second": [0, 1, 2, 3, 4]}, (
        "the resumed writer's first event was glued to the torn fragment and lost"
    )
    assert len(unreadable) == 1 and unreadable[0].line == 6


HOSTILE_RUN_IDS = ["../../escaped", "/tmp/abs-escape", "..", "a/../../b", ".hidden", "x" * 300, "run id; rm -rf ~"]


@fault("Hostile run ids",
       how="`load --events DIR --run-id R` for R in ../../escaped, /tmp/abs-escape, .., a/../../b, "
           ".hidden, 300 x's, `run id; rm -rf ~`; `score --run-id ../../escaped-score`; $ATTNFALLBACK_RUN_ID=../../from-env",
       expected="each run's file lands inside DIR under a sanitised, distinct name; the record keeps "
                "the run id as given; nothing written outside DIR")
def test_hostile_run_ids_stay_inside_the_events_dir(tiny_bert, tmp_path, workdir, cli, monkeypatch, observe):
    from attnfallback.events import open_log

    events = tmp_path / "events"
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "one row"}\n')
    before = snapshot(tmp_path)
    abs_escape = Path("/tmp/abs-escape")
    for run_id in HOSTILE_RUN_IDS:
        result = cli("load", tiny_bert, "--prefer", "eager", "--events", events, "--run-id", run_id, "--json")
        assert result.code == 0, result
        assert Path(json.loads(result.out)["events"]).resolve().is_relative_to(events.resolve())
    scored = cli("score", tiny_bert, "--input", source, "--output", tmp_path / "out" / "o.parquet", "--events", events,
                 "--run-id", "../../escaped-score", "--quiet")
    assert scored.code == 0, scored
    monkeypatch.setenv("ATTNFALLBACK_RUN_ID", "../../from-env")
    assert cli("load", tiny_bert, "--prefer", "eager", "--events", events).code == 0
    created = snapshot(tmp_path) - before
    outside = sorted(p for p in created if not p.startswith(("events/", "out/")))
    assert outside == [] and not abs_escape.exists()
    for run_id in HOSTILE_RUN_IDS + ["../../escaped-score", "../../from-env"]:
        unsanitised = events / run_id / "0-of-1.jsonl"  # where a run id taken as a path would write
        if not unsanitised.resolve().is_relative_to(events.resolve()):
            assert not unsanitised.exists(), unsanitised
    files = sorted(events.rglob("*.jsonl"))
    assert len(files) == len(HOSTILE_RUN_IDS) + 2 and all(f.parent.parent == events for f in files)
    with open_log(events) as log:
        recorded = {r["run_id"] for r in log.sql("SELECT run_id FROM events").to_pylist()}
    assert recorded == set(HOSTILE_RUN_IDS) | {"../../from-env", "../../escaped-score"}
    names = sorted({f.parent.name for f in files})
    observe(f"{len(files)} runs (load and score), {len(files)} distinct directories inside DIR "
            f"(e.g. `{names[0]}`), run ids kept verbatim in the records, 0 paths outside DIR")


@fault("Hostile shard names",
       how="`load --shard ../x` and `--shard /etc/passwd` on the command line; EventSink(shard=...) "
           "with ../../x, /abs, .. and 3/8 from Python",
       expected="the command refuses a malformed shard with exit 2 naming it, before loading; the "
                "API sanitises the name into DIR/<run>/; nothing written outside DIR")
def test_hostile_shard_names(tiny_bert, tmp_path, workdir, cli, observe):
    from attnfallback.events import EventSink

    events = tmp_path / "events"
    before = snapshot(tmp_path)
    codes = []
    for shard in ("../x", "/etc/passwd"):
        result = cli("load", tiny_bert, "--events", events, "--run-id", "r", "--shard", shard)
        assert result.code == 2 and shard in result.error_line, result
        codes.append(result.code)
    assert snapshot(tmp_path) == before  # refused before anything was written
    paths = []
    for shard in ("../../x", "/abs", "..", "3/8"):
        sink = EventSink(events, run_id="api", shard=shard)
        sink.emit("progress", n=1)
        sink.close()
        paths.append(sink.path)
    assert all(p.parent == events / "api" for p in paths) and len(set(paths)) == len(paths)
    outside = sorted(p for p in snapshot(tmp_path) - before if not p.startswith("events/"))
    assert outside == []
    observe(f"CLI: exit {codes[0]} for ../x and /etc/passwd (`malformed shard ...`), nothing written; "
            f"API: files {', '.join(p.name for p in paths)} inside DIR/api")


REFUSED_SQL = [
    "COPY (SELECT * FROM events) TO 'stolen.csv'",
    "COPY events TO 'stolen.parquet' (FORMAT parquet)",
    "ATTACH 'other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CREATE TABLE t AS SELECT 1",
    "SELECT 1; CREATE TABLE t AS SELECT 1",
    "EXPORT DATABASE 'dump'",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling = 'json'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO 'explained.csv'",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "WITH x AS (SELECT 1) SELECT * FROM glob('/*')",
]


@fault("SQL that writes, attaches, copies out or reads files",
       how=f"`events sql DIR \"...\"` with {len(REFUSED_SQL)} statements: COPY TO, ATTACH, INSTALL, LOAD, CREATE, "
           "two statements, EXPORT DATABASE, SET, PRAGMA, EXPLAIN ANALYZE COPY, read_text/read_csv/glob of "
           "system files",
       expected="each refused with exit 2 and a message; no file created anywhere under the working "
                "directory or the events directory; a plain SELECT still works")
def test_sql_that_writes_or_reads_files_is_refused(tmp_path, workdir, cli, observe):
    from attnfallback.events import EventSink

    events = tmp_path / "events"
    with EventSink(events, run_id="sql", shard="0/1") as sink:
        sink.emit("shard_done", rows=1, tokens=2, seconds=0.1)
    before = snapshot(tmp_path)
    leaked = []
    for statement in REFUSED_SQL:
        result = cli("events", "sql", events, statement)
        assert result.code == 2, (statement, result)
        assert result.error_line and result.out.count("/bin/") == 0
        if "/etc/" in statement or "glob" in statement:
            leaked.append(result.out)
    assert snapshot(tmp_path) == before
    assert not any("root:" in text for text in leaked)
    ok = cli("events", "sql", events, "SELECT count(*) AS n FROM events", "--format", "json")
    assert ok.code == 0 and json.loads(ok.out) == [{"n": 1}]
    observe(f"{len(REFUSED_SQL)}/{len(REFUSED_SQL)} refused with exit 2 (e.g. `{cli('events', 'sql', events, REFUSED_SQL[0]).error_line[:90]}`); "
            "0 files created; SELECT count(*) still exit 0")
