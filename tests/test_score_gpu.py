"""The scorer on a CUDA GPU (marked gpu; skipped without one): pinned, non-blocking copies give
the same embeddings as sentence-transformers on the CPU, bf16 stays close, and a real
out-of-memory splits the batch without losing a row."""

from __future__ import annotations

import numpy as np
import pytest

from attnfallback.scoring import ScoreJob, Scorer, run_score
from scoring_helpers import read_events, read_output, seeded_texts, write_jsonl

pytestmark = pytest.mark.gpu


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def texts():
    return seeded_texts(300, seed=21, max_words=120)


@pytest.fixture(scope="module")
def st_reference(texts, default_model_dir):
    from sentence_transformers import SentenceTransformer

    import torch

    # float32 explicitly: a copy of the model stored in bf16 would otherwise load in bf16
    st = SentenceTransformer(str(default_model_dir), device="cpu", local_files_only=True, model_kwargs={"dtype": torch.float32})
    return st.encode(texts, batch_size=32, convert_to_numpy=True)


@pytest.mark.parametrize("dtype, floor", [("float32", 0.99999), ("bfloat16", 0.99)])
def test_embeddings_on_cuda_equal_sentence_transformers(tmp_path, texts, st_reference, dtype, floor):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    result = run_score(ScoreJob(model="default", input=str(path), output=str(tmp_path / "o.parquet"), device="cuda",
                                dtype=dtype, part_rows=128, quiet=True))
    assert result.decision["gpu"]["class"] not in (None, "cpu") and result.rows_written == len(texts)
    got = np.array(read_output(tmp_path / "o.parquet")["embedding"], dtype=np.float32)
    import os

    import torch

    lowest = cosine_rows(got, st_reference).min()
    tf32 = {"matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32, "precision": torch.get_float32_matmul_precision(),
            **{k: v for k, v in os.environ.items() if "TF32" in k}}
    assert lowest >= floor, f"lowest cosine {lowest:.7f} with {result.decision['used']}, {result.decision['model']['dtype']}; {tf32}"


def test_a_real_out_of_memory_splits_the_batch(tmp_path, texts):
    import torch

    events = tmp_path / "events"
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    clean = run_score(ScoreJob(model="default", input=str(path), output=str(tmp_path / "clean.parquet"), device="cuda",
                               dtype="float32", prefer="eager", batch_tokens=1 << 20, quiet=True))
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # leave the scorer about 1 GiB beyond what is allocated now: the eager attention scores of one
    # batch of all rows (300 rows x 12 heads x L x L floats, several copies) do not fit in it
    fraction = min((torch.cuda.memory_allocated() + (1 << 30)) / total, 1.0)
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        result = run_score(ScoreJob(model="default", input=str(path), output=str(tmp_path / "o.parquet"), device="cuda",
                                    dtype="float32", prefer="eager", batch_tokens=1 << 22, max_length=512, events=str(events),
                                    quiet=True))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert result.rows_written == clean.rows_written == len(texts)
    if result.oom_splits == 0:
        pytest.skip("the batch fitted in the memory left; no out-of-memory to split")
    splits = [e for e in read_events(events) if e["event"] == "oom_split"]
    assert len(splits) == result.oom_splits
    a = np.array(read_output(tmp_path / "o.parquet")["embedding"])
    b = np.array(read_output(tmp_path / "clean.parquet")["embedding"])
    assert cosine_rows(a, b).min() >= 0.99999


def test_scorer_table_on_cuda_keeps_order(texts):
    import pyarrow as pa

    scorer = Scorer.from_job(ScoreJob(model="default", device="cuda", dtype="float32"))
    assert scorer.device.type == "cuda"
    out = scorer.score_table(pa.table({"id": list(range(50, 0, -1)), "text": texts[:50]}))
    assert out.column("id").to_pylist() == list(range(50, 0, -1))


@pytest.mark.parametrize("kind, task", [("bert", "embed"), ("qwen2-classify", "classify")])
def test_packed_batches_on_a_flash_kernel_equal_padded_sdpa(tmp_path, kind, task):
    from attnfallback.scoring.chunks import Chunk
    from attnfallback.scoring.collate import PACKING_IMPLS
    from conftest import build_tiny_model

    # head_dim 64, which every flash kernel takes
    overrides = dict(hidden_size=128, num_attention_heads=2, intermediate_size=256)
    if kind.startswith("qwen2"):
        overrides.update(num_key_value_heads=1, num_labels=1)
    model_dir = build_tiny_model(tmp_path / kind, kind, **overrides)
    texts = seeded_texts(200, seed=4, max_words=90)
    chunk = Chunk(0, list(range(len(texts))), [(t,) for t in texts])
    flash = Scorer.from_job(ScoreJob(model=str(model_dir), task=task, device="cuda", dtype="bfloat16",
                                     prefer="flash_attention_4,flash_attention_3,flash_attention_2,sdpa", batch_tokens=4096))
    if flash.decision.used not in PACKING_IMPLS:
        pytest.skip(f"no flash implementation here ({flash.decision.used})")
    assert flash.pack and flash.describe()["packing"] == "on"
    packed = next(flash.score_chunks(iter([chunk])))
    assert packed.padded_tokens == packed.tokens and packed.batches > 1
    dense = Scorer.from_job(ScoreJob(model=str(model_dir), task=task, device="cuda", dtype="bfloat16", prefer="sdpa",
                                     batch_tokens=4096))
    assert not dense.pack
    padded = next(dense.score_chunks(iter([chunk])))
    assert padded.padded_tokens > padded.tokens
    name = "embedding" if task == "embed" else "score"
    a = np.array(packed.columns[name].to_pylist(), dtype=np.float32)
    b = np.array(padded.columns[name].to_pylist(), dtype=np.float32)
    if task == "embed":
        assert cosine_rows(a, b).min() >= 0.99
    else:
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max() and np.std(b) > 0



def test_on_cuda_tokenizing_runs_in_a_child_process_with_the_same_results(texts):
    from attnfallback.scoring.chunks import Chunk

    chunks = [Chunk(i, list(range(i * 100, i * 100 + 100)), [(t,) for t in texts[i * 100:i * 100 + 100]]) for i in range(3)]
    child = Scorer.from_job(ScoreJob(model="default", device="cuda", dtype="float32"))
    assert child.describe()["tokenizer"] == "in a child process"
    got = list(child.score_chunks(iter(chunks)))
    assert child._child is not None and child._child.alive
    thread = Scorer.from_job(ScoreJob(model="default", device="cuda", dtype="float32", tokenizer_process="off"))
    assert thread.describe()["tokenizer"] == "in the worker thread (turned off)"
    want = list(thread.score_chunks(iter(chunks)))
    for a, b in zip(got, want, strict=True):
        assert a.chunk.ids == b.chunk.ids and a.tokens == b.tokens
        assert np.allclose(np.array(a.columns["embedding"].to_pylist()), np.array(b.columns["embedding"].to_pylist()), atol=1e-6)
