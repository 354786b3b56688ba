"""probe, plan and load on the command line: output, JSON, exit codes, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnfallback.cli.app import main


def run_json(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_probe_json(capsys):
    code, data, _ = run_json(capsys, ["probe", "--json"])
    assert code == 0
    assert data["device"]["kind"] == "cpu" and data["software"]["torch"]


def test_plan_for_a_pool(capsys):
    code, data, _ = run_json(capsys, ["plan", "default", "--gpus", "H100,A6000,T4", "--prefer", "flash_attention_2,sdpa,eager", "--assume-installed", "flash-attn", "--json"])
    assert code == 0
    got = {row["gpu"]["class"]: (row["chosen"], row["strict_ok"]) for row in data["plans"]}
    assert got == {"H100": ("flash_attention_2", True), "A6000": ("flash_attention_2", True), "T4": ("sdpa", False)}
    t4 = data["plans"][2]["candidates"][0]
    assert "compute capability 7.5 < 8.0 required by flash_attention_2" in t4["reasons"]


def test_plan_strict_preflight_exits_3_when_a_class_would_fail(capsys):
    assert main(["plan", "default", "--gpus", "H100,T4", "--prefer", "flash_attention_2,sdpa", "--assume-installed", "flash-attn", "--policy", "strict"]) == 3
    assert main(["plan", "default", "--gpus", "H100,A6000", "--prefer", "flash_attention_2,sdpa", "--assume-installed", "flash-attn", "--policy", "strict"]) == 0
    out = capsys.readouterr().out
    assert "H100" in out and "flash_attention_2" in out


def test_load_json_shows_the_fallback(capsys, tmp_path):
    code, data, _ = run_json(capsys, ["load", "default", "--prefer", "flash_attention_2,sdpa,eager", "--events", str(tmp_path), "--run-id", "cli", "--json"])
    assert code == 0
    assert data["requested"] == "flash_attention_2" and data["used"] == "sdpa" and data["fell_back"]
    assert Path(data["events"]).is_file() and Path(data["events"]).is_relative_to(tmp_path)


def test_load_strict_exits_3_with_reasons_on_stderr(capsys, tmp_path):
    code = main(["load", "default", "--prefer", "flash_attention_2,sdpa", "--policy", "strict", "--events", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 3
    assert "package flash_attn is not installed" in err and out == ""
    events = [json.loads(line) for p in tmp_path.rglob("*.jsonl") for line in p.read_text().splitlines()]
    assert [e["event"] for e in events] == ["attn_unavailable"]


def test_strict_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("ATTNFALLBACK_POLICY", "strict")
    monkeypatch.setenv("ATTNFALLBACK_PREFER", "flash_attention_2,sdpa")
    assert main(["load", "default"]) == 3


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["load", "/no/such/model"], "/no/such/model"),
        (["load", "default", "--prefer", "flash_attention_9"], "valid: flash_attention_4"),
        (["load", "default", "--dtype", "float8"], "valid: auto, bfloat16"),
        (["load", "default", "--shard", "8/8"], "malformed shard"),
        (["load", "default", "--shard", "x"], "expected I/N"),
        (["load", "default", "--policy", "lenient"], "valid: graceful, strict"),
        (["plan", "default", "--gpus", "H100,X100"], "unknown GPU class 'X100'; valid: H100"),
        (["plan", "default", "--assume-installed", "flash-attn-9"], "unknown package"),
        (["load"], "Missing argument"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_directory_without_config(capsys, tmp_path):
    assert main(["load", str(tmp_path)]) == 2
    assert f"{tmp_path} has no config.json" in capsys.readouterr().err


def test_broken_config_json(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["load", str(tmp_path)]) == 2
    assert "config.json: not valid JSON" in capsys.readouterr().err


def _fake_hub_cache(cache: Path, repo: str, revision: str, files: Path) -> None:
    """The layout huggingface_hub keeps for a downloaded snapshot."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / revision
    shutil.copytree(files, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)


def test_hub_id_and_revision_load_through_the_hub_code_path(tmp_path, tiny_bert):
    revision = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hub", "acme/tiny-bert", revision, tiny_bert)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "attnfallback.cli.app", "load", "acme/tiny-bert", "--revision", revision, "--prefer", "sdpa", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["model"]["id"] == "acme/tiny-bert" and data["model"]["revision"] == revision
    assert data["model"]["identity"] == f"rev:{revision}"
    missing = subprocess.run(cmd[:4] + ["acme/other"] + cmd[5:], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "acme/other" in missing.stderr


def test_log_lines_reach_the_current_stderr(capsys, monkeypatch):
    monkeypatch.setenv("ATTNFALLBACK_LOG", "INFO")  # on this CPU the flash fallback is logged at info
    for _ in range(2):  # the second call must not write to the first call's stream
        assert main(["load", "default", "--prefer", "flash_attention_2,sdpa"]) == 0
        assert "INFO attnfallback: attention: requested flash_attention_2, using sdpa" in capsys.readouterr().err
    monkeypatch.setenv("ATTNFALLBACK_LOG", "WARNING")
    assert main(["load", "default", "--prefer", "flash_attention_2,sdpa"]) == 0
    assert "requested flash_attention_2" not in capsys.readouterr().err  # the default level: no line for it
