"""The event sink: one JSONL file per (run, shard) under `DIR/<run_id>/<shard>.jsonl`.

Each event is one `os.write` of one complete line on a descriptor opened with O_APPEND, so
writers in many processes and threads never interleave inside a line, and a killed writer leaves
at most one torn last line (which the reader reports). Data reaches the kernel at every event;
`fsync` additionally makes the decisive kinds (`attn_impl`, `attn_unavailable`) survive a power
loss by default.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attnfallback.errors import OutputError, UsageError
from attnfallback.events.schema import build_record, check_fields

FSYNC_KINDS = frozenset({"attn_impl", "attn_unavailable"})

_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_SHARD_FRACTION = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_MAX_NAME = 100


def new_run_id() -> str:
    """A fresh run id: UTC time plus six random hex digits, e.g. `20261122T081500Z-3f9a1c`."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def safe_name(text: str) -> str:
    """`text` as one harmless path component.

    `3/8` becomes `3-of-8`; other characters outside `[A-Za-z0-9._-]` become `_`, leading dots
    are dropped (no `.`, `..` or hidden files), and any name that had to change gets a short hash
    of the original so that two different run ids never share a file.
    """
    text = str(text)
    fraction = _SHARD_FRACTION.match(text)
    if fraction:
        return f"{int(fraction.group(1))}-of-{int(fraction.group(2))}"
    cleaned = _SAFE_CHARS.sub("_", text).lstrip(".")
    if cleaned == text and 0 < len(cleaned) <= _MAX_NAME:
        return cleaned
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned[:_MAX_NAME] or '_'}-{digest}"


def _json_default(value: Any) -> Any:
    """Serialise the few non-JSON types callers plausibly pass (paths, numpy scalars, sets)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(value)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (strict JSON has no spelling for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode_line(record: dict) -> bytes:
    """One record as one UTF-8 JSON line (newlines inside strings are escaped by JSON)."""
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                          default=_json_default)
    except ValueError:
        text = json.dumps(_finite(record), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False, default=_json_default)
    return (text + "\n").encode("utf-8", "surrogatepass")


class EventSink:
    """Appends events of one (run, shard) to `directory/<safe run_id>/<safe shard>.jsonl`.

    Safe to share between threads; safe for many processes to write one directory (each shard
    its own file, or even the same file). The file is opened at the first event.
    """

    def __init__(self, directory, run_id: str | None = None, shard: str = "0/1", *,
                 fsync: bool | None = None):
        self.directory = Path(directory)
        self.run_id = str(run_id) if run_id else new_run_id()
        self.shard = str(shard) if shard is not None and str(shard) != "" else "0/1"
        self.fsync = fsync
        self.path = self.directory / safe_name(self.run_id) / f"{safe_name(self.shard)}.jsonl"
        # safe_name already rules out separators and dot names; this guards the invariant itself.
        root = self.directory.resolve()
        if self.path.resolve().parent.parent != root:
            raise UsageError(f"event file {self.path} would lie outside {self.directory}")
        self._fd: int | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EventSink({str(self.path)!r})"

    def _open_locked(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            self._terminate_torn_tail(fd)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _terminate_torn_tail(self, fd: int) -> None:
        """A writer killed mid-line left a fragment with no newline: end it, so the next event
        starts a line of its own (the fragment stays, reported by the reader as one torn line)."""
        # Under the file lock every live writer's line is complete, so a tail without a newline
        # can only be a dead writer's fragment.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return
            with open(self.path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    os.write(fd, b"\n")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def emit(self, event: str, **fields: Any) -> dict:
        """Write one event and return its record."""
        check_fields(fields)
        record = build_record(event, self.run_id, self.shard, **fields)
        line = encode_line(record)
        sync = self.fsync or (self.fsync is None and event in FSYNC_KINDS)
        with self._lock:  # O_APPEND alone keeps lines whole; the lock keeps close() from racing
            try:
                if self._fd is None:
                    self._fd = self._open_locked()
                fcntl.flock(self._fd, fcntl.LOCK_EX)  # see _terminate_torn_tail
                try:
                    written = os.write(self._fd, line)
                    # A regular file only writes short on a full disk or a signal; finish the line
                    # rather than leave it torn (the reader would report it).
                    while written < len(line):
                        written += os.write(self._fd, line[written:])
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                if sync:
                    os.fsync(self._fd)
            except OSError as e:
                raise OutputError(f"cannot write event to {self.path}: {e}", path=str(self.path)) from e
        return record

    def close(self) -> None:
        """Close the file; a later `emit` opens it again (appending)."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> EventSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class NullSink:
    """A sink that drops every event: for loads that are not a run's attention decisions (the
    parity check's and the benchmark's own), passed where an EventSink is expected."""

    path = None

    def emit(self, event: str, **fields: Any) -> dict:
        return {}

    def close(self) -> None:
        pass


NULL_SINK = NullSink()
