"""Input reading: formats, column choice, and every kind of bad row named by file and line."""

from __future__ import annotations

import pytest

from attnfallback.errors import InputError, UsageError
from attnfallback.scoring.inputs import iter_rows, open_input, resolve_spec
from scoring_helpers import write_csv, write_jsonl, write_parquet


def rows_of(path, text_column=None, text_columns=None, id_column=None, task_columns=1):
    source = open_input(path)
    spec = resolve_spec(source, task_columns, text_column, text_columns, id_column)
    return list(iter_rows(source, spec))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_every_format_gives_the_same_rows(tmp_path, fmt):
    data = [{"key": f"k{i}", "text": f"sentence number {i}"} for i in range(5)]
    path = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, data)
    elif fmt == "parquet":
        write_parquet(path, data)
    else:
        write_csv(path, data, delimiter="\t" if fmt == "tsv" else ",")
    rows = rows_of(path, id_column="key")
    assert [r.id for r in rows] == [f"k{i}" for i in range(5)]
    assert [r.texts for r in rows] == [(f"sentence number {i}",) for i in range(5)]
    assert [r.number for r in rows] == list(range(5))
    assert all(r.problem is None for r in rows)
    if fmt in ("csv", "tsv"):
        assert [r.line for r in rows] == [2, 3, 4, 5, 6]  # the header is line 1
    else:
        assert [r.line for r in rows] == [1, 2, 3, 4, 5]


def test_default_text_column_is_text_else_the_only_string_column(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"n": 1, "body": "hello"}])
    source = open_input(path)
    assert resolve_spec(source, 1, None, None, None).text_columns == ["body"]
    path = write_jsonl(tmp_path / "b.jsonl", [{"title": "x", "body": "hello", "text": "t"}])
    assert resolve_spec(open_input(path), 1, None, None, None).text_columns == ["text"]
    path = write_jsonl(tmp_path / "c.jsonl", [{"title": "x", "body": "hello"}])
    with pytest.raises(InputError, match="title, body"):
        resolve_spec(open_input(path), 1, None, None, None)


def test_row_ids_default_to_row_numbers(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": "b"}])
    assert [r.id for r in rows_of(path)] == [0, 1]


def test_missing_file_and_missing_column_are_named(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        open_input(tmp_path / "nope.jsonl")
    assert e.value.exit_code == 2
    path = write_parquet(tmp_path / "a.parquet", [{"body": "x", "n": 1}])
    with pytest.raises(InputError, match=r"text column 'sentence' not found; the input has columns: body, n"):
        rows_of(path, text_column="sentence")
    with pytest.raises(InputError, match=r"id column 'key' not found; the input has columns: body, n"):
        rows_of(path, text_column="body", id_column="key")


def test_unknown_extension_is_a_usage_error(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("hello\n")
    with pytest.raises(UsageError, match=r"\.jsonl"):
        open_input(path)


def test_malformed_json_line_carries_its_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n[1, 2]\n{"text": "fine"}\n')
    rows = rows_of(path)
    assert [(r.line, r.problem is None) for r in rows] == [(1, True), (3, False), (4, False), (5, True)]
    assert "malformed JSON" in rows[1].problem and "expected an object" in rows[2].problem
    assert [r.number for r in rows] == [0, 1, 2, 3]  # a blank line is not a row


def test_invalid_utf8_in_jsonl_and_csv(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff byte"}\n')
    rows = rows_of(path)
    assert rows[1].line == 2 and "invalid UTF-8" in rows[1].problem
    path = tmp_path / "a.csv"
    path.write_bytes(b'text\nok\nbad \xfe\n')
    rows = rows_of(path)
    assert rows[1].line == 3 and "invalid UTF-8" in rows[1].problem


def test_null_empty_and_non_string_texts_and_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"id": 1, "text": "fine"}, {"id": 2, "text": None}, {"id": 3, "text": "   "},
        {"id": 4, "text": 5}, {"id": 1, "text": "again"}, {"id": "x", "text": "str id"}, {"text": "no id"},
    ])
    rows = rows_of(path, id_column="id")
    problems = [r.problem for r in rows]
    assert problems[0] is None
    assert "null text" in problems[1] and "empty text" in problems[2] and "not a string" in problems[3]
    assert "duplicate id 1" in problems[4]
    assert "expected an integer" in problems[5] and "null id" in problems[6]


def test_empty_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="empty input"):
        open_input(tmp_path / "a.jsonl")
    (tmp_path / "a.csv").write_text("")
    with pytest.raises(InputError, match="empty input"):
        open_input(tmp_path / "a.csv")


def test_parquet_with_the_wrong_column_types(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"text": [1, 2], "score": [0.5, 0.1]})
    with pytest.raises(InputError, match="expected string, found int64"):
        rows_of(path, text_column="text")
    path = write_parquet(tmp_path / "b.parquet", {"text": ["a", "b"], "key": [0.5, 0.1]})
    with pytest.raises(InputError, match="expected integers or strings, found double"):
        rows_of(path, id_column="key")


def test_pairs_need_two_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"a": "x", "b": "y"}])
    with pytest.raises(UsageError, match="--text-columns a,b"):
        rows_of(path, task_columns=2)
    rows = rows_of(path, text_columns=["a", "b"], task_columns=2)
    assert rows[0].texts == ("x", "y")
