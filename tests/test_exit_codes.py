"""Exit codes that tell the truth: an output the user must fix is bad usage (2), not an unexpected
error (1); exit 1 stays for the unexpected."""

from __future__ import annotations

import errno
import json

import pytest

from attnfallback.cli.app import main
from attnfallback.errors import OutputError, OutputRefused
from attnfallback.scoring.writer import PartStore, output_os_error
from scoring_helpers import add_sentence_config, write_jsonl
from conftest import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return add_sentence_config(build_tiny_model(tmp_path_factory.mktemp("exit-bert"), "bert"))


@pytest.fixture
def texts(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", [{"text": f"row {i}"} for i in range(3)])


def score(model_dir, texts, output, *extra):
    return main(["score", str(model_dir), "--input", str(texts), "--output", str(output), "--quiet", "--device", "cpu",
                 "--prefer", "eager", *extra])


def test_an_output_that_is_a_directory_exits_2(model_dir, texts, tmp_path, capsys):
    (tmp_path / "out.parquet").mkdir()
    assert score(model_dir, texts, tmp_path / "out.parquet") == 2
    assert "is a directory" in capsys.readouterr().err


def test_another_runs_output_exits_2(model_dir, texts, tmp_path, capsys):
    out = tmp_path / "out.parquet"
    assert score(model_dir, texts, out, "--run-id", "first") == 0
    capsys.readouterr()
    assert score(model_dir, texts, out, "--run-id", "second") == 2
    assert "exists from a completed run (first)" in capsys.readouterr().err


def test_a_locked_output_exits_2(model_dir, texts, tmp_path, capsys):
    holder = PartStore(tmp_path / "out.parquet")
    holder.open("holder-run")
    try:
        assert score(model_dir, texts, tmp_path / "out.parquet") == 2
        assert "locked by another run" in capsys.readouterr().err
    finally:
        holder.close()


def test_an_output_directory_that_cannot_be_made_exits_2(model_dir, texts, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    assert score(model_dir, texts, tmp_path / "a-file" / "out.parquet") == 2
    assert "cannot create the output directory" in capsys.readouterr().err


@pytest.mark.parametrize("code, refused", [(errno.EROFS, True), (errno.EACCES, True), (errno.ENOTDIR, True),
                                           (errno.ENOSPC, False), (errno.EIO, False)])
def test_os_errors_at_the_output_are_usage_where_the_user_can_fix_them(code, refused):
    err = output_os_error("cannot create the lock /x/.o.lock", OSError(code, "boom"), "/x/.o.lock")
    assert isinstance(err, OutputError) and isinstance(err, OutputRefused) is refused
    assert err.exit_code == (2 if refused else 1) and err.path == "/x/.o.lock"


@pytest.mark.parametrize("bad", [False, True])
def test_a_process_ends_with_its_code_after_its_exit_handlers_and_a_whole_output(model_dir, texts, tmp_path, bad):
    """As a process the command line ends with the command's exit code, after its exit handlers,
    with the output whole."""
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    marker = tmp_path / "handlers-ran"
    output = tmp_path / "out.parquet"
    source = tmp_path / "missing.jsonl" if bad else texts
    program = (f"import atexit, pathlib; atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes'); "
               "import sys; from attnfallback.cli.app import main; "
               f"sys.argv = ['attnfallback', 'score', {str(model_dir)!r}, '--input', {str(source)!r}, '--output', {str(output)!r}, "
               "'--quiet', '--json', '--device', 'cpu', '--prefer', 'eager']; main(); print('not reached')")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == (2 if bad else 0), proc.stderr
    assert "not reached" not in proc.stdout
    assert marker.read_text() == "yes"
    if not bad:
        assert pq.read_table(output).num_rows == 3
        assert json.loads(proc.stdout)["rows_written"] == 3  # stdout flushed before the process ended
