"""Faults of a `score` run other than SIGKILL: a full disk, a read-only output location, a
verification failure at the first forward, out-of-memory in the middle of a shard, a model that
produces NaN, and two runs pointed at one output."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from . import runner
from .registry import fault
from .runner import Injection
from .tools import make_texts, mount_tmpfs, read_events, remount, snapshot, unmount, write_jsonl

AMPERE_ERROR = "FlashAttention only supports Ampere GPUs or newer."


def read_output(path: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1)
    return table, table.column("id").to_pylist(), values


def kinds(events_dir) -> list[str]:
    return [e["event"] for e in read_events(events_dir)]


@pytest.fixture(scope="module")
def texts_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("score-input")
    return write_jsonl(root / "in.jsonl", [{"text": t} for t in make_texts(120, seed=2)])


# --- disk full and read-only --------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A directory on a 128 KiB tmpfs (root), else None (the test limits file sizes instead)."""
    path = tmp_path / "small-disk"
    why_not = mount_tmpfs(path, "128k")
    if why_not is None:
        yield path
        unmount(path)
    else:
        path.mkdir(exist_ok=True)
        yield None


@pytest.mark.slow
@fault("Disk full while writing the output",
       how="output on a 128 KiB tmpfs (mounted as root; without root: RLIMIT_FSIZE 64 KiB, EFBIG), 2,000 rows in "
           "parts of 200, events on another disk; then the disk grows (remount 8 MiB) and the run is resumed",
       expected="exit non-zero naming the output and `no space left on device`; no output file and no temporary "
                "file visible; a shard_failed event with the error; --resume then completes with every row once")
