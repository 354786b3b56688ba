"""The four scoring tasks: what each loads, how it tokenizes, what it computes, what it writes.

    embed     AutoModel + the model's sentence-transformers pooling (modules.json, 1_Pooling,
              Normalize) -> `embedding` (list<float32>)
    classify  AutoModelForSequenceClassification logits -> `score` (one label) or `scores` + `label`
    pairs     the same over two text columns (cross-encoder) -> `score` (or `scores` + `label`)
    logprob   AutoModelForCausalLM log-likelihood of the text, or of the completion given the
              prompt (`--text-columns prompt,completion`) -> `logprob_sum`, `logprob_mean`, `tokens`

Every output is computed in float32 on the device, whatever the model's dtype.
"""

from __future__ import annotations

import inspect
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnfallback.errors import UnknownNameError, UsageError
from attnfallback.model_facts import text_config
from attnfallback.scoring.limits import model_limits
from attnfallback.task_names import TASKS

AUTO_CLASSES = {
    "embed": "AutoModel",
    "classify": "AutoModelForSequenceClassification",
    "pairs": "AutoModelForSequenceClassification",
    "logprob": "AutoModelForCausalLM",
}
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
HUGE_CHARS_PER_TOKEN = 100  # texts longer than max_length x this (chars) are cut before tokenizing
LOGITS_CHUNK_TOKENS = 4096  # logprob: positions per lm-head chunk (bounds the B x L x vocab logits)
_UNSUPPORTED_LOGIT_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# Implementations whose transformers path honours cu_seq_lens_q/k (varlen): a batch may be packed
# into one padding-free sequence. Anything else would attend across the packed rows.
PACKING_IMPLS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


PACKING_MODES = ("auto", "off")


def check_packing_mode(mode: str) -> str:
    """`mode` if it is a packing mode, else a UsageError naming the modes."""
    if mode not in PACKING_MODES:
        raise UsageError(f"--packing must be {' or '.join(PACKING_MODES)}, found {mode!r}")
    return mode


def supports_varlen(impl: str | None) -> bool:
    """True when `impl` keeps the rows of a packed batch apart (cu_seq_lens)."""
    return impl in PACKING_IMPLS


def parse_task(name: str) -> str:
    text = str(name).strip().lower()
    if text not in TASKS:
        raise UnknownNameError("task", str(name), TASKS)
    return text


# --- sentence-transformers configuration -------------------------------------------------------

