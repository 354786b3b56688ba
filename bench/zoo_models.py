"""Random-weight models of real shapes for the benchmarks, built from configs (no hub), and documents
of real English text (STS-B sentences joined).

    from zoo_models import build_model, MODELS, stsb_documents
    path = build_model("modernbert-base-random", Path("/tmp/m"), device="cuda")

Every model is saved with the MiniLM tokenizer (vocab 30522, from the embedded default model): its
shape is the real model's, the vocabulary (the embedding table and, for causal LMs, the LM head) is
that tokenizer's. These are shapes the scorer was not tuned on (sessions 1-7 tuned MiniLM, BERT-base
and Qwen2-0.5B).

| name | shape | task | baseline |
|---|---|---|---|
| modernbert-base-random | ModernBERT-base: 22 layers, hidden 768, 12 heads, local/global attention | embed | sentence-transformers encode |
| xlmr-base-cross-random | XLM-RoBERTa-base cross-encoder: 12 layers, hidden 768, 1 label, no type ids | pairs | CrossEncoder.predict |
| llama-1b-random | Llama-3.2-1B: 16 layers, hidden 2048, 32 heads, 8 KV heads | logprob | plain transformers |
| qwen3-0.6b-reward-random | Qwen3-0.6B reward model: 28 layers, hidden 1024, 16 heads, 8 KV heads, 1 label | classify | plain transformers |
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "modernbert-base-random": "embed",
    "xlmr-base-cross-random": "pairs",
    "llama-1b-random": "logprob",
    "qwen3-0.6b-reward-random": "classify",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _config(name: str, layers: int | None):
    from transformers import LlamaConfig, ModernBertConfig, Qwen3Config, XLMRobertaConfig

    if name == "modernbert-base-random":
        return ModernBertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=layers or 22, num_attention_heads=12,
                                intermediate_size=1152, max_position_embeddings=8192, pad_token_id=0, bos_token_id=101,
                                eos_token_id=102, cls_token_id=101, sep_token_id=102)
    if name == "xlmr-base-cross-random":
        return XLMRobertaConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=layers or 12, num_attention_heads=12,
                                intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=0,
                                num_labels=1)
    if name == "llama-1b-random":
        return LlamaConfig(vocab_size=30522, hidden_size=2048, num_hidden_layers=layers or 16, num_attention_heads=32,
                           num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=131072, rope_theta=500000.0,
                           tie_word_embeddings=True, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if name == "qwen3-0.6b-reward-random":
        return Qwen3Config(vocab_size=30522, hidden_size=1024, num_hidden_layers=layers or 28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
                           tie_word_embeddings=True, pad_token_id=0, num_labels=1)
    raise SystemExit(f"unknown model {name}; known: {', '.join(MODELS)}")


def build_model(name: str, directory: Path, *, device: str = "cpu", layers: int | None = None) -> Path:
    """Build `name` with random weights (bf16 on CUDA, where init is fast), save it with the MiniLM
    tokenizer, and for embedders a sentence-transformers mean-pooling config. Returns `directory`."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModel,
    )

    if (directory / "config.json").is_file():
        return directory
    config = _config(name, layers)
    auto = {"embed": AutoModel, "pairs": AutoModelForSequenceClassification, "classify": AutoModelForSequenceClassification,
            "logprob": AutoModelForCausalLM}[MODELS[name]]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = auto.from_config(config)
    finally:
        torch.set_default_dtype(before)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    del model
    copy_tokenizer(directory)
    if MODELS[name] == "pairs":  # XLM-R's tokenizer emits no type ids (its model has one type)
        tok_config = json.loads((directory / "tokenizer_config.json").read_text())
        tok_config["model_input_names"] = ["input_ids", "attention_mask"]
        (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    if MODELS[name] == "embed":
        sentence_config(directory, config.hidden_size)
    return directory


def copy_tokenizer(directory: Path) -> Path:
    """The embedded MiniLM's tokenizer files into a model directory."""
    from attnfallback.model_facts import default_model_path

    src = default_model_path()
    for file in TOKENIZER_FILES:
        if (src / file).exists():
            shutil.copy(src / file, directory / file)
    return directory


def sentence_config(directory: Path, width: int) -> Path:
    """A sentence-transformers mean-pooling configuration for the model in `directory`."""
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": width, "pooling_mode": "mean"}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    return directory


def json_tail(text: str) -> dict | None:
    """The JSON object a command printed last (from its first `{` to its last `}`), or None."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:text.rindex("}") + 1])
    except ValueError:
        return None


def stsb_sentences() -> list[str]:
    """Both sentences of every STS-B test pair (the packaged copy, else ../shared)."""
    from importlib import resources

    candidates = [Path(str(resources.files("attnfallback") / "data" / "stsb-en-test.csv")),
                  REPO.parent / "shared" / "data" / "stsb" / "stsb-en-test.csv"]
    for path in candidates:
        if path.is_file():
            with open(path, encoding="utf-8", newline="") as fh:
                rows = [r for r in csv.reader(fh) if r]
            return [r[0] for r in rows] + [r[1] for r in rows]
    sys.exit("STS-B test split not found (attnfallback/data/stsb-en-test.csv or ../shared/data/stsb)")


def stsb_documents(n: int, mean_sentences: float, seed: int = 0, max_sentences: int = 64) -> list[str]:
    """`n` documents of STS-B sentences joined; sentence counts geometric around `mean_sentences`
    (so lengths vary as real passages do), seeded."""
    sentences = stsb_sentences()
    rng = random.Random(seed)
    p = 1.0 / max(mean_sentences, 1.0)
    docs = []
    for _ in range(n):
        count = 1
        while rng.random() > p and count < max_sentences:
            count += 1
        docs.append(" ".join(rng.choice(sentences) for _ in range(count)))
    return docs


def write_input(path: Path, docs: list[str], task: str) -> Path:
    """A JSONL input for `task`: {"id", "text"} rows, or {"id", "a", "b"} for pairs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i, doc in enumerate(docs):
            if task == "pairs":
                cut = doc.find(" ", len(doc) // 3)  # a query and its passage
                cut = cut if cut > 0 else len(doc) // 2
                row = {"id": f"r{i}", "a": doc[:cut], "b": doc[cut:].strip() or doc}
            else:
                row = {"id": f"r{i}", "text": doc}
            fh.write(json.dumps(row) + "\n")
    return path
