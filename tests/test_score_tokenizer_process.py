"""Tokenizing in a child process: the same arrays as in the thread, errors carried back, and a
child that dies leaves the scorer tokenizing in its worker thread without losing a row."""

from __future__ import annotations

import numpy as np
import pytest

from attnfallback.scoring import ScoreJob, Scorer
from attnfallback.scoring.chunks import Chunk
from attnfallback.scoring.tokenize import TextEncoder
from attnfallback.scoring.tokenizer_process import ChildDied, ProcessEncoder, process_obstacle
from scoring_helpers import seeded_texts


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_bert))


def assert_same(got, want):
    g_ids, g_types, g_offsets = got.flat()
    w_ids, w_types, w_offsets = want.flat()
    assert len(got) == len(want)
    assert np.array_equal(got.lengths, want.lengths) and np.array_equal(got.truncated, want.truncated)
    assert np.array_equal(g_ids, w_ids) and np.array_equal(g_offsets, w_offsets)
    assert np.array_equal(g_types, w_types)


@pytest.mark.parametrize("mode", ["single", "pair"])
def test_the_child_encodes_as_the_thread_does_truncation_and_huge_rows_included(tokenizer, mode):
    encoder = TextEncoder(tokenizer, max_length=24, mode=mode)
    texts = seeded_texts(40, seed=3, max_words=30) + ["word " * 30_000]  # 150k characters: cut before tokenizing
    rows = [(t,) if mode == "single" else (t, t[::-1]) for t in texts]
    child = ProcessEncoder(encoder)
    try:
        got = child.encode(rows)
        assert_same(got, encoder.encode(rows))
        assert got.truncated.any() and not got.truncated.all()
        assert got.truncated[-1]
        assert_same(child.encode(rows[:3]), encoder.encode(rows[:3]))  # reused for the next call
    finally:
        child.close()
    assert not child.alive


def test_an_error_in_the_child_comes_back_and_the_child_goes_on(tokenizer):
    encoder = TextEncoder(tokenizer, max_length=16)
    child = ProcessEncoder(encoder)
    try:
        with pytest.raises(RuntimeError, match="tokenizing failed in the tokenizer process: TypeError"):
            child.encode([(12345,)])
        assert len(child.encode([("still here",)])) == 1
    finally:
        child.close()


def test_what_stays_in_the_thread_says_why(tokenizer):
    assert process_obstacle(TextEncoder(tokenizer, 16, "prompt_completion")) == "prompt_completion rows are tokenized in two calls"
    with pytest.raises(ValueError, match="two calls"):
        ProcessEncoder(TextEncoder(tokenizer, 16, "prompt_completion"))
    from types import SimpleNamespace

    slow = SimpleNamespace(is_fast=False)  # a Python tokenizer: nothing to hand to a child
    assert process_obstacle(TextEncoder(slow, 16)) == "the tokenizer is not a fast one"


def test_a_dead_child_leaves_the_scorer_tokenizing_in_its_thread_with_every_row_scored(tiny_bert):
    texts = seeded_texts(60, seed=5, max_words=20)
    chunks = [Chunk(i, list(range(i * 20, i * 20 + 20)), [(t,) for t in texts[i * 20:i * 20 + 20]]) for i in range(3)]
    thread = Scorer.from_job(ScoreJob(model=str(tiny_bert), device="cpu"))
    want = list(thread.score_chunks(iter(chunks)))
    scorer = Scorer.from_job(ScoreJob(model=str(tiny_bert), device="cpu"))
    assert scorer.describe()["tokenizer"] == "in the worker thread"  # the CPU: no child unless asked
    assert scorer.start_tokenizer_process() and scorer.describe()["tokenizer"] == "in a child process"
    assert len(scorer.prepare(chunks[0]).encoded) == 20  # the child is up and has the tokenizer
    scorer._child._process.kill()
    scorer._child._process.wait(5)
    got = list(scorer.score_chunks(iter(chunks)))
    assert scorer._child is None
    assert scorer.describe()["tokenizer"].startswith("in the worker thread (the tokenizer process ended")
    assert [r.chunk.ids for r in got] == [r.chunk.ids for r in want]
    for a, b in zip(got, want, strict=True):
        name = "embedding" if "embedding" in a.columns else next(iter(a.columns))
        assert np.allclose(np.array(a.columns[name].to_pylist()), np.array(b.columns[name].to_pylist()), atol=1e-6)


def test_killed_child_is_reported_as_dead(tokenizer):
    child = ProcessEncoder(TextEncoder(tokenizer, 16))
    assert len(child.encode([("ready",)])) == 1
    child._process.kill()
    child._process.wait(5)
    with pytest.raises(ChildDied, match="the tokenizer process ended"):
        child.encode([("anyone there",)])
    child.close()
