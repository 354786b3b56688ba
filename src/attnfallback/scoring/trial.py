"""How `score` tries a candidate implementation through its own input path: the verification
forward's inputs (`TaskVerifyInputs`) and the measured choice's bench over the shard's first rows
(`SampleBench`)."""

from __future__ import annotations

import time

import numpy as np

from attnfallback.batching import plan_batches
from attnfallback.errors import NonFiniteError, TokenizerMismatchError
from attnfallback.loader import load_tokenizer
from attnfallback.measure import Measurement, shape_tag
from attnfallback.scoring.chunks import Chunk, PreparedChunk
from attnfallback.scoring.collate import pad_rows
from attnfallback.scoring.limits import clip_max_length
from attnfallback.scoring.tasks import build_task
from attnfallback.scoring.tokenize import TextEncoder
from attnfallback.verify import RECOVERABLE, first_line

SAMPLE_MIN_REPEATS = 2
# A trial's first pass meets the sample's batch shapes for the first time (kernel set-up, cuBLAS's
# choices, a compile): it costs about this many timed passes (H100, Llama-1B, 256 rows: 0.49 s
# against 0.09-0.13 s a pass; bench/NOTES.md, session 24).
FIRST_PASS_COST = 4
SAMPLE_MAX_REPEATS = 5


class SampleBench:
    """The shard's first rows through the scorer's own forward (tokenized once; batched, packed
    and budgeted as each implementation would be): the `fastest.Bench` that `score` measures on.
    A trial's first pass is also its verification: an exception or a non-finite output there
    rejects the candidate with the reason."""

    min_trial_passes = FIRST_PASS_COST + SAMPLE_MIN_REPEATS  # the first (verifying) pass and the timed ones

    def __init__(self, scorer, texts: list[tuple[str, ...]], expected_rows):  # scorer: pipeline.Scorer
        self.scorer = scorer
        self.chunk = Chunk(0, list(range(len(texts))), [tuple(t) for t in texts])
        self.task = scorer.task.name
        self.expected_rows = expected_rows() if callable(expected_rows) else expected_rows
        # tokenized here, in this thread: the tokenizer process may still be starting
        self._encoded = scorer.encoder.encode(self.chunk.texts)
        self.within_limits = scorer.limit_violation(self._encoded) is None
        lengths = self._encoded.lengths
        self.tokens = int(lengths.sum())
        self.mean_length = self.tokens / max(len(self.chunk), 1)
        self.description: dict = {"source": "this shard's first rows", "rows": len(texts), "tokens": self.tokens,
                                  "mean_length": round(self.mean_length, 1), "max_length": int(lengths.max(initial=0))}
        self.expected_tokens: int | None = None
        if self.expected_rows is not None:
            self.expected_tokens = int(self.mean_length * self.expected_rows)
            self.description["expected_rows"] = self.expected_rows

    def tag(self) -> str:
        return shape_tag(self.mean_length)

    def run_rows(self) -> int:
        """Rows of the parts the run's batches are cut from (a part is sorted and batched whole)."""
        part = max(int(getattr(self.scorer.job, "part_rows", 0) or 0), len(self.chunk), 1)
        return min(part, self.expected_rows) if self.expected_rows else part

    def run_padding(self) -> float:
        """Padded tokens per real token in the batches the run would cut, for the current
        implementation: the sample's lengths repeated to a part's rows, planned by the scorer's
        budget. The sample alone is a few hundred rows of every length, so its batches pad far more
        than a part's thousands sorted together: 256 rows of mean 53 tokens go into one 256 x 263
        batch under a 256k-token budget (five padded tokens a real one) and into finely cut ones
        under eager's 16k, which would rank eager first on work the run never does."""
        scorer = self.scorer
        if scorer.pack or not self.tokens:
            return 1.0
        lengths = np.sort(self._encoded.lengths)[::-1]
        repeats = max(1, round(self.run_rows() / max(len(lengths), 1)))
        floor, overhead = scorer.cut_costs()
        slices = plan_batches(np.repeat(lengths, repeats), scorer.batch_tokens, scorer.max_cells,
                              floor_tokens=floor, overhead_tokens=overhead)
        return sum(s.padded_tokens for s in slices) / (repeats * self.tokens)

    def shard_passes(self) -> float | None:
        """What the shard's scoring costs in passes over the sample on the current implementation
        (its expected tokens at the run's padding over the sample's padded tokens); None when the
        shard's size is unknown."""
        if not self.expected_tokens or not self.tokens:
            return None
        _, batches = self.scorer._batched(self._encoded)
        cells = sum(b.cells for b in batches)
        return self.expected_tokens * self.run_padding() / max(cells, 1)

    def _prepared(self) -> PreparedChunk:
        """The sample's batches for the current implementation (tokens reused, batches rebuilt)."""
        order, batches = self.scorer._batched(self._encoded)
        return PreparedChunk(self.chunk, self._encoded, order, batches)

    def _run_once(self, prepared: PreparedChunk) -> tuple[float, list[str]]:
        t0 = time.perf_counter()
        try:
            result = self.scorer.run(prepared)
        except RECOVERABLE as e:  # torch.OutOfMemoryError and kernels refusing a shape are RuntimeErrors
            if self.scorer.on_cuda:
                self.scorer._torch.cuda.empty_cache()
            return 0.0, [f"a forward on this shard's rows failed: {first_line(e)}"]
        except NonFiniteError as e:
            return 0.0, [f"non-finite outputs on this shard's rows ({len(e.ids)} of {len(self.chunk)})"]
        return time.perf_counter() - t0, []

    def switch(self, impl: str) -> list[str]:
        """Run on `impl` from now on; its reasons not to, after one pass over the sample."""
        try:
            self.scorer.use_implementation(impl)
        except RECOVERABLE as e:
            return [f"switch failed: {first_line(e)}"]
        return self._run_once(self._prepared())[1]

    def trial(self, impl: str, seconds: float) -> tuple[Measurement | None, list[str]]:
        scorer = self.scorer
        timing = dict(scorer.timing)
        try:
            return self._trial(impl, seconds)
        finally:
            scorer.timing = timing  # the shard's own account starts after the measurement

    def _trial(self, impl: str, seconds: float) -> tuple[Measurement | None, list[str]]:
        try:
            self.scorer.use_implementation(impl)
        except RECOVERABLE as e:
            return None, [f"switch failed: {first_line(e)}"]
        prepared = self._prepared()
        first, reasons = self._run_once(prepared)
        if reasons:
            return None, reasons
        repeats: list[float] = []
        while len(repeats) < SAMPLE_MAX_REPEATS and (len(repeats) < SAMPLE_MIN_REPEATS or sum(repeats) < seconds):
            elapsed, reasons = self._run_once(prepared)
            if reasons:
                return None, reasons
            repeats.append(elapsed)
        actual = getattr(self.scorer.loaded.model.config, "_attn_implementation", None) or impl
        return Measurement(impl, actual, self.tokens, sum(b.cells for b in prepared.batches), len(prepared.batches),
                           first, repeats, run_padding=self.run_padding()), []


