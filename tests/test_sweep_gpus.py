"""Several GPUs of one host, on the CPU with injected GPU lists: devices = "auto" gives one worker per
visible GPU, each job's process sees only its GPU and has NVLink multicast off, the event names the
GPU from the worker's own probe (host index, UUID), and the Ray engine asks for one GPU per actor."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from attnfallback.errors import UsageError
from attnfallback.sweep.config import WORKER_ENV, parse_config

MULTICAST_ON = {"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "0", "NVSHMEM_DISABLE_NVLS": "0"}
ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS", *WORKER_ENV)

# A job process that records what it was started with, then runs the real `score` (on the CPU: no
# CUDA here, whatever CUDA_VISIBLE_DEVICES says).
RECORDING_SCORE = (
    "import json, os, sys\n"
    "json.dump({k: os.environ.get(k) for k in json.loads(sys.argv[2])}, open(sys.argv[1], 'w'))\n"
    "from attnfallback.cli.app import main\n"
    "sys.exit(main(sys.argv[3:]))\n"
)


def write_texts(path: Path, rows: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"row {i} of a sweep over two gpus " * (1 + i % 3)}) + "\n"
                            for i in range(rows)))
    return path


def test_visible_gpus_are_those_cuda_visible_devices_names(monkeypatch):
    from attnfallback.sweep.local import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa11,GPU-bb22")
    assert visible_gpus() == ["GPU-aa11", "GPU-bb22"]
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert visible_gpus() == []


def test_job_environment_turns_multicast_off_over_the_parents(tmp_path):
    from attnfallback.sweep.local import Worker, job_env

    write_texts(tmp_path / "t.jsonl", 2)
    job = parse_config({"output": "o", "input": "t.jsonl", "shards": 2}, base=tmp_path).jobs("r")[0]
    for worker in (Worker("gpu1", "cuda", "1"), Worker("cpu0", "cpu", "", 1)):
        env = job_env(worker, job, base={**MULTICAST_ON, "CUDA_VISIBLE_DEVICES": "0,1"})
        assert {k: env[k] for k in WORKER_ENV} == WORKER_ENV
        assert env["CUDA_VISIBLE_DEVICES"] == worker.visible
    assert WORKER_ENV == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def test_each_gpu_job_tokenizes_on_its_share_of_the_cores(tmp_path):
    # one tokenizer thread per GPU job (TOKENIZERS_PARALLELISM=false, the CPU workers' setting)
    # tokenizes ~6.5k rows/s: far below what one GPU scores
    from attnfallback.sweep.local import job_env, plan_workers

    write_texts(tmp_path / "t.jsonl", 2)
    config = parse_config({"output": "o", "input": "t.jsonl", "shards": 4}, base=tmp_path)
    job = config.jobs("r")[0]
    gpus = plan_workers(config, gpus=["0", "1"], cpu_count=32)
    assert [w.tokenizer_threads for w in gpus] == [16, 16] and all(w.threads is None for w in gpus)
    env = job_env(gpus[1], job, base={})
    assert (env["TOKENIZERS_PARALLELISM"], env["RAYON_NUM_THREADS"]) == ("true", "16")
    assert "OMP_NUM_THREADS" not in env
    assert job_env(gpus[1], job, base={"TOKENIZERS_PARALLELISM": "false"})["TOKENIZERS_PARALLELISM"] == "false"
    (cpu,) = plan_workers(parse_config({"output": "o", "input": "t.jsonl", "devices": "cpu"}, base=tmp_path), cpu_count=2)
    env = job_env(cpu, job, base={})
    assert env["TOKENIZERS_PARALLELISM"] == "false" and "RAYON_NUM_THREADS" not in env and env["OMP_NUM_THREADS"] == "2"


def test_devices_auto_runs_one_shard_per_visible_gpu_each_seeing_only_its_own(tiny_bert, tmp_path, monkeypatch):
    import attnfallback.sweep.local as local

    rows = 24
    write_texts(tmp_path / "texts.jsonl", rows)
    config = parse_config({"output": "out", "input": "texts.jsonl", "model": str(tiny_bert), "shards": 2,
                           "devices": "auto", "run_id": "two-gpus"}, base=tmp_path)
    # the sweep's own shell: two GPUs visible, multicast on
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    for name, value in MULTICAST_ON.items():
        monkeypatch.setenv(name, value)
    for name in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()

    def recording_command(job, worker, resume):
        assert worker.device == "cuda"  # a GPU worker: `score --device cuda`; run on the CPU here
        record = seen_dir / f"{job.shard.index}.json"
        job.write_job_file(device="cpu", resume=resume)
        return [sys.executable, "-c", RECORDING_SCORE, str(record), json.dumps(ENV_KEYS), *job.score_args()]

    monkeypatch.setattr(local, "job_command", recording_command)
    result = local.run_local(config)
    assert result.exit_code == 0, [j.error_text for j in result.failed]
    workers = {j.shard: j.worker for j in result.jobs}
    assert sorted(workers.values()) == ["gpu3", "gpu7"]  # one shard on each GPU
    for job in result.jobs:
        seen = json.loads((seen_dir / f"{job.shard.split('/')[0]}.json").read_text())
        assert seen == {"CUDA_VISIBLE_DEVICES": job.worker.removeprefix("gpu"), "TOKENIZERS_PARALLELISM": "true",
                        "RAYON_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2)), **WORKER_ENV}
    ids = pq.read_table(result.merged["main"]["path"]).column("id").to_pylist()
    assert ids == list(range(rows))


class FakeProps(SimpleNamespace):
    pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a process that sees one H200 (its device 0) reports it, without CUDA."""
    import torch

    class FakeUuid:
        def __str__(self):
            return "8f1c2d3e-0000-1111-2222-333344445555"

    props = FakeProps(name="NVIDIA H200", major=9, minor=0, total_memory=150_000_000_000, uuid=FakeUuid())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    return props


