"""Ctrl-C: `score` says what it committed and how to resume, exits 130 and writes
`shard_interrupted`; a sweep hands the Ctrl-C to its jobs and its manifest says they were
interrupted; no hint that cannot work (the demo has no --resume)."""

from __future__ import annotations

import _thread
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from attnfallback.cli.app import main
from attnfallback.errors import Interrupted
from attnfallback.events import validate
from attnfallback.scoring import ScoreJob, run_score
from conftest import build_tiny_model
from scoring_helpers import add_sentence_config, read_events, seeded_texts, write_jsonl


@pytest.fixture(scope="module")
def st_bert(tmp_path_factory):
    return add_sentence_config(build_tiny_model(tmp_path_factory.mktemp("ctrl-c-bert"), "bert"))


@pytest.fixture
def ctrl_c_after_parts(monkeypatch):
    """A Ctrl-C in the scoring loop (the main thread) once `n` parts have been scored."""
    from attnfallback.scoring import job as job_module

    real = job_module._Progress.advance

    def arm(n: int):
        calls = []

        def advance(self, rows, tokens):
            calls.append(rows)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(self, rows, tokens)

        monkeypatch.setattr(job_module._Progress, "advance", advance)
        return lambda: monkeypatch.setattr(job_module._Progress, "advance", real)

    return arm


def committed(output: Path) -> int:
    manifest = output.parent / f".{output.name}.parts" / "manifest.json"
    return len(json.loads(manifest.read_text())["parts"])


def test_ctrl_c_in_score_says_what_was_committed_and_writes_shard_interrupted(st_bert, tmp_path, ctrl_c_after_parts):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in seeded_texts(60, seed=4, max_words=8)])
    out = tmp_path / "out.parquet"
    job = ScoreJob(model=str(st_bert), input=str(source), output=str(out), part_rows=10, first_part_rows=10, device="cpu",
                   quiet=True, prefer=["eager"], events=str(tmp_path / "events"), run_id="ctrl-c")
    undo = ctrl_c_after_parts(3)
    with pytest.raises(KeyboardInterrupt) as info:
        run_score(job)
    undo()
    err = info.value
    assert isinstance(err, Interrupted) and err.exit_code == 130
    assert err.parts == committed(out) >= 3 and err.rows == 10 * err.parts
    assert f"{err.parts} part(s) committed" in str(err) and "--resume" in str(err)
    (event,) = [e for e in read_events(tmp_path / "events") if e["event"] == "shard_interrupted"]
    assert validate(event) == [] and event["parts_committed"] == err.parts and event["rows_committed"] == err.rows
    assert event["resume"] is True and not out.exists()

    from dataclasses import replace

    resumed = run_score(replace(job, resume=True))
    assert resumed.resumed_parts == err.parts and resumed.rows_written == 60


def test_ctrl_c_on_the_command_line_exits_130_with_the_resume_hint(st_bert, tmp_path, capsys, ctrl_c_after_parts):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in seeded_texts(30, seed=5, max_words=8)])
    undo = ctrl_c_after_parts(2)
    code = main(["score", str(st_bert), "--input", str(source), "--output", str(tmp_path / "o.parquet"), "--part-rows", "10",
                 "--first-part-rows", "10", "--device", "cpu", "--quiet", "--prefer", "eager"])
    undo()
    err = capsys.readouterr().err
    assert code == 130
    assert "interrupted: shard 0/1:" in err and "part(s) committed" in err and "run the same command with --resume" in err


