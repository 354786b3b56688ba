"""`score --engine`: local by default, ray on request; wrong combinations are usage errors."""

from __future__ import annotations

from attnfallback.cli.app import main


def test_unknown_engine_and_address_without_ray_exit_2(capsys, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a"}\n')
    out = tmp_path / "out.parquet"
    assert main(["score", "default", "--input", str(data), "--output", str(out), "--engine", "bogus"]) == 2
    assert "unknown engine 'bogus'; valid: local, ray" in capsys.readouterr().err
    assert main(["score", "default", "--input", str(data), "--output", str(out), "--address", "ray://x:10001"]) == 2
    assert "--address needs --engine ray" in capsys.readouterr().err
    assert not out.exists()
