"""The model zoo: one tiny random-weight model per architecture family, with its family's real
tokenizer conventions, and the references users would otherwise call.

    family = FAMILIES["xlm-roberta"]
    model_dir = build(family, "pairs", tmp_path / "xlmr-pairs")     # saved model + tokenizer
    row = run_cell(family, "pairs", "sdpa", model_dir, workdir)      # attnfallback vs CrossEncoder

Tokenizers are trained here, offline, on the STS-B sentences shipped in attnfallback/data (a
WordPiece, Unigram or BPE model of a few hundred tokens) and wrapped in the family's own
transformers tokenizer class, which brings the family's normalizer, pre-tokenizer, special tokens
and post-processor: BERT `[CLS] A [SEP] B [SEP]` with type ids; RoBERTa/XLM-R/MPNet
`<s> A </s></s> B </s>` without them (model_input_names has no token_type_ids); DeBERTa-v2
`[CLS] A [SEP] B [SEP]` with type ids; GPT-2 and Qwen no special tokens; Llama, Mistral and
Gemma a BOS token. Models are built from configs (shapes below) with their heads, and saved with
RoBERTa-style position tables where the family has them (max_position_embeddings = 128 + 2:
positions start at padding_idx + 1). Nothing is fetched.

References, each run in float64 eager (the truth) and in the run's dtype with eager (the bar):
embed: sentence-transformers `encode`; pairs: `CrossEncoder.predict` (raw logits); classify: plain
transformers logits; logprob: a plain transformers log-softmax over the next tokens. A cell passes
when attnfallback's relative L2 error against the float64 reference is within twice the error
eager itself shows in that dtype (never below parity.TOLERANCE_FLOOR[dtype]).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

ENCODER_TASKS = ("embed", "classify", "pairs")
DECODER_TASKS = ("embed", "classify", "pairs", "logprob")
SHAPES = {  # hidden, heads, layers, intermediate; the GPU shape keeps head_dim 64 (flash kernels' sizes)
    "cpu": dict(hidden=64, heads=2, layers=2, intermediate=128),
    "gpu": dict(hidden=128, heads=2, layers=2, intermediate=256),
}
ENCODER_POSITIONS = 128
DECODER_POSITIONS = 256
ROWS = 16  # STS-B pairs per cell: 32 texts (and one long row, truncated)
CLASSIFY_LABELS = 3


@dataclass(frozen=True)
class Family:
    """One architecture family: its config, its tokenizer convention, what it runs."""

    name: str
    model_type: str
    tokenizer: str  # a key of TOKENIZERS
    config: dict = field(default_factory=dict)
    decoder: bool = False
    pooling: str = "mean"  # the sentence-transformers pooling its embedders use
    no_sdpa: str | None = None  # why transformers has no sdpa path for it (then: strict exits 3, graceful runs eager)
    no_flash: str | None = None  # why transformers has no flash path for it
    keeps: str = ""  # what the tiny config keeps of the family, for the README table

    @property
    def tasks(self) -> tuple[str, ...]:
        return DECODER_TASKS if self.decoder else ENCODER_TASKS

    @property
    def refused_tasks(self) -> tuple[str, ...]:
        """Tasks the family cannot do, which must be refused with exit 2 (never a wrong number)."""
        return tuple(t for t in DECODER_TASKS if t not in self.tasks)


FAMILIES = {f.name: f for f in (
    Family("bert", "bert", "bert", dict(type_vocab_size=2), keeps="absolute positions, type ids"),
    Family("roberta", "roberta", "roberta", dict(type_vocab_size=1), keeps="positions from padding_idx + 1, no type ids"),
    Family("xlm-roberta", "xlm-roberta", "xlm-roberta", dict(type_vocab_size=1),
           keeps="Unigram tokenizer, positions from padding_idx + 1, type_vocab_size 1"),
    Family("distilbert", "distilbert", "distilbert", keeps="no type ids (its forward takes none)"),
    Family("mpnet", "mpnet", "mpnet", keeps="relative attention bias, positions from padding_idx + 1",
           no_sdpa="transformers' MPNet has no sdpa path (MPNetModel._supports_sdpa is False)",
           no_flash="transformers' MPNet has no flash path"),
    Family("deberta-v2", "deberta-v2", "deberta", dict(type_vocab_size=2, relative_attention=True, position_biased_input=True,
                                                       pos_att_type=["p2c", "c2p"], max_relative_positions=-1),
           keeps="disentangled attention with an absolute position table and type ids",
           no_sdpa="transformers' DeBERTa-v2 has no sdpa path (disentangled attention, _supports_sdpa is False)",
           no_flash="transformers' DeBERTa-v2 has no flash path"),
    Family("deberta-v3", "deberta-v2", "deberta", dict(type_vocab_size=0, relative_attention=True, position_biased_input=False,
                                                       pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                                                       position_buckets=32, norm_rel_ebd="layer_norm", share_att_key=True),
           keeps="relative positions only (bucketed), type_vocab_size 0: type ids ignored",
           no_sdpa="transformers' DeBERTa-v2 has no sdpa path (disentangled attention, _supports_sdpa is False)",
           no_flash="transformers' DeBERTa-v2 has no flash path"),
    Family("electra", "electra", "electra", dict(type_vocab_size=2, embedding_size=32), keeps="a smaller embedding projected up, type ids"),
    Family("modernbert", "modernbert", "modernbert", dict(global_attn_every_n_layers=2, local_attention=16),
           keeps="rotary positions, local (16-token) and global layers, no type ids"),
    Family("gpt2", "gpt2", "gpt2", decoder=True, pooling="lasttoken",
           keeps="a learned position table (wpe), no special tokens; its forward takes token_type_ids it would look up in the word embeddings"),
    Family("llama", "llama", "llama", dict(num_key_value_heads=1), decoder=True, pooling="lasttoken", keeps="BOS, grouped-query attention"),
    Family("mistral", "mistral", "llama", dict(num_key_value_heads=1, sliding_window=16), decoder=True, pooling="lasttoken",
           keeps="BOS, a 16-token sliding window (rows are longer)"),
    Family("qwen2", "qwen2", "qwen", dict(num_key_value_heads=1), decoder=True, pooling="lasttoken", keeps="no BOS, grouped-query attention"),
    Family("qwen3", "qwen3", "qwen", dict(num_key_value_heads=1), decoder=True, pooling="lasttoken", keeps="q/k norms, explicit head_dim"),
    Family("gemma2", "gemma2", "gemma", dict(num_key_value_heads=1, sliding_window=16, attn_logit_softcapping=1.0,
                                             final_logit_softcapping=2.0, query_pre_attn_scalar=32),
           decoder=True, pooling="lasttoken",
           keeps="attention and final logit soft-capping (thresholds lowered so they change the numbers), sliding window",
           no_sdpa="transformers' Gemma 2 has no sdpa path: sdpa cannot soft-cap attention logits (Gemma2Model._supports_sdpa is False)"),
    Family("gemma3", "gemma3_text", "gemma", dict(num_key_value_heads=1, sliding_window=16, query_pre_attn_scalar=32),
           decoder=True, pooling="lasttoken", keeps="text-only Gemma 3: sliding and global layers, q/k norms"),
    Family("phi3", "phi3", "phi3", dict(num_key_value_heads=1), decoder=True, pooling="lasttoken",
           keeps="fused qkv projection, no BOS, <|endoftext|> padding"),
)}


# --- corpus and tokenizers ---------------------------------------------------------------------


@lru_cache(maxsize=1)
def stsb_pairs() -> tuple[tuple[str, str], ...]:
    """The STS-B test pairs shipped with attnfallback."""
    path = resources.files("attnfallback.data") / "stsb-en-test.csv"
    with open(str(path), encoding="utf-8", newline="") as fh:
        return tuple((r[0], r[1]) for r in csv.reader(fh) if len(r) == 3)


def corpus() -> list[str]:
    return [s for pair in stsb_pairs() for s in pair]


BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


@lru_cache(maxsize=None)
def _trained(kind: str, specials: tuple[str, ...], size: int = 600):
    """A model trained on the corpus: WordPiece vocab, Unigram pieces, or BPE vocab + merges."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=size, special_tokens=list(specials)))
        return tok.get_vocab()
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        unk = next(s for s in specials if "unk" in s.lower())
        tok.train_from_iterator(corpus(), trainers.UnigramTrainer(vocab_size=size, special_tokens=list(specials), unk_token=unk))
        return [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=size, special_tokens=list(specials),
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    elif kind == "metaspace":  # sentencepiece-style BPE with byte fallback (Llama, Gemma)
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=size + 256, special_tokens=list(specials) + BYTE_TOKENS))
    else:
        raise ValueError(kind)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _bert_like(cls_name: str):
    import transformers

    cls = getattr(transformers, cls_name, None) or transformers.BertTokenizer
    return cls(vocab=dict(_trained("wordpiece", ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))), do_lower_case=True)