@dataclass(frozen=True)
class SentenceConfig:
    """What the model's sentence-transformers files say: pooling, normalisation, max length."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    include_prompt: bool = True
    source: str = "default (no modules.json: mean pooling, no normalisation)"


def read_sentence_config(model_dir: str | Path) -> SentenceConfig:
    """Pooling and normalisation from modules.json / 1_Pooling/config.json / sentence_bert_config.json.

    A module other than Transformer, Pooling and Normalize (Dense, say) is refused by name rather
    than silently dropped.
    """
    root = Path(model_dir)
    modules_path = root / "modules.json"
    if not modules_path.is_file():
        return SentenceConfig()
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise UsageError(f"{modules_path}: expected a JSON list of modules")
    pooling: tuple[str, ...] = ("mean",)
    include_prompt = True
    normalize = False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pooling, include_prompt = _read_pooling(root / str(module.get("path", "")) / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise UsageError(f"{modules_path}: sentence-transformers module {module.get('type')!r} is not supported by "
                             "`score --task embed` (supported: Transformer, Pooling, Normalize)")
    max_len = None
    lower = False
    st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        data = _read_json(st_config)
        if isinstance(data, dict):
            max_len = data.get("max_seq_length")
            lower = bool(data.get("do_lower_case", False))
    return SentenceConfig(pooling, normalize, int(max_len) if max_len else None, lower, include_prompt, str(modules_path))


def _read_pooling(path: Path) -> tuple[tuple[str, ...], bool]:
    if not path.is_file():
        return ("mean",), True
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    mode = data.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if data.get(key))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    for m in modes:
        if m not in POOLING_MODES:
            raise UnknownNameError("pooling mode", m, POOLING_MODES)
    return modes or ("mean",), bool(data.get("include_prompt", True))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None


# --- tokenization ------------------------------------------------------------------------------

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
        self.type_ids = bool(type_ids)  # False: the model is given no type ids (see takes_token_types)
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


# --- padded batches ----------------------------------------------------------------------------


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


def pad_rows(encoded: Encoded, rows: np.ndarray, length: int, pad_id: int, with_types: bool) -> dict[str, np.ndarray]:
    """Right-padded int64 arrays for `rows` of `encoded`: input_ids, attention_mask (and token_type_ids)."""
    flat_ids, flat_types, offsets = encoded.flat()
    lens = encoded.lengths[rows]
    positions = np.arange(length, dtype=np.int64)
    mask = positions[None, :] < lens[:, None]
    index = offsets[rows][:, None] + positions[None, :]
    np.minimum(index, max(len(flat_ids) - 1, 0), out=index)
    out = {
        "input_ids": np.where(mask, flat_ids[index] if len(flat_ids) else 0, pad_id).astype(np.int64, copy=False),
        "attention_mask": mask.astype(np.int64),
    }
    if with_types:
        if flat_types is None:
            out["token_type_ids"] = np.zeros((len(rows), length), dtype=np.int64)
        else:
            out["token_type_ids"] = np.where(mask, flat_types[index] if len(flat_types) else 0, 0).astype(np.int64, copy=False)
    return out


def pack_rows(encoded: Encoded, rows: np.ndarray, with_types: bool) -> dict[str, np.ndarray]:
    """`rows` of `encoded` concatenated into one padding-free sequence of shape (1, T).

    position_ids restart at 0 for every row; `cu_seqlens` (int32, n + 1) are the rows' boundaries
    the varlen kernels take; `_segment` (T,) is each token's row, `_lengths` (n,) each row's
    length: what pooling needs."""
    flat_ids, flat_types, offsets = encoded.flat()
    lens = encoded.lengths[rows].astype(np.int64)
    cu = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    segment = np.repeat(np.arange(len(rows), dtype=np.int64), lens)
    positions = np.arange(int(cu[-1]), dtype=np.int64) - cu[:-1][segment]
    index = offsets[rows][segment] + positions
    out = {
        "input_ids": flat_ids[index][None, :],
        "position_ids": positions[None, :],
        "cu_seqlens": cu.astype(np.int32),
        "_segment": segment,
        "_lengths": lens,
    }
    if with_types:
        types = flat_types[index] if flat_types is not None else np.zeros_like(index)
        out["token_type_ids"] = types[None, :]
    return out


def has_local_attention(config) -> bool:
    """Whether some layers attend within a window (sliding_window, ModernBERT's local_attention)."""
    text = text_config(config)
    layer_types = getattr(text, "layer_types", None) or ()
    return bool(getattr(text, "sliding_window", None) or getattr(text, "local_attention", None)
                or any("sliding" in str(t) or "local" in str(t) for t in layer_types))


def takes_token_types(model, tokenizer) -> bool:
    """Whether the model is given token type ids: its forward takes them and its tokenizer emits
    them (`model_input_names`), as the tokenizer's own call would. RoBERTa, XLM-R and GPT-2 take
    the argument but their tokenizers emit none: their type table has one row (GPT-2 would even
    look types up in its word embeddings)."""
    if not _accepts(model.forward, "token_type_ids"):
        return False
    names = getattr(tokenizer, "model_input_names", None)
    return names is None or "token_type_ids" in names


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params


def _accepts_kwargs(fn) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


# --- tasks -------------------------------------------------------------------------------------

class Task:
    """A task bound to one loaded model: tokenization mode, forward, output columns."""

    name = ""
    mode = "single"

    def __init__(self, model, tokenizer, model_dir: str | None):
        self.model = model
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.accepts_types = takes_token_types(model, tokenizer)
        self.causal = is_causal_model(model)
        self.limits = model_limits(model)
        # models on transformers' attention interface take a 4D mask as it is; the others (DeBERTa,
        # MPNet) build their own from a 2D one, and would read a 4D additive mask as 0/1 flags. A
        # model with local (sliding-window) layers builds their mask from the 2D one too: given a
        # 4D mask, ModernBERT's local layers would attend globally.
        self.mask_forms = bool(getattr(model, "_supports_attention_backend", False)) and not has_local_attention(model.config)
        config_pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        tok_pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(config_pad if config_pad is not None else tok_pad if tok_pad is not None else 0)

    def default_max_length(self) -> int:
        candidates = []
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 1_000_000:
            candidates.append(limit)
        positions = self.limits.positions  # a position table's usable rows (RoBERTa-like: less the offset)
        if positions is None:
            positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            candidates.append(positions)
        return min(candidates) if candidates else 512

    def output_fields(self) -> list:
        raise NotImplementedError

    def forward(self, batch: dict) -> dict:
        raise NotImplementedError

    def model_inputs(self, batch: dict) -> dict:
        """The model's inputs. Batches are right-padded, so the attention mask is passed only where
        it changes a real token's output, and in a form transformers uses as it is: a 2D mask makes
        it check the mask's values first (a host sync per batch on CUDA) and build a full L x L mask."""
        inputs = {"input_ids": batch["input_ids"]}
        if self.accepts_types and "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"]
        if self.causal or batch.get("_no_padding", False):
            # causal attention never lets a real token see the padding after it; without padding
            # the mask says nothing. Either way SDPA and the flash kernels take their plain path.
            return inputs
        mask = batch["attention_mask"]
        impl = getattr(self.model.config, "_attn_implementation", None) if self.mask_forms else None
        if impl == "sdpa":
            inputs["attention_mask"] = mask.bool()[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries
        elif impl == "eager":
            dtype = self.model.dtype
            inputs["attention_mask"] = (1.0 - mask[:, None, None, :].to(dtype)) * torch_finfo_min(dtype)
        else:  # flash and flex implementations want the 2D mask (they unpad or build their own)
            inputs["attention_mask"] = mask
        return inputs

    def extra_arrays(self, encoded: Encoded, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """Task-specific host arrays for a batch (prepared off the forward thread)."""
        return {}

    # -- packing (padding-free batches for the varlen flash kernels) --------------------------

    def packing_obstacle(self) -> str | None:
        """Why this task cannot run packed batches on this model (None: it can)."""
        return f"task {self.name} does not pack"

    def packed_inputs(self, batch: dict) -> dict:
        """Model inputs for a packed batch: one sequence, per-row positions and boundaries."""
        impl = getattr(self.model.config, "_attn_implementation", None)
        if not supports_varlen(impl):
            # a packed batch under a dense implementation would attend across rows: never silently
            raise RuntimeError(f"a packed batch reached attention implementation {impl!r}, which cannot keep rows apart")
        cu = batch.get("kernel_cu_seqlens", batch["cu_seqlens"])  # with empty sequences: kernel_variants.py
        longest = int(batch["_max_length"])  # a host int: no device sync inside the kernels' wrapper
        positions = batch["position_ids"]
        if self.limits.position_offset:  # RoBERTa-like: the first token's position is padding_idx + 1
            positions = positions + self.limits.position_offset
        inputs = {"input_ids": batch["input_ids"], "position_ids": positions,
                  "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        if self.accepts_types and "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"]
        return inputs

    def forward_packed(self, batch: dict) -> dict:
        raise NotImplementedError

    def to_arrow(self, outputs: dict[str, np.ndarray]) -> dict:
        """Output columns (name -> pyarrow array) from float32 numpy outputs in row order."""
        import pyarrow as pa

        columns = {}
        for f in self.output_fields():
            value = outputs[f.name]
            if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type):
                columns[f.name] = _list_array(value)
            else:
                columns[f.name] = pa.array(value, type=f.type)
        return columns

    def describe(self) -> dict:
        return {"task": self.name}


def torch_finfo_min(dtype) -> float:
    import torch

    return torch.finfo(dtype).min


def is_causal_model(model) -> bool:
    """True when every attention module of the model is causal (decoder-only models)."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def _list_array(matrix: np.ndarray):
    import pyarrow as pa

    rows, width = matrix.shape
    offsets = np.arange(0, rows * width + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1)))


class EmbedTask(Task):
    name = "embed"

    def __init__(self, model, tokenizer, model_dir):
        super().__init__(model, tokenizer, model_dir)
        self.sentence = read_sentence_config(model_dir) if model_dir else SentenceConfig()
        hidden = getattr(model.config, "hidden_size", None)
        self.dim = int(hidden) * len(self.sentence.pooling) if hidden else None

    def default_max_length(self) -> int:
        base = super().default_max_length()
        if self.sentence.max_seq_length:
            return min(base, self.sentence.max_seq_length)
        return base

    def output_fields(self):
        import pyarrow as pa

        return [pa.field("embedding", pa.list_(pa.float32()))]

    def packing_obstacle(self):
        forward = self.model.forward
        if not (_accepts(forward, "position_ids") and _accepts_kwargs(forward)):
            return f"{type(self.model).__name__}.forward takes no position_ids and attention kwargs"
        return None

    def forward_packed(self, batch):
        import torch

        out = self.model(**self.packed_inputs(batch))
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0].float()
        vectors = [pool_packed(hidden, batch, mode) for mode in self.sentence.pooling]
        vector = vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)
        if self.sentence.normalize:
            vector = torch.nn.functional.normalize(vector, p=2, dim=1)
        return {"embedding": vector}

    def forward(self, batch):
        import torch

        if batch.get("_packed"):
            return self.forward_packed(batch)
        out = self.model(**self.model_inputs(batch))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden = hidden.float()
        mask = batch["attention_mask"]
        vectors = [pool(hidden, mask, mode) for mode in self.sentence.pooling]
        vector = vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)
        if self.sentence.normalize:
            vector = torch.nn.functional.normalize(vector, p=2, dim=1)
        return {"embedding": vector}

    def describe(self):
        return {"task": self.name, "pooling": list(self.sentence.pooling), "normalize": self.sentence.normalize,
                "config": self.sentence.source}


def pool(hidden, mask, mode: str):
    """sentence-transformers' pooling over right-padded float32 token embeddings."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        summed = (hidden * m).sum(dim=1)
        count = torch.clamp(m.sum(dim=1), min=1e-9)
        return summed / (count if mode == "mean" else torch.sqrt(count))
    if mode == "weightedmean":
        weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
        weighted = m * weights
        return (hidden * weighted).sum(dim=1) / torch.clamp(weighted.sum(dim=1), min=1e-9)
    if mode == "lasttoken":
        last = (mask.sum(dim=1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise UnknownNameError("pooling mode", mode, POOLING_MODES)


def pool_packed(hidden, batch: dict, mode: str):
    """`pool` over a packed (T, H) float32 sequence: the same numbers, no padding."""
    import torch

    segment, lengths = batch["_segment"], batch["_lengths"]
    cu = batch["cu_seqlens"].long()
    rows, width = lengths.shape[0], hidden.shape[1]
    if mode == "cls":
        return hidden.index_select(0, cu[:-1])
    if mode == "lasttoken":
        return hidden.index_select(0, cu[1:] - 1)
    if mode == "max":
        out = torch.full((rows, width), float("-inf"), device=hidden.device, dtype=hidden.dtype)
        return out.scatter_reduce_(0, segment[:, None].expand(-1, width), hidden, reduce="amax", include_self=True)
    count = lengths.to(hidden.dtype)[:, None]
    if mode in ("mean", "mean_sqrt_len_tokens"):
        summed = torch.zeros((rows, width), device=hidden.device, dtype=hidden.dtype).index_add_(0, segment, hidden)
        return summed / (count.clamp(min=1e-9) if mode == "mean" else torch.sqrt(count))
    if mode == "weightedmean":
        weights = (batch["position_ids"][0] + 1).to(hidden.dtype)
        summed = torch.zeros((rows, width), device=hidden.device, dtype=hidden.dtype).index_add_(0, segment, hidden * weights[:, None])
        total = torch.zeros(rows, device=hidden.device, dtype=hidden.dtype).index_add_(0, segment, weights)
        return summed / total.clamp(min=1e-9)[:, None]
    raise UnknownNameError("pooling mode", mode, POOLING_MODES)


class ClassifyTask(Task):
    name = "classify"

    def __init__(self, model, tokenizer, model_dir):
        super().__init__(model, tokenizer, model_dir)
        config = model.config
        if getattr(config, "pad_token_id", None) is None and getattr(tokenizer, "pad_token_id", None) is not None:
            # decoder classifiers find each row's last token by the pad id: it must be the one we pad with
            config.pad_token_id = tokenizer.pad_token_id
            self.pad_id = int(tokenizer.pad_token_id)
        self.num_labels = int(getattr(config, "num_labels", 1) or 1)
        id2label = getattr(config, "id2label", None) or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(self.num_labels)]
        base = getattr(model, "base_model", None)
        self._base_takes_use_cache = base is not None and _accepts(base.forward, "use_cache")

    def output_fields(self):
        import pyarrow as pa

        if self.num_labels == 1:
            return [pa.field("score", pa.float32())]
        return [pa.field("scores", pa.list_(pa.float32())), pa.field("label", pa.string())]

    def packing_obstacle(self):
        # decoder classifiers (reward models): a base model plus a linear `score` head on each
        # row's last token, which a packed batch gives directly; encoder heads (pooler,
        # classifier on [CLS]) are not packed
        import torch

        base, head = getattr(self.model, "base_model", None), getattr(self.model, "score", None)
        if not self.causal:
            return "only decoder-only classifiers are packed"
        if base is None or base is self.model or not isinstance(head, torch.nn.Linear):
            return f"{type(self.model).__name__} has no base model plus linear `score` head"
        if not (_accepts(base.forward, "position_ids") and _accepts_kwargs(base.forward)):
            return f"{type(base).__name__}.forward takes no position_ids and attention kwargs"
        return None

    def forward_packed(self, batch):
        inputs = self.packed_inputs(batch)
        if self._base_takes_use_cache:
            inputs["use_cache"] = False
        hidden = self.model.base_model(**inputs).last_hidden_state[0]
        last = batch["cu_seqlens"][1:].long() - 1
        logits = self.model.score(hidden.index_select(0, last)).float()
        if self.num_labels == 1:
            return {"score": logits[:, 0]}
        return {"scores": logits}

    def forward(self, batch):
        if batch.get("_packed"):
            return self.forward_packed(batch)
        logits = self.model(**self.model_inputs(batch)).logits.float()
        if self.num_labels == 1:
            return {"score": logits[:, 0]}
        return {"scores": logits}

    def to_arrow(self, outputs):
        import pyarrow as pa

        if self.num_labels == 1:
            return {"score": pa.array(outputs["score"], type=pa.float32())}
        scores = outputs["scores"]
        best = np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1) if len(scores) else np.zeros(0, dtype=np.int64)
        labels = np.asarray(self.labels, dtype=object)[best] if len(scores) else np.zeros(0, dtype=object)
        return {"scores": _list_array(scores), "label": pa.array(labels.tolist(), type=pa.string())}

    def describe(self):
        return {"task": self.name, "labels": self.labels}


class PairsTask(ClassifyTask):
    name = "pairs"
    mode = "pair"


class LogprobTask(Task):
    name = "logprob"

    def __init__(self, model, tokenizer, model_dir, prompt_completion: bool = False):
        super().__init__(model, tokenizer, model_dir)
        if not self.causal:
            # an encoder's LM head (BertLMHeadModel without is_decoder) attends both ways: the
            # "log-probability" of each token would be computed by a model that sees it
            raise UsageError(f"task logprob needs a causal language model; {type(model).__name__} attends in both "
                             "directions (config.is_decoder is false), so its next-token log-probabilities would see the "
                             "tokens they predict (use embed, classify or pairs with an encoder)")
        self.mode = "prompt_completion" if prompt_completion else "single"
        config = model.config
        text = text_config(config)
        self.chunked = not any(getattr(text, a, None) not in (None, 1, 1.0) for a in _UNSUPPORTED_LOGIT_ATTRS)
        self.base = getattr(model, "base_model", None) if self.chunked else None
        self.head = model.get_output_embeddings() if self.chunked else None
        if self.base is None or self.head is None or self.base is model:
            self.chunked = False

    def output_fields(self):
        import pyarrow as pa

        return [pa.field("logprob_sum", pa.float32()), pa.field("logprob_mean", pa.float32()), pa.field("tokens", pa.int32())]

    def extra_arrays(self, encoded, rows, length):
        lens = encoded.lengths[rows]
        starts = encoded.score_start[rows] if encoded.score_start is not None else np.zeros(len(rows), dtype=np.int64)
        counts = np.maximum(lens - 1 - starts, 0)
        row_of = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
        first = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) if len(rows) else np.zeros(0, np.int64)
        pos = np.arange(int(counts.sum()), dtype=np.int64) + first
        flat_ids, _, offsets = encoded.flat()
        targets = flat_ids[offsets[rows][row_of] + pos + 1] if len(pos) else np.zeros(0, dtype=np.int64)
        return {"_select": row_of * length + pos, "_row_of": row_of, "_targets": targets.astype(np.int64),
                "_counts": counts.astype(np.int64)}

    def forward(self, batch):
        import torch

        inputs = self.model_inputs(batch)
        select, row_of, targets = batch["_select"], batch["_row_of"], batch["_targets"]
        rows = batch["input_ids"].shape[0]
        sums = torch.zeros(rows, dtype=torch.float32, device=batch["input_ids"].device)
        total = int(select.shape[0])  # a host-side shape: no device sync
        if self.chunked:
            hidden = self.base(**inputs).last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1])
            for start in range(0, total, LOGITS_CHUNK_TOKENS):
                stop = min(start + LOGITS_CHUNK_TOKENS, total)
                logits = self.head(flat.index_select(0, select[start:stop])).float()
                picked = logits.gather(1, targets[start:stop, None])[:, 0] - torch.logsumexp(logits, dim=-1)
                sums.index_add_(0, row_of[start:stop], picked)
        else:
            logits = self.model(**inputs).logits
            flat = logits.reshape(-1, logits.shape[-1])
            for start in range(0, total, LOGITS_CHUNK_TOKENS):
                stop = min(start + LOGITS_CHUNK_TOKENS, total)
                chunk = flat.index_select(0, select[start:stop]).float()
                picked = chunk.gather(1, targets[start:stop, None])[:, 0] - torch.logsumexp(chunk, dim=-1)
                sums.index_add_(0, row_of[start:stop], picked)
        counts = batch["_counts"]
        mean = sums / counts.clamp(min=1).to(torch.float32)
        mean = torch.where(counts > 0, mean, torch.full_like(mean, float("nan")))
        return {"logprob_sum": sums, "logprob_mean": mean, "tokens": counts.to(torch.float32)}

    def to_arrow(self, outputs):
        import pyarrow as pa

        return {
            "logprob_sum": pa.array(outputs["logprob_sum"], type=pa.float32()),
            "logprob_mean": pa.array(outputs["logprob_mean"], type=pa.float32()),
            "tokens": pa.array(outputs["tokens"].astype(np.int32), type=pa.int32()),
        }

    def describe(self):
        return {"task": self.name, "mode": self.mode, "chunked_head": self.chunked}


def build_task(name: str, model, tokenizer, model_dir: str | None, text_columns: int) -> Task:
    """The task object for a loaded model."""
    name = parse_task(name)
    if name == "embed":
        return EmbedTask(model, tokenizer, model_dir)
    if name == "classify":
        return ClassifyTask(model, tokenizer, model_dir)
    if name == "pairs":
        return PairsTask(model, tokenizer, model_dir)
    return LogprobTask(model, tokenizer, model_dir, prompt_completion=text_columns == 2)
