"""On a CUDA GPU (marked `gpu`, skipped elsewhere): a real out-of-memory error in the middle of a
shard, from a capped CUDA allocator rather than an injected exception."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .registry import fault
from .tools import make_texts, read_events, write_jsonl

pytestmark = pytest.mark.gpu

def _embeddings(path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1)
    return table.column("id").to_pylist(), values


@pytest.fixture
def cap_cuda_memory():
    """`cap(bytes)` limits the CUDA caching allocator of this process; undone afterwards."""
    import torch

    def cap(limit: int) -> None:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(limit / total, 1.0))

    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


@fault("Real CUDA out-of-memory in the middle of a shard (GPU)",
       how="CUDA allocator capped (set_per_process_memory_fraction) at half the peak of an uncapped run; eager "
           "attention, float32, --batch-tokens 131072; the 1st part 64 short texts, the following ones 256 texts "
           "of 512 tokens",
       expected="the long batch is split in halves until it fits (oom_split events), exit 0, every row once, "
                "values equal to an uncapped run within 1e-4")
def test_real_cuda_oom_mid_shard(tmp_path, cli, cap_cuda_memory, observe):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "model", "bert", hidden_size=256, num_attention_heads=4, intermediate_size=512,
                             max_position_embeddings=512)
    short = make_texts(64, seed=7, max_words=8)
    long = [" ".join(make_texts(120, seed=200 + i, max_words=8)) for i in range(256)]  # ~540 words: cut at 512 tokens
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in short + long])

    def argv(out, events):
        return ["score", model, "--input", source, "--output", out, "--device", "cuda", "--dtype", "float32",
                "--prefer", "eager", "--batch-tokens", 131072, "--max-length", 512, "--part-rows", 64,
                "--events", events, "--quiet", "--json"]

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    free = cli(*argv(tmp_path / "free.parquet", tmp_path / "free-events"))
    assert free.code == 0, free
    peak = torch.cuda.max_memory_allocated() - base
    free_ids, free_values = _embeddings(tmp_path / "free.parquet")
    assert [e for e in read_events(tmp_path / "free-events") if e["event"] == "oom_split"] == []

    cap = base + peak // 2  # the largest batch no longer fits; its halves may
    cap_cuda_memory(cap)
    capped = cli(*argv(tmp_path / "capped.parquet", tmp_path / "events"))
    assert capped.code == 0, capped
    data = json.loads(capped.out)
    ids, values = _embeddings(tmp_path / "capped.parquet")
    splits = [e for e in read_events(tmp_path / "events") if e["event"] == "oom_split"]
    assert splits and data["oom_splits"] == len(splits)
    assert ids == free_ids == list(range(320))
    diff = float(np.abs(values - free_values).max())
    assert diff <= 1e-4
    observe(f"{len(splits)} real CUDA OOMs -> oom_split (first: {splits[0]['rows']} rows x {splits[0]['length']} tokens -> "
            f"{splits[0]['halves']}); cap {cap / 2**30:.2f} GiB (uncapped peak {peak / 2**30:.2f} GiB); exit 0, 320/320 rows, "
            f"max |diff| vs uncapped {diff:.1e}; used {data['decision']['used']}")
