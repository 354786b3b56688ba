"""Pairs truncated longest_first without the joint encoding's quadratic overflow.

The reference throughout is what encode_fast did before: the configured tokenizer's batch encoding
of the pairs, joint, with `truncated` = `len(ids) >= max_length and bool(overflowing)`.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from attnfallback.scoring import tokenize
from attnfallback.scoring.tokenize import TextEncoder, encode_fast, fast_batch

from scoring_helpers import WORDS, seeded_texts

# words of several tokens, a word the vocabulary splits into characters, special tokens as text
EXTRA = ["supercalifragilistic", "ünïcödé", "日本語", "[SEP]", "[CLS]", "x", ",", "..."]


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    if not tok.is_fast:
        pytest.skip("needs the fast tokenizer")
    return tok


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS + EXTRA) for _ in range(words))


def _pairs(seed: int, top: int, n: int = 150) -> list[tuple[str, str]]:
    """Random pairs with sides of 0 to `top` words (many short, some empty), and near ties: equal
    sides and sides one word apart, which longest_first tells apart."""
    rng = random.Random(seed)

    def words() -> int:
        r = rng.random()
        return rng.randint(0, 1) if r < 0.15 else rng.randint(0, min(40, top)) if r < 0.6 else rng.randint(0, top)

    pairs = [(_text(rng, words()), _text(rng, words())) for _ in range(n)]
    for w in range(0, min(top, 60), 3):
        side = _text(rng, w)
        pairs += [(side, side), (side, side + " a"), (side + " a", side), ("", side), (side, "")]
    return pairs + [("", "")]


def _reference(batch, pairs, max_length: int):
    encodings = batch(pairs, add_special_tokens=True)
    ids = [e.ids for e in encodings]
    types = [e.type_ids for e in encodings]
    truncated = [len(e.ids) >= max_length and bool(e.overflowing) for e in encodings]
    return ids, types, truncated


def _assert_same(encoded, reference) -> None:
    ids, types, truncated = reference
    assert encoded.ids == ids
    if encoded.type_ids is None:  # not read back: the template gives type 0 throughout
        assert all(t == [0] * len(t) for t in types)
    else:
        assert encoded.type_ids == types
    assert encoded.lengths.tolist() == [len(i) for i in ids]
    assert encoded.lengths.dtype == np.int64
    assert encoded.truncated.tolist() == truncated


# 4 and 5: one and two tokens for the parts (BERT adds three); sides up to 6 words per token of
# max_length (the joint reference itself is quadratic: it bounds what the test can afford)
@pytest.mark.parametrize("max_length", [4, 5, 8, 9, 16, 17, 24, 25, 64, 127])
@pytest.mark.parametrize("route", ["routed", "all_apart"])
def test_pairs_match_the_joint_encoding(tokenizer, monkeypatch, max_length, route):
    if route == "all_apart":  # every non-empty pair through the part-by-part path
        monkeypatch.setattr(tokenize, "_JOINT_PAIR_CHARS_PER_TOKEN", 0)
    pairs = _pairs(seed=max_length, top=min(300, 6 * max_length))
    encoder = TextEncoder(tokenizer, max_length, "pair")
    reference = _reference(encoder._batch, pairs, max_length)
    assert any(reference[2]) and not all(reference[2])
    _assert_same(encoder.encode(pairs), reference)


def test_long_and_short_pairs_mixed_keep_their_order(tokenizer):
    rng = random.Random(7)
    pairs = _pairs(seed=3, top=40, n=60)
    for i in range(0, len(pairs), 9):  # long pairs among the short ones, which stay joint
        pairs.insert(i, (_text(rng, rng.randint(150, 400)), _text(rng, rng.randint(0, 400))))
    max_length = 24
    limit = max_length * tokenize._JOINT_PAIR_CHARS_PER_TOKEN
    apart = [len(a) + len(b) > limit for a, b in pairs]
    assert any(apart) and not all(apart)
    encoder = TextEncoder(tokenizer, max_length, "pair")
    _assert_same(encoder.encode(pairs), _reference(encoder._batch, pairs, max_length))


@pytest.mark.parametrize("processor", ["none", "bytelevel", "roberta", "template_types"])
@pytest.mark.parametrize("method", ["encode_batch_fast", "encode_batch"])
def test_other_post_processors(tokenizer, monkeypatch, processor, method):
    """Type ids come from the template, or, without one, from the parts themselves: the second part
    has those the joint batch method gives it (encode_batch_fast 0, encode_batch 1)."""
    from tokenizers import Tokenizer, processors

    monkeypatch.setattr(tokenize, "_JOINT_PAIR_CHARS_PER_TOKEN", 0)
    for max_length in (2, 9, 24):
        tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        tok.post_processor = {
            "none": None,
            "bytelevel": processors.ByteLevel(trim_offsets=True),
            "roberta": processors.RobertaProcessing(("[SEP]", 102), ("[CLS]", 101)),
            "template_types": processors.TemplateProcessing(
                single="$A", pair="[CLS]:2 $A:3 [SEP]:4 [SEP] $B:5 [SEP]:6", special_tokens=[("[CLS]", 101), ("[SEP]", 102)]),
        }[processor]
        tok.no_padding()
        tok.enable_truncation(max_length, strategy="longest_first", direction="right")
        batch = getattr(tok, method)
        pairs = _pairs(seed=max_length, top=6 * max_length, n=60)
        _assert_same(encode_fast(batch, pairs, "pair", max_length), _reference(batch, pairs, max_length))


def test_tiny_budgets_and_other_batches_stay_joint(tokenizer):
    pairs = _pairs(seed=1, top=12, n=30)
    for max_length in (1, 2, 3):  # BERT's three special tokens leave the parts no budget
        encoder = TextEncoder(tokenizer, max_length, "pair")
        assert tokenize._apart_plan(encoder._batch) is None
        _assert_same(encoder.encode(pairs), _reference(encoder._batch, pairs, max_length))
    encoder = TextEncoder(tokenizer, 8, "pair")

    def batch(inputs, add_special_tokens):  # not a tokenizer's own method: the joint encoding
        return encoder._batch(inputs, add_special_tokens=add_special_tokens)

    long_pairs = pairs + [(_text(random.Random(2), 60), _text(random.Random(3), 60))]
    assert tokenize._apart_plan(batch) is None
    _assert_same(encode_fast(batch, long_pairs, "pair", 8), _reference(encoder._batch, long_pairs, 8))


@pytest.mark.parametrize("max_length", [24, 512])
def test_two_huge_parts_take_linear_time(tokenizer, max_length):
    a = " ".join(["word"] * 30_000)
    b = a[::-1]
    encoder = TextEncoder(tokenizer, max_length, "pair")
    started = time.perf_counter()
    encoded = encoder.encode([(a, b), ("a short question", a), ("dog", "cat")])
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"{elapsed:.1f} s"  # the joint encoding takes minutes and tens of GB
    assert encoded.lengths.tolist()[:2] == [max_length, max_length]
    assert encoded.truncated.tolist() == [True, True, False]
    sep = tokenizer.sep_token_id
    budget = max_length - 3
    # both parts cut to half the budget each, the first (not the longer) the lesser half
    assert encoded.ids[0].index(sep) == 1 + budget // 2
    assert encoded.type_ids[0] == [0] * (2 + budget // 2) + [1] * (budget - budget // 2 + 1)
    # the short question whole, the rest of the budget to the long part
    question = tokenizer("a short question")["input_ids"]
    assert encoded.ids[1][:len(question)] == question
    assert encoded.type_ids[1] == [0] * len(question) + [1] * (max_length - len(question))


def test_a_tokenizer_process_copy_takes_the_same_path(tokenizer):
    """The tokenizer process encodes with a copy of the configured tokenizer (Tokenizer.from_str)."""
    from tokenizers import Tokenizer

    encoder = TextEncoder(tokenizer, 24, "pair")
    batch = fast_batch(Tokenizer.from_str(encoder._main.to_str()))
    assert tokenize._apart_plan(batch) is not None
    rng = random.Random(11)
    pairs = [(_text(rng, 200), _text(rng, 250)), ("dog", "cat")]
    _assert_same(encode_fast(batch, pairs, "pair", 24), _reference(encoder._batch, pairs, 24))


@pytest.mark.parametrize("max_length", [8, 24, 512])
def test_single_texts_unchanged(tokenizer, max_length):
    texts = [(t,) for t in seeded_texts(300, seed=5, min_words=0, max_words=200)]
    encoder = TextEncoder(tokenizer, max_length, "single")
    encodings = encoder._batch([t[0] for t in texts], add_special_tokens=True)
    reference = ([e.ids for e in encodings], [e.type_ids for e in encodings],
                 [len(e.ids) >= max_length and bool(e.overflowing) for e in encodings])
    _assert_same(encoder.encode(texts), reference)


def test_longest_first_split_follows_tokenizers():
    """_longest_first against tokenizers' own truncation, for every pair of lengths up to 12."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for budget in range(1, 9):
        tok.enable_truncation(budget, strategy="longest_first", direction="right")
        for n1 in range(13):
            for n2 in range(13):
                if n1 + n2 <= budget:
                    continue
                e = tok.encode(" ".join("a" * n1), " ".join("b" * n2))
                kept = (e.ids.count(0), e.ids.count(1))
                assert tokenize._longest_first(n1, n2, budget) == kept, (n1, n2, budget)


def test_truncation_settings_are_read_on_every_call(tokenizer, monkeypatch):
    """The copy that encodes the parts is kept per tokenizer; the budget is not."""
    from tokenizers import Tokenizer

    monkeypatch.setattr(tokenize, "_JOINT_PAIR_CHARS_PER_TOKEN", 0)
    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.no_padding()
    for max_length in (9, 24, 9):
        tok.enable_truncation(max_length, strategy="longest_first", direction="right")
        batch = fast_batch(tok)
        assert tokenize._apart_plan(batch)[2] == max_length - 3
        pairs = _pairs(seed=max_length, top=6 * max_length, n=40)
        _assert_same(encode_fast(batch, pairs, "pair", max_length), _reference(batch, pairs, max_length))
    tok.enable_truncation(24, strategy="only_second", direction="right")
    assert tokenize._apart_plan(fast_batch(tok)) is None