def _mpnet():
    from transformers import MPNetTokenizer

    return MPNetTokenizer(vocab=dict(_trained("wordpiece", ("<s>", "<pad>", "</s>", "[UNK]", "<mask>"))), do_lower_case=True)


def _roberta():
    from transformers import RobertaTokenizer

    vocab, merges = _trained("bytelevel", ("<s>", "<pad>", "</s>", "<unk>", "<mask>"))
    return RobertaTokenizer(vocab=dict(vocab), merges=list(merges))


def _xlm_roberta():
    from transformers import XLMRobertaTokenizer

    pieces = list(_trained("unigram", ("<s>", "<pad>", "</s>", "<unk>")))
    return XLMRobertaTokenizer(vocab=pieces + [("<mask>", 0.0)])


def _deberta():
    from transformers import DebertaV2Tokenizer

    pieces = list(_trained("unigram", ("[PAD]", "[CLS]", "[SEP]", "[UNK]")))
    return DebertaV2Tokenizer(vocab=pieces + [("[MASK]", 0.0)], unk_id=3)


def _modernbert():
    """ModernBERT ships a generic fast tokenizer: byte-level BPE, a [CLS] A [SEP] B [SEP] template
    with type 0 throughout, model_input_names without token_type_ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    vocab, merges = _trained("bytelevel", ("<|endoftext|>",))
    vocab = dict(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])


def _gpt2():
    from transformers import GPT2Tokenizer

    vocab, merges = _trained("bytelevel", ("<|endoftext|>",))
    # GPT-2 has no pad token; embedders and classifiers pad with <|endoftext|>
    return GPT2Tokenizer(vocab=dict(vocab), merges=list(merges), pad_token="<|endoftext|>")


def _qwen():
    from transformers import Qwen2Tokenizer

    vocab, merges = _trained("bytelevel", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))


def _llama():
    from transformers import LlamaTokenizer

    vocab, merges = _trained("metaspace", ("<unk>", "<s>", "</s>"))
    return LlamaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, pad_token="</s>")


def _phi3():
    from transformers import LlamaTokenizer

    vocab, merges = _trained("metaspace", ("<unk>", "<s>", "</s>", "<|endoftext|>"))
    return LlamaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=False, eos_token="<|endoftext|>",
                          pad_token="<|endoftext|>")


def _gemma():
    from transformers import GemmaTokenizer

    vocab, merges = _trained("metaspace", ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))
    return GemmaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True)


TOKENIZERS = {
    "bert": lambda: _bert_like("BertTokenizer"),
    "distilbert": lambda: _bert_like("DistilBertTokenizer"),
    "electra": lambda: _bert_like("ElectraTokenizer"),
    "mpnet": _mpnet,
    "roberta": _roberta,
    "xlm-roberta": _xlm_roberta,
    "deberta": _deberta,
    "modernbert": _modernbert,
    "gpt2": _gpt2,
    "qwen": _qwen,
    "llama": _llama,
    "phi3": _phi3,
    "gemma": _gemma,
}


def tokenizer_for(family: Family):
    tok = TOKENIZERS[family.tokenizer]()
    tok.model_max_length = DECODER_POSITIONS if family.decoder else ENCODER_POSITIONS
    return tok


# --- models ------------------------------------------------------------------------------------


def make_config(family: Family, tokenizer, shape: str = "cpu", task: str = "embed"):
    """The family's config at the tiny shape, with the tokenizer's vocabulary and special ids."""
    from transformers import AutoConfig

    s = SHAPES[shape]
    kw: dict = dict(vocab_size=len(tokenizer), initializer_range=0.1)
    if family.model_type == "gpt2":
        kw.update(n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["intermediate"], n_positions=DECODER_POSITIONS)
    elif family.model_type == "distilbert":
        kw.update(dim=s["hidden"], n_layers=s["layers"], n_heads=s["heads"], hidden_dim=s["intermediate"],
                  max_position_embeddings=ENCODER_POSITIONS)
    else:
        kw.update(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  intermediate_size=s["intermediate"])
        if family.decoder:
            kw.update(max_position_embeddings=DECODER_POSITIONS, head_dim=s["hidden"] // s["heads"])
        elif family.tokenizer in ("roberta", "xlm-roberta", "mpnet"):  # positions start at padding_idx + 1
            kw.update(max_position_embeddings=ENCODER_POSITIONS + tokenizer.pad_token_id + 1)
        else:
            kw.update(max_position_embeddings=ENCODER_POSITIONS)
    for name in ("pad", "bos", "eos", "cls", "sep"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is not None:
            kw[f"{name}_token_id"] = value
    if family.model_type == "gemma3_text":
        kw["layer_types"] = ["sliding_attention", "full_attention"][: s["layers"]]
    kw.update(family.config)
    if task in ("classify", "pairs"):
        labels = CLASSIFY_LABELS if task == "classify" else 1
        kw.update(num_labels=labels, id2label={i: f"label_{i}" for i in range(labels)},
                  label2id={f"label_{i}": i for i in range(labels)})
    return AutoConfig.for_model(family.model_type, **kw)


def model_class(family: Family, task: str):
    """The transformers class a checkpoint of this family carries for `task` (with its head), or
    None where transformers has none (the task is then refused by the scorer)."""
    import transformers

    auto = {"embed": "AutoModel", "classify": "AutoModelForSequenceClassification", "pairs": "AutoModelForSequenceClassification",
            "logprob": "AutoModelForCausalLM"}[task]
    mapping = getattr(transformers, auto)._model_mapping
    config_class = transformers.AutoConfig.for_model(family.model_type).__class__
    try:
        return mapping[config_class]
    except KeyError:
        return None


def build(family: Family, task: str, directory: Path, shape: str = "cpu", seed: int = 0) -> Path:
    """Save a tiny random model of `family` for `task` (with its head; an embedder with a
    sentence-transformers config) and the family's tokenizer in `directory`."""
    import torch
    import transformers

    from scoring_helpers import add_sentence_config

    tokenizer = tokenizer_for(family)
    config = make_config(family, tokenizer, shape, task)
    cls = model_class(family, task) or transformers.AutoModel._model_mapping[type(config)]
    torch.manual_seed(seed)
    model = cls(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if task == "embed":
        add_sentence_config(directory, pooling=family.pooling, normalize=True, hidden=model.config.hidden_size)
    return directory


def transformers_cannot(family: Family, task: str) -> str | None:
    """Why transformers (this version) cannot build the family's model for `task`, or None."""
    import transformers

    try:
        transformers.AutoConfig.for_model(family.model_type)
    except (KeyError, ValueError) as e:
        return f"transformers {transformers.__version__} does not know model type {family.model_type!r} ({e})"
    if task in family.tasks and model_class(family, task) is None:
        return f"transformers {transformers.__version__} has no {task} class for {family.model_type}"
    return None


# --- inputs ------------------------------------------------------------------------------------


def long_text() -> str:
    """One row longer than every model's positions: truncation must match the reference's."""
    return " ".join(s for pair in stsb_pairs()[100:140] for s in pair)


def cell_inputs(task: str) -> list[tuple[str, ...]]:
    pairs = list(stsb_pairs()[:ROWS])
    if task == "pairs":
        return pairs + [(long_text(), pairs[0][1])]
    return [(s,) for pair in pairs for s in pair] + [(long_text(),)]


def write_inputs(task: str, path: Path) -> Path:
    rows = cell_inputs(task)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"a": r[0], "b": r[1]} if task == "pairs" else {"text": r[0]}) + "\n")
    return path


