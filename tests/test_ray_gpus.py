"""The Ray engine on a local Ray instance that declares two GPUs (a CPU machine: Ray hands out GPU ids
all the same): `actors="auto"` is one actor per GPU, each asking for one GPU, so Ray gives each its
own CUDA_VISIBLE_DEVICES; every actor's process has NVLink multicast off; rows exactly once, the same
output as `score`. Actors take half a CPU each so Ray Data's read tasks are never starved."""

from __future__ import annotations

import json
import logging

import pytest

from attnfallback.sweep.ray_engine import ray_available

pytestmark = [pytest.mark.ray, pytest.mark.skipif(not ray_available(), reason="ray is not installed (pip install attnfallback[ray])")]


@pytest.fixture(scope="module")
def ray_two_gpus():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_one_actor_per_gpu_each_with_its_own_gpu_and_multicast_off(ray_two_gpus, tiny_bert, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from attnfallback.scoring import ScoreJob, run_score
    from attnfallback.sweep.config import WORKER_ENV
    from attnfallback.sweep.ray_engine import run_score_ray
    rows = [{"id": f"q{(i * 5) % 16:02d}", "text": f"ray gpu row {i} " + "word " * (i % 4)} for i in range(16)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"model": str(tiny_bert), "input": str(path), "quiet": True}
    result = run_score_ray(ScoreJob(output=str(tmp_path / "ray.parquet"), **common), actors="auto", actor_cpus=0.5)
    actors = result.task["actors"]
    assert [a["shard"] for a in actors] == ["0/2", "1/2"]
    assert sorted(a["env"]["CUDA_VISIBLE_DEVICES"] for a in actors) == ["0", "1"]  # one GPU each, not shared
    assert all({k: a["env"][k] for k in WORKER_ENV} == WORKER_ENV for a in actors)
    assert all(a["gpu"]["class"] == "cpu" and "index" in a["gpu"] for a in actors)  # the actor's own probe
    assert sum(a["rows_in"] for a in actors) == result.rows_written == len(rows)
    local = run_score(ScoreJob(output=str(tmp_path / "local.parquet"), device="cpu", **common))
    ours, theirs = pq.read_table(result.output), pq.read_table(local.output)
    assert ours.column("id").to_pylist() == theirs.column("id").to_pylist() == [r["id"] for r in rows]
    a, b = np.asarray(ours.column("embedding").to_pylist()), np.asarray(theirs.column("embedding").to_pylist())
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # other batch compositions: rounding only


def test_actors_option_refuses_what_is_not_a_count(ray_two_gpus, tmp_path, capsys):
    from attnfallback.cli.app import main

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    code = main(["score", "default", "--input", str(path), "--output", str(tmp_path / "o.parquet"), "--engine", "ray",
                 "--actors", "many"])
    assert code == 2
    assert "--actors must be a positive integer or auto, found 'many'" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()
