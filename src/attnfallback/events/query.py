"""Query many shards' event logs with DuckDB (embedded): which shards fell back, why, how often.

    log = open_log("runs/events")           # directories, files or globs
    log.summary(by="gpu_class")             # pyarrow tables
    log.fallbacks()
    log.sql("SELECT used, count(*) FROM attn_impl GROUP BY used")

Reading: Python finds the `.jsonl` files and splits them into lines (files of other kinds are
reported, not parsed); DuckDB checks and parses the lines. A torn or malformed line never
stops a query: it is skipped and listed in `unreadable` (file:line and the problem), or raised as
`InputError` with `strict_read=True`. (DuckDB's own `read_json(ignore_errors=true)` would turn a
torn line into a row of NULLs, an "event" that never happened; splitting lines ourselves keeps the
file and line of every problem.) A record of a newer schema version is read for the fields this
version knows, with a warning.

Views: `events` (every record), `decisions` (`attn_impl` and `attn_unavailable`, flattened),
`attn_impl`, `shards` (one row per run and shard: `rows` written, `skipped`, `rows_in` their sum,
and `interrupted` for a shard whose latest word is a Ctrl-C). After the views exist, the connection loses
file-system access and its configuration is locked; `sql()` accepts only read statements.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from attnfallback.errors import InputError, UsageError
from attnfallback.events.schema import SCHEMA_PREFIX, SCHEMA_VERSION

log = logging.getLogger("attnfallback.events")

SUMMARY_KEYS = {"gpu_class": "gpu_class", "model": "model_id", "run": "run_id", "host": "host"}

_GLOB_CHARS = re.compile(r"[*?\[]")

# The fields this schema version knows, as DuckDB reads them; anything else stays in `record`.
_STRUCTURE = """{
 "schema": "VARCHAR", "event": "VARCHAR", "ts": "VARCHAR", "run_id": "VARCHAR",
 "shard": "VARCHAR", "host": "VARCHAR", "pid": "BIGINT",
 "gpu": {"name": "VARCHAR", "class": "VARCHAR", "cc": "VARCHAR", "memory_gb": "DOUBLE", "index": "BIGINT", "uuid": "VARCHAR"},
 "model": {"id": "VARCHAR", "revision": "VARCHAR", "dtype": "VARCHAR", "architecture": "VARCHAR"},
 "policy": {"mode": "VARCHAR", "prefer": ["VARCHAR"]},
 "requested": "VARCHAR", "used": "VARCHAR", "fell_back": "BOOLEAN",
 "attempts": [{"impl": "VARCHAR", "stage": "VARCHAR", "ok": "BOOLEAN", "reasons": ["VARCHAR"]}],
 "versions": "JSON", "timing": {"load_s": "DOUBLE", "verify_s": "DOUBLE"},
 "kernels": "JSON", "reasons": "JSON", "error": "VARCHAR",
 "rows": "BIGINT", "rows_written": "BIGINT", "rows_skipped": "BIGINT",
 "tokens": "BIGINT", "seconds": "DOUBLE", "non_finite": "BIGINT"
}"""


@dataclass(frozen=True)
class UnreadableLine:
    """A line that is not an event: where it is and what is wrong with it."""

    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


@dataclass(frozen=True)
class SkippedFile:
    """A file under an events directory that was not read as events."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# --- finding and splitting files ------------------------------------------------------------

def find_event_files(inputs) -> tuple[list[str], list[SkippedFile]]:
    """The `.jsonl` files under `inputs` (directories, files or glob patterns), sorted, and the
    other files found there. A missing path or a glob matching nothing is a UsageError."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(i) for i in inputs]
    if not inputs:
        raise UsageError("no events directory given")
    # Keyed by the real path of the directory given plus the path below it: a directory given
    # twice (or inside another) is read once, without resolving each of 10,000 files.
    found: dict[str, str] = {}  # key -> path as the user will recognise it
    skipped: dict[str, SkippedFile] = {}

    def add_file(key: str, path: str) -> None:
        if path.endswith(".jsonl"):
            found.setdefault(key, path)
        else:
            skipped.setdefault(key, SkippedFile(path, "not a .jsonl file"))

    for given in inputs:
        expanded = os.path.expanduser(given)
        if _GLOB_CHARS.search(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise UsageError(f"no events directory matches {given!r}")
        elif not os.path.exists(expanded):
            raise UsageError(f"events directory {given} does not exist")
        else:
            matches = [expanded]
        for match in matches:
            real = os.path.realpath(match)
            if os.path.isdir(match):
                for root, dirs, files in os.walk(match):
                    dirs.sort()
                    real_root = real + root[len(match):]
                    for name in sorted(files):
                        add_file(os.path.join(real_root, name), os.path.join(root, name))
            elif os.path.isfile(match):
                add_file(real, match)
            else:
                skipped.setdefault(os.path.realpath(match), SkippedFile(match, "not a regular file"))
    return sorted(found.values()), list(skipped.values())


def _read_file(path: str, first: int = 1 << 16) -> bytes:
    """The whole file; raw `os.read` is twice as fast as `open().read()` for 10,000 small files."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        data = os.read(fd, first)
        if len(data) < first:
            return data
        parts = [data]
        while more := os.read(fd, 1 << 20):
            parts.append(more)
        return b"".join(parts)
    finally:
        os.close(fd)


