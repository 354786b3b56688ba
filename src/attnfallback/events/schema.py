"""The event record (schema `attnfallback.event/1`): how one is built and how one is checked.

Every record carries `schema`, `event`, `ts` (UTC ISO-8601), `run_id`, `shard`, `host` and `pid`;
the other fields depend on the kind. `attn_impl` is the one the query tool leans on, so `validate`
checks its fields in detail; other kinds (including user kinds) are checked for the common fields
and the few numeric fields the query tool reads.
"""

from __future__ import annotations

import os
import re
import socket
from datetime import datetime, timezone
from typing import Any

SCHEMA = "attnfallback.event/1"
SCHEMA_PREFIX = "attnfallback.event/"
SCHEMA_VERSION = 1

# shard_failed: the error and exit code of a shard that stopped; shard_interrupted: a Ctrl-C, with
# what was committed (parts_committed, rows_committed) and whether --resume can continue (resume)
EVENT_KINDS = ("attn_impl", "attn_unavailable", "shard_start", "shard_done", "shard_failed", "shard_interrupted",
               "parity", "oom_split")

COMMON_FIELDS = ("schema", "event", "ts", "run_id", "shard", "host", "pid")
# Callers may override these (synthetic logs, replays); the identity fields stay the sink's.
OVERRIDABLE_FIELDS = ("ts", "host", "pid")

ATTEMPT_STAGES = ("plan", "load", "verify")

_EVENT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_HOST = None


def _hostname() -> str:
    global _HOST
    if _HOST is None:
        _HOST = socket.gethostname()
    return _HOST


