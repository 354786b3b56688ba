"""SIGKILL of `score` at many moments, then `--resume`: every row exactly once, values equal to a
clean run, and nothing half-written ever visible under the output's name."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from . import runner
from .registry import fault
from .runner import STEPS, Injection
from .tools import make_texts, read_events, write_jsonl

ROWS = 240
PART_ROWS = 24  # 10 committed parts
SEEDS = 20
TARGETED = 2 * len(STEPS)  # seeds 0..15 kill at a chosen call of each step in turn; 16..19 at a random time


def read_output(path: Path) -> tuple[list, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1)
    return table.column("id").to_pylist(), values


@pytest.fixture(scope="module")
def kill_job(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    source = write_jsonl(root / "in.jsonl", [{"text": t} for t in make_texts(ROWS, seed=1)])

    def argv(out: Path, events: Path, run_id: str, *extra):
        return ["score", tiny_bert, "--input", source, "--output", out, "--part-rows", PART_ROWS, "--prefer", "sdpa,eager",
                "--events", events, "--run-id", run_id, "--quiet", *extra]

    counts_path = root / "counts.json"
    clean = runner.start(argv(root / "clean" / "out.parquet", root / "clean-events", "clean"), cwd=root, logs=root / "logs",
                         injection=Injection(count_to=str(counts_path)))
    result = clean.wait()
    assert result.code == 0, result
    ids, values = read_output(root / "clean" / "out.parquet")
    assert ids == list(range(ROWS)) and np.isfinite(values).all()
    counts = json.loads(counts_path.read_text())
    assert counts["write_part"] == ROWS // PART_ROWS and all(counts[s] >= 1 for s in STEPS), counts
    return SimpleNamespace(root=root, argv=argv, counts=counts, ids=ids, values=values, seconds=clean.seconds)


def kill_plan(seed: int, counts: dict, clean_seconds: float) -> list:
    """The kills of one seed: an Injection (step, call) or a delay in seconds, per killed run."""
    rng = random.Random(seed)
    plan: list = []
    if seed < TARGETED:
        step = STEPS[seed % len(STEPS)]
        # first pass: a random call of the step; second pass: its last call (the last part, the
        # final file's fsync and rename)
        call = rng.randint(1, counts[step]) if seed < len(STEPS) else counts[step]
        plan.append(Injection(kill_step=step, occurrence=call))
    else:
        plan.append(rng.uniform(0.05, 0.95) * clean_seconds)
    if seed % 4 == 3:  # the resumed run is killed as well
        step = rng.choice(STEPS)
        plan.append(Injection(kill_step=step, occurrence=rng.randint(1, counts[step])))
    return plan


@pytest.mark.slow
@fault("SIGKILL of score at random moments, then --resume",
       how=f"{SEEDS} seeds: 16 SIGKILL the run at a random call, then at the last call, of one step in turn (model load, verify forward, "
           "tokenization, forward, half-written part, fsync, before/after each rename of part, manifest and final "
           f"file), 4 at a random time; every 4th seed kills the resumed run too; {ROWS} rows, {ROWS // PART_ROWS} parts",
       expected="after --resume: exit 0, every input row exactly once, in input order, values bit-identical to a "
                "clean run; while killed, the output name is absent or complete")
def test_sigkill_then_resume(kill_job, observe):
    job = kill_job
    landed: Counter = Counter()
    resumed_kills = 0
    leftovers: list[str] = []
    no_done: list[str] = []
    for seed in range(SEEDS):
        out_dir = job.root / f"seed{seed}"
        out = out_dir / "out.parquet"
        events = job.root / f"events{seed}"
        labels = []
        for attempt, kill in enumerate(kill_plan(seed, job.counts, job.seconds)):
            args = job.argv(out, events, f"kill-{seed}", *(["--resume"] if attempt else []))
            if isinstance(kill, Injection):
                result = runner.run(args, cwd=job.root, logs=job.root / "logs", injection=kill)
                label = f"{kill.kill_step}#{kill.occurrence}"
            else:
                child = runner.start(args, cwd=job.root, logs=job.root / "logs")
                time.sleep(kill)
                child.kill()
                result = child.wait()
                label = "timer"
            if attempt == 0 and isinstance(kill, Injection):
                assert result.code == -9, f"seed {seed}: the kill at {label} did not land: {result}"
            assert result.code in (-9, 0), f"seed {seed}: {result}"
            labels.append(label if result.code == -9 else f"{label} (finished first)")
            if result.code == -9:
                landed[label.split("#")[0]] += 1
                resumed_kills += attempt > 0
            if out.exists():  # only ever renamed into place complete
                ids, values = read_output(out)
                assert ids == job.ids and np.array_equal(values, job.values), f"seed {seed}: a partial output is visible"
        final = runner.run(job.argv(out, events, f"kill-{seed}", "--resume"), cwd=job.root, logs=job.root / "logs")
        assert final.code == 0, f"seed {seed}: resume failed: {final}"
        ids, values = read_output(out)
        assert Counter(ids) == Counter(job.ids), f"seed {seed}: rows missing or repeated after resume"
        assert ids == job.ids, f"seed {seed}: rows out of input order after resume"
        assert np.array_equal(values, job.values), f"seed {seed}: values differ from the clean run"
        done = [e for e in read_events(events) if e["event"] == "shard_done"]
        if len(done) != 1 or done[0]["rows_written"] != ROWS:
            no_done.append(f"seed {seed} ({' then '.join(labels)}): {len(done)} shard_done events")
        left = sorted(p.name for p in out_dir.iterdir() if p.name != "out.parquet")
        leftovers += [f"seed {seed} ({' then '.join(labels)}): {name}" for name in left]
    # stale temporary files and missing shard_done events have rows of their own (below)
    observe(f"{SEEDS}/{SEEDS} resumed outputs: {ROWS} rows, each once, in order, bit-identical to the clean run; "
            f"kills landed: {', '.join(f'{k} {v}' for k, v in sorted(landed.items()))} "
            f"({resumed_kills} in resumed runs); seeds leaving a stale file beside the output: {len(leftovers)}; "
            f"seeds whose events lack shard_done: {len(no_done)}")


def kill_at_last(job, step: str, name: str):
    """Kill a run at the last call of `step`, resume it; the output directory and events."""
    out = job.root / name / "out.parquet"
    events = job.root / f"{name}-events"
    killed = runner.run(job.argv(out, events, name), cwd=job.root, logs=job.root / "logs",
                        injection=Injection(kill_step=step, occurrence=job.counts[step]))
    assert killed.code == -9, killed
    resumed = runner.run(job.argv(out, events, name, "--resume"), cwd=job.root, logs=job.root / "logs")
    assert resumed.code == 0, resumed
    ids, values = read_output(out)
    assert ids == job.ids and np.array_equal(values, job.values)
    return sorted(p.name for p in out.parent.iterdir()), read_events(events)


@fault("SIGKILL while the final file is written",
       how="SIGKILL just before the rename of the complete temporary final file into place, then --resume",
       expected="the resumed run leaves only the output: no temporary file of the killed run beside it")
def test_kill_before_final_rename_leaves_no_temporary(kill_job, observe):
    names, _ = kill_at_last(kill_job, "rename_before", "final-write")
    observe(f"resumed: exit 0, output complete; files beside it: {[n for n in names if n != 'out.parquet'] or 'none'}")
    assert names == ["out.parquet"]


@fault("SIGKILL between the final rename and shard_done",
       how="SIGKILL right after the final file is renamed into place (before the shard_done event), then --resume",
       expected="--resume finds the output complete (exit 0) and the events then record the shard as done "
                "(a shard_done event)")
def test_kill_after_final_rename_is_recorded_on_resume(kill_job, observe):
    _, events = kill_at_last(kill_job, "rename_after", "final-rename")
    kinds = [e["event"] for e in events]
    observe(f"resumed: exit 0, output complete; events {kinds}")
    assert "shard_done" in kinds
