"""The demo: 4 shards of STS-B with the embedded model, the events summary and the Spearman (82.03);
under strict policy on a machine without flash-attn, exit 3 with the reasons, in the events too."""

from __future__ import annotations

import functools
import importlib.util

import pytest

from attnfallback.cli.app import main
from attnfallback.errors import InputError
from attnfallback.sweep import demo


def flash_attn_can_run() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def test_the_packaged_stsb_copy_is_complete():
    first, second, gold = demo.read_stsb()
    assert len(first) == len(second) == len(gold) == 1379
    assert all(0.0 <= g <= 5.0 for g in gold)
    assert (demo.stsb_path().parent / "STSB-LICENSE").is_file()


def test_spearman_matches_scipy_with_ties():
    import numpy as np

    spearmanr = pytest.importorskip("scipy.stats").spearmanr

    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = np.round(x + rng.normal(size=300), 0)  # many ties, as in the gold scores
    assert demo.spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
    assert list(demo.rank_average([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]


def test_a_malformed_stsb_file_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b,1.0\nc,d\n")
    with pytest.raises(InputError) as info:
        demo.read_stsb(path)
    assert info.value.line == 2 and "3 fields" in str(info.value)


@pytest.mark.slow
def test_demo_prints_the_summary_and_the_spearman(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "82.03" in out
    assert "events summary by GPU class" in out
    # every shard says what it used, and the table has one row per shard
    for shard in ("0/4", "1/4", "2/4", "3/4"):
        assert f"\n{shard} " in out
    assert (tmp_path / "demo" / "sweep" / "main" / "scores.parquet").is_file()


def test_strict_demo_exits_3_with_the_reasons_and_events(tmp_path, monkeypatch, capsys):
    if flash_attn_can_run():
        pytest.skip("flash_attention_2 runs here: strict does not fail")
    from attnfallback.events import open_log

    # two shards instead of four: the same path through the command, half the processes
    monkeypatch.setattr(demo, "run_demo", functools.partial(demo.run_demo, shards=2))
    assert main(["demo", "--policy", "strict", "--out", str(tmp_path / "strict")]) == 3
    out = capsys.readouterr().out
    assert "strict failure" in out and "flash_attention_2" in out
    assert "refused to fall back" in out
    with open_log(tmp_path / "strict" / "events") as log:
        failures = log.fallbacks().to_pylist()
    assert sorted(f["shard"] for f in failures) == ["0/2", "1/2"]
    assert {f["outcome"] for f in failures} == {"unavailable"}
    assert all(f["reason"] for f in failures)