VERIFY_TEXTS = (  # the verification forward's rows, of different lengths (the second is padded)
    ("A longer verification row, so that the other row is padded and the attention mask matters.",),
    ("A short row.",),
)


class TaskVerifyInputs:
    """The loader's verification batch built by the task's own input path (load_model's
    `verify_inputs`): the task's tokenizing (pairs for pairs, with type ids where the model takes
    them), the limits check, its padding and its mask form for the implementation being verified.
    A failure then shows at load, under the candidate that caused it."""

    def __init__(self, task: str, columns: int, max_length: int | None, trust_remote_code: bool = False):
        self.task = task
        self.columns = columns
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.tokenizer = None  # loaded on the first call, then handed to the scorer

    def __call__(self, model, facts) -> tuple[dict, object]:
        import torch

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(facts.ref, self.trust_remote_code)
        task = build_task(self.task, model, self.tokenizer, None, self.columns)
        max_length, _ = clip_max_length(max(self.max_length or task.default_max_length(), 2), task.limits)
        encoder = TextEncoder(self.tokenizer, max_length, task.mode, type_ids=task.accepts_types)
        texts = list(VERIFY_TEXTS) if task.mode == "single" else [t * 2 for t in VERIFY_TEXTS]
        encoded = encoder.encode(texts)
        ids, types, offsets = encoded.flat()
        found = task.limits.violation(ids, types if task.accepts_types else None, offsets, encoded.lengths)
        if found is not None:
            raise TokenizerMismatchError(f"{facts.model_id}: on the verification rows, before any input row: "
                                         f"{found.message(task.limits.model)}", limit=found.limit, value=found.found,
                                         what=found.what)
        rows = np.arange(len(encoded), dtype=np.int64)
        arrays = pad_rows(encoded, rows, int(encoded.lengths.max()), task.pad_id, task.accepts_types)
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        batch["_no_padding"] = False
        return task.model_inputs(batch), batch["attention_mask"].bool()
