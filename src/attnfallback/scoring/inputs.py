"""Input rows for `score`: JSONL, CSV/TSV (each plain, .gz or .zst), Parquet, Arrow IPC files and
directories written by Hugging Face `datasets`' `save_to_disk`, read in a streaming fashion.

Each row keeps its 0-based row number in the input (which decides its shard), the line it came
from (JSONL and CSV: the physical line where it starts, 1-based, compressed or not; the columnar
formats: row number + 1), its id (`--id-column`, else the `id` column where the input has one,
else the row number) and its text(s). A row that cannot be scored (malformed JSON, invalid UTF-8,
a null or empty text, a missing, null or duplicate id) carries a `problem`; the caller decides
whether that is an error or a skipped row.

Compressed inputs are decompressed as they are read (pyarrow's compressed input streams), never
whole into memory; Arrow files are memory-mapped. A saved dataset is read with pyarrow alone: its
`state.json` lists the Arrow stream files in order, so the `datasets` package is not needed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from attnfallback.errors import InputError, UsageError

log = logging.getLogger("attnfallback")

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow", ".feather")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}  # suffix -> pyarrow codec
DATASET_STATE = "state.json"  # what `save_to_disk` writes beside its .arrow files (with dataset_info.json)
DATASET_DICT = "dataset_dict.json"  # a DatasetDict: one directory per split
ACCEPTED_FORMATS = (".jsonl, .ndjson, .csv, .tsv (each plain, .gz or .zst), .parquet, .pq, .arrow, .feather, "
                    "or a directory written by datasets' save_to_disk")
ID_TYPES = ("int64", "string")
DEFAULT_ID_COLUMN = "id"  # the id where the input has such a column
ROW_NUMBER_ID = ""  # id_column value meaning: the row number, even where an `id` column exists
COLUMNAR = ("parquet", "arrow")  # typed formats: the schema says each column's type
ID_DEFAULT_HINT = "the id column defaults to 'id' where the input has one: --id-column '' numbers the rows instead"
UTF8_BOM = b"\xef\xbb\xbf"
_BATCH_ROWS = 8192


@dataclass
class InputRow:
    """One row of the input; `problem` is None for a row that can be scored."""

    number: int
    line: int
    id: object
    texts: tuple[str, ...]
    problem: str | None = None
    id_problem: bool = False  # the problem is the row's id (missing, null, wrong type, duplicate)


@dataclass
class InputSpec:
    """Which columns of the input hold the texts and the id, and how they were chosen."""

    text_columns: list[str]
    id_column: str | None
    id_type: str  # int64 | string
    text_guessed: bool = False  # no text column given and none named `text`: the only string column
    id_defaulted: bool = False  # no --id-column given: the input's `id` column

    def describe(self) -> dict:
        """The columns used, for the result and `--json`."""
        return {"text": list(self.text_columns), "text_guessed": self.text_guessed,
                "id": self.id_column, "id_from": ("row number" if self.id_column is None
                                                  else "default" if self.id_defaulted else "given")}


@dataclass
class InputSource:
    """An opened input: its path, format, the columns found, and how rows are read."""

    path: Path
    format: str  # jsonl | csv | parquet | arrow (an Arrow IPC file, or a saved dataset's files)
    columns: list[str]
    string_columns: list[str]
    column_types: dict[str, str] = field(default_factory=dict)
    delimiter: str = ","
    num_rows: int | None = None  # known up front for Parquet only
    compression: str | None = None  # gzip | zstd (JSONL and CSV)
    files: list[Path] = field(default_factory=list)  # Arrow: the IPC files, in row order

    def describe_columns(self) -> str:
        return ", ".join(self.columns) if self.columns else "(none)"

    def size_and_mtime(self) -> tuple[int, int]:
        """Bytes and latest modification (ns) of everything read: the resume fingerprint's view
        of the input (a saved dataset is a directory: its files count, not the directory entry)."""
        paths = [self.path] if self.path.is_file() else [self.path / DATASET_STATE, *self.files]
        stats = [p.stat() for p in paths]
        return sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)


def input_format(path: Path) -> tuple[str, str | None]:
    """(format, compression) of a file, from its name; anything else is refused with the list."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = (suffixes[-2] if len(suffixes) > 1 else "") if compression else (suffixes[-1] if suffixes else "")
    if inner in JSONL_SUFFIXES:
        return "jsonl", compression
    if inner in CSV_SUFFIXES:
        return "csv", compression
    if compression is None and inner in PARQUET_SUFFIXES:
        return "parquet", None
    if compression is None and inner in ARROW_SUFFIXES:
        return "arrow", None
    shown = "".join(path.suffixes[-2:] if compression else path.suffixes[-1:]) or "(no extension)"
    raise UsageError(f"{path}: unsupported input format {shown!r}; accepted: {ACCEPTED_FORMATS}")


