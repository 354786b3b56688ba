"""CUDA's primary context through the driver (cuda_context.py), and the run's warm-up thread that uses it."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from attnfallback import cuda_context
from attnfallback.cuda_context import device_index, retain_primary_context, torch_built_with_cuda
from attnfallback.scoring import ScoreJob, job, run_score


@pytest.mark.parametrize("device, index", [("cuda", 0), ("auto", 0), ("cuda:3", 3), ("CUDA:1", 1), ("cpu", None), ("mps", None),
                                           ("cuda:x", None)])
def test_device_index_is_the_cuda_ordinal_a_device_value_runs_on(device, index):
    assert device_index(device) == index


def test_mode_is_the_driver_unless_torch_is_asked_for():
    assert cuda_context.mode({}) == "driver"
    assert cuda_context.mode({"ATTNFALLBACK_CUDA_CONTEXT": "torch"}) == "torch"
    assert cuda_context.mode({"ATTNFALLBACK_CUDA_CONTEXT": "TORCH "}) == "torch"
    assert cuda_context.mode({"ATTNFALLBACK_CUDA_CONTEXT": "bogus"}) == "driver"


def test_a_cuda_build_of_torch_is_told_by_its_library_on_disk(tmp_path):
    (tmp_path / "cpu" / "lib").mkdir(parents=True)
    (tmp_path / "cpu" / "lib" / "libtorch_cpu.so").write_bytes(b"")
    (tmp_path / "cuda" / "lib").mkdir(parents=True)
    (tmp_path / "cuda" / "lib" / "libtorch_cuda.so").write_bytes(b"")
    assert torch_built_with_cuda(tmp_path / "cuda") is True
    assert torch_built_with_cuda(tmp_path / "cpu") is False
    assert torch_built_with_cuda(tmp_path / "nothing") is False


class FakeDriver:
    """The three driver calls, recording their arguments; `fail` names one that returns an error."""

    def __init__(self, fail: str | None = None, code: int = 100):
        self.calls: list[tuple] = []
        self.fail, self.code = fail, code

    def _call(self, name, *args):
        self.calls.append((name, args))
        return self.code if name == self.fail else 0

    def cuInit(self, flags):
        return self._call("cuInit", flags)

    def cuDeviceGet(self, device_ref, ordinal):
        device_ref._obj.value = 40 + ordinal  # the driver's handle for that ordinal
        return self._call("cuDeviceGet", ordinal)

    def cuDevicePrimaryCtxRetain(self, context_ref, device):
        return self._call("cuDevicePrimaryCtxRetain", device.value)


def test_the_primary_context_is_retained_for_the_asked_device():
    driver = FakeDriver()
    assert retain_primary_context(2, driver=driver) is None
    assert driver.calls == [("cuInit", (0,)), ("cuDeviceGet", (2,)), ("cuDevicePrimaryCtxRetain", (42,))]


@pytest.mark.parametrize("fail, said", [("cuInit", "cuInit returned CUDA error 100"),
                                        ("cuDeviceGet", "cuDeviceGet returned CUDA error 100 (device 1)"),
                                        ("cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain returned CUDA error 100 (device 1)")])
def test_a_driver_error_is_said_and_stops_there(fail, said):
    driver = FakeDriver(fail=fail)
    assert retain_primary_context(1, driver=driver) == said
    assert driver.calls[-1][0] == fail


def test_no_driver_library_or_call_is_a_reason_not_an_error(monkeypatch):
    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert retain_primary_context(0).startswith("no CUDA driver library (libcuda.so.1")
    assert retain_primary_context(0, driver=object()) == "the CUDA driver has no cuInit"


@pytest.mark.parametrize("mode, retained", [("driver", [3]), ("torch", [])])
def test_the_warm_up_makes_the_context_through_the_driver_for_the_jobs_device(monkeypatch, mode, retained):
    seen = []
    monkeypatch.setattr(job, "torch_built_with_cuda", lambda: True)
    monkeypatch.setattr(job, "retain_primary_context", lambda index: seen.append(index))
    detail = job._warm_device("cuda:3", mode)
    assert seen == retained
    assert ("driver_context_s" in detail) == (mode == "driver")
    # on a machine without CUDA torch makes nothing; the context is the driver's wherever it made it
    assert detail["context"] == ("driver" if mode == "driver" else "none")
    assert detail["ready_s"] >= detail["torch_import_s"] >= 0


def test_a_driver_that_cannot_make_it_leaves_it_to_torch(monkeypatch):
    monkeypatch.setattr(job, "torch_built_with_cuda", lambda: True)
    monkeypatch.setattr(job, "retain_primary_context", lambda index: "cuInit returned CUDA error 100")
    detail = job._warm_device("cuda", "driver")
    assert detail["context"] == "none"  # no CUDA here, so torch made none either
    monkeypatch.setattr(job, "torch_built_with_cuda", lambda: False)
    monkeypatch.setattr(job, "retain_primary_context", lambda index: pytest.fail("a CPU build of torch needs no context"))
    assert "driver_context_s" not in job._warm_device("cuda", "driver")


def test_a_runs_phases_say_how_its_device_was_warmed(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(6)))
    result = run_score(ScoreJob(model="default", input=str(data), output=str(tmp_path / "out.parquet"), device="auto", quiet=True))
    detail = result.phases["device_detail"]
    assert detail["context"] in ("none", "driver", "torch") and detail["ready_s"] >= detail["torch_import_s"]
    cpu = run_score(ScoreJob(model="default", input=str(data), output=str(tmp_path / "cpu.parquet"), device="cpu", quiet=True))
    assert "device_detail" not in cpu.phases  # nothing to warm


def test_nothing_touches_the_driver_at_import():
    code = ("import ctypes, sys; opened = []; real = ctypes.CDLL\n"
            "ctypes.CDLL = lambda name, *a, **k: opened.append(name) or real(name, *a, **k)\n"
            "import attnfallback.cuda_context, attnfallback.scoring.job\n"
            "print(opened, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[]", "False"]
