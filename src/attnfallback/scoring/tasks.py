"""The four scoring tasks: what each loads, how it tokenizes, what it computes, what it writes.

    embed     AutoModel + the model's sentence-transformers pooling (modules.json, 1_Pooling,
              Normalize) -> `embedding` (list<float32>)
    classify  AutoModelForSequenceClassification logits -> `score` (one label) or `scores` + `label`
    pairs     the same over two text columns (cross-encoder) -> `score` (or `scores` + `label`)
    logprob   AutoModelForCausalLM log-likelihood of the text, or of the completion given the
              prompt (`--text-columns prompt,completion`) -> `logprob_sum`, `logprob_mean`, `tokens`

Every output is computed in float32 on the device, whatever the model's dtype. The tokenizing is
tokenize.py's, the padded and packed batches collate.py's, embed's pooling config st_config.py's;
`fuse_kernels` puts the model's norms, MLPs and the logprob head on fused_ops.py's kernels.
"""

from __future__ import annotations

import numpy as np

from attnfallback import arrow_build
from attnfallback.errors import UnknownNameError, UsageError
from attnfallback.fused_ops import (  # the head's shape constants: module globals here, so bench/loop_levers.py can set them
    HEAD_ALIGN,
    LOGITS_CHUNK_TOKENS,
    TorchKernels,
    checked_logprob_kernel,
    compile_key,
    compiling_here,
    config_shapes,
    device_label,
    finish_background_compile,
    fuse_modules,
    fused_mode,
    is_compiled,
    is_gated_silu_mlp,
    is_rms_norm,
    mark_compiled,
    triton_kernels,
    start_compile_process,
    unavailable_reason,
    wait_for_compile,
    warm_failure,
    warm_in_background,
)
from attnfallback.model_facts import text_config
from attnfallback.scoring.collate import (
    accepts_argument,
    accepts_kwargs,
    has_local_attention,
    supports_varlen,
    takes_token_types,
)
from attnfallback.scoring.limits import model_limits
from attnfallback.scoring.st_config import POOLING_MODES, SentenceConfig, read_sentence_config
from attnfallback.scoring.tokenize import Encoded
from attnfallback.task_names import TASKS

