"""The event sink and schema: records, validation, safe paths, concurrency, SIGKILL."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from events_helpers import FleetGroup, decision_fields

import attnfallback.events as events
from attnfallback.errors import InputError, UsageError
from attnfallback.events import EventSink, build_record, emit_event, open_log, safe_name, validate
from attnfallback.events.schema import SCHEMA


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def attn_impl_fields(**changes) -> dict:
    kind, fields = decision_fields(FleetGroup("T4", 1, used="sdpa"))
    assert kind == "attn_impl"
    fields.update(changes)
    return fields


# --- schema -------------------------------------------------------------------------------

def test_build_record_adds_the_common_fields_in_utc():
    record = build_record("shard_start", "run-1", "3/8", note="x")
    assert list(record)[:7] == ["schema", "event", "ts", "run_id", "shard", "host", "pid"]
    assert record["schema"] == SCHEMA
    assert (record["event"], record["run_id"], record["shard"], record["note"]) == ("shard_start", "run-1", "3/8", "x")
    assert record["pid"] == os.getpid()
    ts = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - ts).total_seconds()) < 60
    assert validate(record) == []


def test_build_record_refuses_identity_overrides_and_bad_kinds():
    with pytest.raises(UsageError, match="schema"):
        build_record("shard_start", "run-1", "0/1", schema="attnfallback.event/9")
    with pytest.raises(UsageError, match="run_id"):
        EventSink("unused", run_id="r").emit("shard_start", run_id="other")
    with pytest.raises(UsageError, match="shard"):
        emit_event("shard_start", shard="9/9")
    for kind in ("", "two words", "../x", None):
        with pytest.raises(UsageError):
            build_record(kind, "run-1", "0/1")


def test_a_loader_shaped_attn_impl_record_is_valid():
    record = build_record("attn_impl", "run-1", "0/1", **attn_impl_fields())
    assert validate(record) == []
    # CPU runs carry no GPU; kernels may be listed.
    assert validate(build_record("attn_impl", "r", "0/1", **attn_impl_fields(gpu=None, kernels=["k/x"]))) == []


@pytest.mark.parametrize("change, field", [
    ({"used": None}, "used"),
    ({"fell_back": "yes"}, "fell_back"),
    ({"attempts": [{"impl": "sdpa", "stage": "compile", "ok": True, "reasons": []}]}, "attempts[0].stage"),
    ({"attempts": [{"impl": "sdpa", "stage": "load", "ok": True, "reasons": "nope"}]}, "attempts[0].reasons"),
    ({"gpu": {"name": "T4", "class": "T4", "cc": "7.5"}}, "gpu.memory_gb"),
    ({"model": {"id": "m", "revision": None, "architecture": "Bert"}}, "model.dtype"),
    ({"policy": {"mode": "graceful", "prefer": "sdpa"}}, "policy.prefer"),
    ({"timing": {"load_s": "fast", "verify_s": 0.1}}, "timing.load_s"),
    ({"versions": {"torch": 2.11}}, "versions.torch"),
])
def test_validate_names_the_field_that_is_wrong(change, field):
    record = build_record("attn_impl", "run-1", "0/1", **attn_impl_fields(**change))
    problems = validate(record)
    assert any(p.startswith(field) for p in problems), problems


def test_validate_checks_the_common_fields():
    record = build_record("shard_start", "run-1", "0/1")
    assert validate(record) == []
    for key, bad in [("ts", "yesterday"), ("ts", "2026-01-01T00:00:00+02:00"), ("pid", "12"),
                     ("schema", "other/1"), ("run_id", "")]:
        broken = dict(record, **{key: bad})
        assert any(p.startswith(key) for p in validate(broken)), (key, bad)
    assert validate(["not", "a", "dict"]) != []


# --- safe names and paths -----------------------------------------------------------------

HOSTILE = ["../../x", "..", ".", "/etc/passwd", "a/../../b", "", "x" * 300, "nul\x00byte",
           "..\\..\\win", ".hidden", "run id with spaces", "ünïcode/..", "3/8/../../.."]


@pytest.mark.parametrize("text", HOSTILE)
def test_safe_name_is_one_harmless_component(text):
    name = safe_name(text)
    assert name and len(name) <= 120
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith(".")
    assert name not in (".", "..")


def test_safe_name_keeps_plain_names_and_tells_changed_ones_apart():
    assert safe_name("sweep-42") == "sweep-42"
    assert safe_name("3/8") == "3-of-8"
    assert len({safe_name(t) for t in HOSTILE}) == len(HOSTILE)
    assert safe_name("a b") != safe_name("a_b")


def test_run_id_cannot_escape_the_events_directory(tmp_path):
    root = tmp_path / "events"
    for run_id in ["../../x", "../x", "/tmp/abs", "..", "ok/../../../y"]:
        sink = EventSink(root, run_id=run_id, shard="../../0")
        sink.emit("shard_start")
        sink.close()
        assert sink.path.resolve().parent.parent == root.resolve()
    assert all(root in p.parents for p in files_under(tmp_path)), files_under(tmp_path)
    assert not (tmp_path / "x").exists()
    log = open_log(root)
    assert sorted(log.sql("SELECT run_id FROM events").column("run_id").to_pylist()) == \
        sorted(["../../x", "../x", "/tmp/abs", "..", "ok/../../../y"])


def test_env_run_id_cannot_escape_either(tmp_path, monkeypatch):
    root = tmp_path / "a" / "events"
    monkeypatch.setenv("ATTNFALLBACK_EVENTS", str(root))
    monkeypatch.setenv("ATTNFALLBACK_RUN_ID", "../../x")
    monkeypatch.setenv("ATTNFALLBACK_SHARD", "2/4")
    record = emit_event("shard_start")
    assert record["run_id"] == "../../x" and record["shard"] == "2/4"
    written = files_under(tmp_path)
    assert len(written) == 1 and root in next(iter(written)).parents


# --- emitting -----------------------------------------------------------------------------

def test_sink_writes_one_json_line_per_event(tmp_path):
    sink = EventSink(tmp_path, run_id="r1", shard="3/8")
    assert sink.path == tmp_path / "r1" / "3-of-8.jsonl"
    first = sink.emit("shard_start", note="multi\nline")
    second = sink.emit("shard_done", rows=10, tokens=100, seconds=float("nan"))
    lines = sink.path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == first
    assert json.loads(lines[1])["seconds"] is None  # strict JSON: non-finite becomes null
    assert second["rows"] == 10


def test_close_then_emit_appends(tmp_path):
    sink = EventSink(tmp_path, run_id="r1")
    sink.emit("shard_start")
    sink.close()
    sink.close()  # idempotent
    sink.emit("shard_done")
    with EventSink(tmp_path, run_id="r1") as again:
        again.emit("oom_split")
    kinds = [json.loads(line)["event"] for line in sink.path.read_text().splitlines()]
    assert kinds == ["shard_start", "shard_done", "oom_split"]


@pytest.mark.parametrize("setting, expected", [(None, ["attn_impl", "attn_unavailable"]),
                                               (True, ["shard_start", "attn_impl", "attn_unavailable", "shard_done"]),
                                               (False, [])])
def test_fsync_by_default_only_for_decisive_kinds(tmp_path, monkeypatch, setting, expected):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    sink = EventSink(tmp_path, run_id="r", fsync=setting)
    kinds_synced = []
    for kind in ["shard_start", "attn_impl", "attn_unavailable", "shard_done"]:
        before = len(synced)
        sink.emit(kind)
        if len(synced) > before:
            kinds_synced.append(kind)
    assert kinds_synced == expected


def test_emit_event_without_a_location_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = emit_event("attn_impl", **attn_impl_fields())
    assert record["event"] == "attn_impl" and validate(record) == []
    assert files_under(tmp_path) == set()


def test_emit_event_prefers_explicit_then_default_then_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFALLBACK_EVENTS", str(tmp_path / "env"))
    explicit = EventSink(tmp_path / "explicit", run_id="r")
    default = EventSink(tmp_path / "default", run_id="r")
    emit_event("shard_start", sink=explicit)
    events.set_default_sink(default)
    assert events.get_default_sink() is default
    emit_event("shard_start")
    events.set_default_sink(None)
    first = emit_event("shard_start")
    second = emit_event("shard_done")
    assert explicit.path.exists() and default.path.exists()
    assert first["run_id"] == second["run_id"]  # one generated run id per process
    env_files = files_under(tmp_path / "env")
    assert len(env_files) == 1
    assert len(next(iter(env_files)).read_text().splitlines()) == 2


# --- concurrency --------------------------------------------------------------------------

PROCESSES = 16
EVENTS_PER_PROCESS = 150
THREADS = 4
EVENTS_PER_THREAD = 300


def _write_shard(directory: str, index: int, start) -> None:
    start.wait()
    own = EventSink(directory, run_id="concurrent", shard=f"{index}/{PROCESSES}", fsync=False)
    shared = EventSink(directory, run_id="concurrent", shard="shared", fsync=False)
    for seq in range(EVENTS_PER_PROCESS):
        # Sizes from tiny to past the 4 KiB pipe-buffer limit, so a non-atomic write would show.
        payload = "x" * ((seq * 997 + index * 131) % 9000)
        own.emit("shard_start", writer=index, seq=seq, payload=payload)
        shared.emit("shard_start", writer=index, seq=seq, payload=payload)
    own.close()
    shared.close()


def test_16_processes_write_one_run_at_once_and_nothing_interleaves(tmp_path):
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    start = context.Event()
    workers = [context.Process(target=_write_shard, args=(str(tmp_path), i, start)) for i in range(PROCESSES)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0

    run_dir = tmp_path / "concurrent"
    assert len(list(run_dir.glob("*.jsonl"))) == PROCESSES + 1
    for path in run_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)  # every line whole

    log = open_log(tmp_path)
    assert log.unreadable == []
    assert log.events == 2 * PROCESSES * EVENTS_PER_PROCESS
    rows = log.sql("""SELECT shard, CAST(record->>'$.writer' AS INT) AS w, CAST(record->>'$.seq' AS INT) AS s,
                             length(record->>'$.payload') AS n FROM events""").to_pylist()
    shared = {(r["w"], r["s"]) for r in rows if r["shard"] == "shared"}
    own = {(r["w"], r["s"]) for r in rows if r["shard"] != "shared"}
    expected = {(w, s) for w in range(PROCESSES) for s in range(EVENTS_PER_PROCESS)}
    assert shared == expected and own == expected
    assert all(r["n"] == (r["s"] * 997 + r["w"] * 131) % 9000 for r in rows)


def test_4_threads_in_one_shard(tmp_path):
    shared_sink = EventSink(tmp_path, run_id="threads", shard="0/1", fsync=False)
    barrier = threading.Barrier(THREADS)

    def write(thread: int) -> None:
        # Half the threads share one sink, half open their own on the same file.
        sink = shared_sink if thread % 2 == 0 else EventSink(tmp_path, run_id="threads", shard="0/1", fsync=False)
        barrier.wait()
        for seq in range(EVENTS_PER_THREAD):
            sink.emit("shard_start", thread=thread, seq=seq, payload="y" * ((seq * 613) % 6000))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = shared_sink.path.read_text().splitlines()
    assert len(lines) == THREADS * EVENTS_PER_THREAD
    seen = {(r["thread"], r["seq"]) for r in map(json.loads, lines)}
    assert seen == {(t, s) for t in range(THREADS) for s in range(EVENTS_PER_THREAD)}
    log = open_log(tmp_path)
    assert log.events == THREADS * EVENTS_PER_THREAD and log.unreadable == []


# --- SIGKILL ------------------------------------------------------------------------------

WRITER = """
import sys
from attnfallback.events import EventSink
sink = EventSink(sys.argv[1], run_id="killed", shard="0/1", fsync=False)
seq = 0
while True:
    sink.emit("shard_start", seq=seq, payload="z" * (200000 + seq % 7))
    seq += 1
