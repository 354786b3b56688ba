"""atomic.py: the content lands whole, no temporary file is left after a success or a failure, and
writers on several threads never tear each other's file."""

from __future__ import annotations

import json
import os
import threading

import pytest

from attnfallback import atomic


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_writes_bytes_text_and_json_over_an_existing_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    atomic.write_bytes(path, b"\x00new\xff")
    assert path.read_bytes() == b"\x00new\xff"
    atomic.write_text(path, "h\u00e9")
    assert path.read_bytes() == "h\u00e9".encode()
    atomic.write_json(path, {"b": [1, 2], "when": object}, indent=2, default=str)
    assert path.read_text().endswith("\n") and json.loads(path.read_text())["b"] == [1, 2]
    assert leftovers(tmp_path) == []


def test_writing_yields_a_file_and_fsyncs_it_and_the_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "table.parquet"
    with atomic.writing(path) as fh:
        fh.write(b"abc")
        assert not path.exists() and fh.name == str(atomic.temp_path(path))
    assert path.read_bytes() == b"abc" and leftovers(tmp_path) == []
    assert len(synced) == 2  # the file, then its directory


def test_an_exception_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="half"):
        with atomic.writing(path) as fh:
            fh.write(b"half of the ")
            raise RuntimeError("half written")
    with pytest.raises(TypeError):
        atomic.write_json(path, {"not json": object()})
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_replace_into_moves_a_closed_temporary_and_removes_it_when_the_rename_fails(tmp_path):
    tmp = atomic.temp_path(tmp_path / "out.parquet")
    tmp.write_bytes(b"final")
    atomic.replace_into(tmp, tmp_path / "out.parquet")
    assert (tmp_path / "out.parquet").read_bytes() == b"final" and not tmp.exists()

    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-directory" / "inside").write_text("x")
    tmp.write_bytes(b"again")
    with pytest.raises(OSError):
        atomic.replace_into(tmp, tmp_path / "a-directory")  # a non-empty directory cannot be replaced
    assert not tmp.exists() and leftovers(tmp_path) == []


def test_temporary_names_differ_between_live_threads(tmp_path):
    names = []
    alive = threading.Barrier(4)  # a finished thread's identifier may be reused: all four run at once

    def name():
        names.append(atomic.temp_path(tmp_path / "f"))
        alive.wait()

    threads = [threading.Thread(target=name) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 4 and all(str(os.getpid()) in n.name for n in names)


def test_concurrent_writers_on_threads_leave_one_whole_content(tmp_path):
    path = tmp_path / "shared.json"
    contents = {i: {"writer": i, "payload": [i] * 20_000} for i in range(8)}
    errors = []
    start = threading.Barrier(len(contents))

    def write(i):
        try:
            start.wait()
            for _ in range(5):
                atomic.write_json(path, contents[i])
                assert json.loads(path.read_text()) in contents.values()  # never a torn or mixed file
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text()) in contents.values()
    assert leftovers(tmp_path) == []
