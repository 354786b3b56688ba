"""`attnfallback score` on the command line: exit codes, messages, --json."""

from __future__ import annotations

import json

import pytest

from attnfallback.cli.app import main
from conftest import build_tiny_model
from scoring_helpers import add_sentence_config, write_jsonl


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
