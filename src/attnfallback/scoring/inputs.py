"""Input rows for `score`: JSONL, CSV/TSV and Parquet, read in a streaming fashion.

Each row keeps its 0-based row number in the input (which decides its shard), the line it came
from (JSONL and CSV: the physical line where it starts, 1-based; Parquet: row number + 1), its id
(`--id-column`, else the row number) and its text(s). A row that cannot be scored (malformed JSON,
invalid UTF-8, a null or empty text, a missing or duplicate id) carries a `problem`; the caller
decides whether that is an error or a skipped row.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from attnfallback.errors import InputError, UsageError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
SUPPORTED = JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES
ID_TYPES = ("int64", "string")


@dataclass
class InputRow:
    """One row of the input; `problem` is None for a row that can be scored."""

    number: int
    line: int
    id: object
    texts: tuple[str, ...]
    problem: str | None = None


@dataclass
class InputSpec:
    """Which columns of the input hold the texts and the id."""

    text_columns: list[str]
    id_column: str | None
    id_type: str  # int64 | string


@dataclass
class InputSource:
    """An opened input: its path, format, the columns found, and how rows are read."""

    path: Path
    format: str  # jsonl | csv | parquet
    columns: list[str]
    string_columns: list[str]
    column_types: dict[str, str] = field(default_factory=dict)
    delimiter: str = ","
    num_rows: int | None = None  # known up front for Parquet only

    def describe_columns(self) -> str:
        return ", ".join(self.columns) if self.columns else "(none)"


def input_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise UsageError(f"{path}: unsupported input format {suffix or '(no extension)'!r}; expected one of {', '.join(SUPPORTED)}")


def open_input(path: str | os.PathLike) -> InputSource:
    """Check that the input exists and read its columns (the first record, header or schema)."""
    path = Path(path)
    fmt = input_format(path)
    if not path.exists():
        raise InputError("input file not found", path=str(path))
    if not path.is_file():
        raise InputError("input is not a regular file", path=str(path))
    if fmt == "parquet":
        return _open_parquet(path)
    if fmt == "csv":
        return _open_csv(path)
    return _open_jsonl(path)


def _open_parquet(path: Path) -> InputSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"not a readable Parquet file ({e})", path=str(path)) from None
    types = {f.name: str(f.type) for f in schema}
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    return InputSource(path, "parquet", list(types), strings, types, num_rows=meta.metadata.num_rows)


def _open_csv(path: Path) -> InputSource:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError("empty input: no header and no rows", path=str(path)) from None
        except csv.Error as e:
            raise InputError(f"malformed CSV header ({e})", path=str(path), line=1) from None
    for name in header:
        if _has_surrogates(name):
            raise InputError("invalid UTF-8 in the header", path=str(path), line=1)
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise InputError("duplicate column names in the header", path=str(path), line=1, found=", ".join(header))
    return InputSource(path, "csv", header, list(header), {h: "string" for h in header}, delimiter=delimiter)


def _open_jsonl(path: Path) -> InputSource:
    """The columns of a JSONL file are the keys of its first object."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            record, problem = _parse_json_line(raw)
            if problem is not None:
                raise InputError(problem, path=str(path), line=line_no)
            types = {k: _json_type(v) for k, v in record.items()}
            strings = [k for k, t in types.items() if t == "string"]
            return InputSource(path, "jsonl", list(types), strings, types)
    raise InputError("empty input: no rows", path=str(path))


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return type(value).__name__