def _split_files(paths: list[str]):
    """Every line of every file as a pyarrow table (file_id, line, text, unterminated,
    invalid_utf8), plus the files that could not be read.

    Built from buffers with numpy rather than from Python lists: no per-line Python work, and
    pyarrow's list conversion would import pandas (a quarter of a second) on first use. `text`
    keeps its newline (JSON ignores it); `unterminated` marks a last line without one, a write
    that may have been cut short.
    """
    import numpy as np
    import pyarrow as pa

    chunks: list[bytes] = []
    chunk_file: list[int] = []
    chunk_unterminated: list[bool] = []
    unreadable_files: list[SkippedFile] = []
    for file_id, path in enumerate(paths):
        try:
            data = _read_file(path)
        except OSError as e:
            unreadable_files.append(SkippedFile(path, f"cannot read: {e.strerror or e}"))
            continue
        if not data:
            continue
        terminated = data.endswith(b"\n")
        chunks.append(data if terminated else data + b"\n")
        chunk_file.append(file_id)
        chunk_unterminated.append(not terminated)

    if not chunks:
        empty = {"file_id": pa.int32(), "line": pa.int32(), "text": pa.large_string(),
                 "unterminated": pa.bool_(), "invalid_utf8": pa.bool_()}
        return pa.schema(empty).empty_table(), unreadable_files

    blob = b"".join(chunks)
    sizes = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    chunk_starts = np.zeros(len(chunks), dtype=np.int64)
    np.cumsum(sizes[:-1], out=chunk_starts[1:])
    line_ends = np.flatnonzero(np.frombuffer(blob, dtype=np.uint8) == 10)  # every '\n'
    line_count = len(line_ends)
    offsets = np.empty(line_count + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = line_ends + 1
    line_chunk = np.searchsorted(chunk_starts, offsets[:-1], side="right") - 1
    first_line = np.searchsorted(offsets[:-1], chunk_starts)  # first line of each chunk
    line_numbers = (np.arange(line_count, dtype=np.int64) - first_line[line_chunk] + 1).astype(np.int32)
    last_line = np.append(first_line[1:], line_count) - 1
    unterminated = np.zeros(line_count, dtype=bool)
    unterminated[last_line[np.asarray(chunk_unterminated, dtype=bool)]] = True

    invalid_utf8 = np.zeros(line_count, dtype=bool)
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError:
        # Rare: blank out each line that is not UTF-8 (same length, so offsets hold) and flag it.
        fixed = bytearray(blob)
        for index, chunk in enumerate(chunks):
            try:
                chunk.decode("utf-8")
                continue
            except UnicodeDecodeError:
                pass
            for k, raw in enumerate(chunk.split(b"\n")[:-1]):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    row = first_line[index] + k
                    fixed[offsets[row]:offsets[row + 1] - 1] = b" " * len(raw)
                    invalid_utf8[row] = True
        blob = bytes(fixed)

    def bits(flags):
        return pa.py_buffer(np.packbits(flags, bitorder="little"))

    file_ids = np.asarray(chunk_file, dtype=np.int32)[line_chunk] if line_count else np.zeros(0, np.int32)
    table = pa.table({
        "file_id": pa.Array.from_buffers(pa.int32(), line_count, [None, pa.py_buffer(file_ids)]),
        "line": pa.Array.from_buffers(pa.int32(), line_count, [None, pa.py_buffer(line_numbers)]),
        "text": pa.Array.from_buffers(pa.large_string(), line_count,
                                      [None, pa.py_buffer(offsets), pa.py_buffer(blob)]),
        "unterminated": pa.Array.from_buffers(pa.bool_(), line_count, [None, bits(unterminated)]),
        "invalid_utf8": pa.Array.from_buffers(pa.bool_(), line_count, [None, bits(invalid_utf8)]),
    })
    return table, unreadable_files


def _string_table(column: str, values: list[str], id_column: str):
    """A two-column pyarrow table (id, string) built from buffers (see `_split_files`)."""
    import numpy as np
    import pyarrow as pa

    encoded = [v.encode("utf-8", "replace") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    ids = np.arange(len(values), dtype=np.int32)
    return pa.table({
        id_column: pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(ids)]),
        column: pa.Array.from_buffers(pa.large_string(), len(values),
                                      [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]),
    })


