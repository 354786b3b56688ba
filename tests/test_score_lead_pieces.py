"""The run's first part in pieces by character count (CUDA's default; set here on the CPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from attnfallback.errors import NonFiniteError
from attnfallback.scoring import ScoreJob, Scorer
from attnfallback.scoring.chunks import Chunk
from attnfallback.scoring.pipeline import LEAD_FRACTIONS, lead_pieces

FOUR = (1 / 8, 1 / 4, 1 / 2)  # four pieces: 1/8, 1/4, 1/2 of the characters, then the rest
from scoring_helpers import seeded_texts


def chars(texts, rows):
    return np.array([sum(map(len, texts[i])) for i in rows])


@pytest.mark.parametrize("seed", range(8))
def test_pieces_hold_every_row_once_longest_first_cut_at_the_shares(seed):
    rng = random.Random(seed)
    texts = [(t,) for t in seeded_texts(rng.randint(64, 600), seed=seed, max_words=rng.choice([5, 40, 200]))]
    pieces = lead_pieces(texts, FOUR, min_rows=8)
    assert sorted(np.concatenate(pieces).tolist()) == list(range(len(texts)))
    assert all(len(p) >= 8 for p in pieces)
    for a, b in zip(pieces, pieces[1:]):
        assert chars(texts, a).min() >= chars(texts, b).max()  # every row of a piece as long as any later one
    total = chars(texts, range(len(texts))).sum()
    done = 0
    for piece, share in zip(pieces, np.cumsum(FOUR)):
        done += chars(texts, piece).sum()
        # a piece ends at the first row whose running count reaches its share (or later, merged)
        assert done >= share * total
        assert done - chars(texts, piece[-1:]).sum() < share * total or len(piece) == 8


def test_small_or_empty_chunks_stay_whole_and_ties_keep_input_order():
    assert lead_pieces([], LEAD_FRACTIONS) == []
    assert len(lead_pieces([("x",)] * 63, FOUR, min_rows=32)) == 1  # no piece could keep 32 rows
    first, rest = lead_pieces([(t,) for t in seeded_texts(300, seed=1)], LEAD_FRACTIONS)  # the default: 1/8, the rest
    assert len(first) >= 32 and len(rest) > len(first)
    same = lead_pieces([("same length",)] * 100, (0.5,), min_rows=10)
    assert [p.tolist() for p in same] == [list(range(50)), list(range(50, 100))]


def test_pairs_are_measured_by_both_texts():
    rows = [("a" * 50, "b")] * 40 + [("c", "d" * 100)] * 40
    first, rest = lead_pieces(rows, (0.66,), min_rows=10)  # 40 x 101 of 6,080 characters: 0.664
    assert set(first.tolist()) == set(range(40, 80))  # 101 characters a row against 51


@pytest.fixture(scope="module")
def scorers(tiny_bert):
    whole = Scorer.from_job(ScoreJob(model=str(tiny_bert), device="cpu"))
    pieces = Scorer.from_job(ScoreJob(model=str(tiny_bert), device="cpu"))
    assert whole.lead_fractions == () and pieces.lead_fractions == ()  # the CPU: whole parts by default
    pieces.lead_fractions = FOUR
    return whole, pieces


def chunks_of(texts, sizes):
    chunks, start = [], 0
    for i, size in enumerate(sizes):
        chunks.append(Chunk(i, list(range(start, start + size)), [(t,) for t in texts[start:start + size]]))
        start += size
    return chunks


def test_the_first_part_in_pieces_scores_as_the_whole_part(scorers, monkeypatch):
    whole, pieces = scorers
    texts = seeded_texts(700, seed=3, max_words=60)
    chunks = chunks_of(texts, [400, 300])
    prepared = []
    real_prepare = Scorer.prepare

    def spy(self, chunk, rows=None, last=True):
        prepared.append((chunk.index, None if rows is None else len(rows), last))
        return real_prepare(self, chunk, rows, last)

    want = list(whole.score_chunks(iter(chunks)))
    monkeypatch.setattr(Scorer, "prepare", spy)
    got = list(pieces.score_chunks(iter(chunks)))
    # the first part in 3 or 4 pieces (the last alone completes it), the second whole
    first = [p for p in prepared if p[0] == 0]
    assert len(first) >= 3 and sum(p[1] for p in first) == 400
    assert [p[2] for p in first] == [False] * (len(first) - 1) + [True]
    assert [p for p in prepared if p[0] == 1] == [(1, None, True)]
    assert [r.chunk.index for r in got] == [0, 1]
    for a, b in zip(got, want, strict=True):
        assert a.tokens == b.tokens and a.batches >= 1
        np.testing.assert_allclose(np.array(a.columns["embedding"].to_pylist()),
                                   np.array(b.columns["embedding"].to_pylist()), atol=1e-5)
    assert got[0].batches >= len(first)


def test_pieces_pad_about_as_little_as_the_whole_part(scorers):
    whole, pieces = scorers
    for seed in range(4):
        chunk = chunks_of(seeded_texts(1000, seed=seed, max_words=rng_words(seed)), [1000])[0]
        padded_whole = sum(b.cells for b in whole.prepare(chunk).batches)
        padded_pieces = sum(b.cells for p in pieces.prepare_pieces(chunk) for b in p.batches)
        assert padded_pieces <= 1.05 * padded_whole


def rng_words(seed: int) -> int:
    return (20, 60, 150, 300)[seed % 4]


def test_a_non_finite_row_in_a_piece_is_named_by_its_own_id(nan_bert):
    scorer = Scorer.from_job(ScoreJob(model=str(nan_bert), device="cpu"))
    scorer.lead_fractions = FOUR
    texts = seeded_texts(300, seed=9, max_words=30)
    texts = [t.replace("piano", "guitar") for t in texts]
    texts[17] = "a woman plays piano " + "slowly " * 40  # among the longest: in the first piece
    texts[250] = "piano"  # the shortest: in the last
    chunk = Chunk(0, [f"row-{i}" for i in range(300)], [(t,) for t in texts])
    assert len(list(scorer.prepare_pieces(chunk))) >= 3
    with pytest.raises(NonFiniteError) as e:
        list(scorer.score_chunks(iter([chunk])))
    assert e.value.ids == ["row-17", "row-250"]