def test_the_event_names_the_gpu_of_the_host_from_the_workers_own_probe(fake_cuda, monkeypatch):
    from attnfallback.caps import probe_device
    from attnfallback.decision import Attempt, Decision
    from attnfallback.model_facts import read_facts
    from attnfallback.policy import Policy

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # what the sweep gives the worker of GPU 1
    device = probe_device("cuda")
    assert (device.index, device.host_index, device.uuid) == (0, 1, "GPU-8f1c2d3e-0000-1111-2222-333344445555")
    assert device.torch_device == "cuda:0"
    decision = Decision("sdpa", "sdpa", [Attempt("sdpa", "verify", True)], Policy.graceful(), "bfloat16", device,
                        read_facts("default"), {})
    gpu = decision.to_dict()["gpu"]
    assert gpu == {"name": "NVIDIA H200", "class": "H200", "cc": "9.0", "memory_gb": 150.0, "index": 1,
                   "uuid": "GPU-8f1c2d3e-0000-1111-2222-333344445555"}

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # every GPU visible: the host index is torch's
    assert probe_device("cuda").host_index == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f1c2d3e")  # named by UUID: no index to give
    assert probe_device("cuda").host_index is None
    del fake_cuda.uuid  # a torch without UUIDs
    assert probe_device("cuda").uuid is None


def test_host_gpu_index_reads_this_process_s_visible_devices():
    from attnfallback.caps import host_gpu_index

    assert host_gpu_index(0, env={}) == 0 and host_gpu_index(3, env={}) == 3
    assert host_gpu_index(1, env={"CUDA_VISIBLE_DEVICES": "4,6"}) == 6
    assert host_gpu_index(0, env={"CUDA_VISIBLE_DEVICES": "MIG-1a2b"}) is None
    assert host_gpu_index(2, env={"CUDA_VISIBLE_DEVICES": "4,6"}) is None