AUTO_CLASSES = {
    "embed": "AutoModel",
    "classify": "AutoModelForSequenceClassification",
    "pairs": "AutoModelForSequenceClassification",
    "logprob": "AutoModelForCausalLM",
}
_UNSUPPORTED_LOGIT_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def parse_task(name: str) -> str:
    """The task `name` names (case and surrounding spaces ignored), else UnknownNameError."""
    text = str(name).strip().lower()
    if text not in TASKS:
        raise UnknownNameError("task", str(name), TASKS)
    return text


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
                columns[f.name] = arrow_build.float_lists(value)
            else:
                columns[f.name] = arrow_build.of_type(value, f.type)
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
        if not (accepts_argument(forward, "position_ids") and accepts_kwargs(forward)):
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
        self._base_takes_use_cache = base is not None and accepts_argument(base.forward, "use_cache")

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
        if not (accepts_argument(base.forward, "position_ids") and accepts_kwargs(base.forward)):
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
            return {"score": arrow_build.numeric(outputs["score"], pa.float32())}
        scores = outputs["scores"]
        best = np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1) if len(scores) else np.zeros(0, dtype=np.int64)
        labels = np.asarray(self.labels, dtype=object)[best] if len(scores) else np.zeros(0, dtype=object)
        return {"scores": arrow_build.float_lists(scores), "label": arrow_build.strings(labels.tolist())}

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
        self.vocab_size = int(getattr(self.head, "out_features", None) or getattr(text, "vocab_size", 0) or 0)
        self.token_logprobs = TorchKernels().token_logprobs  # (rows, vocab) logits, targets -> float32 log p
        self.fused_head = False
        self._aligned_head = None  # (weight, bias) zero-padded to HEAD_ALIGN columns, see align_head
        param = next(model.parameters(), None)
        if self.chunked and param is not None and param.is_cuda:
            self.align_head(HEAD_ALIGN)

    def align_head(self, multiple: int) -> int | None:
        """Run the head's matrix product on a copy of its weight padded with zero rows to a multiple
        of `multiple` outputs; the logits are a view of the first vocab_size columns, so nothing
        downstream changes. Returns the padded width, None where there is nothing to pad (or
        `multiple` is 1: back to the head itself)."""
        import torch

        self._aligned_head = None
        weight = getattr(self.head, "weight", None)
        if not self.chunked or weight is None or multiple <= 1 or weight.dim() != 2 or not isinstance(self.head, torch.nn.Linear):
            return None
        extra = -weight.shape[0] % multiple
        if not extra:
            return None
        with torch.no_grad():
            padded = torch.cat([weight, weight.new_zeros(extra, weight.shape[1])])
            bias = None if self.head.bias is None else torch.cat([self.head.bias, self.head.bias.new_zeros(extra)])
        self._aligned_head = (padded, bias)
        return int(padded.shape[0])

    def head_logits(self, hidden):
        """The head's logits for (positions, hidden) rows: (positions, vocab_size), rows maybe strided."""
        if self._aligned_head is None:
            return self.head(hidden)
        import torch

        weight, bias = self._aligned_head
        return torch.nn.functional.linear(hidden, weight, bias)[:, : self.vocab_size]

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
                picked = self.token_logprobs(self.head_logits(flat.index_select(0, select[start:stop])), targets[start:stop])
                sums.index_add_(0, row_of[start:stop], picked)
        else:
            logits = self.model(**inputs).logits
            flat = logits.reshape(-1, logits.shape[-1])
            for start in range(0, total, LOGITS_CHUNK_TOKENS):
                stop = min(start + LOGITS_CHUNK_TOKENS, total)
                picked = self.token_logprobs(flat.index_select(0, select[start:stop]), targets[start:stop])
                sums.index_add_(0, row_of[start:stop], picked)
        counts = batch["_counts"]
        mean = sums / counts.clamp(min=1).to(torch.float32)
        mean = torch.where(counts > 0, mean, torch.full_like(mean, float("nan")))
        return {"logprob_sum": sums, "logprob_mean": mean, "tokens": counts.to(torch.float32)}

    def to_arrow(self, outputs):
        import pyarrow as pa

        return {
            "logprob_sum": arrow_build.numeric(outputs["logprob_sum"], pa.float32()),
            "logprob_mean": arrow_build.numeric(outputs["logprob_mean"], pa.float32()),
            "tokens": arrow_build.numeric(outputs["tokens"], pa.int32()),
        }

    def describe(self):
        return {"task": self.name, "mode": self.mode, "chunked_head": self.chunked, "fused_head": self.fused_head,
                "head_columns": int(self._aligned_head[0].shape[0]) if self._aligned_head is not None else self.vocab_size}


def not_compiled_yet(model, task: Task, device, env=None) -> str | None:
    """Under ATTNFALLBACK_FUSED=auto, why this shard runs unfused: the kernels for this model's
    shapes are not compiled on this machine (or its shared cache) yet, or their compile failed."""
    if fused_mode(env) != "auto":
        return None
    if is_compiled(_compile_key(model, task, device), env):
        return None
    failed = warm_failure()
    if failed is not None:
        return f"the fused kernels' compile failed: {failed}"
    return "the fused kernels are not compiled on this machine yet"


def compile_for_the_next_shards(model, task: Task, device, env=None) -> str:
    """Where this shard runs unfused: the kernels compile for the shards after it, in the process
    the shard started at its start (fused_ops.start_compile_process) or on a thread of this one;
    else such a process starts now. Says which, for the report."""
    widths, vocab = _kernel_shapes(model, task)
    dtype = str(model.dtype).removeprefix("torch.")
    if compiling_here(dtype, widths, vocab, str(device)):
        return "they compile in a process of their own for the shards after it"
    started = start_compile_process(dtype, widths, vocab, str(device), env)
    if started == "started":
        return "they compile in a process of their own for the shards after it"
    return f"they are not compiled for the shards after it either: {started}"


# A first shard waits for the background compile when its expected work, the model's parameters
# times the tokens it will score, is at least this: on the H200 and H100 (bench/NOTES.md, sessions 15-18)
# a cold compile takes 1.3-2.3 s, about half of it hidden by the model's load, and fusing takes
# 27% (Llama-1B) to 48% (Qwen3-0.6B) off the scoring loop, so the wait pays from a loop of about
# 5 s: Llama-1B's at 1e15 (about 19,000 documents of 50 tokens). A slower GPU scores the same
# work for longer against the same compile (the CPU's), so the bound errs on the side of waiting less.
FUSE_WAIT_MIN_WORK = 1e15
FUSE_WAIT_LIMIT_S = 10.0  # a compile still running after this leaves the shard unfused


