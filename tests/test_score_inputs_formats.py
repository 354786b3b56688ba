"""The inputs users keep: compressed JSONL/CSV (streamed, right line numbers), Arrow IPC files,
datasets saved with `save_to_disk` (read with pyarrow alone), a CSV with Excel's byte-order mark;
the `id` column as the default id; the guessed text column said out loud."""

from __future__ import annotations

import gzip
import json
import logging

import pyarrow as pa
import pytest

from attnfallback.errors import InputError, UsageError
from attnfallback.scoring.inputs import ACCEPTED_FORMATS, iter_rows, open_input, resolve_spec
from scoring_helpers import save_like_datasets, write_arrow, write_jsonl

ROWS = [{"id": f"p{i}", "text": f"sentence number {i}"} for i in range(7)]


def rows_of(path, text_column=None, id_column=None):
    source = open_input(path)
    return list(iter_rows(source, resolve_spec(source, 1, text_column, None, id_column)))


def compress(path, data: bytes, codec: str):
    if codec == "gzip":
        path.write_bytes(gzip.compress(data))
    else:
        with pa.CompressedOutputStream(str(path), codec) as out:
            out.write(data)
    return path


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# a quoted text spanning two lines: the rows after it start one physical line later
CSV_TEXT = 'id,text\np0,"first line\nsecond line"\np1,plain\np2,"quoted, with a comma"\n'


@pytest.mark.parametrize("suffix, codec", [(".jsonl.gz", "gzip"), (".ndjson.zst", "zstd"), (".jsonl.zstd", "zstd")])
def test_compressed_jsonl_reads_like_the_plain_file(tmp_path, suffix, codec):
    plain = write_jsonl(tmp_path / "plain.jsonl", ROWS)
    packed = compress(tmp_path / f"in{suffix}", plain.read_bytes(), codec)
    expected = [(r.number, r.line, r.id, r.texts) for r in rows_of(plain)]
    assert [(r.number, r.line, r.id, r.texts) for r in rows_of(packed)] == expected
    assert open_input(packed).compression == codec


@pytest.mark.parametrize("suffix, codec", [(".csv.gz", "gzip"), (".csv.zst", "zstd"), (".tsv.gz", "gzip")])
def test_compressed_csv_and_tsv_keep_the_physical_lines(tmp_path, suffix, codec):
    text = CSV_TEXT if suffix.startswith(".csv") else 'id\ttext\np0\t"first line\nsecond line"\np1\tplain\np2\t"quoted, with a comma"\n'
    path = compress(tmp_path / f"in{suffix}", text.encode(), codec)
    rows = rows_of(path)
    assert [r.id for r in rows] == ["p0", "p1", "p2"]
    assert [r.line for r in rows] == [2, 4, 5]
    assert rows[0].texts == ("first line\nsecond line",)


def test_a_bad_line_in_a_compressed_file_is_named_by_its_line(tmp_path):
    data = b'{"text": "ok"}\n\n{"text": "broken"\n{"text": "fine"}\n'
    rows = rows_of(compress(tmp_path / "in.jsonl.gz", data, "gzip"))
    assert [(r.line, r.problem is None) for r in rows] == [(1, True), (3, False), (4, True)]
    assert "malformed JSON" in rows[1].problem


def test_compressed_input_is_streamed_and_a_truncated_one_names_the_line(tmp_path):
    # rows come out while the stream is read: those before the damage arrive, then an error at
    # the first line that could not be decompressed
    data = jsonl_bytes({"text": f"row {i} " + "x" * 50} for i in range(200_000))
    whole = gzip.compress(data, compresslevel=1)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    source = open_input(path)
    rows = iter_rows(source, resolve_spec(source, 1, None, None, None))
    seen = []
    with pytest.raises(InputError, match="cannot decompress the gzip input") as err:
        for row in rows:
            seen.append(row)
    assert len(seen) > 1000 and all(r.problem is None for r in seen)
    assert err.value.line == seen[-1].line + 1 and err.value.exit_code == 2


