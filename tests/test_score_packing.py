"""Padding-free (packed) batches: the host arrays, pooling over a packed sequence, and the whole
pipeline against the padded path, on the CPU.

The CPU has no varlen flash kernel, so a reference one is registered with transformers'
AttentionInterface: attention row by row inside the packed sequence (`cu_seq_lens_q`), and the
library's own SDPA for padded batches. A second one ignores the row boundaries, as a model whose
code dropped them would: the check before packing must catch it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnfallback.errors import UsageError
from attnfallback.scoring import ScoreJob, Scorer, collate, run_score
from attnfallback.scoring.collate import pack_rows, pad_rows
from attnfallback.scoring.chunks import Chunk
from attnfallback.scoring.pipeline import build_table
from attnfallback.scoring.st_config import POOLING_MODES
from attnfallback.scoring.tasks import pool, pool_packed
from attnfallback.scoring.tokenize import Encoded
from conftest import build_tiny_model
from scoring_helpers import add_sentence_config, failing_above, read_output, seeded_texts, write_jsonl


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, keep_rows_apart=True, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # a padded batch: what sdpa does
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    causal = bool(getattr(module, "is_causal", False))
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist())) if keep_rows_apart else [(0, query.shape[2])]
    out = torch.empty_like(query)
    for a, b in bounds:
        out[:, :, a:b] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _varlen_reference(*args, **kwargs):
    return _attention(*args, keep_rows_apart=True, **kwargs)


def _varlen_ignoring_rows(*args, **kwargs):
    return _attention(*args, keep_rows_apart=False, **kwargs)


@pytest.fixture
def varlen(monkeypatch):
    """Two test implementations that take cu_seq_lens: one right, one that ignores the rows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register("varlen_reference", _varlen_reference)
    AttentionInterface.register("varlen_ignoring_rows", _varlen_ignoring_rows)
    for name in ("varlen_reference", "varlen_ignoring_rows"):
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    monkeypatch.setattr(collate, "PACKING_IMPLS", collate.PACKING_IMPLS + ("varlen_reference", "varlen_ignoring_rows"))
    return "varlen_reference"


@pytest.fixture(scope="module")
def st_bert(tmp_path_factory):
    return add_sentence_config(build_tiny_model(tmp_path_factory.mktemp("pack-bert"), "bert"), pooling="mean", normalize=True)


@pytest.fixture(scope="module")
def qwen_classifier(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("pack-qwen"), "qwen2-classify", num_labels=1)


def _encoded(rows: list[list[int]], types: bool = False) -> Encoded:
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    type_ids = [[i % 2] * len(r) for i, r in enumerate(rows)] if types else None
    return Encoded(rows, type_ids, lengths, np.zeros(len(rows), dtype=bool))