def fusable(model, task: Task) -> bool:
    """Whether anything of this model and task would run on the fused kernels: a logprob head, or
    an RMSNorm or gated-SiLU MLP instance (an encoder with LayerNorms and GELU has none)."""
    if isinstance(task, LogprobTask) and task.vocab_size:
        return True
    return any(is_rms_norm(m) or is_gated_silu_mlp(m) for m in model.modules())


def wait_pays(model, task: Task, expected_tokens: int | None) -> str | None:
    """Why a first shard (kernels not compiled yet) should wait for the compile and fuse, or None:
    its expected work reaches FUSE_WAIT_MIN_WORK and something would run fused."""
    if not expected_tokens:
        return None
    work = expected_tokens * sum(p.numel() for p in model.parameters())
    if work < FUSE_WAIT_MIN_WORK or not fusable(model, task):
        return None
    return (f"the shard's expected work ({expected_tokens:,} tokens through {work / expected_tokens / 1e9:.2f}B parameters) "
            f"pays for waiting for the fused kernels' compile")


def fuse_kernels(model, task: Task, device, kernels=None, expected_tokens: int | None = None) -> dict:
    """Run `model`'s RMSNorms, gated-SiLU MLPs and a logprob task's head on the fused kernels
    (fused_ops.py) where they run here and agree with the model's own code: what runs fused, what
    was left and why. `kernels`: these instead of Triton's where they run (tests).
    `expected_tokens`: the shard's, which decide whether a first shard waits for the compile (wait_pays)."""
    waited = {}
    if kernels is None:
        reason = unavailable_reason(device)
        if reason is not None:
            return {"kernels": None, "why_not": reason}
        try:
            not_yet = not_compiled_yet(model, task, device)
            pays = wait_pays(model, task, expected_tokens) if not_yet is not None else None
            if pays is not None and warm_failure() is None:
                widths, vocab = _kernel_shapes(model, task)
                dtype = str(model.dtype).removeprefix("torch.")
                seconds = wait_for_compile(_compile_key(model, task, device), dtype, widths, vocab, str(device), FUSE_WAIT_LIMIT_S)
                if seconds is None:  # no process started at the shard's start (a hub model's config not here yet)
                    warm_in_background(dtype, widths, vocab, device=str(device))
                    seconds = finish_background_compile(FUSE_WAIT_LIMIT_S)
                waited = {"waited": pays, "waited_s": round(seconds, 3)}
                not_yet = not_compiled_yet(model, task, device)
            if not_yet is not None and not fusable(model, task):
                not_yet = "nothing of this model runs on the fused kernels (no RMSNorm, gated-SiLU MLP or logprob head)"
            elif not_yet is not None and warm_failure() is None:
                not_yet = f"{not_yet}: {compile_for_the_next_shards(model, task, device)} (ATTNFALLBACK_FUSED=on waits for them)"
        except Exception as e:  # noqa: BLE001 - the kernels' bookkeeping never fails a shard: it runs unfused
            not_yet = f"the fused kernels' cache could not be read: {type(e).__name__}: {e}"
        if not_yet is not None:
            return {"kernels": None, "why_not": not_yet, **waited}
        try:
            kernels = triton_kernels()
        except Exception as e:  # noqa: BLE001 - an installed Triton that does not import leaves the model as it is
            return {"kernels": None, "why_not": f"Triton did not import: {type(e).__name__}: {e}"}
    report = fuse_modules(model, kernels).describe()
    if isinstance(task, LogprobTask) and task.vocab_size:
        kernel, why = checked_logprob_kernel(kernels, device, task.vocab_size, getattr(model, "dtype", None))
        if kernel is not None:
            task.token_logprobs, task.fused_head = kernel, True
        report["logprob_head"] = "fused" if kernel is not None else why
    if kernels.name == "triton" and (report["fused"] or getattr(task, "fused_head", False)):
        mark_compiled(_compile_key(model, task, device))  # compiled in this process: the next shard needs no wait
    return {**report, **waited}


def _kernel_shapes(model, task: Task) -> tuple[tuple, int | None]:
    """The norm widths and (a logprob task's) vocabulary the fused kernels compile for."""
    config = getattr(model, "config", None)
    widths, vocab = config_shapes(config.to_dict() if hasattr(config, "to_dict") else {})
    return widths, vocab if isinstance(task, LogprobTask) else None


def _compile_key(model, task: Task, device) -> str:
    return compile_key(device_label(device), model.dtype, *_kernel_shapes(model, task))


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