def test_not_really_compressed_is_an_input_error(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    path.write_text('{"text": "plain"}\n')
    with pytest.raises(InputError, match=r"in\.jsonl\.gz:1: cannot decompress the gzip input"):
        open_input(path)


@pytest.mark.parametrize("kind", ["arrow-file", "arrow-stream", "feather", "saved-dataset"])
def test_arrow_files_and_saved_datasets_give_the_rows_in_order(tmp_path, kind):
    table = pa.Table.from_pylist(ROWS).append_column("n", pa.array(range(7), pa.int64()))
    if kind == "saved-dataset":
        path = save_like_datasets(tmp_path / "eval-set", table)
    elif kind == "feather":
        import pyarrow.feather as feather

        path = tmp_path / "in.feather"
        feather.write_feather(table, path, compression="uncompressed")
    else:
        path = write_arrow(tmp_path / "in.arrow", table, stream=kind == "arrow-stream")
    source = open_input(path)
    assert source.format == "arrow" and source.column_types["n"] == "int64"
    rows = rows_of(path)
    assert [r.id for r in rows] == [f"p{i}" for i in range(7)]
    assert [r.texts for r in rows] == [(f"sentence number {i}",) for i in range(7)]
    assert [r.line for r in rows] == list(range(1, 8))
    assert [r.id for r in rows_of(path, id_column="n")] == list(range(7))


def test_a_saved_dataset_is_read_without_the_datasets_package(tmp_path, monkeypatch):
    import sys

    path = save_like_datasets(tmp_path / "ds", pa.Table.from_pylist(ROWS))
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it would fail
    assert [r.id for r in rows_of(path)] == [f"p{i}" for i in range(7)]


def test_saved_dataset_problems_are_named(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    ds = save_like_datasets(tmp_path / "ds", table)
    (ds / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(InputError, match="data-00001-of-00002.arrow"):
        open_input(ds)
    splits = tmp_path / "dict"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    for split in ("train", "test"):
        save_like_datasets(splits / split, table)
    with pytest.raises(InputError, match=r"DatasetDict \(splits: test, train\); pass one split's directory") as err:
        open_input(splits)
    assert err.value.exit_code == 2
    other = tmp_path / "just-a-dir"
    other.mkdir()
    with pytest.raises(UsageError, match="not a dataset written by save_to_disk; accepted: .*jsonl"):
        open_input(other)


@pytest.mark.parametrize("name", ["in.txt", "in.json.gz", "in.parquet.gz", "in.gz", "in"])
def test_anything_else_is_refused_with_the_accepted_formats(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"whatever\n")
    with pytest.raises(UsageError) as err:
        open_input(path)
    assert ACCEPTED_FORMATS in str(err.value) and err.value.exit_code == 2
    assert ".jsonl" in ACCEPTED_FORMATS and ".csv" in ACCEPTED_FORMATS and ".zst" in ACCEPTED_FORMATS


@pytest.mark.parametrize("name", ["excel.csv", "excel.tsv", "excel.csv.gz", "bom.jsonl", "bom.jsonl.gz"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, name):
    if ".csv" in name or ".tsv" in name:
        sep = "\t" if ".tsv" in name else ","
        text = f"id{sep}text\r\np0{sep}hello\r\np1{sep}world\r\n"
    else:
        text = '{"id": "p0", "text": "hello"}\n{"id": "p1", "text": "world"}\n'
    data = b"\xef\xbb\xbf" + text.encode()
    path = tmp_path / name
    if name.endswith(".gz"):
        compress(path, data, "gzip")
    else:
        path.write_bytes(data)
    assert open_input(path).columns == ["id", "text"]
    rows = rows_of(path, id_column="id")
    assert [(r.id, r.texts, r.line) for r in rows] == [("p0", ("hello",), 1 + (".jsonl" not in name)),
                                                        ("p1", ("world",), 2 + (".jsonl" not in name))]


def test_the_id_column_is_the_default_id_and_the_row_number_otherwise(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    source = open_input(path)
    spec = resolve_spec(source, 1, None, None, None)
    assert spec.id_column == "id" and spec.id_defaulted and spec.id_type == "string"
    assert [r.id for r in iter_rows(source, spec)] == [f"p{i}" for i in range(7)]
    assert spec.describe() == {"text": ["text"], "text_guessed": False, "id": "id", "id_from": "default"}
    numbered = resolve_spec(source, 1, None, None, "")  # '' asks for the row number
    assert numbered.id_column is None and [r.id for r in iter_rows(source, numbered)] == list(range(7))
    assert numbered.describe()["id_from"] == "row number"
    no_id = write_jsonl(tmp_path / "b.jsonl", [{"text": "a"}, {"text": "b"}])
    assert [r.id for r in rows_of(no_id)] == [0, 1]


def test_duplicate_and_null_default_ids_name_their_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"},
                                              {"id": "a", "text": "z"}, {"id": None, "text": "w"}])
    rows = rows_of(path)
    assert rows[2].problem == "duplicate id 'a' in column 'id' (first on line 1)" and rows[2].id_problem
    assert rows[3].problem == "null id in column 'id'" and rows[3].id_problem
    assert rows[0].problem is None and rows[1].problem is None


def test_an_id_column_of_another_type_is_refused_with_the_way_out(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": 0.5, "text": "x"}])
    with pytest.raises(InputError, match=r"id column 'id' has the wrong type; the id column defaults to 'id'.*--id-column ''"):
        rows_of(path)
    assert [r.id for r in rows_of(path, id_column="")] == [0]


def test_a_guessed_text_column_is_logged(tmp_path, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": "p0", "sentence": "the only string column besides the id"}])
    caplog.set_level(logging.INFO, logger="attnfallback")
    source = open_input(path)
    spec = resolve_spec(source, 1, None, None, None)
    assert spec.text_columns == ["sentence"] and spec.text_guessed and spec.id_column == "id"
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "scoring column 'sentence'" in record.getMessage()
    caplog.clear()
    resolve_spec(source, 1, "sentence", None, None)
    assert caplog.records == []  # named: nothing to say