def test_disk_full(tiny_bert, tmp_path, small_disk, observe):
    rows = 2000
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(rows, seed=3, max_words=12)])
    out_dir = small_disk if small_disk is not None else tmp_path / "small-disk"
    events = tmp_path / "events"
    logs = tmp_path / "logs"

    def argv(out, run_id, *extra):
        return ["score", tiny_bert, "--input", source, "--output", out, "--part-rows", 200, "--prefer", "sdpa,eager",
                "--events", events, "--run-id", run_id, "--quiet", *extra]

    clean = runner.run(argv(tmp_path / "clean" / "out.parquet", "clean"), cwd=tmp_path, logs=logs)
    assert clean.code == 0, clean
    _, clean_ids, clean_values = read_output(tmp_path / "clean" / "out.parquet")

    out = out_dir / "out.parquet"
    limit = None if small_disk is not None else Injection(file_size_limit=64 * 1024)
    full = runner.run(argv(out, "full"), cwd=tmp_path, logs=logs, injection=limit)
    how = "tmpfs" if small_disk is not None else "RLIMIT_FSIZE"
    expected_text = "no space left on device" if small_disk is not None else "too large"
    assert full.code not in (0, -9), full
    assert str(out) in full.error_line or str(out_dir) in full.error_line, full.error_line
    assert expected_text in full.error_line.lower(), full.error_line
    assert not out.exists()
    visible = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    temporary = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.tmp-*"))
    assert visible == [] and temporary == [], (visible, temporary)
    run_events = [e for e in read_events(events) if e["run_id"] == "full"]
    failed = [e for e in run_events if e["event"] == "shard_failed"]
    assert len(failed) == 1 and expected_text in failed[0]["message"].lower(), run_events
    assert "shard_done" not in [e["event"] for e in run_events]
    committed = failed[0].get("parts_committed")

    if small_disk is not None:
        remount(out_dir, "size=8m")
        resumed = runner.run(argv(out, "full", "--resume"), cwd=tmp_path, logs=logs)
    else:
        resumed = runner.run(argv(out, "full", "--resume"), cwd=tmp_path, logs=logs)
    assert resumed.code == 0, resumed
    _, ids, values = read_output(out)
    assert ids == clean_ids and np.array_equal(values, clean_values)
    observe(f"{how}: exit {full.code}, `{full.error_line}`; nothing visible in the output directory; "
            f"shard_failed event ({committed} parts committed); after growing the disk, --resume: exit 0, "
            f"{len(ids)}/{rows} rows once, equal to a clean run")


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only directory: a read-only tmpfs (root), else chmod 555 (a user other than root)."""
    path = tmp_path / "read-only"
    why_not = mount_tmpfs(path, "1m", read_only=True)
    if why_not is None:
        yield path, "read-only tmpfs mount"
        unmount(path)
    elif os.geteuid() != 0:
        path.mkdir(exist_ok=True)
        path.chmod(0o555)
        yield path, "chmod 555 directory"
        path.chmod(0o755)
    else:
        pytest.skip(f"root without mount permission cannot make a read-only directory ({why_not})")


@fault("Read-only output location",
       how="output inside a read-only tmpfs (root; otherwise a chmod 555 directory), directly and in a "
           "subdirectory still to be created",
       expected="exit 2 (bad usage: the user can fix the location) before the model loads, naming the location "
                "and `read-only file system`; nothing written")
def test_read_only_output(tiny_bert, texts_input, read_only_dir, tmp_path, cli, observe):
    location, how = read_only_dir
    events = tmp_path / "events"
    results = []
    for out in (location / "out.parquet", location / "sub" / "out.parquet"):
        result = cli("score", tiny_bert, "--input", texts_input, "--output", out, "--events", events, "--run-id", f"ro-{len(results)}",
                     "--quiet")
        assert result.code == 2, result
        assert str(location) in result.error_line, result.error_line
        assert "read-only file system" in result.error_line or "permission denied" in result.error_line, result.error_line
        results.append(result)
    assert snapshot(location) == set()
    observe(f"{how}: exit {results[0].code} (`{results[0].error_line}`), exit {results[1].code} for a new "
            f"subdirectory; nothing written")


@fault("Read-only output location: the events say so",
       how="the read-only case above with --events on a writable disk",
       expected="a shard_failed event for each run, naming the error (issue 8: the events say what happened)")
def test_read_only_output_is_recorded(tiny_bert, texts_input, read_only_dir, tmp_path, cli, observe):
    location, how = read_only_dir
    events = tmp_path / "events"
    result = cli("score", tiny_bert, "--input", texts_input, "--output", location / "out.parquet", "--events", events,
                 "--run-id", "ro", "--quiet")
    assert result.code == 2, result
    recorded = read_events(events)
    observe(f"exit {result.code}; events: {[e['event'] for e in recorded] or 'none'}")
    failed = [e for e in recorded if e["event"] == "shard_failed"]
    assert len(failed) == 1 and "read-only" in failed[0]["message"], "no event records the failure"


# --- verification failure at the first forward --------------------------------------------------

@pytest.fixture
def ampere_only_sdpa(monkeypatch):
    """sdpa raises the flash kernels' error for a GPU class they do not support."""
    import torch

    def refuse(*args, **kwargs):
        raise RuntimeError(AMPERE_ERROR)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)


@fault("Verification failure at the first forward (graceful)",
       how="`score --prefer sdpa,eager`, sdpa patched to raise \"FlashAttention only supports Ampere GPUs or newer.\"",
       expected="exit 0: the weights stay loaded, eager takes over, every row written; attn_impl records "
                "requested sdpa, used eager, the verify-stage reason; shard_done says eager")
def test_verify_failure_graceful(tiny_bert, texts_input, tmp_path, ampere_only_sdpa, cli, observe):
    events = tmp_path / "events"
    out = tmp_path / "out" / "out.parquet"
    result = cli("score", tiny_bert, "--input", texts_input, "--output", out, "--prefer", "sdpa,eager", "--events", events, "--quiet")
    assert result.code == 0, result
    table, ids, values = read_output(out)
    assert ids == list(range(120)) and np.isfinite(values).all()
    recorded = read_events(events)
    (impl,) = [e for e in recorded if e["event"] == "attn_impl"]
    assert impl["requested"] == "sdpa" and impl["used"] == "eager" and impl["fell_back"] is True
    first = impl["attempts"][0]
    assert first["impl"] == "sdpa" and first["stage"] == "verify" and AMPERE_ERROR in first["reasons"][0]
    (done,) = [e for e in recorded if e["event"] == "shard_done"]
    assert done["impl"] == "eager" and done["rows_written"] == 120
    observe(f"exit 0, 120/120 rows; attn_impl: sdpa -> eager, fell_back, attempt sdpa/verify `{first['reasons'][0][:70]}`; "
            f"events {[e['event'] for e in recorded]}")


