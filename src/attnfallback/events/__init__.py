"""Audit events: one JSONL file per (run, shard), and a query tool over many of them.

    from attnfallback.events import EventSink, emit_event, open_log
    sink = EventSink("runs/events", run_id="sweep-42", shard="3/8")
    sink.emit("shard_done", rows=1000, tokens=64000, seconds=2.5)
    open_log("runs/events").summary()          # a pyarrow table

The query side (DuckDB, pyarrow) is imported only when `open_log` is called.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from attnfallback import envs
from attnfallback.events.schema import EVENT_KINDS, SCHEMA, build_record, check_fields, validate
from attnfallback.events.sink import NULL_SINK, EventSink, NullSink, new_run_id, safe_name
from attnfallback.policy import events_dir_from_env

if TYPE_CHECKING:
    from attnfallback.events.query import EventLog

__all__ = [
    "EVENT_KINDS",
    "SCHEMA",
    "EventSink",
    "NULL_SINK",
    "NullSink",
    "build_record",
    "emit_event",
    "get_default_sink",
    "new_run_id",
    "open_log",
    "open_sink",
    "safe_name",
    "set_default_sink",
    "validate",
]

ENV_RUN_ID = envs.RUN_ID
ENV_SHARD = envs.SHARD

_default_sink: EventSink | None = None
_env_sinks: dict[tuple[str, str, str], EventSink] = {}
_env_run_id: str | None = None
_lock = threading.Lock()


def set_default_sink(sink: EventSink | None) -> None:
    """Make `sink` the one `emit_event` writes to when it is given none (None: back to the env)."""
    global _default_sink
    _default_sink = sink


def get_default_sink() -> EventSink | None:
    """The sink set with `set_default_sink`, or None."""
    return _default_sink


def _process_run_id() -> str:
    """$ATTNFALLBACK_RUN_ID, else one run id generated once for this process."""
    global _env_run_id
    run_id = envs.value(ENV_RUN_ID)
    if run_id:
        return run_id
    with _lock:
        if _env_run_id is None:
            _env_run_id = new_run_id()
        return _env_run_id


def open_sink(directory=None, run_id: str | None = None, shard: str | None = None) -> EventSink | None:
    """A sink for `directory` (else $ATTNFALLBACK_EVENTS; None when neither is set), run id
    `run_id` (else $ATTNFALLBACK_RUN_ID, else this process's), shard `shard` (else
    $ATTNFALLBACK_SHARD, else "0/1")."""
    directory = events_dir_from_env(directory)
    if directory is None:
        return None
    return EventSink(directory, run_id=run_id or _process_run_id(), shard=shard or envs.value(ENV_SHARD, "0/1"))


def _sink_from_env() -> EventSink | None:
    """A sink for $ATTNFALLBACK_EVENTS, one per (dir, run id, shard)."""
    directory = events_dir_from_env(None)
    if not directory:
        return None
    run_id = _process_run_id()
    shard = envs.value(ENV_SHARD, "0/1")
    key = (directory, run_id, shard)
    with _lock:
        sink = _env_sinks.get(key)
        if sink is None:
            sink = EventSink(directory, run_id=run_id, shard=shard)
            _env_sinks[key] = sink
        return sink


def emit_event(event: str, *, sink: EventSink | None = None, **fields: Any) -> dict:
    """Record one event and return its record.

    Writes to `sink`, else to the default sink, else under $ATTNFALLBACK_EVENTS (run id
    $ATTNFALLBACK_RUN_ID or one generated per process, shard $ATTNFALLBACK_SHARD or "0/1").
    With no location at all it writes nothing and only returns the record.
    """
    check_fields(fields)
    target = sink or _default_sink or _sink_from_env()
    if target is None:
        return build_record(event, _process_run_id(), envs.value(ENV_SHARD, "0/1"), **fields)
    return target.emit(event, **fields)


def open_log(*dirs: Any, strict_read: bool = False) -> EventLog:
    """An `EventLog` over the events under `dirs` (directories, files or globs), queried with
    DuckDB. Torn or malformed lines are skipped and listed in `.unreadable`; with
    `strict_read=True` the first one raises InputError naming file:line."""
    from attnfallback.events.query import EventLog

    return EventLog(*dirs, strict_read=strict_read)
