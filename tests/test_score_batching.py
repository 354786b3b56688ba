"""Token-budget batching, padding and tokenization: pure pieces of the scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnfallback.batching import (
    CPU_BATCH_TOKENS,
    CUDA_BATCH_TOKENS,
    CUDA_EAGER_BATCH_TOKENS,
    default_batch_tokens,
    eager_max_cells,
    inverse_permutation,
    length_order,
    plan_batches,
)
from attnfallback.scoring.collate import pad_rows
from attnfallback.scoring.tokenize import Encoded, TextEncoder
from scoring_helpers import seeded_texts


def test_length_order_is_longest_first_and_stable():
    lengths = np.array([3, 7, 3, 1, 7, 3])
    order = length_order(lengths)
    assert order.tolist() == [1, 4, 0, 2, 5, 3]


def test_inverse_permutation_restores_input_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=101)
    order = length_order(lengths)
    sorted_values = lengths[order] * 10
    restored = np.empty_like(sorted_values)
    restored[order] = sorted_values
    assert (restored == lengths * 10).all()
    assert (sorted_values[inverse_permutation(order)] == lengths * 10).all()


def test_batches_respect_the_padded_token_budget_and_cover_every_row():
    rng = np.random.default_rng(1)
    lengths = np.sort(rng.integers(1, 300, size=1000))[::-1]
    batches = plan_batches(lengths, batch_tokens=2048)
    assert batches[0].start == 0 and batches[-1].stop == len(lengths)
    for a, b in zip(batches, batches[1:]):
        assert a.stop == b.start
    for b in batches:
        assert b.length == lengths[b.start]
        assert b.padded_tokens <= 2048 or b.rows == 1
        assert lengths[b.start:b.stop].max() <= b.length


def _plan_cost(batches, floor: int, overhead: int = 0) -> int:
    return sum(max(b.padded_tokens, floor) + overhead for b in batches)


def _least_cost(lengths: np.ndarray, budget: int, floor: int, overhead: int) -> int:
    """Every way of cutting sorted lengths into batches that fit the budget: the least cost."""
    n = len(lengths)
    best = None
    for cuts in range(1 << (n - 1)):
        starts = [0] + [i + 1 for i in range(n - 1) if cuts >> i & 1] + [n]
        cost = 0
        for a, b in zip(starts, starts[1:]):
            if (b - a) * lengths[a] > budget and b - a > 1:
                break
            cost += max((b - a) * int(lengths[a]), floor) + overhead
        else:
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(60))
def test_batches_cost_the_least_of_every_way_to_cut_them(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 11))
    lengths = np.sort(rng.choice([3, 5, 8, 9, 20, 40], size=n))[::-1]  # repeats: runs of one length
    budget, floor = int(rng.choice([40, 60, 100, 400])), int(rng.choice([0, 10, 30, 80]))
    overhead = int(rng.choice([0, 0, 4, 25]))
    batches = plan_batches(lengths, budget, floor_tokens=floor, overhead_tokens=overhead)
    assert [(a.stop == b.start) for a, b in zip(batches, batches[1:])] == [True] * (len(batches) - 1)
    assert batches[0].start == 0 and batches[-1].stop == n
    assert all(b.padded_tokens <= budget or b.rows == 1 for b in batches)
    least = _least_cost(lengths, budget, floor, overhead)
    cost = _plan_cost(batches, floor, overhead)
    if floor == overhead == 0:
        assert cost == least  # the least padding of every cut
    else:
        # cuts are looked for where the length drops, so a run of one length split to spare a
        # floor or an overhead can cost up to one of each more than the best cut
        assert least <= cost <= least + floor + overhead


def test_batches_cut_a_long_tail_where_padding_is_saved_not_elsewhere():
    rng = np.random.default_rng(2)
    lengths = np.sort(np.minimum(rng.lognormal(4.0, 0.6, size=8192).astype(int) + 1, 512))[::-1]
    planned = plan_batches(lengths, 65536)
    floor, overhead = 65536 // 8, 65536 // 64
    padded = sum(b.padded_tokens for b in planned)
    assert padded < 1.1 * lengths.sum()
    one_length = np.full(4096, 64)  # nothing to save: full batches only
    assert [b.rows for b in plan_batches(one_length, 65536)] == [1024] * 4
    # a greedy fill (each batch as full as the budget allows) pads more and costs more
    greedy, start = [], 0
    while start < len(lengths):
        rows = 65536 // int(lengths[start])
        greedy.append((min(rows, len(lengths) - start), int(lengths[start])))
        start += rows
    assert sum(r * length for r, length in greedy) > 1.1 * padded
    assert _plan_cost(planned, floor, overhead) < sum(max(r * length, floor) + overhead for r, length in greedy)


def test_a_row_longer_than_the_budget_gets_a_batch_of_its_own():
    batches = plan_batches(np.array([5000, 10, 10]), batch_tokens=1000)
    assert [(b.start, b.stop) for b in batches] == [(0, 1), (1, 3)]


def test_eager_bounds_the_attention_cells():
    cells = eager_max_cells("eager", num_heads=16)
    assert cells is not None and eager_max_cells("sdpa", 16) is None
    lengths = np.full(64, 2048)
    batches = plan_batches(lengths, batch_tokens=1 << 20, max_cells=cells)
    assert all(b.rows * b.length * b.length <= cells or b.rows == 1 for b in batches)
    assert len(batches) > 1


def test_default_budgets_depend_on_device_and_implementation():
    assert default_batch_tokens("cpu", "sdpa") == CPU_BATCH_TOKENS
    assert default_batch_tokens("cuda", "flash_attention_2") == CUDA_BATCH_TOKENS
    assert default_batch_tokens("cuda", "eager") == CUDA_EAGER_BATCH_TOKENS < CUDA_BATCH_TOKENS


def test_cuda_budgets_shrink_as_the_feed_forward_widens():
    from attnfallback.batching import CUDA_MAX_BATCH_TOKENS, CUDA_MIN_BATCH_TOKENS

    bert, qwen_small, seven_b = (default_batch_tokens("cuda", "sdpa", width) for width in (3072, 4864, 14336))
    assert (bert, qwen_small, seven_b) == (262144, 163840, 49152)
    assert bert * 3072 >= qwen_small * 4864 >= seven_b * 14336  # one activation: at most the same size
    assert default_batch_tokens("cuda", "sdpa", 1536) == CUDA_MAX_BATCH_TOKENS  # capped
    assert default_batch_tokens("cuda", "sdpa", 10 ** 6) == CUDA_MIN_BATCH_TOKENS  # floored
    assert default_batch_tokens("cuda", "eager", 3072) == CUDA_EAGER_BATCH_TOKENS  # eager keeps its own
    assert default_batch_tokens("cpu", "sdpa", 3072) == CPU_BATCH_TOKENS


def test_feed_forward_width_is_read_from_the_config():
    from transformers import BertConfig, Qwen2Config

    from attnfallback.batching import ffn_width

    assert ffn_width(BertConfig(intermediate_size=3072)) == 3072
    assert ffn_width(Qwen2Config(intermediate_size=4864)) == 4864

    class Bare:
        hidden_size = 256

    assert ffn_width(Bare()) == 1024
    assert ffn_width(object()) is None


def test_pad_rows_right_pads_and_masks():
    enc = Encoded([[5, 6, 7], [8], [9, 10]], [[0, 0, 0], [0], [1, 1]], np.array([3, 1, 2]), np.zeros(3, bool))
    out = pad_rows(enc, np.array([2, 1]), length=3, pad_id=0, with_types=True)
    assert out["input_ids"].tolist() == [[9, 10, 0], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert out["token_type_ids"].tolist() == [[1, 1, 0], [0, 0, 0]]


@pytest.fixture(scope="module")
def minilm_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_encoder_matches_the_tokenizer_call_sentence_transformers_makes(minilm_tokenizer):
    texts = seeded_texts(50, seed=3, max_words=80) + ["Ünïcödé and émojis 🙂 too", "x"]
    enc = TextEncoder(minilm_tokenizer, max_length=32).encode([(t,) for t in texts])
    ref = minilm_tokenizer(texts, truncation="longest_first", max_length=32, padding=False)
    assert enc.ids == ref["input_ids"]
    # BERT's single-text template gives type 0 throughout: not read back, None stands for the zeros
    assert enc.type_ids is None and all(t == [0] * len(t) for t in ref["token_type_ids"])
    padded = pad_rows(enc, np.arange(len(texts)), 32, 0, with_types=True)
    assert padded["token_type_ids"].shape == (len(texts), 32) and not padded["token_type_ids"].any()
    full = minilm_tokenizer(texts, padding=False)["input_ids"]
    assert enc.truncated.tolist() == [len(f) > 32 for f in full]
    assert enc.truncated.any() and not enc.truncated.all()


def test_pair_encoding_matches_the_tokenizer(minilm_tokenizer):
    a, b = seeded_texts(20, seed=4, max_words=30), seeded_texts(20, seed=5, max_words=30)
    enc = TextEncoder(minilm_tokenizer, max_length=40, mode="pair").encode(list(zip(a, b)))
    ref = minilm_tokenizer(a, b, truncation="longest_first", max_length=40, padding=False)
    assert enc.ids == ref["input_ids"] and enc.type_ids == ref["token_type_ids"]


def test_prompt_completion_keeps_the_completion_and_marks_where_scoring_starts(minilm_tokenizer):
    enc = TextEncoder(minilm_tokenizer, max_length=12, mode="prompt_completion").encode(
        [("the man plays", "the guitar"), ("a " * 40, "the dog runs")])
    completion0 = minilm_tokenizer("the guitar", add_special_tokens=False)["input_ids"]
    assert enc.ids[0][-len(completion0):] == completion0
    assert enc.score_start[0] == len(enc.ids[0]) - len(completion0) - 1
    assert not enc.truncated[0] and enc.truncated[1]
    assert len(enc.ids[1]) <= 12
    completion1 = minilm_tokenizer("the dog runs", add_special_tokens=False)["input_ids"]
    assert enc.ids[1][-len(completion1):] == completion1



def test_type_ids_are_read_back_unless_the_single_template_is_all_type_zero():
    from attnfallback.scoring.tokenize import single_type_ids_are_zero

    def template(*type_ids):
        single = [{"SpecialToken": {"id": "[CLS]", "type_id": type_ids[0]}}, {"Sequence": {"id": "A", "type_id": type_ids[1]}}]
        return json.dumps({"post_processor": {"type": "TemplateProcessing", "single": single}})

    assert single_type_ids_are_zero(template(0, 0))
    assert not single_type_ids_are_zero(template(0, 1))
    assert single_type_ids_are_zero(json.dumps({"post_processor": None}))
    assert single_type_ids_are_zero(json.dumps({"post_processor": {"type": "Sequence", "processors": [
        {"type": "ByteLevel"}, json.loads(template(0, 0))["post_processor"]]}}))
    assert not single_type_ids_are_zero(json.dumps({"post_processor": {"type": "SomethingNew"}}))
    assert not single_type_ids_are_zero("not json")


def test_a_heavier_models_batches_are_cut_finer():
    from attnfallback.batching import CUT_MAX_SCALE, FLOOR_DIVISOR, OVERHEAD_DIVISOR, cut_costs, cut_scale

    assert cut_scale(None) == cut_scale(0) == cut_scale(100_000_000) == cut_scale(250_000_000) == 1.0
    assert cut_scale(1_000_000_000) == 4.0 and cut_scale(70_000_000_000) == CUT_MAX_SCALE
    assert cut_costs(98304) == (98304 // FLOOR_DIVISOR, 98304 // OVERHEAD_DIVISOR)  # plan_batches' own defaults
    assert cut_costs(98304, 4.0) == (3072, 384) and cut_costs(98304, 0.5) == cut_costs(98304)
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(10, 260, 8192))[::-1]
    plain = plan_batches(lengths, 98304)
    assert plain == plan_batches(lengths, 98304, floor_tokens=cut_costs(98304)[0], overhead_tokens=cut_costs(98304)[1])
    finer = plan_batches(lengths, 98304, floor_tokens=cut_costs(98304, 4.0)[0], overhead_tokens=cut_costs(98304, 4.0)[1])
    padded = lambda batches: sum(b.padded_tokens for b in batches)  # noqa: E731
    assert len(finer) > len(plain) and padded(finer) < padded(plain)
    assert sum(b.rows for b in finer) == len(lengths)


def test_a_models_body_is_its_parameters_without_its_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    from attnfallback.batching import body_parameters
    from conftest import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "llama", "llama"))
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    expected = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    assert body_parameters(model) == expected
    assert 0 < body_parameters(model) < sum(p.numel() for p in model.parameters())