# --- references --------------------------------------------------------------------------------


def torch_dtype(name: str):
    import torch

    return {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def reference(task: str, model_dir: Path, dtype: str = "float64", device: str = "cpu", impl: str = "eager", batch_size: int = 1) -> np.ndarray:
    """What users would otherwise call, as float64 numpy: embed -> (n, d); pairs -> (n,) raw
    logits; classify -> (n, labels) logits; logprob -> (n,) sums of next-token log-probabilities.

    One row per batch by default: no padding at all, the truth the scorer's padded (or packed)
    batches must reproduce. (Padded batches of a sliding-window model can turn a pad position's
    window into nothing but padding; transformers then gives that position NaN, which the next
    layer spreads to every row of the batch: Mistral and Gemma cross-encoders do it in batches
    whose lengths differ by more than the window.)"""
    import torch

    inputs = cell_inputs(task)
    kwargs = {"attn_implementation": impl}
    if task == "embed":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(model_dir), device=device, model_kwargs=kwargs)
        model.to(torch_dtype(dtype))
        out = model.encode([r[0] for r in inputs], batch_size=batch_size, convert_to_tensor=True)
        return out.double().cpu().numpy()
    if task == "pairs":
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(str(model_dir), device=device, model_kwargs=kwargs)
        model.model.to(torch_dtype(dtype))
        out = model.predict(inputs, batch_size=batch_size, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
        return out.double().cpu().numpy().reshape(-1)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    auto = AutoModelForCausalLM if task == "logprob" else AutoModelForSequenceClassification
    model = auto.from_pretrained(model_dir, dtype=torch_dtype(dtype), **kwargs).to(device).eval()
    results = []
    texts = [r[0] for r in inputs]
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt").to(device)
            logits = model(**enc).logits.double()
            if task == "classify":
                results.append(logits.cpu().numpy())
                continue
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
            results.append((logp * enc["attention_mask"][:, 1:]).sum(dim=1).cpu().numpy())
    return np.concatenate(results, axis=0)


# --- attnfallback ------------------------------------------------------------------------------


OUTPUT_COLUMN = {"embed": "embedding", "classify": "scores", "pairs": "score", "logprob": "logprob_sum"}


def score_job(task: str, model_dir: Path, workdir: Path, impl: str, *, dtype: str = "float32", device: str = "cpu",
              policy: str = "strict", packing: str = "auto", tag: str = ""):
    """The ScoreJob of one cell: attnfallback's real scoring path, with `impl` asked for strictly."""
    from attnfallback.scoring.job import ScoreJob

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / f"in-{task}.jsonl"
    if not source.exists():
        write_inputs(task, source)
    return ScoreJob(model=str(model_dir), input=str(source), output=str(workdir / f"out-{impl}-{packing}{tag}.parquet"), task=task,
                    text_columns=["a", "b"] if task == "pairs" else None, prefer=impl if policy == "strict" else f"{impl},eager", policy=policy, dtype=dtype, device=device,
                    packing=packing, quiet=True, tokenizer_process="auto" if device.startswith("cuda") else "off")


def read_scores(task: str, path) -> np.ndarray:
    import pyarrow.parquet as pq

    column = pq.read_table(path).column(OUTPUT_COLUMN[task]).to_pylist()
    return np.asarray(column, dtype=np.float64)


def score(task: str, model_dir: Path, workdir: Path, impl: str, **kwargs):
    """(outputs as float64 numpy, ScoreResult) of attnfallback scoring the cell's inputs."""
    from attnfallback.scoring.job import run_score

    job = score_job(task, model_dir, workdir, impl, **kwargs)
    result = run_score(job)
    return read_scores(task, job.output), result


# --- comparison --------------------------------------------------------------------------------


def errors(out: np.ndarray, ref: np.ndarray) -> dict:
    """Relative L2 error (the pass measure, as parity's), max abs error, and max abs error over the
    reference's largest magnitude."""
    from attnfallback.parity import relative_l2

    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return {"rel_l2": float("inf"), "max_abs": float("inf"), "rel_max": float("inf"), "shape": [list(out.shape), list(ref.shape)]}
    diff = np.abs(out - ref)
    finite = bool(np.isfinite(out).all())
    scale = float(np.abs(ref).max()) or 1.0
    return {"rel_l2": relative_l2(out, ref) if finite else float("inf"), "max_abs": float(diff.max()) if finite else float("inf"),
            "rel_max": float(diff.max()) / scale if finite else float("inf")}


def bar(eager_error: float, dtype: str) -> float:
    """Twice the error eager itself shows in `dtype`, never below the parity floor."""
    from attnfallback.parity import TOLERANCE_FLOOR

    return 2 * max(eager_error, TOLERANCE_FLOOR[dtype])


@dataclass
class Report:
    """Rows of the matrix (family x task x implementation), printed and written as JSON when
    $ATTNFALLBACK_ZOO_REPORT names a file."""

    rows: list = field(default_factory=list)
    device: str | None = None  # set: every row is written as it comes, so a run cut short keeps its rows

    def add(self, **row) -> dict:
        self.rows.append(row)
        if self.device is not None:
            self.write(environment(self.device))
        return row

    def table(self) -> str:
        head = ("family", "task", "impl", "dtype", "status", "rel_l2", "bar", "max_abs", "note")
        lines = ["  ".join(head)]
        for r in sorted(self.rows, key=lambda r: (r["family"], r["task"], r["impl"])):
            number = (lambda v: "" if v is None else f"{v:.2e}")
            lines.append("  ".join(str(x) for x in (r["family"], r["task"], r["impl"], r.get("dtype", ""), r["status"],
                                                      number(r.get("rel_l2")), number(r.get("bar")), number(r.get("max_abs")),
                                                      r.get("note", ""))))
        return "\n".join(lines)

    def write(self, environment: dict) -> str | None:
        target = os.environ.get("ATTNFALLBACK_ZOO_REPORT")
        if not target or not self.rows:
            return None
        path = Path(target)
        existing = json.loads(path.read_text()) if path.is_file() else {}
        rows = [r for r in existing.get("rows", []) if (r["family"], r["task"], r["impl"], r.get("device")) not in
                {(x["family"], x["task"], x["impl"], x.get("device")) for x in self.rows}] + self.rows
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": {**existing.get("environment", {}), **environment}, "rows": rows}, indent=1))
        return str(path)


def environment(device: str) -> dict:
    import platform

    import sentence_transformers
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "sentence_transformers": sentence_transformers.__version__}
    from attnfallback.caps import probe_software

    env["flash_attn_4"] = probe_software().flash_attn_4
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return {device.split(":")[0]: env}