def test_a_cpu_event_has_no_gpu_index():
    from attnfallback.caps import DeviceCaps
    from attnfallback.decision import Attempt, Decision
    from attnfallback.model_facts import read_facts
    from attnfallback.policy import Policy

    gpu = Decision("sdpa", "sdpa", [Attempt("sdpa", "verify", True)], Policy.graceful(), "float32", DeviceCaps.cpu(),
                   read_facts("default"), {}).to_dict()["gpu"]
    assert gpu["class"] == "cpu" and gpu["index"] is None and gpu["uuid"] is None


class FakeRay:
    def __init__(self, resources: dict):
        self.resources = resources

    def cluster_resources(self) -> dict:
        return dict(self.resources)


def test_ray_actors_auto_is_one_actor_per_gpu_with_one_gpu_each():
    from attnfallback.sweep.ray_engine import CPU_ACTORS, _resources

    two_gpus = FakeRay({"CPU": 32.0, "GPU": 2.0})
    assert _resources(two_gpus, "auto", None) == ({"num_gpus": 1, "num_cpus": 1}, 2, None)
    assert _resources(two_gpus, 4, None)[1] == 2  # never more actors than GPUs
    assert _resources(two_gpus, 1, 0.5) == ({"num_gpus": 1, "num_cpus": 0.5}, 1, None)
    remote, actors, threads = _resources(two_gpus, "auto", None, device="cpu")  # --device cpu: GPUs ignored
    assert "num_gpus" not in remote and actors == CPU_ACTORS == 2
    remote, actors, threads = _resources(FakeRay({"CPU": 2.0}), "auto", None)
    assert (remote, actors, threads) == ({"num_cpus": 0.5}, 2, 1)  # a CPU left to Ray Data's reads


def test_actors_option_is_a_positive_integer_or_auto():
    from attnfallback.sweep.ray_engine import parse_actors

    assert parse_actors("auto") == parse_actors(" AUTO ") == "auto"
    assert parse_actors("3") == parse_actors(3) == 3
    for bad, message in (("0", ">= 1, found 0"), (0, ">= 1, found 0"), ("two", "positive integer or auto, found 'two'"),
                         (True, "positive integer or auto")):
        with pytest.raises(UsageError, match=message):
            parse_actors(bad)


def test_the_events_query_reads_the_gpu_index_and_uuid(tmp_path):
    pytest.importorskip("duckdb")
    import dataclasses

    from attnfallback.caps import DeviceCaps
    from attnfallback.decision import Attempt, Decision
    from attnfallback.events import open_log, open_sink
    from attnfallback.model_facts import read_facts
    from attnfallback.policy import Policy

    facts = read_facts("default")

    def fields(device):
        return Decision("sdpa", "sdpa", [Attempt("sdpa", "verify", True)], Policy.graceful(), "bfloat16", device, facts,
                        {}).to_dict()

    h200 = DeviceCaps.from_class("H200")
    for i in range(2):
        with open_sink(tmp_path, "two-gpus", f"{i}/2") as sink:
            sink.emit("attn_impl", **fields(dataclasses.replace(h200, host_index=i, uuid=f"GPU-{i}{i}")))
    older = fields(h200)
    del older["gpu"]["index"], older["gpu"]["uuid"]  # an event written before these fields existed
    with open_sink(tmp_path, "older", "0/1") as sink:
        sink.emit("attn_impl", **older)
    with open_log(tmp_path) as log:
        rows = log.sql("SELECT run_id, shard, gpu_index, gpu_uuid FROM attn_impl ORDER BY run_id, shard").to_pylist()
    assert rows == [{"run_id": "older", "shard": "0/1", "gpu_index": None, "gpu_uuid": None},
                    {"run_id": "two-gpus", "shard": "0/2", "gpu_index": 0, "gpu_uuid": "GPU-00"},
                    {"run_id": "two-gpus", "shard": "1/2", "gpu_index": 1, "gpu_uuid": "GPU-11"}]