@fault("Verification failure at the first forward (strict)",
       how="`score --policy strict --prefer sdpa,eager`, sdpa patched to raise the Ampere error",
       expected="exit 3 with the reason on stderr; attn_unavailable and shard_failed events; no output, no "
                "parts, no lock left")
def test_verify_failure_strict(tiny_bert, texts_input, tmp_path, ampere_only_sdpa, cli, observe):
    events = tmp_path / "events"
    out_dir = tmp_path / "out"
    result = cli("score", tiny_bert, "--input", texts_input, "--output", out_dir / "out.parquet", "--policy", "strict",
                 "--prefer", "sdpa,eager", "--events", events, "--quiet")
    assert result.code == 3, result
    assert AMPERE_ERROR in result.err
    recorded = read_events(events)
    assert [e["event"] for e in recorded] == ["attn_unavailable", "shard_failed"], recorded
    assert recorded[0]["requested"] == "sdpa" and recorded[0]["used"] is None
    assert recorded[1]["exit_code"] == 3
    left = snapshot(out_dir) if out_dir.exists() else set()
    assert left == set(), left
    observe(f"exit 3, `{result.error_line}`; events attn_unavailable, shard_failed(exit_code 3); "
            f"output directory empty")


# --- out of memory in the middle of a shard -----------------------------------------------------