def test_pack_rows_concatenates_rows_with_their_own_positions():
    encoded = _encoded([[5, 6, 7], [8], [9, 10, 11, 12], [13, 14]], types=True)
    rows = np.array([2, 0, 3])
    packed = pack_rows(encoded, rows, with_types=True)
    assert packed["input_ids"].tolist() == [[9, 10, 11, 12, 5, 6, 7, 13, 14]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert packed["cu_seqlens"].tolist() == [0, 4, 7, 9] and packed["cu_seqlens"].dtype == np.int32
    assert packed["_segment"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert packed["_lengths"].tolist() == [4, 3, 2]
    assert packed["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 0, 1, 1]]  # rows 2, 0 have type 0; row 3 type 1


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_a_packed_sequence_gives_the_padded_result(mode):
    torch.manual_seed(1)
    lengths = [6, 2, 4, 1]
    width = 5
    hidden = torch.randn(len(lengths), max(lengths), width)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    want = pool(hidden, mask, mode)
    packed = pack_rows(_encoded([list(range(n)) for n in lengths]), np.arange(len(lengths)), with_types=False)
    batch = {k: torch.from_numpy(v) for k, v in packed.items()}
    flat = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    got = pool_packed(flat, batch, mode)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6)


def _score_both_ways(scorer: Scorer, texts: list[str]) -> dict:
    chunks = [Chunk(0, list(range(len(texts))), [(t,) for t in texts])]
    out = {}
    for packing in ("off", "auto"):
        scorer.packing = packing
        scorer.refresh_packing()
        results = list(scorer.score_chunks(iter(chunks)))
        out[packing] = (scorer.pack, results, build_table(scorer.output_schema, results[0].chunk.ids, results[0]))
    return out


def test_packed_embeddings_equal_the_padded_ones(st_bert, varlen):
    scorer = Scorer.from_job(ScoreJob(model=str(st_bert), batch_tokens=300, device="cpu"))
    assert scorer.describe()["packing"].startswith("off (")  # sdpa on the CPU: no varlen path
    scorer.loaded.model.set_attn_implementation(varlen)
    texts = seeded_texts(47, seed=5, max_words=40)
    runs = _score_both_ways(scorer, texts)
    (packed_off, padded, table_off), (packed_on, packed, table_on) = runs["off"], runs["auto"]
    assert not packed_off and packed_on and scorer.describe()["packing"] == "on"
    assert padded[0].batches == packed[0].batches > 1
    assert packed[0].padded_tokens == packed[0].tokens < padded[0].padded_tokens  # no padding computed
    assert table_on.column("id").to_pylist() == table_off.column("id").to_pylist() == list(range(47))
    a = np.array(table_on.column("embedding").to_pylist())
    b = np.array(table_off.column("embedding").to_pylist())
    assert np.abs(a - b).max() < 1e-5


def test_packed_decoder_classifier_scores_equal_the_padded_ones(qwen_classifier, varlen):
    scorer = Scorer.from_job(ScoreJob(model=str(qwen_classifier), task="classify", batch_tokens=400, device="cpu"))
    scorer.loaded.model.set_attn_implementation(varlen)
    texts = seeded_texts(33, seed=6, max_words=50)
    runs = _score_both_ways(scorer, texts)
    assert runs["auto"][0] and not runs["off"][0]
    a = np.array(runs["auto"][2].column("score").to_pylist())
    b = np.array(runs["off"][2].column("score").to_pylist())
    assert np.abs(a - b).max() < 1e-5 and np.std(b) > 0  # distinct scores, the same both ways


def test_a_kernel_that_ignores_row_boundaries_is_caught_before_packing(st_bert, qwen_classifier, varlen):
    for model, task in ((st_bert, "embed"), (qwen_classifier, "classify")):
        scorer = Scorer.from_job(ScoreJob(model=str(model), task=task, device="cpu"))
        scorer.loaded.model.set_attn_implementation("varlen_ignoring_rows")
        assert scorer.refresh_packing() is False
        assert "packed and padded outputs differ" in scorer.describe()["packing"]
        assert all(not b.tensors.get("_packed") for b in scorer.prepare(Chunk(0, [0, 1], [("a b c",), ("d",)])).batches)


def test_tasks_that_cannot_pack_say_why(tmp_path, varlen):
    bert_classifier = build_tiny_model(tmp_path / "bert-cls", "bert-classify", num_labels=2)
    scorer = Scorer.from_job(ScoreJob(model=str(bert_classifier), task="classify", device="cpu"))
    scorer.loaded.model.set_attn_implementation(varlen)
    assert scorer.refresh_packing() is False
    assert scorer.describe()["packing"] == "off (only decoder-only classifiers are packed)"
    lm = build_tiny_model(tmp_path / "lm", "qwen2")
    scorer = Scorer.from_job(ScoreJob(model=str(lm), task="logprob", device="cpu"))
    scorer.loaded.model.set_attn_implementation(varlen)
    assert scorer.refresh_packing() is False and "does not pack" in scorer.describe()["packing"]


def test_a_packed_batch_never_reaches_a_dense_implementation(st_bert, varlen):
    scorer = Scorer.from_job(ScoreJob(model=str(st_bert), device="cpu"))
    scorer.loaded.model.set_attn_implementation(varlen)
    assert scorer.refresh_packing()
    batch = scorer.prepare(Chunk(0, [0, 1], [("a b c",), ("d e",)])).batches[0]
    scorer.loaded.model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="cannot keep rows apart"):
        scorer.task.forward(scorer._on_device(batch))


def test_out_of_memory_on_a_packed_batch_splits_it_and_loses_no_row(st_bert, varlen, monkeypatch):
    scorer = Scorer.from_job(ScoreJob(model=str(st_bert), batch_tokens=2000, device="cpu"))
    scorer.loaded.model.set_attn_implementation(varlen)
    assert scorer.refresh_packing()
    texts = seeded_texts(40, seed=9, max_words=30)
    chunk = Chunk(0, list(range(40)), [(t,) for t in texts])
    clean = build_table(scorer.output_schema, chunk.ids, next(scorer.score_chunks(iter([chunk]))))
    seen = []
    monkeypatch.setattr(scorer.task, "forward", failing_above(scorer.task.forward, 6, seen, rows_key="_lengths"))
    result = next(scorer.score_chunks(iter([chunk])))
    assert result.oom_splits > 0 and max(seen) > 6
    table = build_table(scorer.output_schema, result.chunk.ids, result)
    assert table.column("id").to_pylist() == clean.column("id").to_pylist()
    diff = np.abs(np.array(table.column("embedding").to_pylist()) - np.array(clean.column("embedding").to_pylist()))
    assert diff.max() < 1e-5


def test_packing_flag_is_checked(st_bert, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a b"}])
    with pytest.raises(UsageError, match="--packing must be auto or off, found 'always'"):
        run_score(ScoreJob(model=str(st_bert), input=str(path), output=str(tmp_path / "o.parquet"), packing="always",
                           device="cpu", quiet=True))
    result = run_score(ScoreJob(model=str(st_bert), input=str(path), output=str(tmp_path / "o.parquet"), packing="off",
                                device="cpu", quiet=True))
    assert result.rows_written == 1 and len(read_output(tmp_path / "o.parquet")["embedding"]) == 1


def test_padded_inputs_unchanged_for_dense_implementations():
    encoded = _encoded([[5, 6, 7], [8]])
    padded = pad_rows(encoded, np.array([0, 1]), 3, pad_id=0, with_types=False)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
