"""The scorer: a model loaded once through the fallback, and the loop that feeds it.

    rows -> chunks --(worker thread: tokenize (on CUDA in a child process), length sort,
    token-budget batches, pinned tensors; on CUDA the run's first part in pieces)-->
    bounded queue --(this thread: non-blocking copy, forward under inference_mode, outputs kept on
    the device)--> one asynchronous copy to the host per chunk --(finisher thread on CUDA: inverse
    permutation, finiteness, Arrow columns)--> results in order

The forward thread never waits on the host per batch; a chunk's outputs come back in one copy,
turned into columns while the next chunk runs. Nothing runs on the GPU before the first part is
tokenized, so on CUDA that part is prepared in pieces by character count (`lead_pieces`): the
GPU starts on the longest rows while the shorter ones are tokenized, and since each piece holds
rows of similar length, the pieces pad about as little as the whole part sorted at once.
On CUDA out-of-memory a batch is split in halves and retried (an `oom_split` event), down to a
single row, so no row is ever dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from attnfallback import arrow_build
from attnfallback.batching import (
    body_parameters,
    cut_costs,
    cut_scale,
    default_batch_tokens,
    eager_max_cells,
    ffn_width,
    length_order,
    plan_batches,
)
from attnfallback.errors import NonFiniteError, TokenizerMismatchError, UsageError, is_fatal_device_error
from attnfallback.kernel_variants import declared_shape, padded_boundaries, shape_mode
from attnfallback.loader import load_model
from attnfallback.model_facts import text_config
from attnfallback.policy import Policy, parse_dtype
from attnfallback.scoring.chunks import Chunk, HostBatch, PreparedChunk
from attnfallback.scoring.collate import check_packing_mode, pack_rows, pad_rows, supports_varlen
from attnfallback.scoring.inputs import DEFAULT_ID_COLUMN, InputSpec, rows_of_table
from attnfallback.scoring.limits import clip_max_length
from attnfallback.scoring.tasks import AUTO_CLASSES, Task, build_task, fuse_kernels, parse_task
from attnfallback.scoring.tokenize import Encoded, TextEncoder
from attnfallback.scoring.tokenizer_process import ChildDied, ProcessEncoder, check_tokenizer_process_mode, process_obstacle
from attnfallback.scoring.trial import SampleBench, TaskVerifyInputs
from attnfallback.sdpa_order import describe as sdpa_order_note
from attnfallback.sdpa_order import sdpa_order

log = logging.getLogger("attnfallback")

QUEUE_CHUNKS = 2  # chunks (or pieces of the first) tokenized ahead of the forward pass
# The run's first part on CUDA: pieces holding these shares of its characters, longest rows first,
# then the rest; each piece holds at least LEAD_MIN_ROWS rows (see lead_pieces). One
# eighth, then the rest: the GPU starts after an eighth of the tokenizing; more pieces only add
# forwards, which cost a launch-bound model host time (bench/NOTES.md, v13)
LEAD_FRACTIONS = (1 / 8,)
LEAD_MIN_ROWS = 32
PACKING_CHECK_TEXTS = (  # rows of different lengths: packed and padded outputs must agree on them
    ("Attention fallback packing check: the third row is the longest of these three.",),
    ("Short row.",),
    ("A longer row, so that the packed sequence holds rows of three different lengths, and every row "
     "after the first would see its neighbours if the kernel ignored the boundaries between rows.",),
)


@dataclass
class Launched:
    """A chunk whose batches are queued on the device, its outputs on their way to the host."""

    prepared: PreparedChunk
    host: dict  # output name -> host tensor (pinned on CUDA; filled once `event` has passed)
    event: object | None
    keep: list
    oom_splits: int
    seconds: float


@dataclass
class ChunkResult:
    """Outputs of one chunk in input order, and what it took."""

    chunk: Chunk
    columns: dict  # output name -> pyarrow array
    nonfinite: np.ndarray  # bool per row
    tokens: int
    padded_tokens: int
    truncated: int
    batches: int
    oom_splits: int
    seconds: float


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


class Scorer:
    """A model loaded once (through `load_model`), reusable across chunks and tables (Ray actors).

    `decision` is the loader's Decision; `output_schema` the output's Arrow schema (id first).
    """

    def __init__(self, loaded, job, task: Task, max_length: int, batch_tokens: int, max_cells: int | None):
        import torch

        self.loaded = loaded
        self.job = job
        self.task = task
        self.max_length = max_length
        self.batch_tokens = batch_tokens
        self.max_cells = max_cells
        self.device = loaded.device
        self.on_cuda = self.device.type == "cuda"
        self.encoder = TextEncoder(loaded.tokenizer, max_length, task.mode, type_ids=task.accepts_types)
        self.with_types = task.accepts_types
        self.max_length_note: str | None = None  # why max_length is below what was asked (clip_max_length)
        self.flag_nonfinite = job.on_nonfinite == "flag"
        self.sink = loaded.sink
        self.oom_splits = 0
        self.id_type = "int64"
        self.packing = getattr(job, "packing", "auto")
        self.pack = False  # batches packed padding-free (see refresh_packing)
        self.floor_tokens: int | None = None  # plan_batches' floor and per-batch overhead (None: from cut_scale)
        self.overhead_tokens: int | None = None
        self.cut_scale = cut_scale(body_parameters(loaded.model))  # a heavier model's batches are cut finer
        # the run's first part in pieces (CUDA: the GPU would wait for all of its tokenizing)
        self.lead_fractions: tuple[float, ...] = LEAD_FRACTIONS if self.on_cuda else ()
        self.packing_note = "off"
        self.fused: dict = {"kernels": None, "why_not": "not asked"}  # fuse_kernels' report (for_loaded)
        self.flash_shapes = shape_mode()  # packed batches' declared shapes (kernel_variants.py)
        self._packing_checked: dict[str, str | None] = {}  # impl -> None (agrees) or why not
        self.tokenizer_process = check_tokenizer_process_mode(getattr(job, "tokenizer_process", "auto"))
        self.tokenizer_note = "in the worker thread" + (" (turned off)" if self.tokenizer_process == "off" else "")
        self._child = None  # the ProcessEncoder, when tokenizing runs in a child process
        if self.on_cuda and self.tokenizer_process == "auto":
            self.start_tokenizer_process()
        # where the time goes (seconds): prepare on the worker, waiting for it, launch, finish
        self.timing = {"prepare_s": 0.0, "wait_s": 0.0, "launch_s": 0.0, "finish_s": 0.0}
        self._torch = torch

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_job(cls, job, *, loaded=None, sink=None, sample_texts: list[tuple[str, ...]] | None = None,
                 expected_rows=None, facts=None) -> Scorer:
        """Load `job.model` for `job.task` through the fallback (or wrap an already loaded model).
        `sample_texts`: the shard's first rows, on which the viable candidates are timed through
        this scorer's own forward when the policy measures (fastest.py); `expected_rows`: the
        shard's rows (or a callable giving them once the model has loaded), which set the
        measuring budget."""
        task_name = parse_task(job.task)
        columns = len(job.text_columns) if job.text_columns else 1
        if job.on_nonfinite not in ("error", "flag"):
            raise UsageError(f"--on-nonfinite must be error or flag, found {job.on_nonfinite!r}")
        if loaded is not None:
            return cls.for_loaded(loaded, job, task_name)
        built: list[Scorer] = []
        verifier = TaskVerifyInputs(task_name, columns, job.max_length, job.trust_remote_code)

        def bench_factory(loaded_model):
            loaded_model.adopt_tokenizer(verifier.tokenizer)
            built.append(cls.for_loaded(loaded_model, job, task_name, fuse=False))
            bench = SampleBench(built[0], sample_texts, expected_rows) if sample_texts else None
            # fused before the candidates are timed, knowing the shard's size: a long first shard waits for the compile
            built[0].fuse(expected_tokens=bench.expected_tokens if bench is not None else None)
            # rows the model's tables cannot take are the run's error to report, with their lines
            return bench if bench is not None and bench.within_limits else None

        loaded = load_model(
            job.model,
            revision=job.revision,
            auto_class=AUTO_CLASSES[task_name],
            dtype=parse_dtype(job.dtype),
            device=job.device,
            policy=Policy.resolve(mode=job.policy, prefer=job.prefer, measure=getattr(job, "measure", None)),
            events=job.events,
            run_id=job.run_id,
            shard=job.shard,
            trust_remote_code=job.trust_remote_code,
            model_kwargs=model_kwargs_for(task_name, job, facts),
            sink=sink,
            allow_new_head=getattr(job, "allow_new_head", False),
            task=task_name,
            bench_factory=bench_factory,
            facts=facts,
            verify_inputs=verifier,
        )
        loaded.adopt_tokenizer(verifier.tokenizer)  # read once, for the verification forward
        if not built:
            return cls.for_loaded(loaded, job, task_name)
        scorer = built[0]
        if scorer.loaded.model.config._attn_implementation != loaded.decision.used:
            scorer.use_implementation(loaded.decision.used)
        return scorer

    @classmethod
    def for_loaded(cls, loaded, job, task_name: str, fuse: bool = True) -> Scorer:
        """A scorer around a model already loaded (its current implementation); `fuse`: its
        kernels fused now (else by `fuse()`)."""
        columns = len(job.text_columns) if job.text_columns else 1
        model_dir = loaded.facts.ref.location if loaded.facts.ref.is_local else _hub_snapshot(loaded.model)
        task = build_task(task_name, loaded.model, loaded.tokenizer, model_dir, columns)
        max_length = job.max_length or task.default_max_length()
        if max_length < 2:
            raise UsageError(f"--max-length must be at least 2, found {max_length}")
        max_length, clipped = clip_max_length(int(max_length), task.limits)
        if clipped:
            log.warning("%s", clipped)
        impl = getattr(loaded.model.config, "_attn_implementation", None) or loaded.decision.used
        budget, max_cells = _budgets(job, loaded, impl)
        scorer = cls(loaded, job, task, int(max_length), budget, max_cells)
        scorer.max_length_note = clipped
        if fuse:
            scorer.fuse()
        scorer.refresh_packing()
        return scorer

    def fuse(self, expected_tokens: int | None = None) -> dict:
        """Put the model on the fused kernels where they run and agree (tasks.fuse_kernels); a
        first shard whose `expected_tokens` pay for it waits for their compile, and the wait is
        in the load's timing (`fused_wait_s`). Returns the report, also kept as `fused`."""
        self.fused = fuse_kernels(self.loaded.model, self.task, self.loaded.device, expected_tokens=expected_tokens)
        if "waited_s" in self.fused:
            self.decision.timing["fused_wait_s"] = self.fused["waited_s"]
        return self.fused

    def use_implementation(self, impl: str, packing: str | None = None) -> bool:
        """Run on `impl` from now on, with the budget and packing the scorer would have chosen for
        it (a benchmark comparing implementations on one loaded model). Returns whether it packs."""
        if self.loaded.model.config._attn_implementation != impl:
            self.loaded.model.set_attn_implementation(impl)
        self.batch_tokens, self.max_cells = _budgets(self.job, self.loaded, impl)
        if packing is not None:
            self.packing = packing
        return self.refresh_packing()

    @property
    def decision(self):
        return self.loaded.decision

    def output_schema_for(self, id_type: str = "int64"):
        import pyarrow as pa

        fields = [pa.field("id", pa.int64() if id_type == "int64" else pa.string())]
        fields += self.task.output_fields()
        if self.flag_nonfinite:
            fields.append(pa.field("nonfinite", pa.bool_()))
        return pa.schema(fields)

    @property
    def output_schema(self):
        """The output schema; the id is int64 (row numbers) unless `id_type` was set to "string"."""
        return self.output_schema_for(self.id_type)

    def describe(self) -> dict:
        return {**self.task.describe(), "max_length": self.max_length, "batch_tokens": self.batch_tokens,
                "batch_cuts": {"scale": round(self.cut_scale, 2), **dict(zip(("floor_tokens", "overhead_tokens"), self.cut_costs()))},
                "max_cells": self.max_cells, "device": str(self.device), "impl": self.decision.used,
                "packing": self.packing_note, "tokenizer": self.tokenizer_note, "token_type_ids": self.with_types,
                "fused": self.fused,
                **({"max_length_note": self.max_length_note} if self.max_length_note else {}),
                **({"sdpa_order": sdpa_order_note()} if self.on_cuda and self.decision.used == "sdpa" else {})}

    # -- packing ----------------------------------------------------------------------------

    def refresh_packing(self) -> bool:
        """Decide whether batches are packed (padding-free) for the model's current implementation.

        Packed when `packing` is auto, the implementation is a varlen flash kernel, the task can
        pool a packed sequence, and a check on three rows of different lengths gives the padded
        path's outputs (once per implementation): a model whose code drops the row boundaries is
        caught there, not in the results. Call again after changing the implementation.
        """
        check_packing_mode(self.packing)
        impl = getattr(self.loaded.model.config, "_attn_implementation", None)
        obstacle = None
        if self.packing == "off":
            obstacle = "turned off"
        elif not supports_varlen(impl):
            obstacle = f"{impl} has no varlen path"
        else:
            obstacle = self.task.packing_obstacle()
            if obstacle is None:
                if impl not in self._packing_checked:
                    self._packing_checked[impl] = self._check_packing()
                obstacle = self._packing_checked[impl]
                if obstacle is not None:
                    log.warning("batches are padded, not packed: %s", obstacle)
        self.pack = obstacle is None
        self.packing_note = "on" if self.pack else f"off ({obstacle})"
        return self.pack

    def _check_packing(self) -> str | None:
        """None when packed and padded batches give the same outputs on a few rows, else why not."""
        torch = self._torch
        encoded = self.encoder.encode(list(PACKING_CHECK_TEXTS) if self.task.mode == "single"
                                      else [t * 2 for t in PACKING_CHECK_TEXTS])
        rows = length_order(encoded.lengths)
        padded = self._padded_batch(encoded, rows, int(encoded.lengths.max()))
        packed = self._packed_batch(encoded, rows)
        try:
            with torch.inference_mode(), sdpa_order(self.device.type):
                want = self.task.forward(self._on_device(padded))
                got = self.task.forward(self._on_device(packed))
        except Exception as e:  # noqa: BLE001 - any failure means: do not pack
            if is_fatal_device_error(e):
                raise
            return f"a packed forward failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        tolerance = 1e-3 if self.loaded.model.dtype == torch.float32 else 5e-2
        for name, value in want.items():
            a, b = value.float(), got[name].float()
            scale = float(a.abs().max()) or 1.0
            error = float((a - b).abs().max()) / scale
            if not error <= tolerance:
                return f"packed and padded outputs differ on the check rows ({name}: {error:.2g} of the largest value)"
        return None

    # -- preparing (worker thread) ----------------------------------------------------------

    def start_tokenizer_process(self) -> bool:
        """Tokenize in a child process from now on (done on CUDA by default: the thread launching
        the forward then keeps the GIL; see tokenizer_process.py). False, and the note says why,
        where it cannot."""
        import weakref

        if self._child is not None:
            return True
        obstacle = process_obstacle(self.encoder)
        if obstacle is None:
            try:
                self._child = ProcessEncoder(self.encoder)
            except (OSError, RuntimeError, ValueError) as e:
                obstacle = f"the tokenizer process did not start: {e}"
        if obstacle is not None:
            self.tokenizer_note = f"in the worker thread ({obstacle})"
            return False
        weakref.finalize(self, self._child.close)
        self.tokenizer_note = "in a child process"
        return True

    def _encode(self, texts: list[tuple[str, ...]]) -> Encoded:
        if self._child is not None and self.tokenizer_process == "auto":
            try:
                return self._child.encode(texts)
            except ChildDied as e:
                log.warning("tokenizing in the worker thread from now on: %s", e)
                self.tokenizer_note = f"in the worker thread ({e})"
                self._child.close()
                self._child = None
        return self.encoder.encode(texts)

    def prepare(self, chunk: Chunk, rows: np.ndarray | None = None, last: bool = True) -> PreparedChunk:
        """Tokenize, sort by length (stable), plan token-budget batches, pad (and pin on CUDA).
        `rows`: only these positions of the chunk (a piece, see `prepare_pieces`)."""
        t0 = time.perf_counter()
        encoded = self._encode(chunk.texts if rows is None else [chunk.texts[i] for i in rows])
        self._check_limits(chunk, encoded, rows)
        order, batches = self._batched(encoded)
        seconds = time.perf_counter() - t0
        self.timing["prepare_s"] += seconds
        return PreparedChunk(chunk, encoded, order, batches, seconds, rows, last)

    def _batched(self, encoded: Encoded) -> tuple[np.ndarray, list[HostBatch]]:
        """Rows in length order (stable) and their token-budget batches, for the current implementation."""
        order = length_order(encoded.lengths)
        floor, overhead = self.cut_costs()
        slices = plan_batches(encoded.lengths[order], self.batch_tokens, self.max_cells, floor_tokens=floor, overhead_tokens=overhead)
        return order, [self._host_batch(encoded, order[s.start:s.stop], s.length) for s in slices]

    def cut_costs(self) -> tuple[int, int]:
        """plan_batches' (floor, overhead) for the current budget: as set, else by the model's cut scale."""
        floor, overhead = cut_costs(self.batch_tokens, self.cut_scale)
        return (floor if self.floor_tokens is None else self.floor_tokens,
                overhead if self.overhead_tokens is None else self.overhead_tokens)

    def limit_violation(self, encoded: Encoded):
        """The first id the model's tables cannot take (scoring/limits.py), or None: a max over the
        flat arrays the batches are cut from."""
        ids, types, offsets = encoded.flat()
        return self.task.limits.violation(ids, types if self.with_types else None, offsets, encoded.lengths)

    def _check_limits(self, chunk: Chunk, encoded: Encoded, rows: np.ndarray | None) -> None:
        """Every id within the model's tables, before any forward: a tokenizer that does not match
        its model is an error naming the limit, the value and the row, not an IndexError or a
        device-side assert."""
        found = self.limit_violation(encoded)
        if found is None:
            return
        limits = self.task.limits
        position = found.row if rows is None else int(rows[found.row])
        line = chunk.lines[position] if position < len(chunk.lines) else None
        path = getattr(self.job, "input", None) or "<table>"
        raise TokenizerMismatchError(f"{found.message(limits.model)} (row id {chunk.ids[position]!r})", path=str(path),
                                     line=line, limit=found.limit, value=found.found, what=found.what)

    def prepare_pieces(self, chunk: Chunk) -> Iterator[PreparedChunk]:
        """The chunk prepared whole, or, for the run's first part when `lead_fractions` is set, in
        pieces (`lead_pieces`), each yielded as soon as it is ready. The pieces depend on the texts
        only, never on timing, so the batches (and the outputs' bits) do not either."""
        pieces = lead_pieces(chunk.texts, self.lead_fractions) if chunk.index == 0 and self.lead_fractions else []
        if len(pieces) < 2:
            yield self.prepare(chunk)
            return
        for i, rows in enumerate(pieces):
            yield self.prepare(chunk, rows, last=i == len(pieces) - 1)

    def _host_batch(self, encoded: Encoded, rows: np.ndarray, length: int) -> HostBatch:
        return self._packed_batch(encoded, rows) if self.pack else self._padded_batch(encoded, rows, length)

    def _tensors(self, arrays: dict) -> dict:
        torch = self._torch
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        if self.on_cuda:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return tensors

    def _padded_batch(self, encoded: Encoded, rows: np.ndarray, length: int) -> HostBatch:
        arrays = pad_rows(encoded, rows, length, self.task.pad_id, self.with_types)
        arrays.update(self.task.extra_arrays(encoded, rows, length))
        tensors = self._tensors(arrays)
        lengths = encoded.lengths[rows]
        tensors["_no_padding"] = bool(len(rows) and lengths.min() == length)  # host-side flag, not copied
        return HostBatch(rows, length, tensors, int(lengths.sum()), len(rows) * length)

    def _packed_batch(self, encoded: Encoded, rows: np.ndarray) -> HostBatch:
        arrays = pack_rows(encoded, rows, self.with_types)
        lengths = encoded.lengths[rows]
        longest = int(lengths.max()) if len(rows) else 0
        impl = getattr(self.loaded.model.config, "_attn_implementation", None)
        declared, empty = declared_shape(impl, len(rows), longest, self.flash_shapes)
        if empty:
            arrays["kernel_cu_seqlens"] = padded_boundaries(arrays["cu_seqlens"], empty)
        tensors = self._tensors(arrays)
        tensors["_packed"] = True  # host-side values, not copied
        tensors["_max_length"] = declared
        tokens = int(lengths.sum())
        return HostBatch(rows, longest, tensors, tokens, tokens)

    def _on_device(self, batch: HostBatch) -> dict:
        return {k: v.to(self.device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.tensors.items()}

    # -- running (this thread) --------------------------------------------------------------

    def run(self, prepared: PreparedChunk) -> ChunkResult:
        """Forward every batch of a chunk; outputs back in input order, one host copy per chunk."""
        return self.finish([self.launch(prepared)])

    def launch(self, prepared: PreparedChunk) -> Launched:
        """Queue the chunk's batches on the device and an asynchronous copy of the outputs back.

        On CUDA nothing here waits for the GPU (out-of-memory aside), so the next chunk can be
        queued while `finish` turns this one into columns on another thread.
        """
        torch = self._torch
        t0 = time.perf_counter()
        splits_before = self.oom_splits
        pieces: dict[str, list] = {}
        host: dict = {}
        keep: list = []
        event = None
        with torch.inference_mode(), sdpa_order(self.device.type):
            for batch in prepared.batches:
                outputs = self._forward(prepared.encoded, batch, depth=0)
                for name, value in outputs.items():
                    pieces.setdefault(name, []).append(value)
            for name, values in pieces.items():
                joined = values[0] if len(values) == 1 else torch.cat(values, dim=0)
                if self.on_cuda:
                    buffer = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True)
                    buffer.copy_(joined, non_blocking=True)
                    keep.append(joined)  # alive until the copy is done
                    host[name] = buffer
                else:
                    host[name] = joined
            if self.on_cuda:
                event = torch.cuda.Event()
                event.record()
        seconds = time.perf_counter() - t0
        self.timing["launch_s"] += seconds
        return Launched(prepared, host, event, keep, self.oom_splits - splits_before, seconds)

    def finish(self, pieces: list[Launched]) -> ChunkResult:
        """Wait for a launched chunk's outputs (all its pieces); restore input order, check
        finiteness, make columns."""
        t0 = time.perf_counter()
        for launched in pieces:
            if launched.event is not None:
                launched.event.synchronize()
            launched.keep.clear()
        chunk = pieces[0].prepared.chunk
        n = len(chunk)
        in_order = {}
        for name in pieces[0].host:
            first = pieces[0].host[name].numpy()
            restored = np.empty((n, *first.shape[1:]), dtype=first.dtype)
            for launched in pieces:
                restored[launched.prepared.positions()] = launched.host[name].numpy()
            in_order[name] = restored
        finite = np.ones(n, dtype=bool)
        for value in in_order.values():
            if value.dtype.kind == "f" and n:
                finite &= np.isfinite(value.reshape(n, -1)).all(axis=1)
        nonfinite = ~finite
        if nonfinite.any() and not self.flag_nonfinite:
            bad = [chunk.ids[i] for i in np.flatnonzero(nonfinite)]
            shown = ", ".join(map(repr, bad[:20])) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
            raise NonFiniteError(f"the model produced NaN or inf for {len(bad)} row(s), ids: {shown} "
                                 "(--on-nonfinite flag writes them with a `nonfinite` column instead)", ids=bad)
        columns = self.task.to_arrow(in_order) if n else self._empty_columns()
        self.timing["finish_s"] += time.perf_counter() - t0
        prepared = [launched.prepared for launched in pieces]
        return ChunkResult(
            chunk=chunk,
            columns=columns,
            nonfinite=nonfinite,
            tokens=sum(int(p.encoded.lengths.sum()) for p in prepared),
            padded_tokens=sum(b.cells for p in prepared for b in p.batches),
            truncated=sum(int(p.encoded.truncated.sum()) for p in prepared),
            batches=sum(len(p.batches) for p in prepared),
            oom_splits=sum(launched.oom_splits for launched in pieces),
            seconds=sum(launched.seconds for launched in pieces) + time.perf_counter() - t0,
        )

    def _empty_columns(self) -> dict:
        return {f.name: arrow_build.empty(f.type) for f in self.task.output_fields()}

    def _forward(self, encoded: Encoded, batch: HostBatch, depth: int) -> dict:
        torch = self._torch
        failed = False
        try:
            on_device = self._on_device(batch)
            return self.task.forward(on_device)
        except torch.OutOfMemoryError:
            if len(batch.rows) == 1:
                raise
            failed = True
        # outside the except block, so the failed attempt's tensors can be freed before retrying
        if failed:
            on_device = None
            if self.on_cuda:
                torch.cuda.empty_cache()
            if self.decision.policy.is_strict:
                # strict is for paper-grade runs: a split batch is not the run that was asked for
                from attnfallback.errors import AttentionUnavailable

                reason = (f"out of memory on a batch of {len(batch.rows)} rows x {batch.length} tokens; strict policy "
                          "does not split batches (graceful would); lower --batch-tokens or use --policy graceful")
                raise AttentionUnavailable(self.decision.used, {self.decision.used: [reason]})
            self.oom_splits += 1
            mid = len(batch.rows) // 2
            halves = (batch.rows[:mid], batch.rows[mid:])
            if self.sink is not None:
                self.sink.emit("oom_split", rows=len(batch.rows), length=batch.length, padded_tokens=batch.cells,
                               tokens=batch.tokens, depth=depth, halves=[len(h) for h in halves], impl=self.decision.used)
            log.warning("out of memory on a batch of %d rows x %d tokens: splitting in halves", len(batch.rows), batch.length)
            results = [self._forward(encoded, self._host_batch(encoded, h, int(encoded.lengths[h].max())), depth + 1) for h in halves]
            return {name: torch.cat([r[name] for r in results], dim=0) for name in results[0]}
        raise AssertionError("unreachable")

    def score_chunks(self, chunks: Iterable[Chunk]) -> Iterator[ChunkResult]:
        """Score chunks in order; tokenization runs in a worker thread ahead of the forward pass."""
        q: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for chunk in chunks:
                    for piece in self.prepare_pieces(chunk):
                        if stop.is_set() or not put(piece):
                            return
                put(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(_Failure(e))

        worker = threading.Thread(target=produce, name="attnfallback-tokenize", daemon=True)
        worker.start()
        # on CUDA a chunk is finished (host copy awaited, columns built) on another thread while
        # the next one runs on the GPU; on the CPU that work would only compete for the cores
        finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnfallback-finish") if self.on_cuda else None
        pending: deque = deque()  # futures of chunks being finished, in order
        launched: list[Launched] = []  # the pieces of the chunk being launched

        def drain(everything: bool) -> Iterator[ChunkResult]:
            """Finished chunks in order: those done (keeping one in flight), or all of them."""
            while pending and (everything or len(pending) > 1 or pending[0].done()):
                yield pending.popleft().result()

        try:
            while True:
                t_wait = time.perf_counter()
                item = q.get()
                self.timing["wait_s"] += time.perf_counter() - t_wait
                if item is _DONE:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                launched.append(self.launch(item))
                if not item.last:
                    continue
                pieces, launched = launched, []
                if finisher is None:
                    yield self.finish(pieces)
                    continue
                pending.append(finisher.submit(self.finish, pieces))
                yield from drain(everything=False)
            yield from drain(everything=True)
        finally:
            stop.set()
            if finisher is not None:
                finisher.shutdown(wait=True)
            worker.join(timeout=5)

    # -- tables (Ray) -----------------------------------------------------------------------

    def score_table(self, table):
        """Input columns (id + text columns) -> id + output columns, in the same row order.

        The id is `job.id_column` if set (`""`: the row's position), else a column named `id` if
        present, else the row's position in the table. Bad rows raise InputError, or are dropped
        with on_bad_row=skip.
        """
        import pyarrow as pa

        spec = self._table_spec(table)
        ids, texts = [], []
        for row in rows_of_table(table, spec):
            if row.problem is not None:
                if self.job.on_bad_row == "skip":
                    continue
                from attnfallback.errors import InputError

                raise InputError(row.problem, path="<table>", line=row.line)
            ids.append(row.id)
            texts.append(row.texts)
        result = self.run(self.prepare(Chunk(0, ids, texts)))
        return build_table(self.output_schema_for(spec.id_type), ids, result)

    def _table_spec(self, table) -> InputSpec:
        import pyarrow as pa

        # the same defaults as the file reader's (inputs.resolve_spec): `id` where present; "" = the row position
        if self.job.id_column is None:
            id_column = DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in table.column_names else None
        else:
            id_column = self.job.id_column or None
        names = list(self.job.text_columns) if self.job.text_columns else None
        if names is None:
            if self.job.text_column:
                names = [self.job.text_column]
            elif "text" in table.column_names:
                names = ["text"]
            else:
                strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
                strings = [s for s in strings if s != id_column]
                if len(strings) != 1:
                    raise UsageError(f"cannot tell the text column; pass text_column (the table has columns: {', '.join(table.column_names)})")
                names = strings
        id_type = "int64"
        if id_column is not None:
            field_type = table.schema.field(id_column).type if id_column in table.column_names else pa.int64()
            id_type = "string" if (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)) else "int64"
        return InputSpec(names, id_column, id_type)