@pytest.fixture
def oom_in_second_part(monkeypatch):
    """Batches of more than 8 rows raise CUDA's out-of-memory error while the second part runs."""
    import torch

    from attnfallback.scoring import pipeline, tasks

    state = {"chunk": None, "raised": 0}
    real_launch = pipeline.Scorer.launch
    real_forward = tasks.EmbedTask.forward

    def launch(self, prepared):
        state["chunk"] = prepared.chunk.index
        return real_launch(self, prepared)

    def forward(self, batch):
        if state["chunk"] == 1 and batch["input_ids"].shape[0] > 8:
            state["raised"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real_forward(self, batch)

    monkeypatch.setattr(pipeline.Scorer, "launch", launch)
    monkeypatch.setattr(tasks.EmbedTask, "forward", forward)
    return state


def _oom_argv(tiny_bert, texts_input, out, events, *extra):
    return ["score", tiny_bert, "--input", texts_input, "--output", out, "--part-rows", 40, "--prefer", "sdpa",
            "--events", events, "--quiet", *extra]


@fault("Out of memory in the middle of a shard (graceful)",
       how="CUDA's OutOfMemoryError raised for every batch of more than 8 rows while the 2nd of 3 parts runs",
       expected="the batch is split in halves until it fits, an oom_split event each time; exit 0; every row once, "
                "values equal to a run without the fault (within 1e-6)")
def test_oom_mid_shard_graceful(tiny_bert, texts_input, tmp_path, cli, monkeypatch, request, observe):
    clean_out = tmp_path / "clean.parquet"
    assert cli(*_oom_argv(tiny_bert, texts_input, clean_out, tmp_path / "clean-events")).code == 0
    _, clean_ids, clean_values = read_output(clean_out)
    state = request.getfixturevalue("oom_in_second_part")
    events = tmp_path / "events"
    out = tmp_path / "out.parquet"
    result = cli(*_oom_argv(tiny_bert, texts_input, out, events))
    assert result.code == 0, result
    assert state["raised"] >= 1
    _, ids, values = read_output(out)
    assert ids == clean_ids
    diff = float(np.abs(values - clean_values).max())
    assert diff <= 1e-6
    recorded = read_events(events)
    splits = [e for e in recorded if e["event"] == "oom_split"]
    (done,) = [e for e in recorded if e["event"] == "shard_done"]
    assert len(splits) == state["raised"] and done["oom_splits"] == len(splits) and done["rows_written"] == 120
    observe(f"{state['raised']} injected OOMs -> {len(splits)} oom_split events (rows {splits[0]['rows']} -> halves "
            f"{splits[0]['halves']}); exit 0, 120/120 rows, max |diff| vs clean {diff:.1e}")


@fault("Out of memory in the middle of a shard (strict)",
       how="as the graceful case, with --policy strict",
       expected="the run stops with exit 3 (issue 8: strict mode stops), the OOM recorded in the events; "
                "committed parts kept for --resume")
def test_oom_mid_shard_strict(tiny_bert, texts_input, tmp_path, cli, oom_in_second_part, observe):
    events = tmp_path / "events"
    result = cli(*_oom_argv(tiny_bert, texts_input, tmp_path / "out.parquet", events, "--policy", "strict"))
    recorded = kinds(events)
    observe(f"exit {result.code}; events {recorded}")
    assert result.code == 3, result
    assert "oom_split" in recorded or "shard_failed" in recorded


@fault("Out of memory that even one row cannot avoid",
       how="OutOfMemoryError raised for every forward of the 2nd part, whatever its size",
       expected="exit non-zero naming the out-of-memory error; oom_split events until single rows, then "
                "shard_failed; the first part stays committed and --resume continues from it")
def test_oom_on_a_single_row(tiny_bert, texts_input, tmp_path, cli, monkeypatch, observe):
    import torch

    from attnfallback.scoring import pipeline, tasks

    real_launch, real_forward = pipeline.Scorer.launch, tasks.EmbedTask.forward
    state = {"chunk": None}

    def launch(self, prepared):
        state["chunk"] = prepared.chunk.index
        return real_launch(self, prepared)

    def forward(self, batch):
        if state["chunk"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real_forward(self, batch)

    monkeypatch.setattr(pipeline.Scorer, "launch", launch)
    monkeypatch.setattr(tasks.EmbedTask, "forward", forward)
    events = tmp_path / "events"
    out = tmp_path / "out.parquet"
    result = cli(*_oom_argv(tiny_bert, texts_input, out, events))
    assert result.code not in (0, 2, -9), result
    assert "out of memory" in result.err.lower()
    assert not out.exists()
    recorded = read_events(events)
    splits = [e for e in recorded if e["event"] == "oom_split"]
    (failed,) = [e for e in recorded if e["event"] == "shard_failed"]
    # split down until a half of one row (which cannot be split) still runs out of memory
    assert splits and any(1 in e["halves"] for e in splits) and "out of memory" in failed["message"].lower()
    monkeypatch.setattr(tasks.EmbedTask, "forward", real_forward)
    resumed = cli(*_oom_argv(tiny_bert, texts_input, out, events, "--resume"))
    assert resumed.code == 0, resumed
    (done,) = [e for e in read_events(events) if e["event"] == "shard_done"]
    assert done["resumed_parts"] == 1 and done["rows_written"] == 120
    observe(f"exit {result.code} (`{result.error_line}`); {len(splits)} oom_split events down to 2 rows, then "
            f"shard_failed ({failed['parts_committed']} part committed); --resume: exit 0 from part 1, 120/120 rows")


# --- non-finite outputs --------------------------------------------------------------------------

POISON = "poison"


# --- a CUDA context lost in the middle of a shard ------------------------------------------------

# The child: the real entry point (main() with sys.argv, as the `attnfallback` script runs it), its
# 3rd part's launch raising what torch raises after a device-side assert. A dead CUDA context makes
# the process abort at exit (its destructors: "terminate called ...", SIGABRT); the child registers
# os.abort at exit at that moment, so a normal exit aborts the same way.
FATAL_CHILD = """
import atexit, os, sys
import torch
from attnfallback.scoring import pipeline

real_launch = pipeline.Scorer.launch

def launch(self, prepared):
    if prepared.chunk.index == 2:
        atexit.register(os.abort)
        raise torch.AcceleratorError("CUDA error: device-side assert triggered\\n"
                                     "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.")
    return real_launch(self, prepared)

pipeline.Scorer.launch = launch
from attnfallback.cli.app import main
sys.argv = ["attnfallback", *sys.argv[1:]]
main()
"""


@fault("CUDA context lost in the middle of a shard (device-side assert)",
       how="the real `attnfallback score` entry point in a subprocess; the 3rd of 5 parts' launch raises "
           "torch.AcceleratorError(\"CUDA error: device-side assert triggered\"), and the process is set to abort at "
           "exit as CUDA's destructors do with a dead context; then --resume",
       expected="exit 1 (not SIGABRT), stderr says the CUDA context failed and --resume continues; a shard_failed "
                "event with the error (fatal_device_error, 2 parts committed); --resume completes, every row once, "
                "equal to a clean run")
def test_cuda_context_lost_mid_shard(tiny_bert, texts_input, tmp_path, cli, observe):
    import subprocess
    import sys

    def argv(out, events, *extra):
        return ["score", str(tiny_bert), "--input", str(texts_input), "--output", str(out), "--part-rows", "24",
                "--first-part-rows", "24", "--prefer", "sdpa", "--events", str(events), "--run-id", "fatal", "--quiet", *extra]

    clean_out = tmp_path / "clean.parquet"
    assert cli(*argv(clean_out, tmp_path / "clean-events")).code == 0
    _, clean_ids, clean_values = read_output(clean_out)
    events = tmp_path / "events"
    out = tmp_path / "out" / "out.parquet"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", FATAL_CHILD, *argv(out, events)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    error_line = next((line for line in done.stderr.splitlines() if line.startswith("error:")), "")
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "the GPU failed and its CUDA context cannot be used again" in error_line and "--resume" in error_line, done.stderr
    assert "device-side assert triggered" in error_line
    recorded = read_events(events)
    (failed,) = [e for e in recorded if e["event"] == "shard_failed"]
    assert failed["error"] == "AcceleratorError" and failed["fatal_device_error"] is True and failed["exit_code"] == 1
    assert failed["parts_committed"] == 2 and "device-side assert" in failed["message"]
    assert not out.exists()
    resumed = cli(*argv(out, events, "--resume"))
    assert resumed.code == 0, resumed
    _, ids, values = read_output(out)
    assert ids == clean_ids and np.array_equal(values, clean_values)
    (done_event,) = [e for e in read_events(events) if e["event"] == "shard_done"]
    observe(f"exit {done.returncode}, `{error_line[:160]}`; shard_failed (AcceleratorError, fatal_device_error, "
            f"{failed['parts_committed']} parts committed); --resume: exit 0 from part {done_event['resumed_parts']}, "
            f"{len(ids)}/{len(clean_ids)} rows once, equal to a clean run")


@fault("Tokenizer whose ids the model's vocabulary cannot take",
       how="a tiny BERT whose embedding table has 1,000 rows, saved with the MiniLM tokenizer (30,522 tokens); "
           "`score` on it",
       expected="exit 2 at load, before any row is scored, naming the token id found and the vocabulary size (no "
                "IndexError, on a GPU no device-side assert); a shard_failed event with exit_code 2; nothing written",
       group="input")
def test_tokenizer_beyond_the_vocabulary(tmp_path, texts_input, cli, observe):
    from conftest import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "small-vocab", "bert", vocab_size=1000)
    events = tmp_path / "events"
    out = tmp_path / "out" / "out.parquet"
    result = cli("score", model_dir, "--input", texts_input, "--output", out, "--prefer", "sdpa,eager", "--events", events, "--quiet")
    assert result.code == 2, result
    assert "is beyond BertModel's vocabulary (1000 rows of input embeddings)" in result.error_line, result.error_line
    assert "expected token ids < 1000" in result.error_line and "IndexError" not in result.err
    (failed,) = [e for e in read_events(events) if e["event"] == "shard_failed"]
    assert failed["exit_code"] == 2 and failed["error"] == "TokenizerMismatchError"
    assert not out.exists()
    observe(f"exit 2: `{result.error_line[:200]}`; shard_failed exit_code 2; nothing written")


@pytest.fixture(scope="module")
def nan_model(tiny_bert, tmp_path_factory):
    """The tiny BERT with the word embedding of `poison` set to NaN: rows with that word give NaN."""
    import torch
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("nan-model")
    shutil.copytree(tiny_bert, path, dirs_exist_ok=True)
    model = BertModel.from_pretrained(path)
    token = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(POISON)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[token] = float("nan")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def poisoned_input(tmp_path_factory):
    texts = make_texts(60, seed=4)
    poisoned = [3, 17, 41]
    for i in poisoned:
        texts[i] = f"{texts[i]} {POISON}"
    path = write_jsonl(tmp_path_factory.mktemp("poisoned") / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    return path, [f"r{i}" for i in poisoned]


@fault("Non-finite outputs (default: refuse)",
       how="a tiny BERT whose word embedding of `poison` is NaN; 3 of 60 rows contain the word; no flag",
       expected="exit non-zero naming the 3 row ids; no output file; shard_failed event; never NaN written as numbers")
def test_nonfinite_refused(nan_model, poisoned_input, tmp_path, cli, observe):
    source, bad_ids = poisoned_input
    out = tmp_path / "out.parquet"
    events = tmp_path / "events"
    result = cli("score", nan_model, "--input", source, "--output", out, "--id-column", "id", "--events", events,
                 "--prefer", "sdpa", "--quiet")
    assert result.code not in (0, -9), result
    assert all(repr(i) in result.error_line for i in bad_ids), result.error_line
    assert not out.exists()
    assert not any(p.suffix == ".parquet" for p in tmp_path.glob("*.parquet"))
    assert "shard_failed" in kinds(events)
    observe(f"exit {result.code}: `{result.error_line}`; no output; shard_failed event")


@fault("Non-finite outputs (--on-nonfinite flag)",
       how="the same model and input with --on-nonfinite flag",
       expected="exit 0; a `nonfinite` column true for exactly the 3 poisoned rows, false and finite elsewhere; "
                "shard_done counts 3 non-finite rows")
def test_nonfinite_flagged(nan_model, poisoned_input, tmp_path, cli, observe):
    source, bad_ids = poisoned_input
    out = tmp_path / "out.parquet"
    events = tmp_path / "events"
    result = cli("score", nan_model, "--input", source, "--output", out, "--id-column", "id", "--on-nonfinite", "flag",
                 "--events", events, "--prefer", "sdpa", "--quiet")
    assert result.code == 0, result
    table, ids, values = read_output(out)
    flagged = [i for i, f in zip(ids, table.column("nonfinite").to_pylist()) if f]
    assert flagged == bad_ids
    finite_rows = np.isfinite(values).all(axis=1)
    assert [i for i, ok in zip(ids, finite_rows) if not ok] == bad_ids
    (done,) = [e for e in read_events(events) if e["event"] == "shard_done"]
    assert done["non_finite"] == 3
    observe(f"exit 0; nonfinite column true for {flagged}, every other row finite; shard_done non_finite=3")


# --- two runs on one output ------------------------------------------------------------------------

@fault("Two score runs on one output, same run id",
       how="run A is held at its first part write (holding the lock); run B, same output, same run id (with and "
           "without --resume), starts meanwhile",
       expected="B refused at once (exit 2, `locked by another run` with A's pid), writes nothing; "
                "A completes with every row once, untouched by B")
def test_two_runs_one_output(tiny_bert, texts_input, tmp_path, cli, observe):
    out = tmp_path / "out" / "out.parquet"
    events = tmp_path / "events"
    marker = tmp_path / "a-holds-the-lock"
    argv = ["score", tiny_bert, "--input", texts_input, "--output", out, "--part-rows", 40, "--prefer", "sdpa",
            "--events", events, "--run-id", "same", "--quiet"]
    first = runner.start(argv, cwd=tmp_path, logs=tmp_path / "logs",
                         injection=Injection(pause_step="write_part", pause_seconds=4.0, pause_marker=str(marker)))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline and first.process.is_alive(), "run A never reached its first part"
        time.sleep(0.05)
    before = snapshot(out.parent)
    second = cli(*argv)
    second_resume = cli(*argv, "--resume")
    during = snapshot(out.parent)
    a = first.wait()
    assert a.code == 0, a
    for b in (second, second_resume):
        assert b.code == 2 and "locked by another run" in b.error_line, b
        assert f"pid {first.pid}" in b.error_line
    assert during == before
    table, ids, _ = read_output(out)
    assert ids == list(range(120))
    done = [e for e in read_events(events) if e["event"] == "shard_done"]
    assert len(done) == 1 and done[0]["pid"] == first.pid
    observe(f"B: exit {second.code} and {second_resume.code} with --resume, `{second.error_line}`; "
            f"nothing changed under the output meanwhile; A: exit 0, 120/120 rows, one shard_done")


# --- what a resume or a rerun must not overwrite ------------------------------------------------

@fault("Input or settings changed before --resume",
       how="a run SIGKILLed after its 2nd committed part; then the input gains a row (or --max-length changes) "
           "and the run is resumed",
       expected="--resume refused (exit 2) naming what changed; the committed parts untouched; the "
                "unchanged job then resumes to every row once")
def test_resume_refuses_a_changed_job(tiny_bert, tmp_path, observe):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(100, seed=6)])
    out = tmp_path / "out" / "out.parquet"
    logs = tmp_path / "logs"

    def argv(*extra):
        return ["score", tiny_bert, "--input", source, "--output", out, "--part-rows", 20, "--prefer", "sdpa", "--quiet", *extra]

    killed = runner.run(argv(), cwd=tmp_path, logs=logs, injection=Injection(kill_step="rename_after", occurrence=5))
    assert killed.code == -9, killed  # renames: manifest, part 0, manifest, part 1, manifest: 2 parts committed
    parts = out.parent / ".out.parquet.parts"
    committed = {p.name: p.read_bytes() for p in parts.iterdir()}
    original, stat = source.read_bytes(), source.stat()
    source.write_bytes(original + b'{"text": "a row added before the resume"}\n')
    changed_input = runner.run(argv("--resume"), cwd=tmp_path, logs=logs)
    source.write_bytes(original)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the very same input again
    changed_length = runner.run(argv("--resume", "--max-length", 16), cwd=tmp_path, logs=logs)
    for result, needle in ((changed_input, "input_size"), (changed_length, "max_length")):
        assert result.code == 2 and "cannot resume" in result.error_line and needle in result.error_line, result
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in parts.iterdir() if not p.name.startswith(".")} == \
        {k: v for k, v in committed.items() if not k.startswith(".")}
    resumed = runner.run(argv("--resume", "--json"), cwd=tmp_path, logs=logs)
    assert resumed.code == 0, resumed
    import json

    data = json.loads(resumed.out)
    _, ids, _ = read_output(out)
    assert data["resumed_parts"] == 2 and ids == list(range(100))
    observe(f"changed input: exit {changed_input.code}, `{changed_input.error_line}`; changed --max-length: exit "
            f"{changed_length.code}; parts untouched; unchanged --resume: exit 0 from part 2, 100/100 rows")


