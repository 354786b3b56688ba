"""`run_score`: one shard of a scoring job, from input rows to a committed Parquet output.

    job = ScoreJob(model="default", input="texts.jsonl", output="out/emb.parquet", shard="3/8")
    result = run_score(job)          # ScoreResult: rows in/written/skipped, tokens, seconds ...

Order of work: check the input and its columns, take the output's lock and look at what a
previous run left, load the model through the fallback (the loader writes `attn_impl`), write
`shard_start`, score the shard's rows chunk by chunk (each chunk one committed part), write the
final file atomically, write `shard_done`. Rows in = rows written + rows skipped, always.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from attnfallback import envs, kernel_warmup
from attnfallback.errors import InputError, Interrupted, OutputError, OutputExistsError, UsageError, is_fatal_device_error
from attnfallback.fused_ops import (config_shapes, config_text, finish_background_compile, gpu_dtype, prepare_triton_in_background,
                                    start_compile_process)
from attnfallback.kernel_warmup import KernelPlan
from attnfallback.policy import Mode, Policy, parse_dtype, parse_measure
from attnfallback.scoring.inputs import InputRow, InputSource, InputSpec, iter_rows, open_input, resolve_spec, row_error
from attnfallback.scoring.collate import check_packing_mode
from attnfallback.scoring.tasks import parse_task
from attnfallback.scoring.tokenizer_process import check_tokenizer_process_mode
from attnfallback.scoring.writer import PartInfo, PartStore, check_complete, fingerprint_differences, output_metadata
from attnfallback.task_names import TEXT_COLUMNS, default_text_columns

log = logging.getLogger("attnfallback")

DEFAULT_PART_ROWS = 8192
# The first parts are smaller (1,024 rows, doubling up to part_rows): the GPU waits only for the
# first part's tokenizing instead of a whole 8,192-row part's (bench/NOTES.md, session 5: 512 rows
# padded a 1,000-text run more, two small parts sorted apart). Part of the resume fingerprint.
FIRST_PART_ROWS = 1024
MAX_LISTED_SKIPS = 10_000  # skipped rows listed in the event and the result (all are counted)
BAD_ROW_MODES = ("error", "skip")
NONFINITE_MODES = ("error", "flag")


@dataclass
class ScoreJob:
    """Everything one `score` run needs; the CLI flags map one to one onto these fields."""

    model: str = "default"
    input: str = ""
    output: str = ""
    task: str = "embed"  # embed | classify | pairs | logprob
    text_column: str | None = None
    text_columns: list[str] | None = None
    id_column: str | None = None  # None: 'id' where the input has one, else the row number; '': the row number
    shard: str | None = None
    prefer: str | list[str] | None = None
    policy: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    batch_tokens: int | None = None
    max_length: int | None = None
    events: str | None = None
    run_id: str | None = None
    resume: bool = False
    on_bad_row: str = "error"
    on_nonfinite: str = "error"
    quiet: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    part_rows: int = DEFAULT_PART_ROWS  # rows per committed part (the unit of --resume)
    first_part_rows: int = FIRST_PART_ROWS  # the first part's rows; parts double from there up to part_rows
    packing: str = "auto"  # auto: padding-free batches where the implementation is a varlen flash kernel | off
    tokenizer_process: str = "auto"  # auto: on CUDA, tokenize in a child process (scoring/tokenizer_process.py) | off
    measure: str | None = None  # auto (graceful times its candidates on a CUDA GPU) | off; None: $ATTNFALLBACK_MEASURE, else auto
    allow_new_head: bool = False  # score with weights the checkpoint lacks (initialised at random): see heads.py

    def to_dict(self) -> dict:
        """Every field by name, JSON-ready; `from_dict` reads it back (a sweep's job file)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str | None = None) -> ScoreJob:
        """The job a `to_dict` dict describes; a missing field takes its default. Not a dict,
        unknown keys, or a value of the wrong type: a UsageError naming them (and `where`, the
        file the dict came from)."""
        import typing

        prefix = f"{where}: " if where else ""
        if not isinstance(data, dict):
            raise UsageError(f"{prefix}a scoring job must be a JSON object of its fields, found {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = [k for k in data if k not in hints]
        if unknown:
            raise UsageError(f"{prefix}unknown key(s) in the scoring job: {', '.join(map(repr, unknown))}; "
                             f"valid keys: {', '.join(hints)}")
        for key, value in data.items():
            if not _is_of_type(value, hints[key]):
                raise UsageError(f"{prefix}{key} in the scoring job must be {_type_name(hints[key])}, found {value!r}")
        return cls(**data)


def _is_of_type(value, hint) -> bool:
    """Whether `value` (read from JSON) fits a ScoreJob field's annotation: str, int, bool, None,
    list[str] and unions of them (an int is not a bool, nor a bool an int)."""
    import types
    import typing

    if isinstance(hint, types.UnionType):
        return any(_is_of_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is_of_type(v, item) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    import types
    import typing

    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"a list of {({str: 'strings', int: 'integers'}).get(item, _type_name(item))}"
    return {str: "a string", int: "an integer", bool: "true or false"}.get(hint, getattr(hint, "__name__", str(hint)))


@dataclass
class ScoreResult:
    """What a run did. rows_in = rows_written + rows_skipped."""

    output: str
    rows_in: int
    rows_written: int
    rows_skipped: int
    skipped: list[dict]  # {"row", "line", "reason"} (the first MAX_LISTED_SKIPS)
    tokens: int
    truncated: int
    seconds: float
    tokens_per_s: float
    nonfinite: int
    decision: dict
    run_id: str
    shard: str
    parts: int = 0
    resumed_parts: int = 0
    oom_splits: int = 0
    events: str | None = None
    already_complete: bool = False
    padded_tokens: int = 0  # token positions the forward computed (tokens plus padding)
    task: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)  # seconds of each phase of the run (Phases.as_dict)
    columns: dict = field(default_factory=dict)  # the text and id columns used, and how each was chosen

    @property
    def skipped_lines(self) -> list[int]:
        return [s["line"] for s in self.skipped]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Counts:
    rows_in: int = 0
    rows_total: int = 0  # every row of the input, owned or not
    skipped: list[dict] = field(default_factory=list)
    skipped_count: int = 0
    skipped_rows: list[int] = field(default_factory=list)  # every skipped row number (a sweep merges by them)


def validate_job(job: ScoreJob) -> str:
    """Check `job`'s settings before any input is read (a UsageError naming the setting, exit 2);
    returns its task's canonical name. Both engines check a job with it."""
    task = parse_task(job.task)
    if not job.input:
        raise UsageError("no input: pass --input FILE")
    if not job.output:
        raise UsageError("no output: pass --output FILE.parquet")
    if job.on_bad_row not in BAD_ROW_MODES:
        raise UsageError(f"--on-bad-row must be one of {', '.join(BAD_ROW_MODES)}, found {job.on_bad_row!r}")
    if job.on_nonfinite not in NONFINITE_MODES:
        raise UsageError(f"--on-nonfinite must be one of {', '.join(NONFINITE_MODES)}, found {job.on_nonfinite!r}")
    if job.part_rows < 1:
        raise UsageError(f"part_rows must be positive, found {job.part_rows}")
    if job.first_part_rows < 1:
        raise UsageError(f"first_part_rows must be positive, found {job.first_part_rows}")
    parse_measure(job.measure)
    if job.batch_tokens is not None and job.batch_tokens < 1:
        raise UsageError(f"--batch-tokens must be positive, found {job.batch_tokens}")
    check_packing_mode(job.packing)
    check_tokenizer_process_mode(job.tokenizer_process)
    if job.max_length is not None and job.max_length < 2:
        raise UsageError(f"--max-length must be at least 2, found {job.max_length}")
    if job.text_columns is not None and len(job.text_columns) not in TEXT_COLUMNS[task]:
        raise UsageError(f"task {task} takes {' or '.join(map(str, TEXT_COLUMNS[task]))} text column(s), found {len(job.text_columns)}")
    if Path(job.input).resolve() == Path(job.output).resolve():
        raise UsageError("the output would overwrite the input")
    return task


def job_fingerprint(job: ScoreJob, task: str, source: InputSource, spec: InputSpec, shard: str, identity: str) -> dict:
    """What must match for --resume to continue a previous run's parts."""
    size, mtime_ns = source.size_and_mtime()
    return {
        "model": str(job.model),
        "model_identity": identity,
        "revision": job.revision,
        "task": task,
        "input": str(source.path.resolve()),
        "input_size": size,
        "input_mtime_ns": mtime_ns,
        "text_columns": spec.text_columns,
        "id_column": spec.id_column,
        "shard": shard,
        "max_length": job.max_length,
        "dtype": job.dtype,
        "part_rows": job.part_rows,
        "first_part_rows": next(part_sizes(job.part_rows, job.first_part_rows)),
        "on_bad_row": job.on_bad_row,
        "on_nonfinite": job.on_nonfinite,
    }


def _bad_row(counts: _Counts, row: InputRow) -> None:
    counts.skipped_count += 1
    counts.skipped_rows.append(row.number)
    if len(counts.skipped) < MAX_LISTED_SKIPS:
        counts.skipped.append({"row": row.number, "line": row.line, "reason": row.problem})


def validate_input(source: InputSource, spec: InputSpec) -> int:
    """Read every row once; the first problem is an InputError (file:line). Returns the row count."""
    total = 0
    for row in iter_rows(source, spec):
        total += 1
        if row.problem is not None:
            raise row_error(source, spec, row, " (--on-bad-row skip skips such rows and lists them)")
    if total == 0:
        raise InputError("empty input: no rows", path=str(source.path))
    return total


def part_sizes(part_rows: int, first_part_rows: int = FIRST_PART_ROWS) -> Iterator[int]:
    """Rows of each part in turn: `first_part_rows`, doubling up to `part_rows`, then `part_rows`."""
    size = min(first_part_rows, part_rows)
    while True:
        yield size
        size = min(size * 2, part_rows)


def shard_chunks(source: InputSource, spec: InputSpec, shard, job: ScoreJob, skip_chunks: int, counts: _Counts) -> Iterator:
    """The shard's good rows in chunks of `part_sizes(part_rows)`; the first `skip_chunks` are read,
    not yielded."""
    from attnfallback.scoring.chunks import Chunk

    ids, texts, lines = [], [], []
    index = 0
    sizes = part_sizes(job.part_rows, job.first_part_rows)
    size = next(sizes)
    for row in iter_rows(source, spec):
        counts.rows_total += 1
        if not shard.owns(row.number):
            continue
        counts.rows_in += 1
        if row.problem is not None:
            if job.on_bad_row == "error":
                raise row_error(source, spec, row)
            _bad_row(counts, row)
            continue
        ids.append(row.id)
        texts.append(row.texts)
        lines.append(row.line)
        if len(ids) == size:
            if index >= skip_chunks:
                yield Chunk(index, ids, texts, lines)
            index += 1
            size = next(sizes)
            ids, texts, lines = [], [], []
    if ids and index >= skip_chunks:
        yield Chunk(index, ids, texts, lines)
    if counts.rows_total == 0:
        raise InputError("empty input: no rows", path=str(source.path))


class _Progress:
    """A rich progress line on stderr (rows/s, tokens/s); nothing when quiet or not a terminal."""

    def __init__(self, enabled: bool, total: int | None, label: str):
        self.enabled = enabled
        self._progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
            console=Console(stderr=True), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, rate="")
        self._t0 = time.perf_counter()
        self._rows = 0
        self._tokens = 0

    def advance(self, rows: int, tokens: int) -> None:
        if self._progress is None:
            return
        self._rows += rows
        self._tokens += tokens
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = f"{self._rows / elapsed:,.0f} rows/s  {self._tokens / elapsed:,.0f} tokens/s"
        self._progress.update(self._task, advance=rows, rate=rate)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _emit(sink, kind: str, **fields) -> None:
    if sink is None:
        return
    try:
        sink.emit(kind, **fields)
    except OutputError as e:
        log.warning("could not write the %s event: %s", kind, e)


def _open_sink(job: ScoreJob, run_id: str, shard: str):
    from attnfallback.events import open_sink

    return open_sink(job.events, run_id, shard)


def process_age() -> float | None:
    """Seconds since this process started (interpreter start-up and imports before the run), or
    None where /proc does not say."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            started_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return round(max(uptime - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0), 3)
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Where a run's time goes: `mark(name)` closes the phase that ran since the last mark."""

    def __init__(self, before_run_s: float | None):
        self._last = time.perf_counter()
        self._first = self._last
        self._seconds: dict[str, float] = {}
        self.before_run_s = before_run_s
        self.device_warm: Future | None = None  # _warm_device's steps, on its thread

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self._seconds[name] = self._seconds.get(name, 0.0) + now - self._last
        self._last = now

    def as_dict(self, load_detail: dict | None = None) -> dict:
        """{"before_run_s" (process start to the run), "input_s", "facts_s", "load_s" (with
        "load_detail": from_pretrained, verification, measurement), "score_s", "finish_s", "compile_wait_s"
        (only when the shard ended before the fused kernels' background compile), "warmup_wait_s" (only
        with the kernel warm-up: waiting for it before the first forward), "run_s", and on a
        GPU "device_detail": how CUDA's context was made and the seconds of each step beside the run}."""
        out = {"before_run_s": self.before_run_s, **{k: round(v, 4) for k, v in self._seconds.items()},
               "run_s": round(self._last - self._first, 4)}
        if load_detail:
            out["load_detail"] = {k: round(v, 4) for k, v in load_detail.items()}
        if self.device_warm is not None and self.device_warm.done() and self.device_warm.exception() is None:
            out["device_detail"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in self.device_warm.result().items()}
        return out


def _start_in_background(fn, *args) -> Future:
    """`fn(*args)` on a daemon thread; its result (or exception) from the returned future."""
    future: Future = Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            future.set_exception(e)

    threading.Thread(target=run, name="attnfallback-background", daemon=True).start()
    return future


_CUDA_DEVICE = re.compile(r"^(auto|cuda)(?::(\d+))?$")


def device_index(device: str) -> int | None:
    """The CUDA ordinal a `--device` value runs on ("cuda" and "auto": 0, "cuda:N": N); None for
    anything that is not CUDA ("cpu", "mps")."""
    match = _CUDA_DEVICE.match(device.strip().lower())
    return None if match is None else int(match.group(2) or 0)


def _warm_device(device: str, dtype: str = "auto", plan: KernelPlan | None = None) -> dict:
    """Import torch and make CUDA's context, where there is a GPU (one to two seconds a process
    would otherwise spend after loading the config), and run one half-precision matrix product on
    the job's device, so cuBLAS is loaded and its handle made beside the model's load, not in the
    verification forward (a first shard's forward took 1.6 s against a later one's 0.6 s on the
    H200). With a `plan` (kernel_warmup.py; ATTNFALLBACK_KERNEL_WARMUP=off: none), then the kernels of the
    model's widths in `dtype`. Returns whether a context was made ("context": torch, none) and the
    seconds of each step ("ready_s": all of them, from the thread's start at the run's), for the
    run's phases."""
    start = time.perf_counter()
    detail: dict = {"context": "none"}  # no CUDA device: nothing made
    index = device_index(device)
    import torch

    detail["torch_import_s"] = time.perf_counter() - start
    if index is not None and torch.cuda.is_available():
        detail["context"] = "torch"
        target = torch.device("cuda", index)
        mark = time.perf_counter()
        torch.cuda.init()
        detail["cuda_init_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        a = torch.ones(16, 16, device=target, dtype=torch.float16)
        (a @ a).sum().item()
        detail["cublas_s"] = time.perf_counter() - mark
        if plan is not None:
            mark = time.perf_counter()
            kernels = kernel_warmup.run(plan, target, gpu_dtype(dtype))
            detail.update({f"kernels_{k}": v for k, v in kernels.items()}, kernels_s=time.perf_counter() - mark)
    detail["ready_s"] = time.perf_counter() - start
    return detail


def _local_config(job: ScoreJob) -> dict | None:
    """A local model's config.json (None for a hub model, or one that cannot be read: the facts
    phase says what is wrong with it)."""
    import json

    from attnfallback.model_facts import resolve_ref

    try:
        ref = resolve_ref(job.model, job.revision)
        if not ref.is_local:
            return None
        raw = json.loads((Path(ref.location) / "config.json").read_text())
        return raw if isinstance(raw, dict) else None
    except Exception as e:  # noqa: BLE001 - read again, with its errors, by the facts phase
        log.debug("config.json not read ahead: %s", e)
        return None


def _kernel_plan(job: ScoreJob, config: dict | None) -> KernelPlan | None:
    """The kernels the warm-up thread runs (kernel_warmup.py), where it is turned on and the job's
    config and dtype are known."""
    if config is None or not kernel_warmup.enabled():
        return None
    try:
        return kernel_warmup.plan_from_config(config, parse_task(job.task))
    except Exception as e:  # noqa: BLE001 - a bad task or dtype is validate_job's to report
        log.debug("no kernel warm-up: %s", e)
        return None


def _dtype_name(dtype: str | None) -> str:
    """The job's dtype for the warm-up thread (`auto` where it is not one: validate_job says so)."""
    try:
        return parse_dtype(dtype)
    except Exception:  # noqa: BLE001 - reported by validate_job, right after
        return "auto"


WARMUP_WAIT_S = 10.0  # the longest a shard waits for its kernel warm-up before its first forward


def _wait_for_kernel_warmup(phases: Phases, plan: KernelPlan | None) -> None:
    """Wait for the warm-up thread's kernels before the model's first forward: SDPA's kernel order
    is process-wide while set (sdpa_order.py), so the two threads must not set it at once."""
    if plan is None or phases.device_warm is None:
        return
    try:
        phases.device_warm.result(timeout=WARMUP_WAIT_S)
    except Exception as e:  # noqa: BLE001 - the warm-up is an optimisation: the load goes on
        log.debug("kernel warm-up not finished: %s", e)
    phases.mark("warmup_wait_s")


def _start_fused_compile(job: ScoreJob, task: str, config: dict | None) -> bool:
    """Start the fused kernels' compile in a process of its own (fused_ops.start_compile_process)
    first thing, from a local model's config.json: the shapes the fuse step keys its marker by.
    Nothing starts for a model whose config says nothing of it would run fused (LayerNorms and
    GELU, no logprob head), nor for a hub model (its config is read later, by transformers).
    Returns whether something of the model would run fused."""
    if config is None:
        return False
    try:
        text = config_text(config)
        if task != "logprob" and "rms_norm_eps" not in text and text.get("hidden_act") not in ("silu", "swish"):
            return False
        widths, vocab = config_shapes(config)
        start_compile_process(parse_dtype(job.dtype), widths, vocab if task == "logprob" else None, device=job.device)
        return True
    except Exception as e:  # noqa: BLE001 - a compile not started is one the fuse step starts, or skips
        log.debug("no compile process for the fused kernels: %s", e)
        return False


def run_score(job: ScoreJob, scorer=None) -> ScoreResult:
    """Score one shard of `job.input` into `job.output` (see the module docstring).

    `scorer`: a Scorer already loaded for the same model and task (`Scorer.from_job`), reused
    instead of loading the model again, as a process that scores many shards would."""
    from attnfallback.events import new_run_id
    from attnfallback.model_facts import read_facts
    from attnfallback.scoring.tasks import AUTO_CLASSES
    from attnfallback.sharding import parse_shard

    t_start = time.perf_counter()
    phases = Phases(process_age())
    on_gpu = scorer is None and job.device != "cpu"
    config = _local_config(job) if on_gpu else None
    plan = _kernel_plan(job, config) if on_gpu else None
    if on_gpu:  # CUDA's context is made while the input and config are read
        phases.device_warm = _start_in_background(_warm_device, job.device, _dtype_name(job.dtype), plan)
    task = validate_job(job)
    fuses = on_gpu and _start_fused_compile(job, task, config)
    shard = parse_shard(job.shard)
    shard_text = str(shard)
    run_id = job.run_id or envs.value(envs.RUN_ID) or new_run_id()
    source = open_input(job.input)
    spec = resolve_spec(source, default_text_columns(task), job.text_column, job.text_columns, job.id_column)
    checking = None
    if job.on_bad_row == "error":  # every row checked while the model loads; joined before any scoring
        checking = _start_in_background(validate_input, source, spec)
    phases.mark("input_s")
    sink = _open_sink(job, run_id, shard_text)
    store = PartStore(job.output)
    try:
        existing = store.open(run_id)
        facts = read_facts(job.model, revision=job.revision, auto_class=AUTO_CLASSES[task], trust_remote_code=job.trust_remote_code)
        phases.mark("facts_s")
        _wait_for_kernel_warmup(phases, plan)
        if fuses:  # after the facts' imports, beside the model's load
            prepare_triton_in_background()
        if checking is not None and checking.done():
            source.num_rows = checking.result()  # a bad row fails now, before the model loads
        fingerprint = job_fingerprint(job, task, source, spec, shard_text, facts.identity)
        resume_parts = _check_existing(store, existing, job, fingerprint)
        if isinstance(resume_parts, ScoreResult):
            # complete already (a run killed between the final rename and its shard_done, or a
            # re-run): record it, so the events never miss a finished shard
            done = resume_parts
            _emit(sink, "shard_done", rows=done.rows_in, rows_written=done.rows_written, rows_skipped=done.rows_skipped,
                  tokens=done.tokens, seconds=0.0, non_finite=done.nonfinite, output=done.output, already_complete=True)
            return done
        return _score(job, task, shard, shard_text, run_id, source, spec, sink, store, fingerprint, resume_parts, t_start, scorer,
                      facts, checking, phases)
    except KeyboardInterrupt as e:
        raise _interrupted(store, sink, shard_text) from e
    except BaseException as e:
        if sink is not None:
            fatal = {"fatal_device_error": True} if is_fatal_device_error(e) else {}  # the process exits at once (cli/app.py)
            _emit(sink, "shard_failed", error=type(e).__name__, message=str(e)[:2000],
                  exit_code=getattr(e, "exit_code", 1), output=str(job.output), parts_committed=len(store.parts), **fatal)
        raise
    finally:
        store.close(remove_lock=True)
        if sink is not None:
            sink.close()


def _interrupted(store, sink, shard: str) -> Interrupted:
    """Ctrl-C: what is committed (the parts written so far are whole; the writer has finished with
    them), a `shard_interrupted` event, and how to go on."""
    parts = len(store.parts)
    rows = sum(p.rows for p in store.parts)
    if parts:
        message = (f"shard {shard}: {parts} part(s) committed ({rows:,} rows) in {store.work}; run the same command "
                   "with --resume to continue from there")
    else:
        message = f"shard {shard}: stopped before any part was committed; run the same command again to start over"
    _emit(sink, "shard_interrupted", output=str(store.output), parts_committed=parts, rows_committed=rows,
          resume=bool(parts))
    return Interrupted(message, output=str(store.output), parts=parts, rows=rows)


def _check_existing(store, existing, job: ScoreJob, fingerprint: dict):
    """None (start fresh), a list of parts to resume from, or a ScoreResult (already complete)."""
    if existing.final_foreign or existing.final_metadata is not None:
        meta = check_complete(store.output, existing.final_metadata, fingerprint, job.resume)
        store.discard_stale_parts()
        return completed_result(meta)
    if existing.manifest is not None:
        manifest = existing.manifest
        if not job.resume:
            raise OutputExistsError(f"a partial output of run {manifest.get('run_id')} ({len(existing.parts)} part(s) committed) is in "
                              f"{store.work}; pass --resume to continue it, or remove that directory to start over", path=str(store.work))
        diff = fingerprint_differences(manifest.get("fingerprint", {}), fingerprint)
        if diff:
            raise OutputExistsError(f"cannot resume: the partial output in {store.work} is from a different job ({diff}); "
                              "remove it to start over", path=str(store.work))
        return existing.parts
    return None


def completed_result(metadata: dict) -> ScoreResult:
    """The result a completed output's summary records, as a run that found it complete returns it."""
    result = ScoreResult(**{k: v for k, v in metadata.get("result", {}).items() if k in ScoreResult.__dataclass_fields__})
    result.already_complete = True
    result.seconds = 0.0
    return result


MEASURE_SAMPLE_ROWS = 256


def measuring_sample(job: ScoreJob, source, spec, shard) -> list[tuple[str, ...]] | None:
    """The shard's first good rows, the sample its candidates are timed on when the policy
    measures (graceful on a CUDA GPU, or fastest; fastest.py): the job's own lengths. None under
    strict or --measure off, which never measure."""
    from itertools import islice

    policy = Policy.resolve(mode=job.policy, prefer=job.prefer, measure=job.measure)
    if policy.mode is Mode.STRICT or (policy.mode is Mode.GRACEFUL and policy.measure == "off"):
        return None
    rows = (r for r in iter_rows(source, spec) if r.problem is None and shard.owns(r.number))
    return [tuple(r.texts) for r in islice(rows, MEASURE_SAMPLE_ROWS)] or None


def _score(job, task, shard, shard_text, run_id, source, spec, sink, store, fingerprint, resume_parts, t_start,
           scorer=None, facts=None, checking=None, phases=None) -> ScoreResult:
    from attnfallback.scoring.pipeline import Scorer, build_table

    if scorer is None:
        def expected_rows() -> int | None:  # asked for after the model loaded, when the measuring budget is set
            if checking is not None:
                source.num_rows = checking.result()
            return None if source.num_rows is None else len(range(shard.index, source.num_rows, shard.count))

        scorer = Scorer.from_job(job, sink=sink, sample_texts=measuring_sample(job, source, spec, shard),
                                 expected_rows=expected_rows, facts=facts)
        phases.mark("load_s")
    elif scorer.task.name != task:
        raise UsageError(f"the scorer given was loaded for task {scorer.task.name}, the job is for {task}")
    phases = phases if phases is not None else Phases(None)
    if checking is not None:
        source.num_rows = checking.result()  # known now: the progress bar gets a total
    phases.mark("load_s")
    scorer.id_type = spec.id_type
    schema = scorer.output_schema
    store.start(fingerprint, run_id, resume_parts, schema)
    resumed = len(store.parts)
    _emit(sink, "shard_start", task=task, model=scorer.decision.facts.model_id, input=str(source.path), output=str(store.output),
          impl=scorer.decision.used, dtype=scorer.decision.dtype, device=str(scorer.device), batch_tokens=scorer.batch_tokens,
          max_length=scorer.max_length, part_rows=job.part_rows, resume_from_part=resumed,
          rows_total=source.num_rows)
    counts = _Counts()
    tty = sys.stderr.isatty()
    total = None if source.num_rows is None else len(range(shard.index, source.num_rows, shard.count))
    progress = _Progress(not job.quiet and tty, total, f"score {shard_text}")
    if resumed:
        progress.advance(sum(p.rows for p in store.parts), 0)
    t_score = time.perf_counter()
    new_tokens = 0
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnfallback-write")
    pending: list[Future] = []
    try:
        chunks = shard_chunks(source, spec, shard, job, resumed, counts)
        for result in scorer.score_chunks(chunks):
            table = build_table(schema, result.chunk.ids, result)
            info = PartInfo(index=result.chunk.index, file=f"part-{result.chunk.index:05d}.parquet", rows=table.num_rows,
                            tokens=result.tokens, padded_tokens=result.padded_tokens, truncated=result.truncated,
                            nonfinite=int(result.nonfinite.sum()), impl=scorer.decision.used)
            # parts are written in order by one thread, while the next chunk runs on the device
            while pending and pending[0].done():
                pending.pop(0).result()
            if len(pending) >= 2:
                pending.pop(0).result()
            pending.append(writer.submit(store.commit_part, table, info))
            new_tokens += result.tokens
            progress.advance(table.num_rows, result.tokens)
        for f in pending:
            f.result()
    finally:
        writer.shutdown(wait=True)
        progress.close()
    score_s = time.perf_counter() - t_score
    phases.mark("score_s")

    parts = store.parts
    rows_written = sum(p.rows for p in parts)
    if rows_written + counts.skipped_count != counts.rows_in:
        raise OutputError(f"row accounting failed: {counts.rows_in} rows in, {rows_written} written, {counts.skipped_count} skipped",
                          path=str(store.output))
    tokens = sum(p.tokens for p in parts)
    result = ScoreResult(
        output=str(store.output),
        rows_in=counts.rows_in,
        rows_written=rows_written,
        rows_skipped=counts.skipped_count,
        skipped=counts.skipped,
        tokens=tokens,
        padded_tokens=sum(p.padded_tokens for p in parts),
        truncated=sum(p.truncated for p in parts),
        seconds=round(time.perf_counter() - t_start, 4),
        tokens_per_s=round(new_tokens / score_s, 1) if score_s > 0 else 0.0,
        nonfinite=sum(p.nonfinite for p in parts),
        decision=scorer.decision.to_dict(),
        run_id=run_id,
        shard=shard_text,
        parts=len(parts),
        resumed_parts=resumed,
        oom_splits=scorer.oom_splits,
        events=None if sink is None else str(sink.path),
        task=scorer.describe(),
        columns=spec.describe(),
    )
    store.finish(output_metadata(run_id, fingerprint, result.to_dict(), counts.skipped_rows))
    phases.mark("finish_s")
    if finish_background_compile() > 0:  # a shard shorter than the fused kernels' compile waits for its end
        phases.mark("compile_wait_s")
    result.phases = phases.as_dict(scorer.decision.timing)
    _emit(sink, "shard_done", rows=result.rows_in, rows_written=result.rows_written, rows_skipped=result.rows_skipped,
          skipped=[{"line": s["line"], "reason": s["reason"]} for s in result.skipped], tokens=result.tokens,
          truncated=result.truncated, seconds=result.seconds, tokens_per_s=result.tokens_per_s, non_finite=result.nonfinite,
          oom_splits=result.oom_splits, output=result.output, parts=result.parts, resumed_parts=resumed, impl=scorer.decision.used,
          fused=scorer.fused, phases=result.phases)
    return result
