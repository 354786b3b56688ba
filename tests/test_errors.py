"""The error tree: exit codes, context on the instances, and pickling across processes."""

from __future__ import annotations

import pickle

import pytest

from attnfallback import errors


@pytest.mark.parametrize(
    "err,code",
    [
        (errors.AttentionUnavailable("flash_attention_2", {"flash_attention_2": ["package flash_attn is not installed"]}), 3),
        (errors.InputError("not valid JSON", path="in.jsonl", line=3, expected="a JSON object", found="'{'"), 2),
        (errors.UnknownNameError("dtype", "float8", ["auto", "bfloat16"]), 2),
        (errors.ConfigError("unknown key 'shardz'", path="sweep.toml", key="shardz"), 2),
        (errors.NonFiniteError("NaN in rows 3, 7", ids=[3, 7]), 1),
        (errors.TokenizerMismatchError("token id 1037 is beyond the vocabulary", path="in.jsonl", line=3, limit=1000,
                                       value=1037, what="token id"), 2),
        (errors.ParityError("sdpa over tolerance"), 4),
        (errors.OutputError("locked", path="/x"), 1),
        (errors.OutputExistsError("output /x exists from a completed run", path="/x"), 2),
        (errors.OutputRefused("locked by another run", path="/x"), 2),
        (errors.CheckpointError("cannot read the weights", path="/m"), 2),
        (errors.NewHeadError("no weights for classifier.weight", missing=["classifier.weight"], task="classify"), 2),
        (errors.ModelLoadError("failed the same way under every implementation"), 1),
    ],
)
def test_exit_codes_and_pickling_keep_the_context(err, code):
    assert err.exit_code == code
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and back.__dict__ == err.__dict__


def test_input_error_names_file_line_expected_and_found():
    err = errors.InputError("not valid JSON", path="in.jsonl", line=3, expected="a JSON object", found="'{'")
    assert str(err) == "in.jsonl:3: not valid JSON (expected a JSON object, found '{')"


def test_attention_unavailable_lists_every_reason():
    err = errors.AttentionUnavailable("flash_attention_2", {"flash_attention_2": ["a", "b"], "sdpa": ["c"]})
    text = str(err)
    assert "strict policy" in text and "flash_attention_2: a" in text and "flash_attention_2: b" in text and "sdpa: c" in text
