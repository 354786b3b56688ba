"""Tokenization: texts (or pairs, or prompt and completion) to unpadded token ids with the model's
tokenizer, truncated at max_length, each row marked where it lost tokens (`TextEncoder`, `Encoded`)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnfallback.errors import UsageError

HUGE_CHARS_PER_TOKEN = 100  # texts longer than max_length x this (chars) are cut before tokenizing


@dataclass
class Encoded:
    """Tokenized rows of one chunk (unpadded)."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    lengths: np.ndarray  # int64
    truncated: np.ndarray  # bool
    score_start: np.ndarray | None = None  # logprob: first position whose next token is scored
    _flat: tuple[np.ndarray, np.ndarray | None, np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def from_flat(cls, ids: np.ndarray, type_ids: np.ndarray | None, lengths: np.ndarray, truncated: np.ndarray) -> Encoded:
        """Rows given as all ids concatenated (what a tokenizer process sends back)."""
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        return cls([], None, lengths, truncated, _flat=(ids, type_ids, offsets))

    def flat(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """All ids concatenated (and type ids), with each row's offset: for vectorised padding."""
        if self._flat is None:
            total = int(self.lengths.sum())
            ids = np.fromiter(itertools.chain.from_iterable(self.ids), dtype=np.int64, count=total)
            types = None
            if self.type_ids is not None:
                types = np.fromiter(itertools.chain.from_iterable(self.type_ids), dtype=np.int64, count=total)
            offsets = np.zeros(len(self.lengths), dtype=np.int64)
            if len(self.lengths) > 1:
                np.cumsum(self.lengths[:-1], out=offsets[1:])
            self._flat = (ids, types, offsets)
        return self._flat


class TextEncoder:
    """Tokenizes texts (or pairs) with the model's fast tokenizer, truncating at `max_length`
    and recording which rows were truncated. Thread-safe: its settings never change after init."""

    def __init__(self, tokenizer, max_length: int, mode: str = "single", type_ids: bool = True):
        self.max_length = int(max_length)
        self.mode = mode  # single | pair | prompt_completion
        self.tokenizer = tokenizer
        self.type_ids = bool(type_ids)  # False: the model is given no type ids (see collate.takes_token_types)
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self.fast = backend is not None
        self.type_ids_needed = self.type_ids  # see below: False where the template gives type 0 throughout
        if self.fast:
            from tokenizers import Tokenizer

            def configured(direction: str, max_length: int):
                copy = Tokenizer.from_str(backend.to_str())
                copy.no_padding()
                copy.enable_truncation(max_length, strategy="longest_first", direction=direction)
                return copy

            self._main = configured("right", self.max_length)
            self._batch = fast_batch(self._main)
            # single texts whose template gives every token type 0 (BERT's, RoBERTa's): the type
            # ids are not read back from the tokenizer, a list per row less (None means zeros)
            self.type_ids_needed = self.type_ids and not (mode == "single" and single_type_ids_are_zero(self._main.to_str()))
            if mode == "prompt_completion":
                # the completion is kept; the prompt gives way, from its left
                self._prompt = configured("left", self.max_length)
                self._completion = configured("right", max(self.max_length - 1, 1))

    def encode(self, texts: list[tuple[str, ...]]) -> Encoded:
        texts, cut = cut_huge(texts, self.max_length, self.mode)
        if self.mode == "prompt_completion":
            encoded = self._encode_prompt_completion(texts)
        elif self.fast:
            encoded = encode_fast(self._batch, texts, self.mode, self.max_length, self.type_ids_needed)
        else:
            ids, type_ids, truncated = self._encode_slow(texts)
            lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
            encoded = Encoded(ids, type_ids, lengths, truncated)
        if cut:
            encoded.truncated[cut] = True
        return encoded

    def _encode_slow(self, texts):
        pair = self.mode == "pair"
        first = [t[0] for t in texts]
        second = [t[1] for t in texts] if pair else None
        out = self.tokenizer(first, second, truncation="longest_first", max_length=self.max_length, padding=False)
        ids = out["input_ids"]
        type_ids = (out.get("token_type_ids") or [[0] * len(i) for i in ids]) if self.type_ids else None
        truncated = np.zeros(len(ids), dtype=bool)
        full_candidates = [i for i, row in enumerate(ids) if len(row) >= self.max_length]
        if full_candidates:
            sub_first = [first[i] for i in full_candidates]
            sub_second = [second[i] for i in full_candidates] if pair else None
            full = self.tokenizer(sub_first, sub_second, truncation=False, padding=False)["input_ids"]
            for i, row in zip(full_candidates, full):
                truncated[i] = len(row) > self.max_length
        return ids, type_ids, truncated

    def _encode_prompt_completion(self, texts) -> Encoded:
        if not self.fast:
            raise UsageError("logprob with prompt,completion columns needs a fast tokenizer")
        completions = self._completion.encode_batch([t[1] for t in texts], add_special_tokens=False)
        ids, starts, truncated = [], [], []
        prompts = self._prompt.encode_batch([t[0] for t in texts], add_special_tokens=True)
        for p, c in zip(prompts, completions):
            room = self.max_length - len(c.ids)
            p_ids = p.ids[-room:] if room > 0 else []
            cut = bool(p.overflowing) or bool(c.overflowing) or len(p_ids) < len(p.ids)
            if not p_ids:  # the first completion token needs at least one token of context
                p_ids = p.ids[-1:]
                c_ids = c.ids[: self.max_length - 1]
                cut = True
            else:
                c_ids = c.ids
            ids.append(p_ids + c_ids)
            starts.append(len(p_ids) - 1)
            truncated.append(cut)
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        return Encoded(ids, None, lengths, np.array(truncated, dtype=bool), np.array(starts, dtype=np.int64))



def fast_batch(tokenizer):
    """The tokenizer's batch encoding: encode_batch_fast (tokenizers >= 0.21) skips the character
    offsets, which nothing here reads."""
    return getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)


def single_type_ids_are_zero(tokenizer_json: str) -> bool:
    """Whether a fast tokenizer (its JSON) gives every token of a single text type id 0: no
    post-processor, or one (or a sequence of them) whose single-text template uses type 0 only."""
    try:
        processor = json.loads(tokenizer_json).get("post_processor")
    except (ValueError, AttributeError):
        return False

    def zero(p) -> bool:
        if p is None:
            return True
        kind = p.get("type")
        if kind in ("BertProcessing", "RobertaProcessing", "ByteLevel"):
            return True
        if kind == "TemplateProcessing":
            pieces = [next(iter(piece.values()), {}) for piece in p.get("single", [])]
            return all(isinstance(x, dict) and x.get("type_id", 0) == 0 for x in pieces)
        if kind == "Sequence":
            return all(zero(q) for q in p.get("processors", []))
        return False

    return zero(processor)


def encode_fast(batch, texts: list[tuple[str, ...]], mode: str, max_length: int, with_type_ids: bool = True) -> Encoded:
    """Single texts or pairs through a configured fast tokenizer's batch encoding (see TextEncoder);
    without `with_type_ids` the type ids are left None (all zero).

    Pairs with a long part are not encoded jointly (see _encode_pairs): the result is the same,
    but the joint encoding's truncation costs time and memory quadratic in the parts' lengths."""
    lost = None  # per row, where known without the overflow: whether the row lost tokens
    if mode == "single":
        encodings = batch([t[0] for t in texts], add_special_tokens=True)
    else:
        encodings, lost = _encode_pairs(batch, texts, max_length)
    ids = [e.ids for e in encodings]
    type_ids = [e.type_ids for e in encodings] if with_type_ids else None
    if lost is None:
        flags = (len(i) >= max_length and bool(e.overflowing) for i, e in zip(ids, encodings))
    else:
        flags = (len(i) >= max_length and (bool(e.overflowing) if cut is None else cut) for i, e, cut in zip(ids, encodings, lost))
    truncated = np.fromiter(flags, dtype=bool, count=len(encodings))
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    return Encoded(ids, type_ids, lengths, truncated)


# Pairs of at most this many characters per max_length token (both parts together) keep the joint
# encoding, whose overflow is then bounded per row (a few combinations for prose, some tens where
# each character is a token); longer pairs are encoded part by part (_encode_apart), which costs
# each row a post_process call but no more.
_JOINT_PAIR_CHARS_PER_TOKEN = 8
_APART_GROUP_ROWS = 256  # pairs tokenized apart per call: bounds the untruncated parts held at once
_APART_COPIES: Any = None  # tokenizer -> its copy without truncation (weak keys), made on first use


def _encode_pairs(batch, texts: list[tuple[str, ...]], max_length: int) -> tuple[list, list | None]:
    """The encodings `batch` gives the pairs (joint, truncated), at a cost linear in their lengths,
    and per row whether it lost tokens: None where the encoding's overflow says (None: every row).

    The joint encoding truncates each part (longest_first), then joins every overflowing piece of
    one part with every piece of the other: two 6000-word parts take 27 s and 11 GB. Pairs with a
    long part are encoded part by part instead and joined by the tokenizer's own post_process,
    each part first cut to one token more than it keeps (_encode_apart)."""
    limit = max_length * _JOINT_PAIR_CHARS_PER_TOKEN
    apart = [len(t[0]) + len(t[1]) > limit for t in texts]
    plan = _apart_plan(batch) if any(apart) else None
    if plan is None:
        return batch([(t[0], t[1]) for t in texts], add_special_tokens=True), None
    if all(apart):
        return _encode_apart(plan, texts)
    joint = iter(batch([(t[0], t[1]) for t, a in zip(texts, apart) if not a], add_special_tokens=True))
    split, split_lost = _encode_apart(plan, [t for t, a in zip(texts, apart) if a])
    split, split_lost = iter(split), iter(split_lost)
    encodings = [next(split) if a else next(joint) for a in apart]
    lost = [next(split_lost) if a else None for a in apart]
    return encodings, lost


def _apart_plan(batch):
    """(parts' batch encoding, joining post_process, budget) for the tokenizer behind `batch`, or None
    where _encode_apart does not reproduce its joint encoding or need not (the joint one is used).

    The copy that encodes the parts is made once per tokenizer: its other settings (model,
    normalizer, post-processor...) are taken as fixed, as TextEncoder leaves them."""
    global _APART_COPIES
    import weakref

    from tokenizers import Tokenizer

    tokenizer = getattr(batch, "__self__", None)
    if not isinstance(tokenizer, Tokenizer) or tokenizer.padding is not None:
        return None
    trunc = tokenizer.truncation
    if trunc is None or (trunc["strategy"], trunc["stride"], trunc["direction"]) != ("longest_first", 0, "right"):
        return None
    # the parts' budget: what longest_first shares out once the special tokens are counted. Below 1
    # the joint encoding stays linear: at 0 each part goes whole into the overflow, below 0 nothing
    # is truncated (the subtraction wraps, in tokenizers).
    budget = trunc["max_length"] - tokenizer.num_special_tokens_to_add(True)
    if budget < 1:
        return None
    if _APART_COPIES is None:
        _APART_COPIES = weakref.WeakKeyDictionary()
    parts = _APART_COPIES.get(tokenizer)
    if parts is None:
        parts = Tokenizer.from_str(tokenizer.to_str())
        parts.no_truncation()
        parts.no_padding()
        _APART_COPIES[tokenizer] = parts
    # the parts go through the same batch method as the joint encoding: encode_batch_fast gives a
    # pair's second part type id 0 where the post-processor keeps the parts' own (none, ByteLevel),
    # encode_batch gives 1
    return getattr(parts, batch.__name__), tokenizer.post_process, budget


def _longest_first(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """How many tokens tokenizers' LongestFirst truncation keeps of parts of n1 and n2 tokens, given
    `budget` tokens for both (n1 + n2 > budget): its truncate_encodings (utils/truncation.rs), step
    by step. The shorter part (the first on a tie) keeps s if 2s <= budget, the longer the rest; else
    the shorter keeps budget // 2, the longer the rest."""
    swap = n1 > n2
    short, long_ = (n2, n1) if swap else (n1, n2)
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short = budget // 2
        long_ = short + budget % 2
    return (long_, short) if swap else (short, long_)


def _encode_apart(plan, texts: list[tuple[str, ...]]) -> tuple[list, list]:
    """Pairs encoded part by part, then joined by post_process (truncation + special tokens): the
    joint encoding's result, and per row whether it lost tokens, at a cost linear in the lengths.

    The joint encoding keeps the first k1 and k2 tokens of parts of n1 and n2 tokens
    (_longest_first), and overflows iff n1 + n2 > budget. Here each part is first cut to at most
    k + 1 tokens, and post_process's longest_first, on those lengths, keeps k1 and k2 again:
    - the shorter part (s tokens) has 2s <= budget: it keeps s and is not cut; the longer, cut to
      budget - s + 1 > s, is still the longer and gets budget - s;
    - else each gets half: the shorter part is cut to budget // 2 + 1, the longer to
      budget - budget // 2 + 1 (or not cut, if no longer than that), so 2s > budget still, and the
      longer stays the longer, or equal where the order makes no difference (an even budget) or was
      a tie (n1 = n2 = budget // 2 + 1, not cut at all).
    post_process then truncates each cut part again, which replaces the pieces the first cut split
    off with its one-token rest: a few overflow combinations per row, where the joint encoding
    builds every piece of one part with every piece of the other."""
    parts, post, budget = plan
    out, lost = [], []
    for start in range(0, len(texts), _APART_GROUP_ROWS):
        group = texts[start:start + _APART_GROUP_ROWS]
        # the second part encoded as the second of a pair with an empty first: its type ids are then
        # those of the joint encoding (which a post-processor without a template keeps)
        encodings = parts([t[0] for t in group] + [("", t[1]) for t in group], add_special_tokens=False)
        for first, second in zip(encodings[:len(group)], encodings[len(group):]):
            n1, n2 = len(first), len(second)
            cut = n1 + n2 > budget
            if cut:
                k1, k2 = _longest_first(n1, n2, budget)
                if n1 > k1 + 1:
                    _cut_part(first, n1, k1 + 1)
                if n2 > k2 + 1:
                    _cut_part(second, n2, k2 + 1)
            out.append(post(first, second, add_special_tokens=True))
            lost.append(cut)
    return out, lost


def _cut_part(encoding, n: int, keep: int) -> None:
    """Truncate `encoding` (n tokens) to `keep`. keep == 1 is a part that keeps no token, which
    post_process's truncation to 0 moves whole into the overflow, its own overflow too: a cut to 2
    first leaves that one token, not n - 1 pieces."""
    if keep == 1 and n > 2:
        encoding.truncate(2)
    encoding.truncate(keep)


def cut_huge(texts: list[tuple[str, ...]], max_length: int, mode: str) -> tuple[list[tuple[str, ...]], list[int]]:
    """Texts far longer than any `max_length` tokens can span are cut (by characters) before
    tokenizing: a 10 MB row would otherwise be tokenized whole, then truncated. The limit,
    100 characters per token allowed, leaves real text's first max_length tokens unchanged."""
    limit = max(max_length * HUGE_CHARS_PER_TOKEN, 100_000)
    cut = [i for i, t in enumerate(texts) if any(len(part) > limit for part in t)]
    if not cut:
        return texts, cut
    texts = list(texts)
    for i in cut:
        texts[i] = tuple(part[:limit] if mode != "prompt_completion" or j == 1 else part[-limit:]
                         for j, part in enumerate(texts[i]))
    return texts, cut