def open_input(path: str | os.PathLike) -> InputSource:
    """Check that the input exists and read its columns (the first record, header or schema)."""
    path = Path(path)
    if not path.exists():
        raise InputError("input file not found", path=str(path))
    if path.is_dir():
        return _open_dataset_dir(path)
    fmt, compression = input_format(path)
    if not path.is_file():
        raise InputError("input is not a regular file", path=str(path))
    if fmt == "parquet":
        return _open_parquet(path)
    if fmt == "arrow":
        return _open_arrow(path, [path])
    if fmt == "csv":
        return _open_csv(path, compression)
    return _open_jsonl(path, compression)


def _schema_source(path: Path, fmt: str, schema, **kwargs) -> InputSource:
    import pyarrow as pa

    types = {f.name: str(f.type) for f in schema}
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    return InputSource(path, fmt, list(types), strings, types, **kwargs)


def _open_parquet(path: Path) -> InputSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"not a readable Parquet file ({e})", path=str(path)) from None
    return _schema_source(path, "parquet", schema, num_rows=meta.metadata.num_rows)


def _open_dataset_dir(path: Path) -> InputSource:
    """A directory written by `Dataset.save_to_disk`: state.json lists its Arrow files in order."""
    if (path / DATASET_DICT).is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / DATASET_STATE).is_file())
        example = f", e.g. {path / splits[0]}" if splits else ""
        raise InputError(f"a saved DatasetDict (splits: {', '.join(splits) or 'none found'}); pass one split's "
                         f"directory{example}", path=str(path))
    state_path = path / DATASET_STATE
    if not state_path.is_file():
        raise UsageError(f"{path}: a directory without {DATASET_STATE}, so not a dataset written by save_to_disk; "
                         f"accepted: {ACCEPTED_FORMATS}")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        files = [path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"unreadable {DATASET_STATE} ({type(e).__name__}: {e})", path=str(state_path),
                         expected="a '_data_files' list of {\"filename\": ...}") from None
    if not files:
        raise InputError(f"empty dataset: {DATASET_STATE} lists no data files", path=str(path))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"data file(s) listed in {DATASET_STATE} not found: {', '.join(missing)}", path=str(path))
    return _open_arrow(path, files)


def _ipc_reader(file: Path):
    """An Arrow IPC reader over the memory-mapped file: the file format (random access, .arrow
    and .feather v2) or the stream format (what `datasets` writes)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    mapped = pa.memory_map(str(file))
    try:
        return ipc.open_file(mapped)
    except pa.ArrowInvalid:
        mapped.seek(0)
        return ipc.open_stream(mapped)


def _ipc_batches(reader) -> Iterator:
    if hasattr(reader, "num_record_batches"):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


def _open_arrow(path: Path, files: list[Path]) -> InputSource:
    import pyarrow as pa

    schemas = []
    for file in files:
        try:
            schemas.append(_ipc_reader(file).schema)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"not a readable Arrow IPC file ({e})", path=str(file)) from None
    for file, schema in zip(files[1:], schemas[1:]):
        if not schema.remove_metadata().equals(schemas[0].remove_metadata()):
            raise InputError("its schema differs from the first data file's", path=str(file),
                             expected=str(schemas[0].names), found=str(schema.names))
    return _schema_source(path, "arrow", schemas[0], files=files)


def _open_bytes(path: Path, compression: str | None) -> BinaryIO:
    """The file's bytes, decompressed as they are read."""
    if compression is None:
        return open(path, "rb")
    import pyarrow as pa

    return io.BufferedReader(pa.input_stream(str(path), compression=compression), buffer_size=1 << 18)


def _open_text(path: Path, compression: str | None):
    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
    return io.TextIOWrapper(_open_bytes(path, compression), encoding="utf-8-sig", errors="surrogateescape", newline="")


def _read_error(path: Path, compression: str | None, line: int, e: Exception) -> InputError:
    what = f"cannot decompress the {compression} input" if compression else "cannot read the input"
    return InputError(f"{what} ({e})", path=str(path), line=line)


