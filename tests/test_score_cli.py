"""`attnfallback score` on the command line: exit codes, messages, --json."""

from __future__ import annotations

import json

import pytest

from attnfallback.cli.app import main
from conftest import build_tiny_model
from scoring_helpers import add_sentence_config, save_like_datasets, write_jsonl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return add_sentence_config(build_tiny_model(tmp_path_factory.mktemp("cli-bert"), "bert"))


def test_score_prints_the_result_as_json(model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}, {"text": ""}, {"text": "three"}])
    code = main(["score", str(model_dir), "--input", str(path), "--output", str(tmp_path / "o.parquet"),
                 "--on-bad-row", "skip", "--device", "cpu", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows_in"] == 3 and data["rows_written"] == 2 and data["rows_skipped"] == 1
    assert data["skipped"] == [{"row": 1, "line": 2, "reason": "empty text in column 'text'"}]
    assert data["decision"]["used"] in ("sdpa", "eager")


@pytest.mark.parametrize("case, message", [
    ("missing-file", "input file not found"),
    ("missing-column", "text column 'body' not found; the input has columns: text, n"),
    ("malformed", "in.jsonl:2: malformed JSON"),
    ("empty", "empty input"),
    ("bad-shard", "malformed shard"),
    ("bad-packing", "--packing must be auto or off, found 'always'"),
    ("bad-tokenizer-process", "--tokenizer-process must be auto or off, found 'always'"),
])
def test_bad_input_exits_2_with_a_message_naming_it(model_dir, tmp_path, capsys, case, message):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "fine", "n": 1}, {"text": "also fine", "n": 2}])
    extra = []
    if case == "missing-file":
        path = tmp_path / "nope.jsonl"
    elif case == "missing-column":
        extra = ["--text-column", "body"]
    elif case == "malformed":
        path.write_text('{"text": "ok"}\n{"text": \n')
    elif case == "empty":
        path.write_text("\n")
    elif case == "bad-shard":
        extra = ["--shard", "3/2"]
    elif case == "bad-packing":
        extra = ["--packing", "always"]
    elif case == "bad-tokenizer-process":
        extra = ["--tokenizer-process", "always"]
    code = main(["score", str(model_dir), "--input", str(path), "--output", str(tmp_path / "o.parquet"), "--quiet", "--device", "cpu", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_a_model_asking_for_remote_code_is_refused_without_the_flag(model_dir, tmp_path, capsys):
    import json
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}])
    code = main(["score", str(remote), "--input", str(path), "--output", str(tmp_path / "o.parquet"), "--quiet"])
    assert code == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / ".o.parquet.parts").exists()


def score(model_dir, path, output, *extra):
    return main(["score", str(model_dir), "--input", str(path), "--output", str(output), "--quiet", "--device", "cpu", *extra])


def test_the_inputs_id_column_is_the_default_id(model_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "p0a", "text": "one"}, {"id": "p0b", "text": "two"}])
    assert score(model_dir, path, tmp_path / "o.parquet", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert pq.read_table(tmp_path / "o.parquet").column("id").to_pylist() == ["p0a", "p0b"]
    assert data["columns"] == {"text": ["text"], "text_guessed": False, "id": "id", "id_from": "default"}
    assert score(model_dir, path, tmp_path / "n.parquet", "--id-column", "", "--json") == 0  # '' : row numbers
    assert pq.read_table(tmp_path / "n.parquet").column("id").to_pylist() == [0, 1]
    assert json.loads(capsys.readouterr().out)["columns"]["id_from"] == "row number"


@pytest.mark.parametrize("rows, message", [
    ([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}],
     "in.jsonl:3: duplicate id 'a' in column 'id' (first on line 1)"),
    ([{"id": "a", "text": "x"}, {"id": None, "text": "y"}], "in.jsonl:2: null id in column 'id'"),
])
def test_duplicate_or_null_default_ids_exit_2_naming_the_lines(model_dir, tmp_path, capsys, rows, message):
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    assert score(model_dir, path, tmp_path / "o.parquet") == 2
    err = capsys.readouterr().err
    assert message in err and "--id-column ''" in err
    assert not (tmp_path / "o.parquet").exists()


def test_a_guessed_text_column_is_said_on_stderr_and_in_json(model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "s1", "sentence": "a dog runs"}, {"id": "s2", "sentence": "a cat sleeps"}])
    assert score(model_dir, path, tmp_path / "o.parquet", "--json") == 0
    out, err = capsys.readouterr()
    assert "no column named 'text': scoring column 'sentence'" in err and "--text-column" in err
    assert json.loads(out)["columns"] == {"text": ["sentence"], "text_guessed": True, "id": "id", "id_from": "default"}


def test_an_existing_output_exits_2(model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}])
    assert score(model_dir, path, tmp_path / "o.parquet") == 0
    capsys.readouterr()
    assert score(model_dir, path, tmp_path / "o.parquet") == 2
    assert "exists from a completed run" in capsys.readouterr().err
    (tmp_path / "foreign.parquet").write_bytes(b"not ours")
    assert score(model_dir, path, tmp_path / "foreign.parquet") == 2
    assert "was not written by attnfallback" in capsys.readouterr().err
    (tmp_path / "adir.parquet").mkdir()
    assert score(model_dir, path, tmp_path / "adir.parquet") == 2


