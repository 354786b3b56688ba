"""Parity: sdpa against eager on the embedded model over STS-B sentences, the calibrated tolerance,
an implementation forced to produce wrong outputs (exit 4), the metrics, and the input reader."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from attnfallback import parity
from attnfallback.events import NULL_SINK
from attnfallback.cli.app import main
from attnfallback.errors import InputError, UsageError
from attnfallback.events import validate

STSB_ROWS = 100  # 200 sentences: enough for rankings to mean something, quick on two cores


@pytest.fixture(scope="module")
def stsb_csv() -> Path:
    shipped = resources.files("attnfallback.data") / "stsb-en-test.csv"
    if shipped.is_file():
        return Path(str(shipped))
    beside = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stsb" / "stsb-en-test.csv"
    if beside.is_file():
        return beside
    pytest.skip("STS-B test split not found (neither attnfallback/data/stsb-en-test.csv nor ../shared/data/stsb)")


def read_events(directory: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.rglob("*.jsonl")) for line in path.read_text().splitlines()]


def test_sdpa_matches_eager_on_stsb_within_the_calibrated_tolerance(stsb_csv, tmp_path, capsys):
    code = main(["parity", "default", "--input", str(stsb_csv), "--rows", str(STSB_ROWS), "--impls", "sdpa,flash_attention_2",
                 "--events", str(tmp_path), "--run-id", "p1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["passed"] is True
    assert data["rows"] == STSB_ROWS and data["texts"] == 2 * STSB_ROWS and data["dtype"] == "float32"
    # fp32: the reference is its own fp32 run, so the documented floor is the tolerance
    assert data["calibration"]["rel_l2_vs_fp32"] == 0.0
    assert data["tolerance"] == parity.TOLERANCE_FLOOR["float32"] == data["calibration"]["floor"]
    sdpa = data["results"]["sdpa"]
    assert sdpa["within_tolerance"] and 0 < sdpa["rel_l2"] <= data["tolerance"]
    assert sdpa["min_cosine"] > 0.99999 and sdpa["spearman"] > 0.999 and sdpa["kendall"] > 0.99 and sdpa["top_k_agreement"] == 1.0
    # STS-B gold scores ride along: both implementations rank pairs as well as each other
    assert data["reference_label_spearman"] > 0.7
    assert abs(sdpa["label_spearman"] - data["reference_label_spearman"]) < 1e-3
    assert "package flash_attn is not installed" in data["unavailable"]["flash_attention_2"]
    (event,) = read_events(tmp_path)
    assert validate(event) == [] and event["event"] == "parity" and event["run_id"] == "p1"
    assert event["passed"] is True and event["results"]["sdpa"]["rel_l2"] == sdpa["rel_l2"]


def test_calibration_in_bfloat16_is_twice_the_reference_error_against_fp32(stsb_csv):
    rows = parity.read_texts(stsb_csv, rows=12)
    report = parity.run_parity("default", rows, impls=["sdpa"], dtype="bfloat16")
    cal = report.calibration
    assert report.dtype == "bfloat16" and report.tolerance_source == "calibrated"
    assert cal.error > parity.TOLERANCE_FLOOR["float32"]  # bf16 eager really differs from fp32 eager
    assert report.tolerance == pytest.approx(max(2 * cal.error, parity.TOLERANCE_FLOOR["bfloat16"]))
    assert report.results["sdpa"].metrics["rel_l2"] > 0 and report.passed


def test_default_tolerance_doubles_the_calibration_error_above_the_floor():
    assert parity.default_tolerance(0.0, "float32") == parity.TOLERANCE_FLOOR["float32"]
    assert parity.default_tolerance(0.01, "bfloat16") == pytest.approx(0.02)
    assert parity.default_tolerance(1e-4, "bfloat16") == parity.TOLERANCE_FLOOR["bfloat16"]
    assert parity.default_tolerance(float("nan"), "float16") == parity.TOLERANCE_FLOOR["float16"]
    rng = np.random.default_rng(0)
    fp32 = rng.normal(size=(50, 8)).astype(np.float32)
    noisy = fp32 + 0.05 * rng.normal(size=fp32.shape).astype(np.float32)
    cal = parity.calibrate(noisy, fp32, "eager", "bfloat16")
    expected = np.linalg.norm(noisy - fp32) / np.linalg.norm(fp32)
    assert cal.error == pytest.approx(expected, rel=1e-5) and cal.tolerance == pytest.approx(2 * expected, rel=1e-5)
    assert parity.calibrate(fp32, None, "eager", "float32").tolerance == parity.TOLERANCE_FLOOR["float32"]


def test_an_implementation_producing_wrong_outputs_fails_with_exit_4(stsb_csv, tmp_path, monkeypatch, capsys):
    from transformers.modeling_utils import AttentionInterface

    real = AttentionInterface._global_mapping["sdpa"]

    def wrong_sdpa(*args, **kwargs):
        out, weights = real(*args, **kwargs)
        return out.flip(-1), weights  # finite, plausible in scale, and wrong

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", wrong_sdpa)
    code = main(["parity", "default", "--input", str(stsb_csv), "--rows", "16", "--impls", "sdpa", "--events", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert code == 4
    assert data["passed"] is False and data["failures"] == ["sdpa"]
    assert data["results"]["sdpa"]["rel_l2"] > 100 * data["tolerance"]
    assert "over tolerance" in captured.err and "sdpa" in captured.err
    (event,) = read_events(tmp_path)
    assert event["event"] == "parity" and event["passed"] is False and event["failures"] == ["sdpa"]


def test_an_unknown_task_or_reference_is_a_usage_error(stsb_csv):
    rows = parity.read_texts(stsb_csv, rows=2)
    with pytest.raises(UsageError):
        parity.run_parity("default", rows, task="translate")
    with pytest.raises(UsageError):
        parity.run_parity("default", rows, reference="flash_attention_2", impls=["sdpa"])  # cannot run on a CPU
    assert main(["parity", "default", "--input", str(stsb_csv), "--tolerance", "-1", "--rows", "2"]) == 2


# --- metrics -------------------------------------------------------------------------------------


def test_rank_correlations_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a = rng.normal(size=300)
    b = a + rng.normal(scale=0.5, size=300)
    b[::7] = b[0]  # ties
    assert parity.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert parity.kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
    np.testing.assert_allclose(parity.average_ranks(b), stats.rankdata(b))


def test_kendall_without_scipy_matches(monkeypatch):
    import builtins

    rng = np.random.default_rng(2)
    a = rng.integers(0, 20, size=200).astype(float)
    b = a + rng.integers(0, 5, size=200)
    with_scipy = parity.kendall(a, b)
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("no scipy here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert parity.kendall(a, b) == pytest.approx(with_scipy, abs=1e-12)


def test_compare_metrics_on_embeddings_and_scores():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(40, 16)).astype(np.float32)
    same = parity.compare(ref.copy(), ref, "embed", paired=True)
    assert same["rel_l2"] == 0 and same["max_abs"] == 0 and same["spearman"] == pytest.approx(1.0)
    assert same["min_cosine"] == pytest.approx(1.0) and same["top_k_agreement"] == 1.0
    flipped = ref.copy()
    flipped[5] = -flipped[5]
    worse = parity.compare(flipped, ref, "embed", paired=False)
    assert worse["min_cosine"] == pytest.approx(-1.0) and worse["max_abs"] == pytest.approx(float(np.abs(2 * ref[5]).max()))
    logits = rng.normal(size=(30, 1)).astype(np.float32)
    reversed_scores = parity.compare(-logits, logits, "classify", top_k=5)
    assert reversed_scores["spearman"] == pytest.approx(-1.0) and reversed_scores["top_k_agreement"] == 0.0
    assert "min_cosine" not in reversed_scores


def test_top_k_agreement_counts_the_shared_top_rows():
    ref = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    out = np.array([5.0, 1.0, 3.0, 4.0, 2.0])  # top-2: {0,1} against {0,3}
    assert parity.top_k_agreement(out, ref, 2) == 0.5
    assert parity.top_k_agreement(out, ref, 5) == 1.0


# --- inputs and pooling ----------------------------------------------------------------------------


def test_stsb_csv_is_read_as_sentence_pairs_with_gold_scores(stsb_csv):
    rows = parity.read_texts(stsb_csv, rows=5)
    assert rows.names == ["sentence1", "sentence2"] and rows.rows == 5 and len(rows.texts()) == 10
    assert rows.labels.shape == (5,) and rows.labels[0] == 2.5
    assert rows.texts()[:2] == [rows.columns[0][0], rows.columns[1][0]]
    one = parity.read_texts(stsb_csv, ["sentence2"], rows=3)
    assert one.names == ["sentence2"] and len(one.texts()) == 3


def test_jsonl_input_skips_empty_texts_and_counts_them(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a cat"}\n{"text": ""}\n{"text": "a dog"}\n')
    rows = parity.read_texts(path)
    assert rows.texts() == ["a cat", "a dog"] and rows.skipped == 1
    with pytest.raises(InputError) as info:
        parity.read_texts(path, ["body"])
    assert info.value.exit_code == 2 and "body" in str(info.value)


def test_embed_outputs_come_from_the_scorer_and_match_sentence_transformers(default_model_dir):
    st = pytest.importorskip("sentence_transformers")
    from attnfallback.loader import load_model
    from attnfallback.policy import Policy

    texts = ["A man is playing a guitar.", "Two dogs run on the beach in the morning sun.", "Hi"]
    loaded = load_model("default", policy=Policy.graceful(["sdpa"]), sink=NULL_SINK)
    ours = parity.outputs_for(loaded, [(t,) for t in texts], parity.score_job_for("default", "embed", 1))
    theirs = st.SentenceTransformer(str(default_model_dir), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("task, kind", [("classify", "bert-classify"), ("logprob", "qwen2")])
def test_score_tasks_compare_sdpa_with_eager(task, kind, tmp_path):
    from conftest import build_tiny_model

    model_dir = build_tiny_model(tmp_path / kind, kind, **({"num_labels": 3} if kind == "bert-classify" else {}))
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i} " + "word " * (i % 7)}) + "\n" for i in range(24)))
    report = parity.run_parity(str(model_dir), parity.read_texts(path), task=task, impls=["sdpa"])
    metrics = report.results["sdpa"].metrics
    assert report.passed and report.texts == 24 and "min_cosine" not in metrics
    assert metrics["rel_l2"] <= report.tolerance and metrics["spearman"] > 0.99


@pytest.mark.gpu
def test_flash_and_sdpa_against_eager_in_bfloat16_on_the_gpu(stsb_csv):
    from attnfallback.caps import probe_software

    report = parity.run_parity("default", parity.read_texts(stsb_csv, rows=200), impls=["flash_attention_4", "sdpa"],
                               dtype="bfloat16", device="cuda")
    assert report.calibration.error > 0 and report.tolerance == pytest.approx(max(2 * report.calibration.error, parity.TOLERANCE_FLOOR["bfloat16"]))
    assert report.passed and "sdpa" in report.results
    if probe_software().flash_attn_4:
        assert report.results["flash_attention_4"].metrics["spearman"] > 0.999
    else:
        assert any("flash-attn-4" in r for r in report.unavailable["flash_attention_4"])
