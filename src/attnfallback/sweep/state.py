"""What a sweep leaves in its output directory, shared by the local and the Ray engines.

`<output>/sweep.json` (the manifest) names the run that owns the directory, the configurations
and every job's status; it is rewritten atomically after each job. A second run is refused
the directory unless it resumes the same run id. `merge_outputs` joins a configuration's shard
outputs back into input order.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attnfallback import atomic
from attnfallback.errors import ConfigError, OutputRefused
from attnfallback.scoring.writer import output_os_error
from attnfallback.sweep.config import MANIFEST, SweepConfig

MANIFEST_SCHEMA = "attnfallback.sweep/1"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_manifest(output: str | os.PathLike) -> dict | None:
    """The manifest of a sweep output directory, or None when there is none."""
    path = Path(output) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OutputRefused(f"cannot read the sweep manifest {path}: {e}", path=str(path)) from None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        raise OutputRefused(f"{path} is not a sweep manifest (schema {MANIFEST_SCHEMA})", path=str(path))
    return data


@dataclass
class SweepState:
    """The manifest of one run, kept in memory and written after every change."""

    config: SweepConfig
    run_id: str
    engine: str
    jobs: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    interrupted: str | None = None  # when a Ctrl-C stopped the run (cleared by a resume)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def path(self) -> Path:
        return self.config.output / MANIFEST

    def to_dict(self) -> dict:
        return {
            "schema": MANIFEST_SCHEMA,
            "run_id": self.run_id,
            "engine": self.engine,
            "created": self.created,
            "updated": _now(),
            "config": self.config.to_dict(),
            "jobs": self.jobs,
            "outputs": self.outputs,
            "interrupted": self.interrupted,
        }

    def save(self) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.path, self.to_dict(), indent=2, default=str)

    def update_job(self, key: str, **fields: Any) -> None:
        with self._lock:
            self.jobs.setdefault(key, {}).update(fields)
        self.save()

    def mark_interrupted(self) -> list[str]:
        """A Ctrl-C: every job still running is `interrupted` (its committed parts kept for --resume),
        and the manifest says when. Returns those jobs' keys."""
        with self._lock:
            stopped = [k for k, j in self.jobs.items() if j.get("status") in ("running", "interrupted")]
            for key in stopped:
                self.jobs[key]["status"] = "interrupted"
            self.interrupted = _now()
        self.save()
        return stopped

    def is_done(self, key: str, output: Path) -> bool:
        """A job counts as complete only when it said so and its output is there."""
        return self.jobs.get(key, {}).get("status") == "done" and Path(output).exists()


def claim_output(config: SweepConfig, resume: bool, engine: str) -> SweepState:
    """Take the output directory for this run, or refuse it.

    A directory holding another run's results (or anything that is not a sweep) is refused;
    one holding this run's results is taken only with `resume` (the run id then comes from the
    manifest unless the configuration names it, and the two must agree).
    """
    from attnfallback.events import new_run_id

    output = config.output
    where = None if config.path is None else str(config.path)
    previous = read_manifest(output)
    if previous is not None:
        prev_id = previous.get("run_id")
        if config.run_id is not None and config.run_id != prev_id:
            raise ConfigError(
                f"output directory {output} holds the results of run {prev_id!r}, not of run {config.run_id!r}: "
                "choose another output directory (or resume that run with its own run id)", where, "output")
        if not resume:
            raise ConfigError(
                f"output directory {output} already holds the results of run {prev_id!r}: pass --resume to "
                "complete that run, or choose another output directory", where, "output")
        changed = _changed_configs(previous.get("config", {}).get("configs", []), config)
        if changed:
            raise ConfigError(
                f"cannot resume run {prev_id!r} in {output}: the configuration changed since it started "
                f"({'; '.join(changed)})", where, "configs")
        state = SweepState(config, prev_id, engine, jobs=dict(previous.get("jobs", {})),
                           outputs=dict(previous.get("outputs", {})), created=previous.get("created", _now()))
        state.save()
        return state
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {output} exists and is not a directory", where, "output")
    if output.is_dir() and any(p for p in output.iterdir() if p.resolve() != config.events.resolve()):
        raise ConfigError(
            f"output directory {output} is not empty and holds no sweep manifest ({MANIFEST}): "
            "it may hold another run's results; choose an empty or new directory", where, "output")
    run_id = config.run_id or new_run_id()
    _refuse_used_run_id(config, run_id, where)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_os_error(f"cannot create output directory {output}", e, output) from None
    state = SweepState(config, run_id, engine)
    state.save()
    return state