def lead_pieces(texts: list[tuple[str, ...]], fractions: tuple[float, ...] = LEAD_FRACTIONS,
                min_rows: int = LEAD_MIN_ROWS) -> list[np.ndarray]:
    """Row positions of a chunk's pieces: rows ordered by character count, longest first (stable),
    cut where the running count of characters reaches each fraction in turn (then the rest). Every
    piece holds at least `min_rows` rows: a piece is extended past its share to reach them, and a
    cut that would leave the rest fewer is not made.

    Characters stand in for tokens, which are not known before tokenizing: rows of similar
    character counts have similar token counts, so each piece sorts into batches that pad little.
    """
    n = len(texts)
    chars = np.fromiter((sum(map(len, row)) for row in texts), dtype=np.int64, count=n)
    order = np.argsort(-chars, kind="stable")
    running = np.cumsum(chars[order])
    total = int(running[-1]) if n else 0
    cuts, start = [], 0
    for share in np.cumsum(fractions):
        cut = max(int(np.searchsorted(running, share * total, side="left")) + 1, start + min_rows)
        if n - cut < min_rows:
            break
        if cut > start:
            cuts.append(cut)
            start = cut
    return [order[a:b] for a, b in zip([0, *cuts], [*cuts, n])] if n else []


def build_table(schema, ids: list, result: ChunkResult):
    """The output table of one chunk: id first, then the task's columns (and `nonfinite`)."""
    import pyarrow as pa

    arrays = [arrow_build.of_type(ids, schema.field("id").type)]
    for f in schema:
        if f.name == "id":
            continue
        if f.name == "nonfinite":
            arrays.append(arrow_build.numeric(result.nonfinite, pa.bool_()))
        else:
            arrays.append(result.columns[f.name])
    return pa.Table.from_arrays(arrays, schema=schema)