# --- the log --------------------------------------------------------------------------------

class EventLog:
    """The events under one or more directories, queryable with DuckDB.

    Attributes after opening: `files` (event files read), `events` (records read),
    `unreadable` (UnreadableLine list), `skipped_files` (SkippedFile list), `warnings`.
    """

    def __init__(self, *dirs: Any, strict_read: bool = False):
        import duckdb

        flat: list[Any] = []
        for d in dirs:
            flat.extend(d if isinstance(d, (list, tuple)) else [d])
        self.inputs = [os.fspath(d) for d in flat]
        self.strict_read = strict_read
        self.warnings: list[str] = []
        paths, self.skipped_files = find_event_files(self.inputs)
        self._lines, unreadable_files = _split_files(paths)
        self.skipped_files += unreadable_files
        self.files = len(paths) - len(unreadable_files)
        self._files = _string_table("file", paths, "file_id")
        self.con = duckdb.connect(":memory:")
        self.con.register("_lines_arrow", self._lines)
        self.con.register("_files_arrow", self._files)
        self._load()
        self._lock_down()

        self.unreadable = [UnreadableLine(p, n, problem) for p, n, problem in self.con.execute(
            "SELECT file, line, problem FROM _unreadable ORDER BY file, line").fetchall()]
        if self.unreadable and strict_read:
            first = self.unreadable[0]
            more = len(self.unreadable) - 1
            raise InputError(first.problem + (f" (and {more} more unreadable lines)" if more else ""),
                             path=first.path, line=first.line)
        self.events = self.con.execute("SELECT count(*) FROM events").fetchone()[0]
        newer = self.con.execute(
            "SELECT schema, count(*) FROM events WHERE schema_version > ? GROUP BY schema ORDER BY schema",
            [SCHEMA_VERSION]).fetchall()
        for schema, count in newer:
            self._warn(f"{count} record(s) of the newer schema {schema} read for the fields of "
                       f"{SCHEMA_PREFIX}{SCHEMA_VERSION}")
        if self.events == 0:
            where = ", ".join(self.inputs)
            detail = f"{self.files} .jsonl file(s)"
            if self.unreadable:
                detail += f", {len(self.unreadable)} unreadable line(s), first {self.unreadable[0]}"
            if self.skipped_files:
                detail += f", {len(self.skipped_files)} other file(s) skipped"
            raise InputError(f"no events found ({detail})", path=where)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    def _load(self) -> None:
        execute = self.con.execute
        execute("""
            CREATE TEMP TABLE _lines AS
            SELECT f.file, l.line, l.text,
                   CASE WHEN l.invalid_utf8 THEN 'invalid UTF-8'
                        WHEN NOT json_valid(l.text) THEN
                            CASE WHEN l.unterminated THEN 'torn last line (incomplete JSON, no newline)'
                                 ELSE 'malformed JSON' END
                        WHEN json_type(l.text) <> 'OBJECT' THEN 'not a JSON object'
                   END AS problem
            FROM _lines_arrow l JOIN _files_arrow f USING (file_id)
            WHERE l.invalid_utf8 OR trim(l.text, ' ' || chr(9) || chr(10) || chr(13)) <> ''
        """)
        execute(f"""
            CREATE TEMP TABLE _records AS
            SELECT file, line, text, r,
                   TRY_CAST(regexp_extract(r.schema, '/([0-9]+)$', 1) AS INTEGER) AS schema_version,
                   CASE WHEN r.schema IS NULL THEN 'not an attnfallback event (no schema)'
                        WHEN NOT starts_with(r.schema, '{SCHEMA_PREFIX}')
                             OR regexp_extract(r.schema, '/([0-9]+)$', 1) = '' THEN
                            'not an attnfallback event (schema ' || r.schema || ')'
                        WHEN coalesce(r.event, '') = '' THEN 'no event kind'
                        WHEN coalesce(r.run_id, '') = '' OR coalesce(r.shard, '') = '' THEN 'no run_id or shard'
                   END AS problem
            FROM (SELECT file, line, text, from_json(text, '{_STRUCTURE}') AS r
                  FROM _lines WHERE problem IS NULL)
        """)
        execute("""
            CREATE TEMP TABLE _unreadable AS
            SELECT file, line, problem FROM _lines WHERE problem IS NOT NULL
            UNION ALL SELECT file, line, problem FROM _records WHERE problem IS NOT NULL
        """)
        execute("""
            CREATE VIEW events AS
            SELECT r.schema AS schema, schema_version, r.event AS event,
                   TRY_CAST(r.ts AS TIMESTAMP) AS ts, r.run_id AS run_id, r.shard AS shard,
                   r.host AS host, r.pid AS pid, file, line, rtrim(text, chr(10) || chr(13)) AS record
            FROM _records WHERE problem IS NULL
        """)
        # failed: the attempts that did not succeed; reason: the first reason of the first one,
        # else (attn_unavailable from other writers) the first of `reasons`, else `error`.
        execute("""
            CREATE VIEW decisions AS
            SELECT r.event AS event, r.run_id AS run_id, r.shard AS shard,
                   TRY_CAST(r.ts AS TIMESTAMP) AS ts, r.host AS host, r.pid AS pid,
                   r.gpu.name AS gpu_name, r.gpu.class AS gpu_class, r.gpu.cc AS gpu_cc,
                   r.gpu.memory_gb AS gpu_memory_gb, r.gpu.index AS gpu_index, r.gpu.uuid AS gpu_uuid,
                   r.model.id AS model_id, r.model.revision AS model_revision,
                   r.model.dtype AS model_dtype, r.model.architecture AS model_architecture,
                   r.policy.mode AS policy_mode, r.policy.prefer AS prefer,
                   r.requested AS requested, r.used AS used,
                   CASE WHEN r.event = 'attn_impl'
                        THEN coalesce(r.fell_back, r.used IS DISTINCT FROM r.requested)
                        ELSE false END AS fell_back,
                   r.event = 'attn_unavailable' AS unavailable,
                   r.attempts AS attempts,
                   failed[1].impl AS failed_impl,
                   coalesce(failed[1].reasons[1],
                            CASE json_type(r.reasons)
                                 WHEN 'ARRAY' THEN r.reasons->>'$[0]'
                                 WHEN 'OBJECT' THEN json_extract(r.reasons, '$.*')[1]->>'$[0]'
                            END,
                            r.error) AS reason,
                   [coalesce(a.impl, '?') || ' (' || coalesce(a.stage, '?') || '): '
                        || coalesce(array_to_string(a.reasons, '; '), '')
                    FOR a IN failed] AS reasons,
                   [CASE json_type(k) WHEN 'VARCHAR' THEN k->>'$' ELSE k::VARCHAR END
                    FOR k IN CASE WHEN json_type(r.kernels) = 'ARRAY'
                                  THEN from_json(r.kernels, '["JSON"]') END] AS kernels,
                   r.versions AS versions, r.timing.load_s AS load_s, r.timing.verify_s AS verify_s,
                   r.error AS error, file, line, rtrim(text, chr(10) || chr(13)) AS record
            FROM (SELECT *, [a FOR a IN r.attempts IF NOT coalesce(a.ok, false)] AS failed
                  FROM _records
                  WHERE problem IS NULL AND r.event IN ('attn_impl', 'attn_unavailable'))
        """)
        execute("CREATE VIEW attn_impl AS SELECT * EXCLUDE (event, unavailable) FROM decisions "
                "WHERE event = 'attn_impl'")
        # One row per (run, shard): the latest decisive record says how it ran (a shard retried
        # after a strict failure that then loaded counts as loaded); the latest shard_done says
        # how much it did.
        execute("""
            CREATE VIEW shards AS
            WITH latest_decision AS (
                SELECT *, row_number() OVER (PARTITION BY run_id, shard
                                             ORDER BY ts DESC NULLS LAST, file DESC, line DESC) AS n
                FROM decisions
            ), latest_done AS (
                SELECT r.run_id AS run_id, r.shard AS shard, r.rows AS rows_in,
                       coalesce(r.rows_written, r.rows - r.rows_skipped, r.rows) AS rows,
                       coalesce(r.rows_skipped, r.rows - r.rows_written, 0) AS skipped,
                       r.tokens AS tokens, r.seconds AS seconds, r.non_finite AS non_finite,
                       row_number() OVER (PARTITION BY r.run_id, r.shard
                                          ORDER BY TRY_CAST(r.ts AS TIMESTAMP) DESC NULLS LAST,
                                                   file DESC, line DESC) AS n
                FROM _records WHERE problem IS NULL AND r.event = 'shard_done'
            ), per_shard AS (
                SELECT run_id, shard, count(*) AS events, min(ts) AS first_ts, max(ts) AS last_ts,
                       min(host) AS any_host,
                       arg_max(event, ts) FILTER (WHERE event IN ('shard_start', 'shard_done', 'shard_failed',
                                                                 'shard_interrupted')) AS last_step
                FROM events GROUP BY run_id, shard
            )
            SELECT s.run_id, s.shard, coalesce(d.host, s.any_host) AS host,
                   d.gpu_name, d.gpu_class, d.model_id, d.requested, d.used,
                   coalesce(d.fell_back, false) AS fell_back,
                   coalesce(d.unavailable, false) AS strict_failure,
                   CASE WHEN d.fell_back OR d.unavailable THEN d.failed_impl END AS failed_impl,
                   CASE WHEN d.fell_back OR d.unavailable THEN d.reason END AS reason,
                   done.rows, done.skipped, done.rows_in, done.tokens, done.seconds, done.non_finite,
                   done.run_id IS NOT NULL AS done,
                   coalesce(s.last_step = 'shard_interrupted', false) AS interrupted,
                   s.events, s.first_ts, s.last_ts
            FROM per_shard s
            LEFT JOIN latest_decision d ON d.run_id = s.run_id AND d.shard = s.shard AND d.n = 1
            LEFT JOIN latest_done done ON done.run_id = s.run_id AND done.shard = s.shard AND done.n = 1
        """)

    def _lock_down(self) -> None:
        """No file system, no extensions, no changing that back: the views are all there is."""
        try:
            self.con.execute("SET enable_external_access = false")
            self.con.execute("SET lock_configuration = true")
        except Exception as e:  # noqa: BLE001 - an older DuckDB: the statement check still holds
            log.debug("cannot lock down DuckDB: %s", e)

    # --- queries --------------------------------------------------------------------------

    def _query(self, query: str, params: list | None = None):
        relation = self.con.sql(query, params=params) if params else self.con.sql(query)
        if relation is None:  # a statement without a result (EXPLAIN on some versions)
            import pyarrow as pa

            return pa.table({})
        if hasattr(relation, "to_arrow_table"):
            return relation.to_arrow_table()
        result = relation.arrow()  # DuckDB 1.x: a Table; later versions: a reader
        return result.read_all() if hasattr(result, "read_all") else result

    def sql(self, query: str, params: list | None = None):
        """Run one read-only statement (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN ...)
        over the views and return a pyarrow table. Anything else is a UsageError."""
        import duckdb

        check_read_only(query)
        try:
            return self._query(query, params)
        except duckdb.Error as e:
            raise UsageError(f"SQL failed: {_first_line(str(e))}") from e

    def shards(self):
        """One row per (run, shard) as a pyarrow table."""
        return self._query(f"SELECT * FROM shards ORDER BY run_id, {_SHARD_ORDER}")

    def summary(self, by: str = "gpu_class"):
        """Per `by` (gpu_class, model, run, host): shards, fell_back, rate, strict_failures and
        the most common reason (first reason of the first failed attempt) with its count."""
        if by not in SUMMARY_KEYS:
            from attnfallback.errors import UnknownNameError

            raise UnknownNameError("summary key", by, SUMMARY_KEYS)
        column = SUMMARY_KEYS[by]
        return self._query(f"""
            WITH grouped AS (
                SELECT {column} AS key, count(*) AS shards,
                       count(*) FILTER (WHERE fell_back) AS fell_back,
                       count(*) FILTER (WHERE strict_failure) AS strict_failures
                FROM shards GROUP BY 1
            ), reasons AS (
                SELECT {column} AS key, reason, count(*) AS n,
                       row_number() OVER (PARTITION BY {column} ORDER BY count(*) DESC, reason) AS rank
                FROM shards WHERE reason IS NOT NULL GROUP BY 1, 2
            )
            SELECT g.key AS {by}, g.shards, g.fell_back,
                   g.fell_back / g.shards AS rate, g.strict_failures,
                   r.reason AS top_reason, coalesce(r.n, 0) AS top_reason_shards
            FROM grouped g LEFT JOIN reasons r ON r.key IS NOT DISTINCT FROM g.key AND r.rank = 1
            ORDER BY g.shards DESC, g.key NULLS LAST
        """)

    def fallbacks(self, include_failures: bool = True):
        """Every `attn_impl` record that fell back (and, unless told not to, every
        `attn_unavailable` record): run, shard, GPU, requested -> used, reasons, kernels."""
        kinds = "fell_back OR unavailable" if include_failures else "fell_back"
        return self._query(f"""
            SELECT run_id, shard,
                   CASE WHEN unavailable THEN 'unavailable' ELSE 'fell_back' END AS outcome,
                   gpu_class, gpu_name, requested, used, reason, reasons, kernels,
                   model_id, policy_mode, host, ts, file, line
            FROM decisions WHERE {kinds}
            ORDER BY run_id, {_SHARD_ORDER}, ts, file, line
        """)

    def runs(self):
        """One row per run: shards, fallbacks, strict failures, work done, time span, GPUs."""
        return self._query("""
            SELECT run_id, count(*) AS shards,
                   count(*) FILTER (WHERE fell_back) AS fell_back,
                   count(*) FILTER (WHERE fell_back) / count(*) AS rate,
                   count(*) FILTER (WHERE strict_failure) AS strict_failures,
                   count(*) FILTER (WHERE done) AS done,
                   count(*) FILTER (WHERE interrupted) AS interrupted,
                   sum(rows)::BIGINT AS rows, sum(skipped)::BIGINT AS skipped, sum(tokens)::BIGINT AS tokens,
                   min(first_ts) AS started, max(last_ts) AS finished,
                   string_agg(DISTINCT gpu_class, ',' ORDER BY gpu_class) AS gpu_classes,
                   count(DISTINCT host) AS hosts
            FROM shards GROUP BY run_id ORDER BY started NULLS LAST, run_id
        """)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventLog({', '.join(self.inputs)}: {self.events} events in {self.files} files)"


