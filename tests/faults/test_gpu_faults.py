"""On a CUDA GPU (marked `gpu`, skipped elsewhere): a real out-of-memory error in the middle of a
shard, from a capped CUDA allocator rather than an injected exception."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .registry import fault
from .tools import make_texts, read_events, write_jsonl

pytestmark = pytest.mark.gpu

CAP_GIB = 1.5


def _embeddings(path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1)
    return table.column("id").to_pylist(), values


@pytest.fixture
def capped_cuda_memory():
    """The CUDA caching allocator limited to CAP_GIB for this process, restored afterwards."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(CAP_GIB * 2**30 / total, 1.0))
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


@fault("Real CUDA out-of-memory in the middle of a shard (GPU)",
       how=f"CUDA allocator capped at {CAP_GIB} GiB with set_per_process_memory_fraction; eager attention, float32, "
           "--batch-tokens 131072; the 1st part 64 short texts, the 2nd 256 texts of ~500 tokens (~2 GiB of "
           "attention scores per batch)",
       expected="the long batch is split in halves until it fits (oom_split events), exit 0, every row once, "
                "values equal to an uncapped run within 1e-4")
def test_real_cuda_oom_mid_shard(tmp_path, cli, request, observe):
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

    free = cli(*argv(tmp_path / "free.parquet", tmp_path / "free-events"))
    assert free.code == 0, free
    free_ids, free_values = _embeddings(tmp_path / "free.parquet")
    assert [e for e in read_events(tmp_path / "free-events") if e["event"] == "oom_split"] == []

    request.getfixturevalue("capped_cuda_memory")
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
            f"{splits[0]['halves']}); exit 0, 320/320 rows, max |diff| vs uncapped {diff:.1e}; used {data['decision']['used']}")
