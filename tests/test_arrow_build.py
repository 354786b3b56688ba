"""arrow_build: the same arrays as pyarrow.array, without importing pandas."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnfallback import arrow_build
from conftest import build_tiny_model
from scoring_helpers import write_jsonl


@pytest.mark.parametrize("type_", [pa.int8(), pa.int32(), pa.int64(), pa.uint16(), pa.float16(), pa.float32(), pa.float64()])
def test_numeric_equals_pyarrow(type_):
    values = np.array([0, 1, -1, 7, 3], dtype=np.float64)
    if pa.types.is_unsigned_integer(type_):
        values = np.abs(values)
    expected = pa.array(values.astype(type_.to_pandas_dtype()), type=type_)
    built = arrow_build.numeric(values, type_)
    assert built.type == type_ and built.equals(expected)


def test_booleans_are_bit_packed():
    flags = [True, False, False, True, True, False, True, True, False, True]
    assert arrow_build.numeric(np.array(flags), pa.bool_()).to_pylist() == flags


def test_strings_and_lists():
    words = ["a", "héllo", "", "日本語"]
    assert arrow_build.strings(words).to_pylist() == words
    assert arrow_build.strings(words, pa.large_string()).type == pa.large_string()
    matrix = np.arange(6, dtype=np.float32).reshape(3, 2)
    built = arrow_build.float_lists(matrix)
    assert built.type == pa.list_(pa.float32()) and built.to_pylist() == matrix.tolist()
    assert len(arrow_build.float_lists(np.zeros((0, 4), np.float32))) == 0
    assert len(arrow_build.empty(pa.list_(pa.float32()))) == 0


def test_of_type_falls_back_for_nulls_and_other_types():
    assert arrow_build.of_type([1, None], pa.int64()).to_pylist() == [1, None]
    assert arrow_build.of_type(["x", None], pa.string()).to_pylist() == ["x", None]
    assert arrow_build.of_type([3, 4], pa.int64()).to_pylist() == [3, 4]
    assert arrow_build.of_type(np.array([0.5]), pa.float32()).to_pylist() == [0.5]


def test_no_pandas_import():
    code = ("import sys, numpy as np, pyarrow as pa\n"
            "from attnfallback import arrow_build as b\n"
            "b.numeric(np.arange(3), pa.int64()); b.numeric([True], pa.bool_()); b.strings(['a'])\n"
            "b.float_lists(np.ones((2, 2), np.float32)); b.empty(pa.float32()); b.of_type(['id'], pa.string())\n"
            "print('pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="pandas is not installed: nothing to avoid")
@pytest.mark.parametrize("kind, task", [("bert", "embed"), ("bert-classify", "classify"), ("qwen2", "logprob")])
def test_a_shard_does_not_import_pandas(tmp_path, kind, task):
    """Every task's output is written without pandas (which pyarrow.array would import)."""
    model = build_tiny_model(tmp_path / kind, kind)
    texts = write_jsonl(tmp_path / "in.jsonl", [{"text": f"row number {i}", "id": f"r{i}"} for i in range(5)])
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run([sys.executable, "-m", "attnfallback.cli.app", "score", str(model), "--task", task, "--input",
                           str(texts), "--output", str(tmp_path / "out.parquet"), "--id-column", "id", "--device", "cpu",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported  # the log is read right
    assert "pandas" not in imported
    assert pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == [f"r{i}" for i in range(5)]