# "3/8" sorts before "10/8": by the shard index where there is one.
_SHARD_ORDER = "TRY_CAST(split_part(shard, '/', 1) AS BIGINT) NULLS LAST, shard"


# --- read-only SQL --------------------------------------------------------------------------

READ_KEYWORDS = ("SELECT", "WITH", "FROM", "VALUES", "TABLE", "DESCRIBE", "DESC", "SHOW",
                 "SUMMARIZE", "EXPLAIN", "PIVOT", "UNPIVOT", "(")
_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*(\n|$)|/\*.*?\*/)*", re.S)
_EXPLAIN_PREFIX = re.compile(r"^EXPLAIN\s+(\([^)]*\)\s*)?(ANALY[SZ]E\s+)?", re.I)


def _first_word(text: str) -> str:
    text = _LEADING_COMMENTS.sub("", text, count=1)
    if text.startswith("("):
        return "("
    match = re.match(r"[A-Za-z_]+", text)
    return match.group(0).upper() if match else text[:20]


def check_read_only(query: str) -> None:
    """Raise UsageError unless `query` is exactly one statement that only reads."""
    import duckdb

    if not isinstance(query, str) or not query.strip():
        raise UsageError("empty SQL statement")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise UsageError(f"SQL does not parse: {_first_line(str(e))}") from e
    if len(statements) != 1:
        raise UsageError(f"one SQL statement at a time, found {len(statements)}")
    statement = statements[0]
    text = getattr(statement, "query", query)
    kind = getattr(statement.type, "name", str(statement.type)).rsplit(".", 1)[-1]
    word = _first_word(text)
    if kind == "EXPLAIN":
        inner = _EXPLAIN_PREFIX.sub("", _LEADING_COMMENTS.sub("", text, count=1), count=1)
        try:
            check_read_only(inner)
        except UsageError as e:
            raise UsageError(f"refused: EXPLAIN of a statement that is not read-only ({e})") from None
        return
    if kind != "SELECT" or word not in READ_KEYWORDS:
        what = word if word == kind or kind == "SELECT" else f"{word} ({kind})"
        raise UsageError(
            f"refused: {what} statement; events sql is read-only "
            f"(allowed: {', '.join(w for w in READ_KEYWORDS if w != '(')})"
        )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
