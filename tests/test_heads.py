"""Never a made-up number: a head the checkpoint has no weights for is refused before scoring
(exit 2, naming the weights and the task), unless --allow-new-head; a causal LM is asked only of a
causal model; a failure that is not the attention's is not reported as one."""

from __future__ import annotations

import json
import shutil

import pytest

from attnfallback import loader
from attnfallback.cli.app import main
from attnfallback.errors import AttentionUnavailable, CheckpointError, ModelLoadError, NewHeadError
from attnfallback.loader import load_model
from attnfallback.policy import Policy
from attnfallback.scoring import ScoreJob, run_score
from conftest import build_tiny_model
from scoring_helpers import add_sentence_config, read_output, write_csv, write_jsonl


@pytest.fixture
def pairs_csv(tmp_path):
    return write_csv(tmp_path / "pairs.csv", [{"a": f"question {i}", "b": f"an answer, number {i}"} for i in range(4)])


@pytest.fixture
def texts(tmp_path):
    return write_jsonl(tmp_path / "texts.jsonl", [{"text": f"sentence {i} about a cat"} for i in range(4)])


def score_argv(model, input_path, output, *extra):
    return ["score", str(model), "--input", str(input_path), "--output", str(output), "--quiet", "--device", "cpu", *extra]


def test_pairs_on_an_encoder_checkpoint_is_refused_naming_the_head_not_the_attention(pairs_csv, tmp_path, capsys):
    code = main(score_argv("default", pairs_csv, tmp_path / "p.parquet", "--task", "pairs", "--text-columns", "a,b"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "classifier.weight" in err and "task pairs" in err and "--allow-new-head" in err
    assert "attention implementation" not in err and "TypeError" not in err
    assert not (tmp_path / "p.parquet").exists()


def test_pairs_with_allow_new_head_builds_a_one_label_cross_encoder(pairs_csv, tmp_path):
    result = run_score(ScoreJob(model="default", input=str(pairs_csv), output=str(tmp_path / "p.parquet"), task="pairs",
                                text_columns=["a", "b"], device="cpu", quiet=True, allow_new_head=True))
    assert result.rows_written == 4
    out = read_output(tmp_path / "p.parquet")
    assert list(out) == ["id", "score"] and len(out["score"]) == 4  # one label: a score, not a list


def test_classify_on_an_embedding_checkpoint_is_refused(tiny_bert, texts, tmp_path):
    with pytest.raises(NewHeadError) as info:
        run_score(ScoreJob(model=str(tiny_bert), input=str(texts), output=str(tmp_path / "c.parquet"), task="classify",
                           device="cpu", quiet=True))
    assert info.value.exit_code == 2 and info.value.task == "classify"
    assert info.value.missing == ["classifier.bias", "classifier.weight"]
    assert "task classify" in str(info.value) and not (tmp_path / "c.parquet").exists()


def test_logprob_on_bert_is_refused_even_with_allow_new_head(texts, tmp_path, capsys):
    for extra in ((), ("--allow-new-head",)):
        code = main(score_argv("default", texts, tmp_path / "l.parquet", "--task", "logprob", *extra))
        err = capsys.readouterr().err
        assert code == 2, err
        assert "task logprob needs a causal language model" in err and "BertLMHeadModel is not one" in err
    assert not (tmp_path / "l.parquet").exists()


def test_logprob_needs_the_lm_head_loaded_not_made(tmp_path, texts):
    import torch
    from transformers import Qwen2Config, Qwen2Model

    from scoring_helpers import copy_tokenizer

    config = Qwen2Config(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    base = tmp_path / "qwen-base"
    Qwen2Model(config).save_pretrained(base)
    copy_tokenizer(base)
    with pytest.raises(NewHeadError, match=r"task logprob needs \(lm_head\.weight\)"):
        run_score(ScoreJob(model=str(base), input=str(texts), output=str(tmp_path / "a.parquet"), task="logprob", device="cpu", quiet=True))
    result = run_score(ScoreJob(model=str(base), input=str(texts), output=str(tmp_path / "b.parquet"), task="logprob",
                                device="cpu", quiet=True, allow_new_head=True))
    assert result.rows_written == 4


def test_embed_does_not_need_the_pooler(tmp_path, texts):
    """A checkpoint saved from an MLM has no pooler; embeddings pool the hidden states, so they are right."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from scoring_helpers import copy_tokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    mlm = tmp_path / "mlm"
    BertForMaskedLM(config).save_pretrained(mlm)
    copy_tokenizer(mlm)
    add_sentence_config(mlm)
    loaded = load_model(mlm, policy=Policy.graceful(["eager"]), device="cpu")
    reference = BertModel.from_pretrained(mlm, attn_implementation="eager").eval()
    assert torch.equal(loaded.model.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight)
    result = run_score(ScoreJob(model=str(mlm), input=str(texts), output=str(tmp_path / "e.parquet"), device="cpu", quiet=True))
    assert result.rows_written == 4


def test_a_classifier_checkpoint_still_scores(tmp_path, texts):
    model_dir = build_tiny_model(tmp_path / "clf", "bert-classify", num_labels=3)
    result = run_score(ScoreJob(model=str(model_dir), input=str(texts), output=str(tmp_path / "c.parquet"), task="classify",
                                device="cpu", quiet=True))
    assert result.rows_written == 4


def test_load_with_an_auto_class_whose_head_is_missing_exits_2(tiny_bert, capsys):
    code = main(["load", str(tiny_bert), "--auto-class", "AutoModelForSequenceClassification", "--device", "cpu"])
    assert code == 2 and "classifier.weight" in capsys.readouterr().err
    code = main(["load", str(tiny_bert), "--auto-class", "AutoModelForSequenceClassification", "--device", "cpu",
                 "--allow-new-head", "--json"])
    assert code == 0


def test_parity_pairs_on_an_encoder_checkpoint_exits_2(pairs_csv, capsys):
    code = main(["parity", "default", "--input", str(pairs_csv), "--task", "pairs", "--text-columns", "a,b", "--impls", "sdpa",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "classifier.weight" in err and "TypeError" not in err


def test_load_cross_encoder_refuses_a_plain_encoder_and_builds_one_when_allowed():
    pytest.importorskip("sentence_transformers")
    from attnfallback import load_cross_encoder

    with pytest.raises(NewHeadError, match="classifier.weight"):
        load_cross_encoder("default", device="cpu")
    ce = load_cross_encoder("default", "graceful", prefer=["sdpa"], device="cpu", allow_new_head=True)
    scores = ce.predict([("a question", "an answer"), ("another", "one")])
    assert scores.shape == (2,) and ce.attn_decision.used == "sdpa"


# --- failures that are not the attention's ----------------------------------------------------

def test_a_load_failure_every_implementation_shares_is_not_an_attention_failure(monkeypatch, tiny_bert, tmp_path, capsys):
    def bad_kwargs(facts, auto_class, impl, *rest):
        raise TypeError("BertModel.__init__() got an unexpected keyword argument 'num_labels'")

    monkeypatch.setattr(loader, "from_pretrained", bad_kwargs)
    with pytest.raises(ModelLoadError) as info:
        load_model(tiny_bert, policy=Policy.graceful(["flash_attention_2", "sdpa", "eager"]), device="cpu")
    assert not isinstance(info.value, AttentionUnavailable)
    assert "attention is not the cause" in str(info.value) and "num_labels" in str(info.value)
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    code = main(score_argv(tiny_bert, texts, tmp_path / "o.parquet", "--prefer", "sdpa,eager"))
    err = capsys.readouterr().err
    assert code not in (0, 3) and "no preferred attention implementation" not in err


def test_one_implementation_failing_is_still_its_own(monkeypatch, tiny_bert):
    def sdpa_only_fails(facts, auto_class, impl, *rest):
        raise ImportError(f"{impl} kernel missing")

    monkeypatch.setattr(loader, "from_pretrained", sdpa_only_fails)
    with pytest.raises(AttentionUnavailable):  # one implementation, not eager: it may be the kernel
        load_model(tiny_bert, policy=Policy.graceful(["sdpa"]), device="cpu")


def test_a_device_that_is_not_there_exits_2_not_3(capsys):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code = main(["load", "default", "--device", "mps"])
    err = capsys.readouterr().err
    assert code == 2 and "mps" in err and "flash" not in err


def test_a_corrupt_checkpoint_exits_2_not_3(tiny_bert, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(CheckpointError):
        load_model(broken, policy=Policy.graceful(["sdpa", "eager"]), device="cpu")
    code = main(["load", str(broken), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read the weights" in err and "attention" not in err


def test_a_sweep_configuration_may_allow_a_new_head(tmp_path, texts):
    from attnfallback.sweep.config import parse_config

    allowed = parse_config({"output": "out", "input": texts.name, "task": "classify", "allow_new_head": True}, base=tmp_path)
    (job,) = allowed.jobs("r")
    assert json.loads(job.write_job_file().read_text())["allow_new_head"] is True  # the local engine's job file
    assert allowed.specs[0].score_job("r", None, tmp_path / "o.parquet", tmp_path / "ev").allow_new_head  # Ray's job
    plain = parse_config({"output": "out", "input": texts.name, "task": "classify"}, base=tmp_path)
    assert json.loads(plain.jobs("r")[0].write_job_file().read_text())["allow_new_head"] is False
    assert "allow_new_head" not in plain.specs[0].to_dict()  # manifests from before the key still resume


def test_a_causal_lm_with_a_non_causal_part_is_still_a_causal_lm():
    """A multimodal LM's vision tower attends both ways, its language model causally: not refused.
    A model whose attention is causal nowhere (an encoder) is."""
    import torch

    from attnfallback.heads import check_loaded

    def attention(causal: bool):
        module = torch.nn.Module()
        module.is_causal = causal
        return module

    mixed = torch.nn.ModuleDict({"vision": attention(False), "text": attention(True)})
    assert check_loaded(mixed, {"missing_keys": set()}, model_id="m", auto_class="AutoModelForCausalLM", task="logprob") == []
    encoder = torch.nn.ModuleDict({"layer0": attention(False), "layer1": attention(False)})
    with pytest.raises(NewHeadError, match="needs a causal language model"):
        check_loaded(encoder, {"missing_keys": set()}, model_id="m", auto_class="AutoModelForCausalLM", task="logprob",
                     allow_new_head=True)
    assert check_loaded(encoder, {"missing_keys": set()}, model_id="m", auto_class="AutoModel") == []


def test_flash_kernels_failing_alike_are_still_an_attention_failure():
    from attnfallback.loader import Attempt, shared_failure

    same = ["load failed: ImportError: kernel build missing"]
    flash_only = [Attempt("flash_attention_2", "load", False, same), Attempt("flash_attention_3", "load", False, same)]
    assert shared_failure(flash_only) is None
    with_sdpa = [Attempt("flash_attention_2", "load", False, same), Attempt("sdpa", "load", False, same)]
    assert shared_failure(with_sdpa) == same[0]
    assert shared_failure([Attempt("eager", "load", False, same)]) == same[0]
    assert shared_failure([Attempt("sdpa", "load", False, same), Attempt("eager", "verify", True, [])]) is None
