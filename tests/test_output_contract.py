"""The output contract every engine shares (scoring/writer.py): a completed output carries its run's
summary under one key, and a later run keeps the file only by `check_complete`'s rules. The Ray
engine's resume decision (`completed_output`) is a plain function, checked here without Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnfallback.errors import OutputExistsError
from attnfallback.scoring.writer import (
    METADATA_KEY,
    check_complete,
    encode_metadata,
    output_metadata,
    read_output_metadata,
)
from attnfallback.sweep.ray_engine import completed_output, output_run_id

FINGERPRINT = {"model_identity": "sampled-sha256:abc", "task": "embed", "shard": "ray", "max_length": None}
RESULT = {"output": "out.parquet", "rows_in": 3, "rows_written": 2, "rows_skipped": 1, "skipped": [], "tokens": 12,
          "truncated": 0, "seconds": 1.5, "tokens_per_s": 8.0, "nonfinite": 0, "decision": {"used": "sdpa"},
          "run_id": "run-1", "shard": "ray (2 actors)"}


def write_output(path: Path, metadata: dict | None) -> Path:
    table = pa.table({"id": [0, 2], "score": [0.5, 0.25]})
    if metadata is not None:
        table = table.replace_schema_metadata(encode_metadata(metadata))
    pq.write_table(table, path)
    return path


def test_the_summary_round_trips_under_the_one_key(tmp_path):
    meta = output_metadata("run-1", FINGERPRINT, RESULT, [1])
    path = write_output(tmp_path / "out.parquet", meta)
    assert METADATA_KEY in pq.ParquetFile(path).metadata.metadata
    assert read_output_metadata(path) == meta and meta["format"] == "attnfallback.output/1"
    assert output_run_id(path) == "run-1"


def test_check_complete_keeps_only_this_jobs_output_under_resume(tmp_path):
    out = tmp_path / "out.parquet"
    meta = output_metadata("run-1", FINGERPRINT, RESULT, [1])
    assert check_complete(out, meta, dict(FINGERPRINT), resume=True) is meta
    with pytest.raises(OutputExistsError, match="not written by attnfallback"):
        check_complete(out, None, FINGERPRINT, resume=True)
    with pytest.raises(OutputExistsError, match=r"completed run \(run-1\); pass --resume"):
        check_complete(out, meta, FINGERPRINT, resume=False)
    with pytest.raises(OutputExistsError, match="different job \\(max_length: None then, 128 now\\)"):
        check_complete(out, meta, {**FINGERPRINT, "max_length": 128}, resume=True)


def test_ray_resume_refuses_a_parquet_file_without_the_summary(tmp_path):
    plain = write_output(tmp_path / "plain.parquet", None)
    with pytest.raises(OutputExistsError, match="not written by attnfallback") as err:
        completed_output(plain, FINGERPRINT, resume=True)
    assert err.value.exit_code == 2
    # a summary under another key (the Ray engine's old one) is no summary either
    old = pa.table({"id": [0]}).replace_schema_metadata({b"attnfallback.ray": b'{"run_id": "run-1", "engine": "ray"}'})
    pq.write_table(old, tmp_path / "old.parquet")
    with pytest.raises(OutputExistsError, match="not written by attnfallback"):
        completed_output(tmp_path / "old.parquet", FINGERPRINT, resume=True)
    assert output_run_id(tmp_path / "old.parquet") is None


def test_ray_resume_keeps_only_a_matching_completed_output(tmp_path):
    assert completed_output(tmp_path / "none.parquet", FINGERPRINT, resume=True) is None
    out = write_output(tmp_path / "out.parquet", output_metadata("run-1", FINGERPRINT, RESULT, [1]))
    kept = completed_output(out, FINGERPRINT, resume=True)
    assert kept.already_complete and kept.seconds == 0.0
    assert (kept.rows_in, kept.rows_written, kept.rows_skipped, kept.run_id) == (3, 2, 1, "run-1")
    with pytest.raises(OutputExistsError, match="different job"):
        completed_output(out, {**FINGERPRINT, "model_identity": "sampled-sha256:def"}, resume=True)
    with pytest.raises(OutputExistsError, match="pass --resume"):
        completed_output(out, FINGERPRINT, resume=False)