"""


def test_sigkilled_writer_loses_no_complete_event(tmp_path):
    path = tmp_path / "killed" / "0-of-1.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_size > 3_000_000:
                break
            time.sleep(0.01)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    data = path.read_bytes()
    complete = data.count(b"\n")
    assert complete >= 10

    log = open_log(tmp_path)
    seqs = log.sql("SELECT CAST(record->>'$.seq' AS INT) AS s FROM events ORDER BY s").column("s").to_pylist()
    assert seqs == list(range(complete))  # every complete event, in order, none invented
    assert len(log.unreadable) <= 1
    if not data.endswith(b"\n"):
        assert len(log.unreadable) == 1 and log.unreadable[0].line == complete + 1

    # Make the torn tail certain (the kill may have landed between writes) and check it is reported.
    with open(path, "ab") as handle:
        handle.write(b'{"schema":"attnfallback.event/1","event":"shard_do')
    log = open_log(tmp_path)
    assert log.events == complete
    assert len(log.unreadable) == 1
    torn = log.unreadable[0]
    assert (Path(torn.path), torn.line) == (path, complete + 1) and "torn" in torn.problem
    with pytest.raises(InputError) as error:
        open_log(tmp_path, strict_read=True)
    assert f"{path}:{complete + 1}" in str(error.value)


def test_open_sink_resolves_arguments_then_environment(tmp_path, monkeypatch):
    assert events.open_sink(None) is None  # no directory anywhere: no events
    monkeypatch.setenv("ATTNFALLBACK_EVENTS", str(tmp_path / "env"))
    monkeypatch.setenv("ATTNFALLBACK_RUN_ID", "env-run")
    monkeypatch.setenv("ATTNFALLBACK_SHARD", "2/4")
    from_env = events.open_sink()
    assert (from_env.directory, from_env.run_id, from_env.shard) == (tmp_path / "env", "env-run", "2/4")
    given = events.open_sink(tmp_path / "arg", run_id="arg-run", shard="1/3")
    assert (given.directory, given.run_id, given.shard) == (tmp_path / "arg", "arg-run", "1/3")
    monkeypatch.delenv("ATTNFALLBACK_RUN_ID")
    monkeypatch.delenv("ATTNFALLBACK_SHARD")
    first, second = events.open_sink(), events.open_sink()
    assert first.run_id == second.run_id and first.shard == "0/1"  # one run id per process
