"""Local engine: 2 CPU workers, 4 shards; a shard killed mid-run is reported, --resume completes it,
and the merged output equals a single `score` run, every row exactly once."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from attnfallback.cli.app import main
from attnfallback.sweep.local import run_local

ROWS = 160
PART_ROWS = 4
KILLED = 1  # the shard index killed mid-run


def make_texts(path: Path, rows: int = ROWS) -> Path:
    rng = random.Random(7)
    words = "the a model shard graceful strict attention kernel falls back to sdpa on this GPU class when flash is missing".split()
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 16)))}) + "\n")
    return path


def committed_parts(output: Path) -> int:
    manifest = output.parent / f".{output.name}.parts" / "manifest.json"
    try:
        return len(json.loads(manifest.read_text())["parts"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("sweep-local")
    make_texts(base / "texts.jsonl")
    (base / "sweep.toml").write_text(f"""
output = "out"
run_id = "local-test"
shards = 4
workers = 2
devices = "cpu"
model = "default"
task = "embed"
input = "texts.jsonl"
part_rows = {PART_ROWS}
prefer = ["flash_attention_2", "sdpa", "eager"]
""")
    return base


@pytest.fixture(scope="module")
def killed_run(sweep_dir):
    """The first run: shard 1/4 is killed with SIGKILL once it has committed a part."""
    from attnfallback.sweep.config import load_config

    kills: list[int] = []

    def on_start(job, proc):
        if job.shard.index != KILLED:
            return

        def kill_after_first_part():
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if committed_parts(job.output) >= 1:
                    proc.send_signal(signal.SIGKILL)
                    kills.append(committed_parts(job.output))
                    return
                time.sleep(0.005)

        threading.Thread(target=kill_after_first_part, daemon=True).start()

    result = run_local(load_config(sweep_dir / "sweep.toml"), on_start=on_start)
    return result, kills


@pytest.fixture(scope="module")
def resumed_run(sweep_dir, killed_run):
    from attnfallback.sweep.config import load_config

    return run_local(load_config(sweep_dir / "sweep.toml"), resume=True)


def test_killed_shard_is_reported_while_the_others_finish(killed_run):
    result, kills = killed_run
    assert kills, "the shard finished before it could be killed"
    by_shard = {j.shard: j for j in result.jobs}
    killed = by_shard[f"{KILLED}/4"]
    assert killed.status == "failed" and killed.exit_code == -signal.SIGKILL
    assert "SIGKILL" in killed.error
    assert [s for s, j in by_shard.items() if j.ok] == [s for s in ("0/4", "1/4", "2/4", "3/4") if s != f"{KILLED}/4"]
    assert result.exit_code == 1
    assert result.merged == {}  # no merged output while a shard is missing
    manifest = json.loads(Path(result.manifest).read_text())
    assert manifest["jobs"][f"main/{KILLED}/4"]["status"] == "failed"


def test_resume_runs_only_the_incomplete_shard_and_every_row_is_there_once(sweep_dir, resumed_run):
    result = resumed_run
    assert result.exit_code == 0
    statuses = {j.shard: j.status for j in result.jobs}
    assert statuses == {"0/4": "complete", "1/4": "done", "2/4": "complete", "3/4": "complete"}
    resumed = next(j for j in result.jobs if j.status == "done")
    assert resumed.score["resumed_parts"] >= 1  # continued from its committed parts
    merged = pq.read_table(result.merged["main"]["path"])
    assert merged.column("id").to_pylist() == list(range(ROWS))
    for job in result.jobs:  # each shard holds exactly the rows it owns
        index = int(job.shard.split("/")[0])
        assert pq.read_table(job.output).column("id").to_pylist() == list(range(index, ROWS, 4))


def test_merged_output_equals_a_single_score_run(sweep_dir, resumed_run, tmp_path):
    import numpy as np

    from attnfallback.scoring import ScoreJob, run_score

    single = run_score(ScoreJob(model="default", input=str(sweep_dir / "texts.jsonl"), output=str(tmp_path / "single.parquet"),
                                device="cpu", prefer=["flash_attention_2", "sdpa", "eager"], quiet=True))
    expected = pq.read_table(single.output)
    merged = pq.read_table(resumed_run.merged["main"]["path"])
    assert merged.schema.remove_metadata() == expected.schema.remove_metadata()
    assert merged.column("id").to_pylist() == expected.column("id").to_pylist()
    a = np.asarray(merged.column("embedding").to_pylist())
    b = np.asarray(expected.column("embedding").to_pylist())
    # other batch compositions and thread counts: float rounding only
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_events_summary_of_the_run(resumed_run):
    shards = resumed_run.shards
    assert [s["shard"] for s in shards] == ["0/4", "1/4", "2/4", "3/4"]
    assert all(s["done"] and s["used"] == "sdpa" and s["fell_back"] for s in shards)
    assert all(s["failed_impl"] == "flash_attention_2" and "CUDA" in s["reason"] for s in shards)
    assert sum(s["rows"] for s in shards) == ROWS
    (row,) = resumed_run.summary
    assert (row["gpu_class"], row["shards"], row["fell_back"], row["strict_failures"]) == ("cpu", 4, 4, 0)


def test_cli_refuses_the_finished_directory_without_resume(sweep_dir, resumed_run, capsys):
    assert main(["sweep", str(sweep_dir / "sweep.toml")]) == 2
    assert "already holds the results of run 'local-test'" in capsys.readouterr().err
    # with --resume every shard is complete: nothing runs, exit 0, the report is printed
    assert main(["sweep", str(sweep_dir / "sweep.toml"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "4 shard jobs, 4 complete, 0 failed" in out and "flash_attention_2: no CUDA GPU" in out


def test_ray_engine_without_ray_says_how_to_install(sweep_dir, monkeypatch, capsys):
    import attnfallback.sweep.ray_engine as ray_engine

    monkeypatch.setattr(ray_engine, "ray_available", lambda: False)
    assert main(["sweep", str(sweep_dir / "sweep.toml"), "--engine", "ray"]) == 2
    assert "pip install attnfallback[ray]" in capsys.readouterr().err


def test_merge_keeps_input_order_when_the_default_id_column_holds_integers(tiny_bert, tmp_path):
    # the configuration names no id_column, the input has an `id` column of integers in no order:
    # the shards use it (the default), so the merge must not sort by it as if it were row numbers
    from attnfallback.scoring import ScoreJob, run_score
    from attnfallback.sweep.local import _ids_are_row_numbers
    from attnfallback.sweep.state import merge_outputs

    ids = [50, 10, 40, 20, 30, 0, 60]
    texts = tmp_path / "in.jsonl"
    texts.write_text("".join(json.dumps({"id": i, "text": f"row with id {i}"}) + "\n" for i in ids))
    outputs = []
    for shard in range(2):
        output = tmp_path / f"s{shard}.parquet"
        run_score(ScoreJob(model=str(tiny_bert), input=str(texts), output=str(output), shard=f"{shard}/2",
                           device="cpu", quiet=True))
        outputs.append(output)
    assert not _ids_are_row_numbers(outputs)
    merged = merge_outputs(outputs, tmp_path / "merged.parquet", ids_are_row_numbers=_ids_are_row_numbers(outputs))
    assert pq.read_table(merged["path"]).column("id").to_pylist() == ids
    numbered = []
    for shard in range(2):
        output = tmp_path / f"n{shard}.parquet"
        run_score(ScoreJob(model=str(tiny_bert), input=str(texts), output=str(output), shard=f"{shard}/2",
                           id_column="", device="cpu", quiet=True))
        numbered.append(output)
    assert _ids_are_row_numbers(numbered)


def test_each_job_runs_from_its_job_file_and_reports_what_its_result_file_holds(sweep_dir, killed_run, resumed_run):
    from attnfallback.scoring import ScoreJob

    killed, _ = killed_run
    first = {j.shard: j for j in killed.jobs}
    assert first[f"{KILLED}/4"].score is None  # killed: it wrote no result
    assert all(j.score["rows_written"] > 0 for s, j in first.items() if s != f"{KILLED}/4")
    manifest = json.loads(Path(resumed_run.manifest).read_text())
    for job in resumed_run.jobs:
        log = Path(job.log)
        job_file, result_file = log.with_suffix(".job.json"), log.with_suffix(".result.json")
        written = ScoreJob.from_dict(json.loads(job_file.read_text()))
        assert (written.model, written.input, written.output, written.shard, written.run_id) == (
            "default", str(sweep_dir / "texts.jsonl"), job.output, job.shard, "local-test")
        assert (written.device, written.part_rows, written.prefer, written.quiet) == (
            "cpu", PART_ROWS, ["flash_attention_2", "sdpa", "eager"], True)
        assert written.resume == (job.shard == f"{KILLED}/4")  # only the killed shard ran again, resuming
        result = json.loads(result_file.read_text())
        assert result["shard"] == job.shard and result["output"] == job.output
        if job.status == "done":
            assert job.score == result
        command = manifest["jobs"][f"main/{job.shard}"]["command"]
        assert command[-4:] == ["--job", str(job_file), "--result", str(result_file)]
        assert f"--- score --job {job_file} --result {result_file}" in log.read_text()


# A job process that writes an (empty) output, then the result text given (unless "-"), and exits with the code given.
FAKE_SCORE = (
    "import pathlib, sys\n"
    "output, result, text, code = sys.argv[1:5]\n"
    "pathlib.Path(output).write_bytes(b'')\n"
    "if text != '-':\n"
    "    pathlib.Path(result).write_text(text)\n"
    "sys.exit(int(code))\n"
)


@pytest.mark.parametrize("text, score", [("-", None), ("{not json", None), ('["a list"]', None),
                                         ('{"rows_written": 3}', {"rows_written": 3})])
def test_the_score_is_the_result_file_this_run_wrote_else_none(tmp_path, monkeypatch, text, score):
    import sys

    import attnfallback.sweep.local as local
    from attnfallback.sweep.config import parse_config

    make_texts(tmp_path / "t.jsonl", 2)
    config = parse_config({"output": "out", "input": "t.jsonl", "devices": "cpu", "merge": False, "run_id": "r"},
                          base=tmp_path)
    runs = iter([('{"rows_written": 99}', "1"), (text, "0")])  # a failed first run's result, then this run's

    def fake_command(job, worker, resume):
        written, code = next(runs)
        job.write_job_file(device=worker.device, resume=resume)
        return [sys.executable, "-c", FAKE_SCORE, str(job.output), str(job.result_file), written, code]

    monkeypatch.setattr(local, "job_command", fake_command)
    (failed,) = local.run_local(config).jobs
    assert failed.status == "failed" and failed.exit_code == 1 and failed.score == {"rows_written": 99}
    (job,) = local.run_local(config, resume=True).jobs
    assert job.status == "done" and job.exit_code == 0 and job.score == score  # never the first run's 99
