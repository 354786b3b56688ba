"""The Ray engine: a scoring job (or a whole sweep) on a Ray cluster.

Ray Data reads the input; every row gets its row number (the input order, which the local
engine's outputs follow too); `map_batches` runs a pool of actors, each loading the model once
through the scoring `Scorer` (so through `load_model`, with its fallback, verification and
`attn_impl` event). Each actor is one shard in the events (`i/N`), with its own node's GPU class.
Actors take `num_gpus=1` where the cluster has GPUs (`actors="auto"`: one per GPU); on CPUs they
take a fraction of a CPU so that Ray Data's read tasks always find one (whole-CPU actors on a 2-core
machine starve the reads: a silent hang). Every actor's environment has NVLink multicast off
(`WORKER_ENV`, as the local engine's workers). The actors' outputs are written as Parquet, then
joined into one file in input order, identical to what the local engine writes, its run's summary
included (scoring/writer.py: `output_metadata`); --resume keeps it by the local engine's rules
(`check_complete`).

Ray is optional (`pip install attnfallback[ray]`); without it this engine is a UsageError (exit 2).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path

from attnfallback import atomic
from attnfallback.errors import AttnFallbackError, OutputError, UsageError

log = logging.getLogger("attnfallback")

INSTALL_HINT = "pip install attnfallback[ray]"
ROW_COLUMN = "__attnfallback_row__"
DEFAULT_BATCH_ROWS = 1024
BLOCKS_PER_ACTOR = 4
CPU_ACTORS = 2  # actors="auto" on a cluster without GPUs
ACTOR_START_TIMEOUT_S = 600  # every actor loads before work starts: each one is a shard


def ray_available() -> bool:
    """Ray and Ray Data are importable (without importing them)."""
    try:
        return find_spec("ray") is not None and find_spec("ray.data") is not None
    except (ImportError, ValueError):
        return False


def require_ray() -> None:
    """A UsageError (exit 2) naming the install command when Ray is missing."""
    if not ray_available():
        raise UsageError(f"the Ray engine needs Ray, which is not installed: {INSTALL_HINT}")


@dataclass
class ActorShard:
    """What one actor (one shard in the events) did."""

    shard: str
    host: str | None = None
    pid: int | None = None
    gpu_class: str | None = None
    used: str | None = None
    requested: str | None = None
    fell_back: bool | None = None
    rows_in: int = 0
    rows_written: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    non_finite: int = 0
    error: str | None = None
    exit_code: int | None = None
    gpu: dict | None = None  # the attn_impl event's gpu (name, class, index, uuid): the actor's own probe
    env: dict | None = None  # CUDA_VISIBLE_DEVICES and WORKER_ENV's variables as the actor's process has them
    decision: dict | None = None  # the attn_impl fields

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "decision"}, "rows_skipped": self.rows_in - self.rows_written}


@dataclass
class RayRun:
    """A Ray scoring run: the result in `score`'s shape, and every actor's shard."""

    result: object  # ScoreResult
    shards: list[ActorShard] = field(default_factory=list)


def _registry_class():
    import ray

    @ray.remote(num_cpus=0)
    class ShardRegistry:
        """Hands each actor its shard index and collects what the actors did."""

        def __init__(self):
            self.next = 0
            self.shards: dict[int, dict] = {}

        def claim(self, info: dict) -> int:
            index = self.next
            self.next += 1
            self.shards[index] = {**info, "rows_in": 0, "rows_written": 0, "tokens": 0, "busy_s": 0.0, "non_finite": 0}
            return index

        def loaded(self, index: int, info: dict) -> None:
            self.shards[index].update(info)

        def failed(self, index: int, error: str, exit_code: int) -> None:
            self.shards[index].update(error=error, exit_code=exit_code)

        def add(self, index: int, rows_in: int, rows_written: int, tokens: int, busy_s: float, non_finite: int) -> None:
            s = self.shards[index]
            s["non_finite"] += non_finite
            s["rows_in"] += rows_in
            s["rows_written"] += rows_written
            s["tokens"] += tokens
            s["busy_s"] += busy_s

        def report(self) -> dict[int, dict]:
            return self.shards

    return ShardRegistry


class ScoreActor:
    """One shard: loads the model once, then scores the batches Ray Data hands it."""

    def __init__(self, job, registry, actors: int, threads: int | None):
        import socket

        import ray

        from attnfallback.sweep.config import WORKER_ENV

        self.registry = registry
        seen = {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", *WORKER_ENV)}
        self.index = ray.get(registry.claim.remote({"host": socket.gethostname(), "pid": os.getpid(), "env": seen}))
        self.shard = f"{self.index}/{actors}"
        if threads:
            import torch

            torch.set_num_threads(threads)
        from attnfallback.scoring import Scorer

        try:
            self.scorer = Scorer.from_job(replace(job, shard=self.shard))
        except Exception as e:
            self._fail(e)
        decision = self.scorer.decision.to_dict()
        ray.get(registry.loaded.remote(self.index, {
            "gpu_class": decision["gpu"]["class"], "gpu": decision["gpu"], "used": decision["used"],
            "requested": decision["requested"],
            "fell_back": decision["fell_back"], "decision": decision}))
        # score_table keeps the chunk's token count to itself: count it as it passes by
        self.tokens = 0
        run = self.scorer.run

        def counting_run(prepared):
            result = run(prepared)
            self.tokens += result.tokens
            return result

        self.scorer.run = counting_run
        self.id_column = job.id_column
        if self.scorer.sink is not None:
            self.scorer.sink.emit("shard_start", task=job.task, model=self.scorer.decision.facts.model_id, input=job.input,
                                  impl=self.scorer.decision.used, dtype=self.scorer.decision.dtype,
                                  device=str(self.scorer.device), batch_tokens=self.scorer.batch_tokens,
                                  max_length=self.scorer.max_length, engine="ray")

    def _fail(self, e: Exception):
        """Tell the registry (the driver reports it, exit code included), then fail this actor.

        Raised again as a RuntimeError: some of our exceptions (AttentionUnavailable) do not
        survive pickling, and Ray would turn them into an unreadable internal error.
        """
        import ray

        if isinstance(e, AttnFallbackError):
            message, code = str(e), e.exit_code
        else:
            message, code = f"{type(e).__name__}: {e}", 1
        ray.get(self.registry.failed.remote(self.index, message, code))  # delivered before this actor dies
        raise RuntimeError(f"shard {self.shard}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def __call__(self, batch):
        import pyarrow as pa

        t0 = time.perf_counter()
        tokens_before = self.tokens
        rows = batch.column(ROW_COLUMN)
        try:
            out = self.scorer.score_table(batch)
        except Exception as e:
            self._fail(e)
        if out.num_rows == batch.num_rows:
            row_numbers = rows
        else:  # rows skipped (on_bad_row = skip): find the survivors by their id
            position = {v: i for i, v in enumerate(batch.column(self.id_column).to_pylist())}
            row_numbers = pa.array([rows[position[v]].as_py() for v in out.column("id").to_pylist()], pa.int64())
        out = out.append_column(ROW_COLUMN, row_numbers)
        non_finite = 0
        if "nonfinite" in out.column_names:
            import pyarrow.compute as pc

            non_finite = int(pc.sum(out.column("nonfinite")).as_py() or 0)
        self.registry.add.remote(self.index, batch.num_rows, out.num_rows, self.tokens - tokens_before,
                                 time.perf_counter() - t0, non_finite)
        return out


# --- running ----------------------------------------------------------------------------------

class _RaySession:
    """ray.init when Ray is not running yet (and ray.shutdown after); else the running one."""

    def __init__(self, address: str | None):
        self.address = address
        self.started = False

    def __enter__(self):
        import ray

        if not ray.is_initialized():
            # the actors' failures reach the report through the registry; their logs stay on the nodes
            kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
            if self.address:
                kwargs["address"] = self.address
            ray.init(**kwargs)
            self.started = True
        return ray

    def __exit__(self, *exc):
        if self.started:
            import ray

            ray.shutdown()


def _read_dataset(source):
    """Ray Data reads the input the way the local reader does (CSV: every column a string).

    Compressed JSONL/CSV: Ray infers the codec from the name (`file_extensions=None`: any name
    `open_input` accepted). Arrow files and saved datasets: memory-mapped, then handed to Ray."""
    import ray.data

    path = str(source.path)
    if source.format == "csv":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        return ray.data.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=source.delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in source.columns},
                                                 strings_can_be_null=False),
            file_extensions=None,
        )
    if source.format == "jsonl":
        return ray.data.read_json(path, lines=True, file_extensions=None)
    if source.format == "arrow":
        from attnfallback.scoring.inputs import arrow_table

        return ray.data.from_arrow(arrow_table(source))
    return ray.data.read_parquet(path)


def _with_row_numbers(ds, rows: int):
    """Every row with its 0-based position in the input (Dataset.zip is positional)."""
    import ray.data

    numbers = ray.data.range(rows).rename_columns({"id": ROW_COLUMN})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zip's deprecation notice: ordering is preserved below
        return ds.zip(numbers)


def parse_actors(value) -> int | str:
    """`--actors`: a positive integer, or "auto" (one actor per GPU of the cluster; 2 without GPUs)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if not text.lstrip("-").isdigit():
            raise UsageError(f"--actors must be a positive integer or auto, found {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"--actors must be a positive integer or auto, found {value!r}")
    if value < 1:
        raise UsageError(f"--actors must be >= 1, found {value}")
    return value


def _resources(ray, actors: int | str, actor_cpus: float | None, device: str = "auto") -> tuple[dict, int, int | None]:
    """(ray_remote_args per actor, actors, torch threads per actor) for this cluster: one GPU per
    actor where it has GPUs (no more actors than GPUs), else a share of the CPUs."""
    total = ray.cluster_resources()
    gpus = 0 if device == "cpu" else int(total.get("GPU", 0))
    cpus = float(total.get("CPU", 1))
    if gpus > 0:
        actors = gpus if actors == "auto" else min(actors, gpus)
        return {"num_gpus": 1, "num_cpus": actor_cpus if actor_cpus is not None else 1}, actors, None
    if actors == "auto":
        actors = CPU_ACTORS
    # leave a whole CPU to Ray Data's read and write tasks
    share = actor_cpus if actor_cpus is not None else max(0.1, min(1.0, (cpus - 1) / actors))
    return {"num_cpus": share}, actors, max(1, int(share))


def run_score_ray(job, address: str | None = None, actors: int | str = "auto", *, actor_cpus: float | None = None,
                  batch_rows: int = DEFAULT_BATCH_ROWS, echo=None):
    """Score `job` on Ray with `actors` actors (each a shard in the events; "auto": one per GPU of
    the cluster, 2 without GPUs); returns a ScoreResult.

    The output (`job.output`, one Parquet file) holds the same rows, in the same order, as
    `run_score(job)` writes. `address`: a Ray cluster (default: the running instance, else a
    local one started and stopped here).
    """
    return _run_ray(job, address, actors, actor_cpus, batch_rows, echo).result


def _actor_env() -> dict[str, str]:
    """WORKER_ENV, and the bytecode directory the command line chose (bytecode.py), so the actors'
    imports read bytecode too."""
    from attnfallback.sweep.config import WORKER_ENV

    env = dict(WORKER_ENV)
    if os.environ.get("PYTHONPYCACHEPREFIX"):
        env["PYTHONPYCACHEPREFIX"] = os.environ["PYTHONPYCACHEPREFIX"]
    return env


def _run_ray(job, address, actors, actor_cpus, batch_rows, echo) -> RayRun:
    require_ray()
    import pyarrow.compute as pc

    from attnfallback.events import new_run_id
    from attnfallback.scoring.inputs import open_input, resolve_spec
    from attnfallback.scoring.job import ScoreResult, validate_input, validate_job
    from attnfallback.scoring.writer import output_metadata
    from attnfallback.task_names import default_text_columns

    if job.shard is not None:
        raise UsageError("--shard with the Ray engine: Ray spreads the rows over its actors (each a shard in the "
                         "events); pass --actors N instead")
    actors = parse_actors(actors)
    task = validate_job(job)
    source = open_input(job.input)
    spec = resolve_spec(source, default_text_columns(task), job.text_column, job.text_columns, job.id_column)
    if job.on_bad_row == "error":
        # as the local engine does: the first bad row (a duplicate id across the actors' batches
        # too) is an error naming its file and line, before any actor starts
        validate_input(source, spec)
    run_id = job.run_id or new_run_id()
    output = Path(job.output)
    fingerprint = ray_fingerprint(job, task, source, spec)
    complete = completed_output(output, fingerprint, job.resume)
    if complete is not None:
        return RayRun(complete)
    t0 = time.perf_counter()
    actor_job = replace(job, text_column=None, text_columns=list(spec.text_columns),
                        id_column=spec.id_column or ROW_COLUMN, run_id=run_id, shard=None, resume=False, quiet=True)
    with _RaySession(address) as ray:
        import ray.data

        remote_args, actors, threads = _resources(ray, actors, actor_cpus, job.device)
        context = ray.data.DataContext.get_current()
        options = context.execution_options
        saved = (options.preserve_order, context.enable_progress_bars, context.wait_for_min_actors_s)
        options.preserve_order = True  # the row numbers rely on it
        context.enable_progress_bars = False
        # Without this the pool starts with the first ready actor, and on a small input the others
        # are torn down mid-load; with it, a cluster too small for the pool is an error, not a hang.
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        # a failed actor is reported through the registry: Ray Data's own traces of it are noise
        quiet = {name: logging.getLogger(name) for name in ("ray.data", "ray.data.exceptions")}
        saved_levels = {name: logger.level for name, logger in quiet.items()}
        quiet["ray.data"].setLevel(max(saved_levels["ray.data"], logging.ERROR))
        quiet["ray.data.exceptions"].setLevel(logging.CRITICAL)
        registry = _registry_class().remote()
        parts = output.parent / f".{output.name}.ray-parts"
        shutil.rmtree(parts, ignore_errors=True)
        try:
            ds = _read_dataset(source)
            rows_in = ds.count()
            if rows_in == 0:
                from attnfallback.errors import InputError

                raise InputError("empty input: no rows", path=str(source.path))
            columns = list(dict.fromkeys(spec.text_columns + ([spec.id_column] if spec.id_column else [])))
            ds = _with_row_numbers(ds.select_columns(columns), rows_in)
            blocks = max(1, min(rows_in, actors * BLOCKS_PER_ACTOR))
            ds = ds.repartition(blocks)
            # Ray Data bundles blocks up to a batch before handing them to an actor: a batch larger
            # than a block's share would send a small input to one actor only
            batch_rows = max(1, min(batch_rows, -(-rows_in // blocks)))
            scored = ds.map_batches(
                ScoreActor,
                fn_constructor_kwargs={"job": actor_job, "registry": registry, "actors": actors, "threads": threads},
                batch_size=batch_rows, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
                runtime_env={"env_vars": _actor_env()}, **remote_args,
            )
            if echo:
                echo(f"  ray: {rows_in} rows over {actors} actors ({', '.join(f'{k}={v}' for k, v in remote_args.items())})")
            failure = None
            try:
                scored.write_parquet(str(parts))
            except Exception as e:  # noqa: BLE001 - the registry says which shard failed and why
                failure = e
            shards = _collect(ray, registry, actors)
            if failure is not None:
                error = _failure_error(failure, shards)
                error.shards = shards
                raise error from failure
            table, skipped_rows = _merged_table(parts, rows_in)
        finally:
            options.preserve_order, context.enable_progress_bars, context.wait_for_min_actors_s = saved
            for name, logger in quiet.items():
                logger.setLevel(saved_levels[name])
            shutil.rmtree(parts, ignore_errors=True)
    rows_written = table.num_rows
    rows_skipped = rows_in - rows_written
    if sum(s.rows_in for s in shards) != rows_in or sum(s.rows_written for s in shards) != rows_written:
        raise OutputError(f"row accounting failed: {rows_in} rows in, {rows_written} written, "
                          f"{sum(s.rows_in for s in shards)} seen by the actors", path=str(output))
    seconds = time.perf_counter() - t0
    tokens = sum(s.tokens for s in shards)
    first = next((s for s in shards if s.used), None)
    nonfinite = int(pc.sum(table.column("nonfinite")).as_py() or 0) if "nonfinite" in table.column_names else 0
    result = ScoreResult(
        output=str(output), rows_in=rows_in, rows_written=rows_written, rows_skipped=rows_skipped, skipped=[],
        tokens=tokens, truncated=0, seconds=round(seconds, 4), tokens_per_s=round(tokens / seconds, 1) if seconds else 0.0,
        nonfinite=nonfinite, decision=getattr(first, "decision", None) or {}, run_id=run_id,
        shard=f"ray ({len(shards)} actors)", parts=len(shards),
        events=job.events, task={"engine": "ray", "actors": [s.to_dict() for s in shards]}, columns=spec.describe(),
    )
    _write_output(table, output, output_metadata(run_id, fingerprint, result.to_dict(), skipped_rows))
    _emit_shard_done(job.events, run_id, shards, output)
    return RayRun(result, shards)


RAY_SHARD = "ray"  # the shard a Ray output's fingerprint names: the actors split the rows among themselves


def ray_fingerprint(job, task: str, source, spec) -> dict:
    """What must match for --resume to keep a Ray output: the local engine's fingerprint
    (`job_fingerprint`: the model's identity, the input, the columns, the settings) of the whole input."""
    from attnfallback.model_facts import read_facts
    from attnfallback.scoring.job import job_fingerprint
    from attnfallback.scoring.tasks import AUTO_CLASSES

    facts = read_facts(job.model, revision=job.revision, auto_class=AUTO_CLASSES[task], trust_remote_code=job.trust_remote_code)
    return job_fingerprint(job, task, source, spec, RAY_SHARD, facts.identity)


def completed_output(output: Path, fingerprint: dict, resume: bool):
    """The ScoreResult of a completed output at `output` that this job keeps, or None where there
    is no file. The local engine's rules (`check_complete`): a file without attnfallback's summary,
    a completed run without `resume`, or another job's output is an OutputExistsError."""
    from attnfallback.scoring.job import completed_result
    from attnfallback.scoring.writer import check_complete, read_output_metadata

    if not output.exists():
        return None
    return completed_result(check_complete(output, read_output_metadata(output), fingerprint, resume))


def output_run_id(output: Path) -> str | None:
    """The run a completed output's summary names; None for a file without one."""
    from attnfallback.scoring.writer import read_output_metadata

    return (read_output_metadata(output) or {}).get("run_id")


def _collect(ray, registry, actors: int) -> list[ActorShard]:
    report = ray.get(registry.report.remote())
    shards = []
    for index in sorted(report):
        info = report[index]
        if info.get("used") is None and not info.get("error") and not info.get("rows_in"):
            continue  # an actor torn down before it loaded: no shard
        shards.append(ActorShard(shard=f"{index}/{actors}", **{k: v for k, v in info.items()
                                                               if k in ActorShard.__dataclass_fields__ and k != "shard"}))
    return shards


def _failure_error(exc: BaseException, shards: list[ActorShard]) -> AttnFallbackError:
    """The error a failed Ray run raises: the first failed shard's own message and exit code."""
    failed = [s for s in shards if s.error]
    if failed:
        first = failed[0]
        message = f"shard {first.shard} on {first.host}: {first.error}"
        if len(failed) > 1:
            message += f"\n(and {len(failed) - 1} more shard(s) failed; see the events)"
        err = AttnFallbackError(message)
        err.exit_code = first.exit_code or 1
        return err
    text = str(exc).strip().splitlines()
    return AttnFallbackError(f"the Ray job failed: {type(exc).__name__}: {text[0] if text else ''}")


def _merged_table(parts: Path, rows_in: int):
    """The actors' Parquet files as one table in input order, and the numbers of the input rows
    missing from it (skipped)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(parts.glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    table = pa.concat_tables(tables, promote_options="default") if tables else None
    if table is None:
        raise OutputError(f"the Ray job wrote no output under {parts}", path=str(parts))
    table = table.take(pc.sort_indices(table.column(ROW_COLUMN)))
    skipped = np.setdiff1d(np.arange(rows_in, dtype=np.int64), table.column(ROW_COLUMN).to_numpy())
    return table.drop_columns([ROW_COLUMN]), skipped.tolist()


def _write_output(table, output: Path, metadata: dict) -> None:
    """The merged table at `output`, atomically, with the run's summary (writer.output_metadata)."""
    import pyarrow.parquet as pq

    from attnfallback.scoring.writer import encode_metadata

    table = table.replace_schema_metadata(encode_metadata(metadata))
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic.writing(output) as fh:
        pq.write_table(table, fh)


def _emit_shard_done(events, run_id: str, shards: list[ActorShard], output: Path) -> None:
    """One `shard_done` per actor, written by the driver for the actor's host and process."""
    from attnfallback.events import open_sink

    for s in shards:
        sink = open_sink(events, run_id, s.shard)
        if sink is None:
            return
        with sink:
            sink.emit("shard_done", rows=s.rows_in, rows_written=s.rows_written, rows_skipped=s.rows_in - s.rows_written,
                      tokens=s.tokens, seconds=round(s.busy_s, 4),
                      tokens_per_s=round(s.tokens / s.busy_s, 1) if s.busy_s else 0.0, non_finite=s.non_finite,
                      output=str(output), impl=s.used, engine="ray", host=s.host, pid=s.pid)


# --- sweeps -----------------------------------------------------------------------------------

def run_sweep_ray(config, *, resume: bool = False, address: str | None = None, echo=None,
                  actor_cpus: float | None = None, batch_rows: int = DEFAULT_BATCH_ROWS):
    """Run a sweep on Ray: each configuration one Ray Data job with `shards` actors (each a shard
    in the events); its output is one Parquet file in input order. Failures are reported per
    configuration and shard, not raised; `resume` re-runs only configurations not complete."""
    require_ray()
    from attnfallback.sweep.local import JobResult, SweepResult, interrupted, read_run_events
    from attnfallback.sweep.state import claim_output

    t0 = time.perf_counter()
    state = claim_output(config, resume, engine="ray")
    jobs: list[JobResult] = []
    merged: dict[str, dict] = {}
    if echo:
        echo(f"sweep {state.run_id}: {len(config.specs)} configuration{'s' if len(config.specs) != 1 else ''} on Ray, "
             "each shard one actor")
    try:
        with _RaySession(address):
            for spec in config.specs:
                run_id = config.run_id_of(spec, state.run_id)
                output = config.config_dir(spec) / "scores.parquet"
                key = f"{spec.name}/ray"
                previous = state.jobs.get(key, {})
                if resume and state.is_done(key, output) and output_run_id(output) == run_id:
                    jobs += [JobResult(spec.name, s["shard"], run_id, "complete", 0, str(output), "", s.get("host"), s.get("busy_s"))
                             for s in previous.get("shards", [])]
                    merged[spec.name] = {"path": str(output), "rows": previous.get("rows"), "order": "input order (by row number)"}
                    continue
                output.unlink(missing_ok=True)  # a completed output is only ever one the manifest calls done
                state.update_job(key, status="running", run_id=run_id, output=str(output), exit_code=None, error=None)
                if echo:
                    echo(f"  start  {spec.name} on Ray ({spec.shards} actors)")
                t_job = time.perf_counter()
                try:
                    run = _run_ray(spec.score_job(run_id, None, output, config.events), None, spec.shards, actor_cpus,
                                   batch_rows, echo)
                except AttnFallbackError as e:
                    shards = getattr(e, "shards", [])
                    state.update_job(key, status="failed", exit_code=e.exit_code, error=str(e).splitlines()[0],
                                     shards=[s.to_dict() for s in shards])
                    if echo:
                        echo(f"  FAILED {spec.name} exit {e.exit_code}: {str(e).splitlines()[-1].strip()}")
                    failed = [s for s in shards if s.error] or [ActorShard(shard=f"?/{spec.shards}")]
                    for s in failed:
                        text = s.error or str(e)
                        jobs.append(JobResult(spec.name, s.shard, run_id, "failed", s.exit_code or e.exit_code, str(output), "",
                                              s.host, None, text.strip().splitlines()[-1].strip(), text))
                    continue
                seconds = round(time.perf_counter() - t_job, 3)
                state.update_job(key, status="done", exit_code=0, seconds=seconds, rows=run.result.rows_written,
                                 shards=[s.to_dict() for s in run.shards])
                merged[spec.name] = {"path": str(output), "rows": run.result.rows_written, "order": "input order (by row number)"}
                state.outputs[spec.name] = str(output)
                if echo:
                    echo(f"  done   {spec.name} {seconds:6.1f} s ({', '.join(f'{s.shard} {s.used}' for s in run.shards)})")
                jobs += [JobResult(spec.name, s.shard, run_id, "done", 0, str(output), "", f"{s.host}:{s.pid}",
                                   round(s.busy_s, 3), score=s.to_dict()) for s in run.shards]
    except KeyboardInterrupt:
        raise interrupted(config, state, total=len(config.specs)) from None
    state.save()
    run_ids = sorted({config.run_id_of(spec, state.run_id) for spec in config.specs})
    shard_rows, summary = read_run_events(config.events, run_ids)
    # Ray stops a job at its first failed actor: the others' failures are in the events only
    known = {(j.run_id, j.shard) for j in jobs}
    names = {config.run_id_of(spec, state.run_id): spec.name for spec in config.specs}
    for row in shard_rows:
        if (row["run_id"], row["shard"]) not in known and row["strict_failure"]:
            reason = f"{row['failed_impl']}: {row['reason']}" if row.get("failed_impl") else (row.get("reason") or "")
            jobs.append(JobResult(names.get(row["run_id"], row["run_id"]), row["shard"], row["run_id"], "failed", 3, "", "",
                                  row.get("host"), None, reason, reason))
    jobs.sort(key=lambda j: (list(names.values()).index(j.config) if j.config in names.values() else 0, _shard_index(j.shard)))
    result = SweepResult(state.run_id, "ray", str(config.output), str(config.events), str(state.path), jobs, merged)
    result.shards, result.summary = shard_rows, summary
    result.seconds = time.perf_counter() - t0
    return result


def _shard_index(shard: str) -> int:
    head = shard.split("/", 1)[0]
    return int(head) if head.isdigit() else -1