def _parse_json_line(raw: bytes) -> tuple[dict | None, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start} of the line"
    try:
        record = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return None, f"malformed JSON line: expected an object, found {_json_type(record)}"
    return record, None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def resolve_spec(source: InputSource, task_columns: int, text_column: str | None, text_columns: list[str] | None,
                 id_column: str | None) -> InputSpec:
    """The text and id columns to read, checked against the input's columns.

    Default text column: `text` if present, else the single string column (the id column aside).
    """
    def missing(name: str, role: str) -> InputError:
        return InputError(f"{role} column {name!r} not found; the input has columns: {source.describe_columns()}",
                          path=str(source.path))

    if text_columns is not None and text_column is not None:
        raise UsageError("give either --text-column or --text-columns, not both")
    if text_columns is not None:
        names = list(text_columns)
    elif text_column is not None:
        names = [text_column]
    elif task_columns == 2:
        raise UsageError(f"this task needs two text columns: pass --text-columns a,b (the input has columns: {source.describe_columns()})")
    elif "text" in source.columns:
        names = ["text"]
    else:
        candidates = [c for c in source.string_columns if c != id_column]
        if len(candidates) != 1:
            raise InputError(
                "no text column given, no column named 'text', and "
                + ("no string column" if not candidates else f"{len(candidates)} string columns")
                + f"; pass --text-column (the input has columns: {source.describe_columns()})",
                path=str(source.path),
            )
        names = candidates
    if len(names) not in (1, 2) or (task_columns == 2 and len(names) != 2):
        expected = "two" if task_columns == 2 else "one or two (prompt,completion)"
        raise UsageError(f"expected {expected} text columns, found {len(names)}: {', '.join(names)}")
    for name in names:
        if name not in source.columns:
            raise missing(name, "text")
        kind = source.column_types.get(name)
        if source.format == "parquet" and name not in source.string_columns:
            raise InputError(f"text column {name!r} has the wrong type", path=str(source.path), expected="string", found=kind)
    id_type = "int64"
    if id_column is not None:
        if id_column not in source.columns:
            raise missing(id_column, "id")
        kind = source.column_types.get(id_column, "string")
        if source.format == "csv":
            id_type = "string"
        elif kind == "string" or kind == "large_string":
            id_type = "string"
        elif kind in ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32"):
            id_type = "int64"
        else:
            raise InputError(f"id column {id_column!r} has the wrong type", path=str(source.path),
                             expected="integers or strings", found=kind)
    return InputSpec(names, id_column, id_type)


def iter_rows(source: InputSource, spec: InputSpec) -> Iterator[InputRow]:
    """Every row of the input, in order, with its problem if it has one (duplicates included)."""
    if source.format == "jsonl":
        rows = _jsonl_rows(source, spec)
    elif source.format == "csv":
        rows = _csv_rows(source, spec)
    else:
        rows = _parquet_rows(source, spec)
    seen: set = set()
    for row in rows:
        if row.problem is None and spec.id_column is not None:
            if row.id in seen:
                row.problem = f"duplicate id {row.id!r}"
            else:
                seen.add(row.id)
        yield row


def _check_texts(values: list[object], names: list[str]) -> tuple[tuple[str, ...], str | None]:
    for name, value in zip(names, values):
        if value is None:
            return (), f"null text in column {name!r}"
        if not isinstance(value, str):
            return (), f"text in column {name!r} is not a string (found {_json_type(value)})"
        if not value.strip():
            return (), f"empty text in column {name!r}"
    return tuple(values), None  # type: ignore[arg-type]


def _check_id(value: object, spec: InputSpec) -> tuple[object, str | None]:
    if value is None:
        return None, f"null id in column {spec.id_column!r}"
    if spec.id_type == "int64":
        if isinstance(value, bool) or not isinstance(value, int):
            return None, f"id in column {spec.id_column!r}: expected an integer, found {_json_type(value)}"
        return value, None
    if not isinstance(value, str):
        return None, f"id in column {spec.id_column!r}: expected a string, found {_json_type(value)}"
    if value == "":
        return None, f"empty id in column {spec.id_column!r}"
    return value, None


def _make_row(number: int, line: int, record: dict, spec: InputSpec) -> InputRow:
    texts, problem = _check_texts([record.get(n) for n in spec.text_columns], spec.text_columns)
    row_id: object = number
    if problem is None and spec.id_column is not None:
        row_id, problem = _check_id(record.get(spec.id_column), spec)
    return InputRow(number, line, row_id if problem is None else None, texts, problem)


