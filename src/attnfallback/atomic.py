"""Atomic file writes: a reader sees the old file or the whole new one, never part of one.

    atomic.write_json(path, manifest, indent=2)
    with atomic.writing(path) as fh:        # a writer that wants a file object (Parquet)
        pq.write_table(table, fh)
    atomic.replace_into(tmp, path)          # a temporary file the caller wrote and closed itself

The new content goes to a temporary file beside the target (`temp_path`: `.NAME.tmp-PID-THREAD`,
so no two processes or threads share one), is fsynced and renamed over the target; then the
directory is fsynced, so the rename survives a power loss too. A write that fails removes its
temporary file and raises. A leaf: the standard library only.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name beside `path` that this process and thread write into."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync `directory`, so that a rename in it is durable; nothing where the system does not allow it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file for `path`'s new content: fsynced and renamed over `path` when the block ends,
    removed when it raises."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`, atomically."""
    with writing(path) as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text`, atomically."""
    write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, **dumps_options: Any) -> None:
    """Replace `path` with `obj` as JSON (`json.dumps` options) and a final newline, atomically."""
    write_text(path, json.dumps(obj, **dumps_options) + "\n")


def replace_into(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move `tmp`, written and closed by the caller, over `path`: fsync it, rename it, fsync the
    directory. `tmp` is removed when that fails."""
    tmp, path = Path(tmp), Path(path)
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