def _budgets(job, loaded, impl: str) -> tuple[int, int | None]:
    """(padded tokens per batch, eager's cell bound) for `impl`: --batch-tokens, else the default."""
    budget = job.batch_tokens or default_batch_tokens(loaded.device.type, impl, ffn_width(loaded.model.config))
    if budget < 1:
        raise UsageError(f"--batch-tokens must be positive, found {budget}")
    heads = getattr(text_config(loaded.model.config), "num_attention_heads", None)
    return int(budget), eager_max_cells(impl, heads)


def model_kwargs_for(task: str, job, facts=None) -> dict:
    """A plain encoder checkpoint scored as pairs gets one label, as sentence-transformers' CrossEncoder
    gives it (set on the config by the loader; its classifier is new: refused unless allowed)."""
    if task != "pairs":
        return {}
    from attnfallback.model_facts import read_facts

    try:
        facts = facts or read_facts(job.model, revision=job.revision, auto_class="AutoModelForSequenceClassification",
                                    trust_remote_code=job.trust_remote_code)
    except Exception:  # noqa: BLE001 - load_model reports the same problem properly
        return {}
    if facts.architecture and facts.architecture.endswith("ForSequenceClassification"):
        return {}
    return {"num_labels": 1}


def _hub_snapshot(model) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None)