def _jsonl_rows(source: InputSource, spec: InputSpec) -> Iterator[InputRow]:
    number = 0
    with open(source.path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline, say) are not rows
            record, problem = _parse_json_line(raw)
            if problem is not None:
                yield InputRow(number, line_no, None, (), problem)
            else:
                yield _make_row(number, line_no, record, spec)
            number += 1


def _csv_rows(source: InputSource, spec: InputSpec) -> Iterator[InputRow]:
    index = {name: i for i, name in enumerate(source.columns)}
    wanted = spec.text_columns + ([spec.id_column] if spec.id_column else [])
    positions = [index[n] for n in wanted]
    width = len(source.columns)
    number = 0
    with open(source.path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=source.delimiter, strict=True)
        try:
            next(reader)  # the header
        except (StopIteration, csv.Error):
            return
        while True:
            start_line = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                # strict: a quote left open raises here instead of swallowing the lines after it
                span = f", lines {start_line}-{reader.line_num}" if reader.line_num > start_line else ""
                yield InputRow(number, start_line, None, (), f"malformed CSV ({e}{span})")
                number += 1
                continue
            if not fields:
                continue  # a blank line
            if len(fields) != width:
                yield InputRow(number, start_line, None, (), f"expected {width} fields, found {len(fields)}")
                number += 1
                continue
            values = [fields[p] for p in positions]
            if any(_has_surrogates(v) for v in values):
                yield InputRow(number, start_line, None, (), "invalid UTF-8")
                number += 1
                continue
            record = dict(zip(wanted, values))
            yield _make_row(number, start_line, record, spec)
            number += 1


def _parquet_rows(source: InputSource, spec: InputSpec) -> Iterator[InputRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted = list(dict.fromkeys(spec.text_columns + ([spec.id_column] if spec.id_column else [])))
    number = 0
    try:
        batches = pq.ParquetFile(source.path).iter_batches(batch_size=8192, columns=wanted)
        for batch in batches:
            columns = {}
            for name in wanted:
                column = batch.column(batch.schema.get_field_index(name))
                try:
                    columns[name] = column.to_pylist()
                except UnicodeDecodeError:
                    columns[name] = _decode_column_per_row(column)
            for i in range(batch.num_rows):
                record = {name: columns[name][i] for name in wanted}
                bad = next((n for n in wanted if isinstance(record[n], _BadUtf8)), None)
                if bad is not None:
                    yield InputRow(number, number + 1, None, (), f"invalid UTF-8 in column {bad!r}")
                else:
                    yield _make_row(number, number + 1, record, spec)
                number += 1
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot read Parquet row {number + 1} onwards ({e})", path=str(source.path), line=number + 1) from None


class _BadUtf8:
    """A marker for a Parquet string value that does not decode."""


def _decode_column_per_row(column) -> list:
    out = []
    for value in column.cast("binary").to_pylist():
        if value is None:
            out.append(None)
            continue
        try:
            out.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(_BadUtf8())
    return out


def rows_of_table(table, spec: InputSpec) -> Iterator[InputRow]:
    """Rows of an in-memory pyarrow table (Ray batches): row numbers are positions in the table."""
    wanted = list(dict.fromkeys(spec.text_columns + ([spec.id_column] if spec.id_column else [])))
    missing = [n for n in wanted if n not in table.column_names]
    if missing:
        raise InputError(f"column(s) {', '.join(map(repr, missing))} not found; the table has columns: {', '.join(table.column_names)}")
    columns = {n: table.column(n).to_pylist() for n in wanted}
    seen: set = set()
    for i in range(table.num_rows):
        row = _make_row(i, i + 1, {n: columns[n][i] for n in wanted}, spec)
        if row.problem is None and spec.id_column is not None:
            if row.id in seen:
                row.problem = f"duplicate id {row.id!r}"
            seen.add(row.id)
        yield row
