"""The model-zoo conformance matrix on the CPU: every family of tests/zoo.py, every task it
supports, through attnfallback's real scoring path (run_score), against what users would otherwise
call (sentence-transformers encode, CrossEncoder.predict, transformers logits, a transformers
log-softmax), with sdpa and eager; and every task it does not support refused with exit 2.

What transformers itself does not run (the table the README repeats):

| family | implementation or task | why |
|---|---|---|
| MPNet | sdpa, flash | transformers' MPNet has no sdpa or flash path (strict: exit 3; graceful: eager) |
| DeBERTa-v2, DeBERTa-v3 | sdpa, flash | disentangled attention: no sdpa or flash path (strict: exit 3; graceful: eager) |
| Gemma 2 | sdpa | sdpa cannot soft-cap attention logits: refused by attnfallback as by transformers 5.24 (transformers 5.17 ran it without the cap: other numbers) (strict: exit 3; graceful: eager or flash) |
| BERT, RoBERTa, XLM-R, ELECTRA | logprob | their LM heads attend both ways: exit 2 |
| DistilBERT, MPNet, DeBERTa, ModernBERT | logprob | transformers has no causal LM class for them: exit 2 |

A family or task that transformers of the running version cannot build is skipped with the
reason (zoo.transformers_cannot), never left out. $ATTNFALLBACK_ZOO_REPORT=FILE writes the rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import zoo
from attnfallback.cli.app import main

zoo_report = zoo.report_fixture("cpu")

CELLS = [(f.name, t) for f in zoo.FAMILIES.values() for t in f.tasks]
REFUSED = [(f.name, t) for f in zoo.FAMILIES.values() for t in f.refused_tasks]
IMPLS = ("sdpa", "eager")


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def cell_model(family, task, root):
    why = zoo.transformers_cannot(family, task)
    if why:
        pytest.skip(why)
    return zoo.build(family, task, root / f"{family.name}-{task}")


@pytest.mark.parametrize("name,task", CELLS, ids=[f"{n}-{t}" for n, t in CELLS])
def test_family_task_matches_the_reference(name, task, zoo_root, zoo_report):
    family = zoo.FAMILIES[name]
    model_dir = cell_model(family, task, zoo_root)
    ref = zoo.cell_reference(task, model_dir, "float32", "cpu")
    assert np.isfinite(ref.truth).all() and ref.truth.shape[0] == len(zoo.cell_inputs(task))
    work = zoo_root / f"{name}-{task}-runs"
    outputs = {}
    for impl in IMPLS:
        row, out = zoo.check_impl(family, task, impl, model_dir, work, ref)
        zoo_report.add(**row)
        expected = zoo.expected_unavailable(family, impl)
        if expected:
            # the family's table entry holds: strict refuses with the reason, never a number
            assert row["status"] == "unavailable", row
            assert f"does not support {impl}" in row["note"] or "cannot soft-cap" in row["note"], row
            continue
        assert row["status"] == "pass", row
        # on the CPU no implementation packs: auto pads, and says why
        assert row["packing"].startswith("off (") and "varlen" in row["packing"], row
        outputs[impl] = out
    if "sdpa" in outputs:
        # sdpa against eager directly, within the same bar
        assert zoo.errors(outputs["sdpa"], outputs["eager"])["rel_l2"] <= ref.bar
    else:
        # graceful policy runs such a family on eager, with the same numbers
        out, result = zoo.score(task, model_dir, work, "sdpa", policy="graceful", tag="graceful")
        assert result.decision["used"] == "eager" and result.decision["fell_back"] is True
        assert zoo.errors(out, ref.truth)["rel_l2"] <= ref.bar
    # --packing off gives the bits auto gives (auto pads here)
    off, _ = zoo.score(task, model_dir, work, "eager", packing="off")
    assert np.array_equal(off, outputs["eager"])


@pytest.mark.parametrize("name,task", REFUSED, ids=[f"{n}-{t}" for n, t in REFUSED])
def test_a_task_the_family_cannot_do_is_refused_with_exit_2(name, task, zoo_root, tmp_path, capsys, zoo_report):
    family = zoo.FAMILIES[name]
    model_dir = zoo.build(family, task, zoo_root / f"{name}-{task}")  # its LM head where transformers has one
    source = zoo.write_inputs(task, tmp_path / "in.jsonl")
    out = tmp_path / "out.parquet"
    code = main(["score", str(model_dir), "--input", str(source), "--output", str(out), "--task", task, "--quiet"])
    err = capsys.readouterr().err
    zoo_report.add(family=name, task=task, impl="any", status="refused (exit 2)", note=err.strip().splitlines()[-1][:200])
    assert code == 2, err
    has_lm_class = zoo.model_class(family, task) is not None
    reason = "needs a causal language model" if has_lm_class else "model type for AutoModelForCausalLM"
    assert reason in err, err
    assert not out.exists()


def test_xlm_roberta_cross_encoder_scores_pairs_from_the_command_line(zoo_root, tmp_path, capsys):
    """The issue's case: an XLM-R cross-encoder (type_vocab_size 1, a tokenizer without
    token_type_ids) crashed `score --task pairs` (IndexError; a device-side assert on a GPU)."""
    family = zoo.FAMILIES["xlm-roberta"]
    model_dir = zoo.build(family, "pairs", tmp_path / "xlmr")
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    assert config["type_vocab_size"] == 1
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(model_dir).model_input_names
    source = zoo.write_inputs("pairs", tmp_path / "in.jsonl")
    out = tmp_path / "out.parquet"
    code = main(["score", str(model_dir), "--input", str(source), "--output", str(out), "--task", "pairs",
                 "--text-columns", "a,b", "--json", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["task"]["token_type_ids"] is False and data["rows_written"] == len(zoo.cell_inputs("pairs"))
    ref = zoo.cell_reference("pairs", model_dir, "float32", "cpu")
    assert zoo.errors(zoo.read_scores("pairs", out), ref.truth)["rel_l2"] <= ref.bar