# --- one cell of the matrix --------------------------------------------------------------------


@dataclass
class CellReference:
    """The truth (float64 eager, one row per batch) and the bar: twice the error of the same
    library, eager, in the run's dtype."""

    truth: np.ndarray
    eager_error: float
    bar: float
    dtype: str


def cell_reference(task: str, model_dir: Path, dtype: str, device: str) -> CellReference:
    truth = reference(task, model_dir, "float64", device)
    eager = reference(task, model_dir, dtype, device)
    error = errors(eager, truth)["rel_l2"]
    return CellReference(truth, error, bar(error, dtype), dtype)


def expected_unavailable(family: Family, impl: str) -> str | None:
    if impl == "sdpa":
        return family.no_sdpa
    if impl.startswith("flash"):
        return family.no_flash
    return None


def check_impl(family: Family, task: str, impl: str, model_dir: Path, workdir: Path, ref: CellReference, *,
               device: str = "cpu", packing: str = "auto", label: str | None = None) -> tuple[dict, np.ndarray | None]:
    """Score the cell with `impl` asked for strictly; the report row and the outputs (None when the
    implementation was refused: exit 3 with its reasons, which the row keeps)."""
    from attnfallback.errors import AttentionUnavailable

    row = dict(family=family.name, task=task, impl=label or impl, dtype=ref.dtype, device=device.split(":")[0],
               eager_rel_l2=ref.eager_error, bar=ref.bar)
    try:
        out, result = score(task, model_dir, workdir, impl, dtype=ref.dtype, device=device, packing=packing, tag=label or "")
    except AttentionUnavailable as e:
        reasons = "; ".join(f"{k}: {r}" for k, rs in e.reasons.items() for r in rs)
        return {**row, "status": "unavailable", "note": reasons[:300], "rel_l2": None, "max_abs": None}, None
    measured = errors(out, ref.truth)
    status = "pass" if measured["rel_l2"] <= ref.bar else "FAIL"
    note = f"packing {result.task.get('packing')}; used {result.decision.get('used')}"
    return {**row, **measured, "status": status, "note": note, "packing": result.task.get("packing")}, out


def report_fixture(device: str):
    """A module-scoped fixture collecting the module's rows; at its end, with
    $ATTNFALLBACK_ZOO_REPORT set, the table is printed and the rows written there as JSON."""
    import pytest

    @pytest.fixture(scope="module")
    def zoo_report(request):
        report = Report(device=device if os.environ.get("ATTNFALLBACK_ZOO_REPORT") else None)
        yield report
        written = report.write(environment(device))
        if written:
            terminal = request.config.pluginmanager.get_plugin("terminalreporter")
            text = f"\nmodel zoo ({device}): {len(report.rows)} rows -> {written}\n{report.table()}\n"
            terminal.write(text) if terminal is not None else print(text)

    return zoo_report
