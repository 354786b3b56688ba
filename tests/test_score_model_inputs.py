"""Inputs the model actually takes, and ids checked against its tables before the first forward:
type ids only where the tokenizer emits them and the model takes them; a token id, type id or row
length beyond the model's tables is exit 2 naming the limit, the value and the row (file:line),
never an IndexError (a device-side assert on a GPU); --max-length beyond the positions is clipped,
with a message; the verification forward goes through the task's own inputs; packing is checked
honestly."""

from __future__ import annotations

import json

import numpy as np
import pytest

import zoo
from attnfallback import verify
from attnfallback.cli.app import main
from attnfallback.errors import is_fatal_device_error
from attnfallback.scoring import collate
from attnfallback.scoring.limits import ModelLimits, clip_max_length, model_limits
from attnfallback.scoring.pipeline import Scorer
from attnfallback.scoring.trial import VERIFY_TEXTS
from scoring_helpers import read_events, write_jsonl


def tiny(family: str, task: str = "embed", **overrides):
    """The zoo's model of `family` for `task`, built in memory (not saved), with config overrides."""
    f = zoo.FAMILIES[family]
    tokenizer = zoo.tokenizer_for(f)
    config = zoo.make_config(f, tokenizer, "cpu", task)
    for key, value in overrides.items():
        setattr(config, key, value)
    cls = zoo.model_class(f, task)
    return cls(config), tokenizer


def save(model, tokenizer, directory):
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --- the limits themselves ---------------------------------------------------------------------


@pytest.mark.parametrize("family,vocab_from_tokenizer,types,positions,offset", [
    ("bert", True, 2, 128, 0),
    ("roberta", True, 1, 128, 2),  # 130 rows, positions start at padding_idx + 1 = 2
    ("xlm-roberta", True, 1, 128, 2),
    ("mpnet", True, None, 128, 2),
    ("distilbert", True, None, 128, 0),
    ("deberta-v2", True, 2, 128, 0),  # position_biased_input: an absolute table
    ("deberta-v3", True, None, None, 0),  # type_vocab_size 0, relative positions only
    ("modernbert", True, None, None, 0),  # rotary
    ("gpt2", True, None, 256, 0),  # wpe
    ("llama", True, None, None, 0),
])
def test_model_limits_read_the_tables(family, vocab_from_tokenizer, types, positions, offset):
    model, tokenizer = tiny(family)
    limits = model_limits(model)
    assert limits.vocab == len(tokenizer)
    assert (limits.type_vocab, limits.positions, limits.position_offset) == (types, positions, offset)


def test_violation_names_the_first_bad_id_and_its_row():
    limits = ModelLimits("M", vocab=10, type_vocab=1, positions=4)
    lengths = np.array([3, 2, 4])
    offsets = np.array([0, 3, 5])
    ids = np.array([1, 2, 3, 4, 12, 5, 6, 7, 8])
    found = limits.violation(ids, None, offsets, lengths)
    assert (found.what, found.limit, found.found, found.row) == ("token id", 10, 12, 1)
    assert "expected token ids < 10, found 12" in found.message("M")
    ids[4] = 5
    assert limits.violation(ids, np.zeros_like(ids), offsets, lengths) is None
    types = np.zeros_like(ids)
    types[6] = 1
    found = limits.violation(ids, types, offsets, lengths)
    assert (found.what, found.limit, found.found, found.row) == ("token type id", 1, 1, 2)
    found = limits.violation(ids, None, offsets, np.array([3, 2, 5]))
    assert (found.what, found.limit, found.found, found.row) == ("position", 4, 5, 2)
    assert clip_max_length(512, limits)[0] == 4 and "beyond the 4 positions M can take" in clip_max_length(512, limits)[1]
    assert clip_max_length(3, limits) == (3, None)