def test_the_events_say_a_shard_was_interrupted_until_it_is_resumed(st_bert, tmp_path, ctrl_c_after_parts):
    pytest.importorskip("duckdb")
    from dataclasses import replace

    from attnfallback.events import open_log

    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in seeded_texts(30, seed=6, max_words=8)])
    job = ScoreJob(model=str(st_bert), input=str(source), output=str(tmp_path / "o.parquet"), part_rows=10, first_part_rows=10,
                   device="cpu", quiet=True, prefer=["eager"], events=str(tmp_path / "events"), run_id="r")
    undo = ctrl_c_after_parts(2)
    with pytest.raises(Interrupted):
        run_score(job)
    undo()
    with open_log(tmp_path / "events") as log:
        (shard,) = log.shards().to_pylist()
        (run,) = log.runs().to_pylist()
    assert shard["interrupted"] and not shard["done"] and run["interrupted"] == 1
    run_score(replace(job, resume=True))
    with open_log(tmp_path / "events") as log:
        (shard,) = log.shards().to_pylist()
    assert shard["done"] and not shard["interrupted"]


def test_ctrl_c_in_a_sweep_interrupts_its_jobs_and_the_manifest_says_so(tmp_path, monkeypatch):
    from attnfallback.sweep import local
    from attnfallback.sweep.config import load_config
    from attnfallback.sweep.local import run_local

    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in seeded_texts(400, seed=8, max_words=10)])
    (tmp_path / "sweep.toml").write_text("""
output = "out"
run_id = "sweep-ctrl-c"
shards = 2
workers = 2
devices = "cpu"
model = "default"
input = "in.jsonl"
part_rows = 8
prefer = ["eager"]
""")
    config = load_config(tmp_path / "sweep.toml")

    def ctrl_c_once_a_part_is_committed(job, proc):
        if job.shard.index != 0:
            return

        def watch():
            deadline = time.monotonic() + 120
            manifest = job.output.parent / f".{job.output.name}.parts" / "manifest.json"
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if json.loads(manifest.read_text())["parts"]:
                        # held mid-shard: on a busy machine the shard could otherwise finish in the
                        # moment before the sweep's SIGINT arrives, and there would be nothing to interrupt
                        os.killpg(proc.pid, signal.SIGSTOP)
                        _thread.interrupt_main()  # what a Ctrl-C at the terminal does to the sweep
                        time.sleep(30)  # never left stopped, should the sweep's SIGCONT not come
                        os.killpg(proc.pid, signal.SIGCONT)
                        return
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.01)

        threading.Thread(target=watch, daemon=True).start()

    send = local._Runner._signal_jobs

    def send_then_continue(runner, sig):
        send(runner, sig)
        if sig == signal.SIGINT:  # the held job wakes with the SIGINT pending
            send(runner, signal.SIGCONT)

    monkeypatch.setattr(local._Runner, "_signal_jobs", send_then_continue)
    with pytest.raises(Interrupted) as info:
        run_local(config, on_start=ctrl_c_once_a_part_is_committed)
    monkeypatch.undo()
    message = str(info.value)
    assert f"attnfallback sweep {tmp_path / 'sweep.toml'} --resume" in message and "interrupted" in message
    manifest = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert manifest["interrupted"] is not None
    assert manifest["jobs"]["main/0/2"]["status"] == "interrupted"
    events = [e for e in read_events(tmp_path / "out" / "events") if e["event"] == "shard_interrupted"]
    assert any(e["shard"] == "0/2" and e["parts_committed"] >= 1 for e in events), events

    again = run_local(config, resume=True)
    assert again.exit_code == 0 and again.merged["main"]["rows"] == 400
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["interrupted"] is None


def test_hints_that_cannot_work_are_not_given(capsys):
    from attnfallback.cli.sweep import render_sweep
    from attnfallback.sweep.local import JobResult, SweepResult

    failed = JobResult("main", "0/4", "demo-x", "failed", 3, "out.parquet", "", error="strict", error_text="strict")
    result = SweepResult("demo-x", "local", "out", "out/events", "out/sweep.json", [failed])
    render_sweep(result)  # the demo's call: there is no configuration file to resume
    assert "--resume" not in capsys.readouterr().out
    render_sweep(result, resume_command="attnfallback sweep sweep.toml --resume")
    assert "resume the failed shards: attnfallback sweep sweep.toml --resume" in capsys.readouterr().out