def _open_csv(path: Path, compression: str | None = None) -> InputSource:
    inner = path.suffixes[-2] if compression else path.suffix
    delimiter = "\t" if inner.lower() == ".tsv" else ","
    try:
        with _open_text(path, compression) as fh:
            reader = csv.reader(fh, delimiter=delimiter, strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise InputError("empty input: no header and no rows", path=str(path)) from None
            except csv.Error as e:
                raise InputError(f"malformed CSV header ({e})", path=str(path), line=1) from None
    except OSError as e:
        raise _read_error(path, compression, 1, e) from None
    for name in header:
        if _has_surrogates(name):
            raise InputError("invalid UTF-8 in the header", path=str(path), line=1)
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise InputError("duplicate column names in the header", path=str(path), line=1, found=", ".join(header))
    return InputSource(path, "csv", header, list(header), {h: "string" for h in header}, delimiter=delimiter,
                       compression=compression)


def _open_jsonl(path: Path, compression: str | None = None) -> InputSource:
    """The columns of a JSONL file are the keys of its first object."""
    line_no = 0
    try:
        with _open_bytes(path, compression) as fh:
            for line_no, raw in enumerate(fh, start=1):
                if line_no == 1:
                    raw = raw.removeprefix(UTF8_BOM)
                if not raw.strip():
                    continue
                record, problem = _parse_json_line(raw)
                if problem is not None:
                    raise InputError(problem, path=str(path), line=line_no)
                types = {k: _json_type(v) for k, v in record.items()}
                strings = [k for k, t in types.items() if t == "string"]
                return InputSource(path, "jsonl", list(types), strings, types, compression=compression)
    except OSError as e:
        raise _read_error(path, compression, line_no + 1, e) from None
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


_INT_TYPES = ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32")


def resolve_spec(source: InputSource, task_columns: int, text_column: str | None, text_columns: list[str] | None,
                 id_column: str | None) -> InputSpec:
    """The text and id columns to read, checked against the input's columns.

    Default id column: `id` where the input has one, else none (the row number); `""` asks for
    the row number. Default text column: `text` if present, else the single string column (the
    id column aside); a guessed column is logged (a warning: `--text-column` silences it).
    """
    def missing(name: str, role: str) -> InputError:
        return InputError(f"{role} column {name!r} not found; the input has columns: {source.describe_columns()}",
                          path=str(source.path))

    id_defaulted = id_column is None and DEFAULT_ID_COLUMN in source.columns
    if id_column is None:
        id_column = DEFAULT_ID_COLUMN if id_defaulted else None
    elif id_column == ROW_NUMBER_ID:
        id_column = None
    guessed = False
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
        guessed = True
    if len(names) not in (1, 2) or (task_columns == 2 and len(names) != 2):
        expected = "two" if task_columns == 2 else "one or two (prompt,completion)"
        raise UsageError(f"expected {expected} text columns, found {len(names)}: {', '.join(names)}")
    for name in names:
        if name not in source.columns:
            raise missing(name, "text")
        kind = source.column_types.get(name)
        if source.format in COLUMNAR and name not in source.string_columns:
            raise InputError(f"text column {name!r} has the wrong type", path=str(source.path), expected="string", found=kind)
    if guessed:
        log.warning("%s: no column named 'text': scoring column %r, the only string column (--text-column picks another)",
                    source.path, names[0])
    id_type = "int64"
    if id_column is not None:
        if id_column not in source.columns:
            raise missing(id_column, "id")
        kind = source.column_types.get(id_column, "string")
        if source.format == "csv":
            id_type = "string"
        elif kind == "string" or kind == "large_string":
            id_type = "string"
        elif kind in _INT_TYPES:
            id_type = "int64"
        else:
            hint = f"; {ID_DEFAULT_HINT}" if id_defaulted else ""
            raise InputError(f"id column {id_column!r} has the wrong type{hint}", path=str(source.path),
                             expected="integers or strings", found=kind)
    return InputSpec(names, id_column, id_type, text_guessed=guessed, id_defaulted=id_defaulted)



def row_error(source: InputSource, spec: InputSpec, row: InputRow, advice: str = "") -> InputError:
    """The error for a bad row: file:line, the problem, and how the id was chosen if it is the id's."""
    hint = f" ({ID_DEFAULT_HINT})" if row.id_problem and spec.id_defaulted else ""
    return InputError(f"{row.problem}{hint}{advice}", path=str(source.path), line=row.line)


def iter_rows(source: InputSource, spec: InputSpec) -> Iterator[InputRow]:
    """Every row of the input, in order, with its problem if it has one (duplicates included)."""
    if source.format == "jsonl":
        rows = _jsonl_rows(source, spec)
    elif source.format == "csv":
        rows = _csv_rows(source, spec)
    else:
        rows = _columnar_rows(source, spec)
    yield from _mark_duplicates(rows, spec)


def _mark_duplicates(rows: Iterator[InputRow], spec: InputSpec) -> Iterator[InputRow]:
    first_line: dict = {}
    for row in rows:
        if row.problem is None and spec.id_column is not None:
            line = first_line.setdefault(row.id, row.line)
            if line != row.line:
                row.problem = f"duplicate id {row.id!r} in column {spec.id_column!r} (first on line {line})"
                row.id_problem = True
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
    id_problem = False
    if problem is None and spec.id_column is not None:
        if spec.id_column not in record:
            problem = f"null id in column {spec.id_column!r} (the row has no such key)"
        else:
            row_id, problem = _check_id(record[spec.id_column], spec)
        id_problem = problem is not None
    return InputRow(number, line, row_id if problem is None else None, texts, problem, id_problem)


def _jsonl_rows(source: InputSource, spec: InputSpec) -> Iterator[InputRow]:
    number = 0
    line_no = 0
    try:
        with _open_bytes(source.path, source.compression) as fh:
            for line_no, raw in enumerate(fh, start=1):
                if line_no == 1:
                    raw = raw.removeprefix(UTF8_BOM)
                if not raw.strip():
                    continue  # blank lines (a trailing newline, say) are not rows
                record, problem = _parse_json_line(raw)
                if problem is not None:
                    yield InputRow(number, line_no, None, (), problem)
                else:
                    yield _make_row(number, line_no, record, spec)
                number += 1
    except OSError as e:
        raise _read_error(source.path, source.compression, line_no + 1, e) from None


def _csv_rows(source: InputSource, spec: InputSpec) -> Iterator[InputRow]:
    index = {name: i for i, name in enumerate(source.columns)}
    wanted = spec.text_columns + ([spec.id_column] if spec.id_column else [])
    positions = [index[n] for n in wanted]
    width = len(source.columns)
    number = 0
    start_line = 1
    try:
        with _open_text(source.path, source.compression) as fh:
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
    except OSError as e:
        raise _read_error(source.path, source.compression, start_line, e) from None


def _record_batches(source: InputSource, columns: list[str]) -> Iterator:
    """The wanted columns of a Parquet or Arrow input, in row order, at most _BATCH_ROWS at a time."""
    if source.format == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(source.path).iter_batches(batch_size=_BATCH_ROWS, columns=columns)
        return
    for file in source.files:
        for batch in _ipc_batches(_ipc_reader(file)):
            batch = batch.select(columns)
            for start in range(0, batch.num_rows, _BATCH_ROWS):
                yield batch.slice(start, _BATCH_ROWS)


def _columnar_rows(source: InputSource, spec: InputSpec) -> Iterator[InputRow]:
    import pyarrow as pa

    wanted = list(dict.fromkeys(spec.text_columns + ([spec.id_column] if spec.id_column else [])))
    number = 0
    try:
        for batch in _record_batches(source, wanted):
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
        kind = "Parquet" if source.format == "parquet" else "Arrow"
        raise InputError(f"cannot read {kind} row {number + 1} onwards ({e})", path=str(source.path), line=number + 1) from None


class _BadUtf8:
    """A marker for a Parquet or Arrow string value that does not decode."""


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


def arrow_table(source: InputSource):
    """An Arrow input (a file or a saved dataset) as one memory-mapped pyarrow table (Ray reads it so)."""
    import pyarrow as pa

    return pa.Table.from_batches(list(_record_batches(source, source.columns)), schema=_ipc_reader(source.files[0]).schema)


def rows_of_table(table, spec: InputSpec) -> Iterator[InputRow]:
    """Rows of an in-memory pyarrow table (Ray batches): row numbers are positions in the table."""
    wanted = list(dict.fromkeys(spec.text_columns + ([spec.id_column] if spec.id_column else [])))
    missing = [n for n in wanted if n not in table.column_names]
    if missing:
        raise InputError(f"column(s) {', '.join(map(repr, missing))} not found; the table has columns: {', '.join(table.column_names)}")
    columns = {n: table.column(n).to_pylist() for n in wanted}
    rows = (_make_row(i, i + 1, {n: columns[n][i] for n in wanted}, spec) for i in range(table.num_rows))
    yield from _mark_duplicates(rows, spec)
