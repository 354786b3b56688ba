"""The real check: STS-B test pairs embedded with `default` through `score --task embed`.

Spearman x100 of the pairs' cosine against the gold score is the published 82.03 of
all-MiniLM-L6-v2, and every embedding equals sentence-transformers' own `encode` (cosine >=
0.99999 in float32), whichever attention implementation the fallback chose.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from attnfallback.scoring import ScoreJob, run_score
from scoring_helpers import read_output, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]


def stsb_test_csv() -> Path | None:
    """The packaged copy, else ../shared/data/stsb beside the repository."""
    packaged = resources.files("attnfallback") / "data" / "stsb-en-test.csv"
    if packaged.is_file():
        return Path(str(packaged))
    shared = REPO_ROOT.parent / "shared" / "data" / "stsb" / "stsb-en-test.csv"
    return shared if shared.is_file() else None


@pytest.fixture(scope="module")
def stsb():
    path = stsb_test_csv()
    if path is None:
        pytest.skip("STS-B test split not found: neither attnfallback/data/stsb-en-test.csv nor ../shared/data/stsb/stsb-en-test.csv")
    with open(path, encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    assert len(rows) == 1379 and all(len(r) == 3 for r in rows), "expected 1,379 rows of sentence1,sentence2,score"
    return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])


@pytest.mark.slow
def test_stsb_spearman_is_the_published_82_03_and_embeddings_equal_sentence_transformers(stsb, tmp_path):
    import torch
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from attnfallback.model_facts import default_model_path

    first, second, gold = stsb
    n = len(gold)
    # both sentences of every pair, one file: rows 0..n-1 the first sentences, n..2n-1 the second
    path = write_jsonl(tmp_path / "stsb.jsonl", [{"text": t} for t in first + second])
    result = run_score(ScoreJob(model="default", input=str(path), output=str(tmp_path / "emb.parquet"), device="cpu",
                                dtype="float32", quiet=True))
    out = read_output(tmp_path / "emb.parquet")
    assert out["id"] == list(range(2 * n)) and result.rows_written == 2 * n
    emb = np.array(out["embedding"], dtype=np.float32)
    cosine = (emb[:n] * emb[n:]).sum(1) / (np.linalg.norm(emb[:n], axis=1) * np.linalg.norm(emb[n:], axis=1))
    spearman = spearmanr(cosine, gold).statistic * 100
    assert round(spearman, 2) == 82.03, f"Spearman x100 = {spearman:.4f} with {result.decision['used']}"

    st = SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True, model_kwargs={"dtype": torch.float32})
    reference = st.encode(first + second, batch_size=32, convert_to_numpy=True).astype(np.float32)
    agreement = (emb * reference).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
    assert agreement.min() >= 0.99999, f"lowest cosine to sentence-transformers: {agreement.min()} ({result.decision['used']})"
