"""The run's warm-up thread: torch imported and CUDA's context made on the job's own device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnfallback.scoring import ScoreJob, job, run_score


@pytest.mark.parametrize("device, index", [("cuda", 0), ("auto", 0), ("cuda:3", 3), ("CUDA:1", 1), ("cpu", None), ("mps", None),
                                           ("cuda:x", None)])
def test_device_index_is_the_cuda_ordinal_a_device_value_runs_on(device, index):
    assert job.device_index(device) == index


def test_the_warm_up_without_cuda_imports_torch_and_makes_nothing():
    detail = job._warm_device("cuda:3")
    assert detail["context"] == "none" and "cublas_s" not in detail  # this machine has no CUDA device
    assert detail["ready_s"] >= detail["torch_import_s"] >= 0


def test_a_runs_phases_say_how_its_device_was_warmed(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(6)))
    result = run_score(ScoreJob(model="default", input=str(data), output=str(tmp_path / "out.parquet"), device="auto", quiet=True))
    detail = result.phases["device_detail"]
    assert detail["context"] in ("none", "torch") and detail["ready_s"] >= detail["torch_import_s"]
    cpu = run_score(ScoreJob(model="default", input=str(data), output=str(tmp_path / "cpu.parquet"), device="cpu", quiet=True))
    assert "device_detail" not in cpu.phases  # nothing to warm


def test_nothing_imports_torch_when_the_job_module_is_imported():
    code = "import sys, attnfallback.scoring.job\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False"]