@pytest.mark.parametrize("family,expected", [
    ("bert", True), ("electra", True), ("deberta-v2", True),
    ("roberta", False), ("xlm-roberta", False), ("gpt2", False),  # they take the argument, their tokenizer emits none
    ("distilbert", False), ("llama", False),  # they take no argument
])
def test_type_ids_go_only_where_the_tokenizer_emits_them_and_the_model_takes_them(family, expected):
    model, tokenizer = tiny(family, "pairs")
    assert collate.takes_token_types(model, tokenizer) is expected


def test_fatal_device_errors_are_told_from_recoverable_ones():
    import torch

    assert is_fatal_device_error(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    assert is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_fatal_device_error(RuntimeError("CUDA error: no kernel image is available for execution on the device"))
    assert not is_fatal_device_error(RuntimeError("FlashAttention only supports Ampere GPUs or newer."))
    assert not is_fatal_device_error(ValueError("device-side assert"))


# --- a tokenizer that does not match its model -------------------------------------------------


def _max_id(tokenizer, text: str) -> int:
    return max(tokenizer(text)["input_ids"])


def test_token_id_beyond_the_vocabulary_is_exit_2_naming_limit_value_and_line(tmp_path, capsys):
    model, tokenizer = tiny("bert", "classify")
    sentences = sorted(zoo.corpus()[:400], key=lambda s: _max_id(tokenizer, s))
    fine = sentences[:2]
    limit = max([_max_id(tokenizer, s) for s in fine] + [_max_id(tokenizer, t[0]) for t in VERIFY_TEXTS]) + 1
    bad = next(s for s in sentences if _max_id(tokenizer, s) >= limit)
    model, _ = tiny("bert", "classify", vocab_size=limit)  # a checkpoint whose vocabulary is smaller than its tokenizer's
    model_dir = save(model, tokenizer, tmp_path / "model")
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": fine[0]}, {"text": fine[1]}, {"text": bad}, {"text": fine[0]}])
    out = tmp_path / "out.parquet"
    events = tmp_path / "events"
    code = main(["score", str(model_dir), "--input", str(source), "--output", str(out), "--task", "classify",
                 "--events", str(events), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    found = _max_id(tokenizer, bad)
    assert f"in.jsonl:3: token id {found} is beyond BertForSequenceClassification's vocabulary" in err, err
    assert f"expected token ids < {limit}, found {found}" in err and "does not match the model" in err
    assert "IndexError" not in err and not out.exists()
    (failed,) = [e for e in read_events(events) if e["event"] == "shard_failed"]
    assert failed["error"] == "TokenizerMismatchError" and failed["exit_code"] == 2


def test_type_ids_for_a_model_with_one_type_are_refused_at_load(tmp_path, capsys):
    """A tokenizer that emits type ids (1 for a pair's second text) and a model with
    type_vocab_size 1: the verification forward, through the pairs task's own inputs, refuses it
    before any row is scored."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    model, plain = tiny("xlm-roberta", "pairs")
    # a generic fast tokenizer (its tokenizer.json as it is) whose template gives the second text type 1
    backend = plain.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B:1 </s>:1", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                        cls_token="<s>", pad_token="<pad>", unk_token="<unk>", model_max_length=128,
                                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    model_dir = save(model, tokenizer, tmp_path / "model")
    source = zoo.write_inputs("pairs", tmp_path / "in.jsonl")
    out = tmp_path / "out.parquet"
    code = main(["score", str(model_dir), "--input", str(source), "--output", str(out), "--task", "pairs",
                 "--text-columns", "a,b", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "on the verification rows, before any input row" in err
    assert "token type id 1 is beyond XLMRobertaForSequenceClassification's token type table (type_vocab_size 1)" in err, err
    assert not out.exists()


def test_max_length_beyond_the_positions_is_clipped_with_a_message(tmp_path, capsys):
    family = zoo.FAMILIES["roberta"]
    model_dir = zoo.build(family, "embed", tmp_path / "roberta")
    source = zoo.write_inputs("embed", tmp_path / "in.jsonl")
    results = {}
    for name, extra in (("default", []), ("long", ["--max-length", "1000"])):
        out = tmp_path / f"{name}.parquet"
        code = main(["score", str(model_dir), "--input", str(source), "--output", str(out), "--json", "--quiet", *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        results[name] = (json.loads(captured.out), zoo.read_scores("embed", out), captured.err)
    data, values, err = results["long"]
    assert "--max-length 1000 is beyond the 128 positions RobertaModel can take" in err
    assert "padding offset 2" in data["task"]["max_length_note"]
    assert data["task"]["max_length"] == results["default"][0]["task"]["max_length"] == 128
    assert data["truncated"] == 1 and np.array_equal(values, results["default"][1])


def test_a_tokenizer_without_a_max_length_stops_at_the_usable_positions(tmp_path):
    """RoBERTa's 130-row position table holds 128 tokens: a tokenizer that states no
    model_max_length must not give rows of 130 (IndexError, or a device-side assert)."""
    model, tokenizer = tiny("roberta", "embed")
    tokenizer.model_max_length = int(1e30)
    model_dir = save(model, tokenizer, tmp_path / "model")
    (model_dir / "modules.json").unlink(missing_ok=True)
    out, result = zoo.score("embed", model_dir, tmp_path / "work", "sdpa")
    assert result.task["max_length"] == 128 and result.truncated == 1 and np.isfinite(out).all()


# --- the verification forward goes through the task's inputs -----------------------------------


@pytest.mark.parametrize("family,types", [("bert", True), ("xlm-roberta", False)])
def test_the_verification_forward_feeds_the_tasks_own_inputs(family, types, tmp_path, monkeypatch):
    model_dir = zoo.build(zoo.FAMILIES[family], "pairs", tmp_path / family)
    seen = []
    real = verify.verify_forward

    def recording(model, facts, device, inputs_for=None):
        seen.append((model.config._attn_implementation, inputs_for(model, facts)[0]))
        return real(model, facts, device, inputs_for)

    monkeypatch.setattr(verify, "verify_forward", recording)
    job = zoo.score_job("pairs", model_dir, tmp_path / "work", "sdpa")
    Scorer.from_job(job)
    ((impl, inputs),) = seen
    assert impl == "sdpa"
    assert inputs["attention_mask"].dim() == 4  # the task's mask form for sdpa, not the plain 2D mask
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(tokenizer.sep_token_id) >= 2  # a pair: the template's separators
    if types:
        assert int(inputs["token_type_ids"].max()) == 1
    else:
        assert "token_type_ids" not in inputs


# --- packing: the check is honest --------------------------------------------------------------

PACKING_FAMILIES = ["bert", "roberta", "modernbert", "gpt2", "llama", "mistral", "qwen3", "gemma3"]


@pytest.mark.parametrize("family", PACKING_FAMILIES)
def test_the_packing_check_is_honest_about_a_kernel_that_ignores_row_boundaries(family, tmp_path, monkeypatch):
    """On this CPU no implementation keeps a packed batch's rows apart. Declared varlen-capable
    anyway, sdpa gets packed batches: the check must either refuse to pack (rows would see their
    neighbours) or, where it packs, give the reference's numbers."""
    monkeypatch.setattr(collate, "PACKING_IMPLS", (*collate.PACKING_IMPLS, "sdpa"))
    task = "embed"
    model_dir = zoo.build(zoo.FAMILIES[family], task, tmp_path / family)
    out, result = zoo.score(task, model_dir, tmp_path / "work", "sdpa")
    ref = zoo.cell_reference(task, model_dir, "float32", "cpu")
    note = result.task["packing"]
    if note == "on":
        assert zoo.errors(out, ref.truth)["rel_l2"] <= ref.bar, note
    else:
        assert "differ on the check rows" in note or "a packed forward failed" in note, note
        assert zoo.errors(out, ref.truth)["rel_l2"] <= ref.bar
    import transformers
    from packaging.version import Version

    # transformers < 5.25 let bidirectional rows see their packed neighbours under sdpa; 5.25 keeps
    # them apart, and the check then packs, with the reference's numbers (asserted above)
    if not zoo.FAMILIES[family].decoder and Version(transformers.__version__) < Version("5.25"):
        assert note != "on"