def utc_now_iso() -> str:
    """The current time as UTC ISO-8601 with microseconds and a `Z` suffix."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def schema_version(schema: object) -> int | None:
    """The integer version of a schema string like `attnfallback.event/1`; None if not ours."""
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_PREFIX):
        return None
    tail = schema[len(SCHEMA_PREFIX):]
    return int(tail) if tail.isdigit() else None


def check_fields(fields: dict) -> None:
    """Raise UsageError if `fields` tries to set a field the sink owns (schema, event, run_id, shard)."""
    from attnfallback.errors import UsageError

    clash = sorted(k for k in fields if k in COMMON_FIELDS and k not in OVERRIDABLE_FIELDS)
    if clash:
        raise UsageError(f"event field(s) {', '.join(clash)} are set by the sink and cannot be passed")


def build_record(event: str, run_id: str, shard: str, **fields: Any) -> dict:
    """A new record: the common fields first, then `fields` in the order given.

    `ts`, `host` and `pid` default to now, this host and this process; the other common fields
    cannot be overridden through `fields`.
    """
    from attnfallback.errors import UsageError

    if not isinstance(event, str) or not _EVENT_NAME.match(event):
        raise UsageError(
            f"event kind must be a short identifier (letters, digits, _ . -), got {event!r}"
        )
    check_fields(fields)
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "event": event,
        "ts": fields.pop("ts", None) or utc_now_iso(),
        "run_id": str(run_id),
        "shard": str(shard),
        "host": fields.pop("host", None) or _hostname(),
        "pid": fields.pop("pid", None) or os.getpid(),
    }
    record.update(fields)
    return record


# --- validation -------------------------------------------------------------------------------

def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_type(problems: list[str], where: str, value: object, kinds: tuple, nullable: bool) -> bool:
    if value is None:
        if not nullable:
            problems.append(f"{where}: missing or null")
        return False
    if float in kinds and _is_number(value):
        return True
    if isinstance(value, bool) and bool not in kinds:
        problems.append(f"{where}: expected {_kind_names(kinds)}, found bool")
        return False
    if not isinstance(value, kinds):
        problems.append(f"{where}: expected {_kind_names(kinds)}, found {type(value).__name__}")
        return False
    return True


def _kind_names(kinds: tuple) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_object(problems: list[str], record: dict, key: str, spec: dict, nullable: bool = False) -> None:
    """Check record[key] is an object whose keys in `spec` hold values of the given kinds."""
    value = record.get(key)
    if value is None and nullable and key in record:
        return
    if not _check_type(problems, key, value, (dict,), nullable=False):
        return
    for sub, (kinds, sub_nullable) in spec.items():
        if sub not in value:
            problems.append(f"{key}.{sub}: missing")
            continue
        _check_type(problems, f"{key}.{sub}", value[sub], kinds, sub_nullable)


def _check_common(record: dict, problems: list[str]) -> None:
    schema = record.get("schema")
    if schema_version(schema) is None:
        problems.append(f"schema: expected {SCHEMA_PREFIX}<version>, found {schema!r}")
    event = record.get("event")
    if not isinstance(event, str) or not _EVENT_NAME.match(event):
        problems.append(f"event: expected a short identifier, found {event!r}")
    ts = record.get("ts")
    if not isinstance(ts, str):
        problems.append(f"ts: expected an ISO-8601 string, found {ts!r}")
    else:
        try:
            parsed = datetime.fromisoformat(ts.replace("Z", "+00:00"))
        except ValueError:
            problems.append(f"ts: not ISO-8601: {ts!r}")
        else:
            if parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:
                problems.append(f"ts: expected UTC, found {ts!r}")
    for key in ("run_id", "shard", "host"):
        value = record.get(key)
        if not isinstance(value, str) or not value:
            problems.append(f"{key}: expected a non-empty string, found {value!r}")
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        problems.append(f"pid: expected a non-negative integer, found {pid!r}")


def _check_attn_impl(record: dict, problems: list[str]) -> None:
    # gpu is null for a CPU run; its values may be null where a probe could not tell.
    _check_object(problems, record, "gpu", {
        "name": ((str,), True),
        "class": ((str,), True),
        "cc": ((str, float, list), True),
        "memory_gb": ((float,), True),
    }, nullable=True)
    _check_object(problems, record, "model", {
        "id": ((str,), False),
        "revision": ((str,), True),
        "dtype": ((str,), False),
        "architecture": ((str,), True),
    })
    _check_object(problems, record, "policy", {
        "mode": ((str,), False),
        "prefer": ((list,), False),
    })
    policy = record.get("policy")
    if isinstance(policy, dict) and isinstance(policy.get("prefer"), list):
        if not all(isinstance(p, str) for p in policy["prefer"]):
            problems.append("policy.prefer: expected a list of strings")
    if "requested" not in record:
        problems.append("requested: missing")
    else:
        _check_type(problems, "requested", record["requested"], (str,), nullable=True)
    _check_type(problems, "used", record.get("used"), (str,), nullable=False)
    _check_type(problems, "fell_back", record.get("fell_back"), (bool,), nullable=False)

    attempts = record.get("attempts")
    if _check_type(problems, "attempts", attempts, (list,), nullable=False):
        for i, attempt in enumerate(attempts):
            where = f"attempts[{i}]"
            if not isinstance(attempt, dict):
                problems.append(f"{where}: expected an object, found {type(attempt).__name__}")
                continue
            _check_type(problems, f"{where}.impl", attempt.get("impl"), (str,), nullable=False)
            stage = attempt.get("stage")
            if stage not in ATTEMPT_STAGES:
                problems.append(f"{where}.stage: expected one of {', '.join(ATTEMPT_STAGES)}, found {stage!r}")
            _check_type(problems, f"{where}.ok", attempt.get("ok"), (bool,), nullable=False)
            reasons = attempt.get("reasons")
            if _check_type(problems, f"{where}.reasons", reasons, (list,), nullable=False):
                if not all(isinstance(r, str) for r in reasons):
                    problems.append(f"{where}.reasons: expected a list of strings")

    versions = record.get("versions")
    if _check_type(problems, "versions", versions, (dict,), nullable=False):
        for name, version in versions.items():
            if version is not None and not isinstance(version, str):
                problems.append(f"versions.{name}: expected a string or null, found {type(version).__name__}")
    _check_object(problems, record, "timing", {
        "load_s": ((float,), True),
        "verify_s": ((float,), True),
    })
    if "kernels" in record and record["kernels"] is not None:
        _check_type(problems, "kernels", record["kernels"], (list,), nullable=False)


def _check_shard_done(record: dict, problems: list[str]) -> None:
    for key in ("rows", "tokens", "seconds", "non_finite"):
        if key in record:
            _check_type(problems, key, record[key], (float,), nullable=True)


def validate(record: dict) -> list[str]:
    """Problems with `record`, each a short sentence naming the field; [] means valid."""
    if not isinstance(record, dict):
        return [f"record: expected an object, found {type(record).__name__}"]
    problems: list[str] = []
    _check_common(record, problems)
    event = record.get("event")
    if event == "attn_impl":
        _check_attn_impl(record, problems)
    elif event == "shard_done":
        _check_shard_done(record, problems)
    return problems