def test_shards_are_numbered_from_0_and_the_error_for_n_of_n_says_so(model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}])
    assert score(model_dir, path, tmp_path / "o.parquet", "--shard", "4/4") == 2
    err = capsys.readouterr().err
    assert "numbered from 0" in err and "0/4 .. 3/4" in err and "did you mean 3/4?" in err
    assert main(["score", "--help"]) == 0
    assert "numbered from 0" in capsys.readouterr().out


def test_an_excel_csv_with_a_byte_order_mark_finds_its_id_column(model_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffid,text\r\nx1,hello there\r\nx2,good bye\r\n".encode("utf-8"))
    assert score(model_dir, path, tmp_path / "o.parquet", "--id-column", "id") == 0
    assert pq.read_table(tmp_path / "o.parquet").column("id").to_pylist() == ["x1", "x2"]


def test_no_warning_for_the_expected_cpu_fallback(model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}])
    assert score(model_dir, path, tmp_path / "o.parquet", "--json") == 0  # default prefer: flash_attention_4 first
    out, err = capsys.readouterr()
    assert json.loads(out)["decision"]["fell_back"] is True
    assert "WARNING" not in err and "flash_attention_4" not in err


def test_a_saved_dataset_and_a_compressed_file_score_and_resume(model_dir, tmp_path, capsys):
    import gzip
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"q{i}", "text": f"question number {i}"} for i in range(6)]
    ds = save_like_datasets(tmp_path / "eval-set", pa.Table.from_pylist(rows))
    assert score(model_dir, ds, tmp_path / "ds.parquet", "--json") == 0
    assert pq.read_table(tmp_path / "ds.parquet").column("id").to_pylist() == [r["id"] for r in rows]
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert score(model_dir, packed, tmp_path / "gz.parquet", "--json") == 0
    assert pq.read_table(tmp_path / "gz.parquet").column("id").to_pylist() == [r["id"] for r in rows]
    capsys.readouterr()
    # resume fingerprint of a directory: its files' sizes and times
    assert score(model_dir, ds, tmp_path / "ds.parquet", "--resume", "--json") == 0
    assert json.loads(capsys.readouterr().out)["already_complete"] is True
    data_file = ds / "data-00001-of-00002.arrow"
    stat = data_file.stat()
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert score(model_dir, ds, tmp_path / "ds.parquet", "--resume") == 2
    assert "different job (input_mtime_ns" in capsys.readouterr().err


def test_job_reads_the_whole_job_from_a_file_and_result_writes_what_json_prints(model_dir, tmp_path, capsys):
    from attnfallback.scoring import ScoreJob

    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}, {"text": ""}, {"text": "three"}])
    job = ScoreJob(model=str(model_dir), input=str(path), output=str(tmp_path / "o.parquet"), on_bad_row="skip",
                   device="cpu", quiet=True, run_id="from-a-file")
    (tmp_path / "job.json").write_text(json.dumps(job.to_dict()))
    result = tmp_path / "result.json"
    assert main(["score", "--job", str(tmp_path / "job.json"), "--result", str(result), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(result.read_text())
    assert written == printed
    assert written["run_id"] == "from-a-file" and written["rows_written"] == 2 and written["rows_skipped"] == 1
    assert not list(tmp_path.glob(".result.json.tmp-*"))  # written atomically: no temporary file left
    # --result without --job, and without --json (the summary is printed as text then)
    again = tmp_path / "again.json"
    assert main(["score", str(model_dir), "--input", str(path), "--output", str(tmp_path / "o2.parquet"), "--on-bad-row", "skip",
                 "--device", "cpu", "--quiet", "--result", str(again)]) == 0
    assert "2 rows written" in capsys.readouterr().out
    assert json.loads(again.read_text())["rows_written"] == 2


@pytest.mark.parametrize("extra, message", [
    (["default"], "given besides it: MODEL"),
    (["--input", "x.jsonl", "--shard", "0/2"], "given besides it: --input, --shard"),
    (["--trust-remote-code"], "given besides it: --trust-remote-code"),
])
def test_options_of_the_job_besides_job_exit_2_naming_them(tmp_path, capsys, extra, message):
    (tmp_path / "job.json").write_text(json.dumps({"input": "in.jsonl", "output": "o.parquet"}))
    assert main(["score", "--job", str(tmp_path / "job.json"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "(write them into the job file instead)" in err


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the job file"),
    ("{not json", "not JSON"),
    ('{"input": "in.jsonl", "output": "o.parquet", "shards": 2}', "unknown key(s) in the scoring job: 'shards'"),
    ('{"input": "in.jsonl", "part_rows": "many"}', "part_rows in the scoring job must be an integer, found 'many'"),
])
def test_a_job_file_that_is_missing_or_no_job_exits_2_naming_the_file(tmp_path, capsys, content, message):
    job = tmp_path / "job.json"
    if content is not None:
        job.write_text(content)
    assert main(["score", "--job", str(job), "--result", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert str(job) in err and message in err
    assert not (tmp_path / "r.json").exists()


def test_without_job_model_input_and_output_are_still_required(capsys):
    assert main(["score", "--input", "x.jsonl", "--output", "o.parquet"]) == 2
    assert "Missing argument" in capsys.readouterr().err
    assert main(["score", "m", "--output", "o.parquet"]) == 2
    assert "Missing option '--input'" in capsys.readouterr().err