def _refuse_used_run_id(config: SweepConfig, run_id: str, where: str | None) -> None:
    """A new run must not append to the events of an earlier run with the same id (its output gone)."""
    from attnfallback.events import safe_name

    for spec in config.specs:
        folder = config.events / safe_name(config.run_id_of(spec, run_id))
        if folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(
                f"events directory {config.events} already holds events of run {config.run_id_of(spec, run_id)!r}: "
                "give this run another run_id (or another events directory), or resume that run in its own output "
                "directory", where, "run_id")


def _changed_configs(previous: list[dict], config: SweepConfig) -> list[str]:
    now = {s.name: s.to_dict() for s in config.specs}
    before = {c.get("name"): c for c in previous}
    changes = []
    for name in sorted(set(now) | set(before)):
        if name not in before:
            changes.append(f"{name}: added")
        elif name not in now:
            changes.append(f"{name}: removed")
        else:
            keys = sorted(k for k in set(now[name]) | set(before[name]) if now[name].get(k) != before[name].get(k))
            if keys:
                changes.append(f"{name}: {', '.join(keys)} differ")
    return changes


def shard_row_numbers(output: Path, index: int, count: int, rows: int):
    """The input row numbers of a shard output's rows, in its order (shard i of N owns rows i, i+N, ...
    and writes them in order, less the rows it skipped), from the run summary the output carries;
    None where it carries none to tell."""
    import numpy as np

    from attnfallback.scoring.writer import read_output_metadata

    meta = read_output_metadata(output) or {}
    result, skipped = meta.get("result") or {}, meta.get("skipped_rows")
    rows_in = result.get("rows_in")
    if not isinstance(rows_in, int) or not isinstance(skipped, list) or len(skipped) != result.get("rows_skipped"):
        return None
    owned = index + count * np.arange(rows_in, dtype=np.int64)
    kept = owned[~np.isin(owned, np.asarray(skipped, dtype=np.int64))]
    return kept if len(kept) == rows else None


def merge_outputs(shard_outputs: list[Path], destination: Path, ids_are_row_numbers: bool) -> dict:
    """Join the shards' outputs (shard i holds rows r with r mod N == i) back into input order.

    Rows are placed by their input row numbers, which each shard output's summary gives (its
    skipped rows included); failing that, sorted by id when the ids are row numbers, interleaved
    when no row was skipped, else (outputs without a summary) concatenated shard by shard.
    Written to a temporary name, then renamed. Returns {path, rows, order}.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in shard_outputs]
    total = sum(t.num_rows for t in tables)
    n = len(tables)
    numbers = [shard_row_numbers(p, i, n, t.num_rows) for i, (p, t) in enumerate(zip(shard_outputs, tables))]
    if all(r is not None for r in numbers):
        merged = pa.concat_tables(tables, promote_options="default")
        merged = merged.take(pa.array(np.argsort(np.concatenate(numbers), kind="stable")))
        order = "input order (by row number)"
    elif ids_are_row_numbers and all(pa.types.is_integer(t.schema.field(0).type) for t in tables):
        merged = pa.concat_tables(tables, promote_options="default")
        merged = merged.take(pc.sort_indices(merged.column(0), sort_keys=[(merged.column_names[0], "ascending")]))
        order = "input order (by row number)"
    elif all(t.num_rows == len(range(i, total, n)) for i, t in enumerate(tables)):
        # row r sits in shard r mod N at position r // N
        merged = pa.concat_tables(tables, promote_options="default")
        offsets = [0]
        for t in tables[:-1]:
            offsets.append(offsets[-1] + t.num_rows)
        merged = merged.take(pa.array([offsets[r % n] + r // n for r in range(total)], type=pa.int64()))
        order = "input order (interleaved)"
    else:
        merged = pa.concat_tables(tables, promote_options="default")
        order = "shard by shard (some rows were skipped)"
    # the shards' own run summaries describe one shard each: the merged file says what it is
    merged = merged.replace_schema_metadata({b"attnfallback.sweep": json.dumps(
        {"merged_from": [str(p) for p in shard_outputs], "order": order}).encode()})
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic.writing(destination) as fh:
        pq.write_table(merged, fh)
    return {"path": str(destination), "rows": merged.num_rows, "order": order}