@fault("Output name holding a file attnfallback did not write",
       how="--output pointing at an existing Parquet file of the user's (and, separately, at an existing directory)",
       expected="refused (exit 2) naming the path; the user's file byte-for-byte unchanged",
       group="input")
def test_foreign_output_is_not_overwritten(tiny_bert, texts_input, tmp_path, cli, observe):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "precious.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), out)
    before = out.read_bytes()
    result = cli("score", tiny_bert, "--input", texts_input, "--output", out, "--quiet")
    (tmp_path / "a-directory.parquet").mkdir()
    directory = cli("score", tiny_bert, "--input", texts_input, "--output", tmp_path / "a-directory.parquet", "--quiet")
    assert result.code == 2 and str(out) in result.error_line, result
    assert directory.code == 2 and "a-directory.parquet" in directory.error_line, directory
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory.parquet", "precious.parquet"]
    observe(f"exit {result.code}: `{result.error_line}`; directory: exit {directory.code}; the file unchanged")


@fault("Events location that cannot be written",
       how="--events pointing at a regular file (so no directory can be made under it)",
       expected="the run stops with exit non-zero naming the events path, rather than scoring without its audit "
                "trail; no output written")
def test_unwritable_events_location(tiny_bert, texts_input, tmp_path, cli, observe):
    events = tmp_path / "events-is-a-file"
    events.write_text("not a directory")
    out = tmp_path / "out" / "out.parquet"
    result = cli("score", tiny_bert, "--input", texts_input, "--output", out, "--events", events, "--quiet")
    assert result.code not in (0, -9), result
    assert str(events) in result.error_line
    assert not out.exists() and not (out.parent / ".out.parquet.lock").exists()
    observe(f"exit {result.code}: `{result.error_line}`; no output")
