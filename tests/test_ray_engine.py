"""Ray engine on a local Ray instance on the CPU (two actors): the same output as `score`, each actor
a shard in the events, strict failures with exit 3. One Ray instance for the module (start-up costs
seconds); actors take half a CPU each so Ray Data's read tasks are never starved (a silent hang)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from attnfallback.errors import UsageError
from attnfallback.sweep.ray_engine import ray_available

pytestmark = [pytest.mark.ray, pytest.mark.skipif(not ray_available(), reason="ray is not installed (pip install attnfallback[ray])")]

ROWS = 60


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


def write_texts(path: Path, rows: int = ROWS, empty_at: int | None = None) -> Path:
    rng = random.Random(3)
    words = "ray actors score shards on nodes of several gpu classes and fall back when flash is missing".split()
    lines = []
    for i in range(rows):
        text = "" if i == empty_at else " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        lines.append({"key": f"k{i:03d}", "text": text})
    if path.suffix == ".csv":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.table({"key": [r["key"] for r in lines], "text": [r["text"] for r in lines]}), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def assert_same_output(actual_path, expected_path):
    import numpy as np

    actual, expected = pq.read_table(actual_path), pq.read_table(expected_path)
    assert actual.schema.remove_metadata() == expected.schema.remove_metadata()
    assert actual.column("id").to_pylist() == expected.column("id").to_pylist()
    a = np.asarray(actual.column("embedding").to_pylist())
    b = np.asarray(expected.column("embedding").to_pylist())
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # other batch compositions: rounding only


def test_sweep_on_ray_matches_score_and_each_actor_is_a_shard(ray_local, tiny_bert, tmp_path):
    from attnfallback.scoring import ScoreJob, run_score
    from attnfallback.sweep.config import parse_config
    from attnfallback.sweep.ray_engine import run_sweep_ray

    # CSV with string ids and one empty text, skipped: the same rows, ids and order as `score`
    texts = write_texts(tmp_path / "texts.csv", empty_at=5)
    common = {"model": str(tiny_bert), "id_column": "key", "text_column": "text", "on_bad_row": "skip",
              "prefer": ["flash_attention_2", "sdpa", "eager"]}
    config = parse_config({"output": "out", "input": texts.name, "shards": 2, "run_id": "ray-test", **common}, base=tmp_path)
    result = run_sweep_ray(config)
    assert result.exit_code == 0, [j.error_text for j in result.failed]
    assert [j.shard for j in result.jobs] == ["0/2", "1/2"]

    single = run_score(ScoreJob(input=str(texts), output=str(tmp_path / "single.parquet"), device="cpu", quiet=True, **common))
    assert (single.rows_written, single.rows_skipped) == (ROWS - 1, 1)
    assert_same_output(result.merged["main"]["path"], single.output)
    ids = pq.read_table(result.merged["main"]["path"]).column("id").to_pylist()
    assert ids[:6] == ["k000", "k001", "k002", "k003", "k004", "k006"]

    # the events: one attn_impl per actor with its node's GPU class, and a shard_done per actor;
    # rows in = rows written + rows skipped over the actors
    shards = result.shards
    assert [s["shard"] for s in shards] == ["0/2", "1/2"]
    assert all(s["run_id"] == "ray-test" and s["gpu_class"] == "cpu" and s["used"] == "sdpa" and s["done"] for s in shards), shards
    assert sum(s["rows"] for s in shards) == ROWS - 1 and sum(s["skipped"] for s in shards) == 1  # written, skipped
    assert sum(s["rows_in"] for s in shards) == ROWS
    assert sum(j.score["rows_written"] for j in result.jobs) == ROWS - 1
    assert all(j.score["rows_in"] > 0 for j in result.jobs)  # both actors scored
    assert result.summary[0]["shards"] == 2 and result.summary[0]["fell_back"] == 2

    # resume: the configuration is complete, nothing runs again
    again = run_sweep_ray(config, resume=True)
    assert [j.status for j in again.jobs] == ["complete", "complete"] and again.exit_code == 0


def test_strict_failure_on_ray_exits_3_with_reasons_in_the_events(ray_local, tiny_bert, tmp_path):
    from attnfallback.events import open_log
    from attnfallback.sweep.config import parse_config
    from attnfallback.sweep.ray_engine import run_sweep_ray

    write_texts(tmp_path / "texts.jsonl", rows=8)
    config = parse_config({"output": "out", "input": "texts.jsonl", "model": str(tiny_bert), "shards": 2,
                           "policy": "strict", "prefer": ["flash_attention_2", "sdpa"]}, base=tmp_path)
    result = run_sweep_ray(config)
    assert result.exit_code == 3
    assert result.failed and all("flash_attention_2" in j.error_text for j in result.failed)
    with open_log(config.events) as log:
        failures = log.fallbacks().to_pylist()
    assert failures and {f["outcome"] for f in failures} == {"unavailable"}
    assert all(f["requested"] == "flash_attention_2" for f in failures)


def test_shard_flag_is_refused_on_ray(tmp_path):
    from attnfallback.scoring import ScoreJob
    from attnfallback.sweep.ray_engine import run_score_ray

    texts = write_texts(tmp_path / "texts.jsonl", rows=2)
    with pytest.raises(UsageError, match="--actors"):
        run_score_ray(ScoreJob(input=str(texts), output=str(tmp_path / "o.parquet"), shard="0/2"), actors=2)


def test_score_engine_dispatch_refuses_unknown_engines_and_stray_addresses(tmp_path):
    from attnfallback.errors import UnknownNameError
    from attnfallback.scoring import ScoreJob
    from attnfallback.sweep.engines import run_score_engine

    job = ScoreJob(input=str(tmp_path / "t.jsonl"), output=str(tmp_path / "o.parquet"))
    with pytest.raises(UnknownNameError, match="local, ray"):
        run_score_engine(job, engine="spark")
    with pytest.raises(UsageError, match="--engine ray"):
        run_score_engine(job, engine="local", address="ray://head:10001")


@pytest.mark.parametrize("kind", ["jsonl.gz", "csv.zst", "saved-dataset"])
def test_ray_reads_compressed_files_and_saved_datasets_with_the_default_id(ray_local, tiny_bert, tmp_path, kind):
    import gzip

    import pyarrow as pa

    from attnfallback.scoring import ScoreJob, run_score
    from attnfallback.sweep.ray_engine import run_score_ray
    from scoring_helpers import save_like_datasets

    # ids out of order, in a column named `id`: both engines use it without being told
    rows = [{"id": f"r{(i * 7) % 24:02d}", "text": f"ray row {i} " + "word " * (i % 5)} for i in range(24)]
    if kind == "saved-dataset":
        path = save_like_datasets(tmp_path / "ds", pa.Table.from_pylist(rows))
    elif kind == "jsonl.gz":
        path = tmp_path / "in.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    else:
        path = tmp_path / "in.csv.zst"
        text = "id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in rows)
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(text.encode())
    common = {"model": str(tiny_bert), "input": str(path), "device": "cpu", "quiet": True}
    result = run_score_ray(ScoreJob(output=str(tmp_path / "ray.parquet"), **common), actors=2, actor_cpus=0.5)
    local = run_score(ScoreJob(output=str(tmp_path / "local.parquet"), **common))
    assert result.rows_written == local.rows_written == len(rows)
    assert result.columns == local.columns == {"text": ["text"], "text_guessed": False, "id": "id", "id_from": "default"}
    assert_same_output(result.output, local.output)
    assert pq.read_table(result.output).column("id").to_pylist() == [r["id"] for r in rows]


def test_duplicate_default_ids_are_refused_before_ray_starts(tmp_path):
    from attnfallback.errors import InputError
    from attnfallback.scoring import ScoreJob
    from attnfallback.sweep.ray_engine import run_score_ray

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i % 3, "text": f"row {i}"}) + "\n" for i in range(5)))
    with pytest.raises(InputError, match=r"in\.jsonl:4: duplicate id 0 in column 'id' \(first on line 1\)") as err:
        run_score_ray(ScoreJob(input=str(path), output=str(tmp_path / "o.parquet")), actors=2)
    assert err.value.exit_code == 2 and not (tmp_path / "o.parquet").exists()


def test_ray_resume_refuses_a_parquet_file_it_did_not_write(tiny_bert, tmp_path):
    import pyarrow as pa

    from attnfallback.errors import OutputExistsError
    from attnfallback.scoring import ScoreJob
    from attnfallback.sweep.ray_engine import run_score_ray

    texts = write_texts(tmp_path / "texts.jsonl", rows=4)
    out = tmp_path / "o.parquet"
    pq.write_table(pa.table({"id": [0], "embedding": [[0.0]]}), out)  # a plain Parquet file: no run summary
    job = ScoreJob(model=str(tiny_bert), input=str(texts), output=str(out), id_column="key", resume=True, device="cpu")
    with pytest.raises(OutputExistsError, match="not written by attnfallback"):
        run_score_ray(job, actors=2)
    assert pq.read_table(out).num_rows == 1  # left as it was


def test_ray_output_carries_the_run_summary_and_resume_keeps_only_the_same_job(ray_local, tiny_bert, tmp_path):
    from dataclasses import replace

    from attnfallback.errors import OutputExistsError
    from attnfallback.scoring import ScoreJob
    from attnfallback.scoring.writer import read_output_metadata
    from attnfallback.sweep.ray_engine import run_score_ray

    texts = write_texts(tmp_path / "texts.jsonl", rows=12, empty_at=3)
    out = tmp_path / "ray.parquet"
    job = ScoreJob(model=str(tiny_bert), input=str(texts), output=str(out), id_column="key", text_column="text",
                   on_bad_row="skip", device="cpu", quiet=True, run_id="ray-resume")
    first = run_score_ray(job, actors=2, actor_cpus=0.5)
    meta = read_output_metadata(out)
    assert meta["run_id"] == "ray-resume" and meta["skipped_rows"] == [3]
    assert meta["fingerprint"]["shard"] == "ray" and meta["result"]["rows_written"] == first.rows_written == 11
    assert not list(tmp_path.glob(".ray.parquet.tmp-*"))

    with pytest.raises(OutputExistsError, match="pass --resume"):
        run_score_ray(job, actors=2)
    again = run_score_ray(replace(job, resume=True), actors=2)
    assert again.already_complete and (again.rows_in, again.rows_written, again.rows_skipped) == (12, 11, 1)
    with pytest.raises(OutputExistsError, match="different job \\(max_length"):
        run_score_ray(replace(job, resume=True, max_length=16), actors=2)
