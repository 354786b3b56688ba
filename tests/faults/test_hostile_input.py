"""Hostile or broken input to `score`: each a clear error naming what and where, exit 2, and
nothing written outside the run's own directories (the tree is listed before and after)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from .registry import Case, fault, fault_cases
from .tools import make_texts, read_events, snapshot, write_jsonl


def _jsonl(lines: list[bytes]):
    def build(d: Path) -> Path:
        path = d / "in.jsonl"
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        return path
    return build


def _csv(data: bytes, name: str = "in.csv"):
    def build(d: Path) -> Path:
        path = d / name
        path.write_bytes(data)
        return path
    return build


def _parquet(columns: dict):
    def build(d: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = d / "in.parquet"
        pq.write_table(pa.table(columns), path)
        return path
    return build


def _garbage_parquet(d: Path) -> Path:
    path = d / "in.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all " * 10)
    return path


GOOD = b'{"id": "a", "text": "a good row"}'

CASES = [
    Case("malformed-json", "Malformed JSON line",
         how="JSONL whose 3rd line is `{\"text\": \"no closing brace\"`",
         expected="exit 2, `in.jsonl:3: malformed JSON (...)`",
         params=(_jsonl([GOOD, b'{"id": "b", "text": "ok"}', b'{"id": "c", "text": "no closing brace"']), (), ["in.jsonl:3", "malformed JSON"])),
    Case("json-not-object", "JSON line that is not an object",
         how="JSONL whose 2nd line is `[\"a\", \"list\"]`",
         expected="exit 2, `in.jsonl:2: ... expected an object, found list`",
         params=(_jsonl([GOOD, b'["a", "list"]']), (), ["in.jsonl:2", "expected an object"])),
    Case("invalid-utf8-jsonl", "Invalid UTF-8 in JSONL",
         how="JSONL whose 2nd line holds the bytes 0xff 0xfe inside a string",
         expected="exit 2, `in.jsonl:2: invalid UTF-8 at byte N of the line`",
         params=(_jsonl([GOOD, b'{"id": "b", "text": "bad \xff\xfe bytes"}']), (), ["in.jsonl:2", "invalid UTF-8"])),
    Case("malformed-csv", "Malformed CSV row",
         how="CSV `id,text` whose 3rd line has three fields",
         expected="exit 2, `in.csv:3: expected 2 fields, found 3`",
         params=(_csv(b"id,text\n1,fine\n2,one,too many\n"), ("--text-column", "text"), ["in.csv:3", "expected 2 fields, found 3"])),
    Case("csv-unterminated-quote", "CSV with an unterminated quote",
         how="CSV `id,text` of 4 rows whose 3rd line opens a quote that never closes",
         expected="exit 2 naming `in.csv:3` (the rows after it are not swallowed into one text)",
         params=(_csv(b'id,text\n1,fine\n2,"unterminated\n3,a row\n4,another row\n'), ("--text-column", "text"), ["in.csv:3"])),
    Case("invalid-utf8-csv", "Invalid UTF-8 in CSV",
         how="CSV whose 3rd line holds the byte 0xff",
         expected="exit 2, `in.csv:3: invalid UTF-8`",
         params=(_csv(b"id,text\n1,fine\n2,bad \xff byte\n"), ("--text-column", "text"), ["in.csv:3", "invalid UTF-8"])),
    Case("null-text", "Null text",
         how="JSONL whose 2nd line is `{\"id\": \"b\", \"text\": null}`",
         expected="exit 2, `in.jsonl:2: null text in column 'text'`",
         params=(_jsonl([GOOD, b'{"id": "b", "text": null}']), (), ["in.jsonl:2", "null text in column 'text'"])),
    Case("empty-text", "Empty and blank texts",
         how="JSONL whose 2nd line has the text \"\" and the 3rd three spaces",
         expected="exit 2, `in.jsonl:2: empty text in column 'text'`",
         params=(_jsonl([GOOD, b'{"id": "b", "text": ""}', b'{"id": "c", "text": "   "}']), (), ["in.jsonl:2", "empty text"])),
    Case("duplicate-ids", "Duplicate ids",
         how="JSONL with `--id-column id` where lines 1 and 3 both have id \"a\"",
         expected="exit 2, `in.jsonl:3: duplicate id 'a'`",
         params=(_jsonl([GOOD, b'{"id": "b", "text": "x"}', b'{"id": "a", "text": "again"}']), ("--id-column", "id"), ["in.jsonl:3", "duplicate id 'a'"])),
    Case("empty-file", "Empty file",
         how="a JSONL file of 0 bytes",
         expected="exit 2, `in.jsonl: empty input`",
         params=(_jsonl([]), (), ["in.jsonl", "empty input"])),
    Case("header-only-csv", "CSV with a header and no rows",
         how="CSV holding only `id,text`",
         expected="exit 2, `in.csv: empty input: no rows`",
         params=(_csv(b"id,text\n"), ("--text-column", "text"), ["in.csv", "empty input"])),
    Case("parquet-wrong-type", "Parquet text column of the wrong type",
         how="Parquet whose `text` column is int64",
         expected="exit 2, `in.parquet: text column 'text' has the wrong type (expected string, found int64)`",
         params=(_parquet({"text": [1, 2, 3]}), (), ["in.parquet", "wrong type", "int64"])),
    Case("parquet-wrong-id-type", "Parquet id column of the wrong type",
         how="Parquet with `--id-column id` where `id` is float64",
         expected="exit 2, `in.parquet: id column 'id' has the wrong type (expected integers or strings, found double)`",
         params=(_parquet({"id": [0.5, 1.5], "text": ["a", "b"]}), ("--id-column", "id"), ["in.parquet", "id column 'id'", "wrong type"])),
    Case("not-parquet", "A file named .parquet that is not Parquet",
         how="`in.parquet` holding text bytes",
         expected="exit 2, `in.parquet: not a readable Parquet file (...)`",
         params=(_garbage_parquet, (), ["in.parquet", "not a readable Parquet file"])),
    Case("missing-column", "Missing text column",
         how="JSONL without the column passed as --text-column",
         expected="exit 2 naming the column and listing the columns there",
         params=(_jsonl([GOOD]), ("--text-column", "body"), ["'body' not found", "id, text"])),
]


@fault_cases(*CASES, argnames="build,extra,needles", group="input")
def test_broken_input_is_refused(build, extra, needles, tiny_bert, tmp_path, workdir, cli, observe):
    source = build(tmp_path)
    before = snapshot(tmp_path)
    result = cli("score", tiny_bert, "--input", source, "--output", tmp_path / "out" / "o.parquet", "--events", tmp_path / "events",
                 "--quiet", *extra)
    created = sorted(snapshot(tmp_path) - before)
    assert result.code == 2, result
    for needle in needles:
        assert needle in result.error_line, (needle, result.error_line)
    assert str(source) in result.error_line
    outside = [p for p in created if not p.startswith(("out/", "events/"))]
    assert outside == [], outside
    observe(f"exit 2: `{result.error_line}`; "
            + ("nothing written" if not created else f"written: {created}"))


@fault("Bad rows skipped with --on-bad-row skip",
       how="JSONL of 10 lines: malformed JSON (line 2), null text (4), empty text (5), invalid UTF-8 (7), duplicate id (9); "
           "`--on-bad-row skip --id-column id`",
       expected="exit 0; rows in = rows written + rows skipped (10 = 5 + 5); shard_done lists the skipped lines "
                "2, 4, 5, 7, 9 with reasons; the good rows written in order",
       group="input")
def test_bad_rows_skipped_and_listed(tiny_bert, tmp_path, cli, observe):
    import pyarrow.parquet as pq

    lines = [b'{"id": "r1", "text": "one"}', b'{"id": "r2", "text": ', b'{"id": "r3", "text": "three"}',
             b'{"id": "r4", "text": null}', b'{"id": "r5", "text": ""}', b'{"id": "r6", "text": "six"}',
             b'{"id": "r7", "text": "\xff"}', b'{"id": "r8", "text": "eight"}', b'{"id": "r1", "text": "dup"}',
             b'{"id": "r10", "text": "ten"}']
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    events = tmp_path / "events"
    out = tmp_path / "out.parquet"
    result = cli("score", tiny_bert, "--input", source, "--output", out, "--on-bad-row", "skip", "--id-column", "id",
                 "--events", events, "--quiet", "--json")
    assert result.code == 0, result
    data = json.loads(result.out)
    assert (data["rows_in"], data["rows_written"], data["rows_skipped"]) == (10, 5, 5)
    assert pq.read_table(out).column("id").to_pylist() == ["r1", "r3", "r6", "r8", "r10"]
    (done,) = [e for e in read_events(events) if e["event"] == "shard_done"]
    assert [s["line"] for s in done["skipped"]] == [2, 4, 5, 7, 9]
    reasons = [s["reason"] for s in done["skipped"]]
    assert "malformed JSON" in reasons[0] and "null text" in reasons[1] and "duplicate id" in reasons[4]
    observe(f"exit 0; 10 in = 5 written + 5 skipped; shard_done skipped lines {[s['line'] for s in done['skipped']]}: "
            f"{'; '.join(r[:28] for r in reasons)}")


TEN_MB = 10_000_000


@pytest.mark.slow
@fault("A 10 MB text in one row",
       how="JSONL of 3 rows, the 2nd a 10 MB text of words; default --max-length",
       expected="exit 0: the long text truncated to the model's max length and counted (truncated=1), every row "
                "written; no error, no unbounded batch",
       group="input")
def test_ten_megabyte_text(tiny_bert, tmp_path, cli, observe):
    import pyarrow.parquet as pq

    words = make_texts(1, seed=5, max_words=40)[0].split()
    long_text = (" ".join(words) + " ") * (TEN_MB // (len(" ".join(words)) + 1) + 1)
    long_text = long_text[:TEN_MB]
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "short"}, {"text": long_text}, {"text": "short again"}])
    events = tmp_path / "events"
    out = tmp_path / "out.parquet"
    t0 = time.perf_counter()
    result = cli("score", tiny_bert, "--input", source, "--output", out, "--events", events, "--quiet", "--json")
    seconds = time.perf_counter() - t0
    assert result.code == 0, result
    data = json.loads(result.out)
    assert data["rows_written"] == 3 and data["truncated"] == 1
    assert pq.read_table(out).num_rows == 3
    max_length = data["task"]["max_length"]
    assert data["tokens"] <= max_length + 10
    observe(f"exit 0 in {seconds:.1f} s on this machine; 3/3 rows written; truncated=1 (to {max_length} tokens); "
            f"{data['tokens']} tokens scored in all")


@fault("Model directory asking for remote code",
       how="a copy of the tiny model whose config.json has auto_map -> modeling_evil.EvilModel; modeling_evil.py "
           "would create a marker file when imported; `score` and `load` without --trust-remote-code",
       expected="both refused with exit 2 naming --trust-remote-code; the model's code never imported (no marker); "
                "nothing written",
       group="input")
def test_remote_code_refused(tiny_bert, tmp_path, workdir, cli, observe):
    model = tmp_path / "remote-model"
    shutil.copytree(tiny_bert, model)
    marker = tmp_path / "remote-code-ran"
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    before = snapshot(tmp_path)
    scored = cli("score", model, "--input", source, "--output", tmp_path / "out" / "o.parquet", "--events", tmp_path / "events", "--quiet")
    loaded = cli("load", model, "--events", tmp_path / "events")
    created = sorted(snapshot(tmp_path) - before)
    for result in (scored, loaded):
        assert result.code == 2, result
        assert "--trust-remote-code" in result.error_line
    assert not marker.exists()
    outside = [p for p in created if not p.startswith(("out/", "events/"))]
    assert outside == [], outside
    observe(f"score: exit 2, load: exit 2 (`{scored.error_line}`); marker absent; "
            + ("nothing written" if not created else f"written: {created}"))
