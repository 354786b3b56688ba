"""A local model's identity: cheap by default (headers, sizes, sampled blocks), every byte on request
(stored by file stat, so a machine hashes a model once), and it tells different weights apart."""

from __future__ import annotations

import shutil

import pytest

from attnfallback import model_facts
from attnfallback.model_facts import weights_identity


@pytest.fixture
def two_models(tmp_path):
    """Two checkpoints of one architecture with different random weights, and a copy of the first."""
    from conftest import build_tiny_model

    a = build_tiny_model(tmp_path / "a", "bert")
    b = build_tiny_model(tmp_path / "b", "bert", initializer_range=0.5)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    return a, b, copy


def test_fast_identity_tells_weights_apart_and_follows_the_bytes_not_the_path(two_models):
    a, b, copy = two_models
    ida = weights_identity(a, "fast")
    assert ida.startswith("sampled-sha256:")
    assert ida == weights_identity(copy, "fast")
    assert ida != weights_identity(b, "fast")


def test_fast_identity_reads_a_bounded_amount_whatever_the_file_size(tmp_path, monkeypatch):
    big = tmp_path / "big"
    big.mkdir()
    (big / "model.safetensors").write_bytes(b"\0" * (8 << 20))  # 8 MiB, no real header: read as plain data
    read = []
    real = model_facts._read_at
    monkeypatch.setattr(model_facts, "_read_at", lambda fh, off, size: read.append(size) or real(fh, off, size))
    weights_identity(big, "fast")
    assert sum(read) <= model_facts.SAMPLED_BLOCKS * model_facts.SAMPLED_BLOCK_BYTES + 16  # and the header's length, twice
    assert sum(read) < (8 << 20) // 4


def test_fast_identity_changes_when_sampled_data_changes(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    data = bytearray(b"\1" * (1 << 20))
    (d / "model.bin").write_bytes(bytes(data))
    before = weights_identity(d, "fast")
    data[0] = 2  # the first block is always sampled
    (d / "model.bin").write_bytes(bytes(data))
    assert weights_identity(d, "fast") != before


def test_full_identity_is_stored_by_stat_and_read_back(two_models, tmp_path, monkeypatch):
    a, _, copy = two_models
    monkeypatch.setenv("ATTNFALLBACK_CACHE", str(tmp_path / "cache"))
    model_facts._identity.cache_clear()
    first = weights_identity(a, "full")
    assert first.startswith("sha256:") and first == weights_identity(copy, "full")
    assert len(list((tmp_path / "cache" / "identity").glob("*.json"))) == 2  # one per directory
    model_facts._identity.cache_clear()
    monkeypatch.setattr(model_facts, "full_digest", lambda *a: pytest.fail("hashed again despite an unchanged stat"))
    assert weights_identity(a, "full") == first


def test_identity_mode_from_the_environment(two_models, monkeypatch):
    a, _, _ = two_models
    monkeypatch.setenv("ATTNFALLBACK_IDENTITY", "full")
    assert weights_identity(a).startswith("sha256:")
    monkeypatch.setenv("ATTNFALLBACK_IDENTITY", "fast")
    assert weights_identity(a).startswith("sampled-sha256:")
