"""The local engine: every configuration x shard as one `attnfallback score` process.

One process per job isolates what a shard must not share: its own CUDA_VISIBLE_DEVICES (one
visible GPU per worker), its own crash, its own exit code. Workers are the visible GPUs
(`devices = "auto"` or a list; each GPU job tokenizes on its share of the cores) or K processes on
the CPU (`workers = K`, each with its share of the cores as threads). A job that fails is reported with its exit code and the last error line
while the others finish; `resume=True` runs only the jobs that are not complete (each with
`resume` set, so a killed shard continues from its last committed part).

The process gets its job as a file: the job's ScoreJob (`SweepJob.score_job`) is written beside its
log, `<output>/<config>/logs/<i>-of-<n>.job.json`, and run by `attnfallback score --job FILE
--result <i>-of-<n>.result.json`; the sweep reads the result file afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib.util import find_spec
from dataclasses import asdict, dataclass, field
from pathlib import Path

from attnfallback import envs
from attnfallback.errors import Interrupted
from attnfallback.sweep.config import SweepConfig, SweepJob
from attnfallback.sweep.state import SweepState, claim_output, merge_outputs

log = logging.getLogger("attnfallback")

# Environment a job must not inherit from the sweep's own shell: the job gets its own.
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
STOP_WAIT_S = 30  # after a Ctrl-C: how long the jobs get to commit what they hold and say so


@dataclass(frozen=True)
class Worker:
    """Where a job runs: `cuda` with one visible GPU, or `cpu` with a number of threads."""

    name: str
    device: str  # cuda | cpu
    visible: str  # CUDA_VISIBLE_DEVICES for the job ("" hides every GPU)
    threads: int | None = None
    tokenizer_threads: int | None = None  # a GPU job's share of the cores for tokenizing (RAYON_NUM_THREADS)


@dataclass
class JobResult:
    """How one configuration x shard ended."""

    config: str
    shard: str
    run_id: str
    status: str  # done | failed | interrupted | complete (already done before this run)
    exit_code: int | None
    output: str
    log: str
    worker: str | None = None
    seconds: float | None = None
    error: str | None = None  # the last error line
    error_text: str | None = None  # the whole error message (e.g. every strict reason)
    score: dict | None = None  # the result the job's process wrote (`score --result`: what --json prints)

    @property
    def ok(self) -> bool:
        return self.status in ("done", "complete")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepResult:
    """The outcome of a sweep: every job, the merged outputs, the events of the run."""

    run_id: str
    engine: str
    output: str
    events: str
    manifest: str
    jobs: list[JobResult]
    merged: dict[str, dict] = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)  # one row per shard from the events
    summary: list[dict] = field(default_factory=list)  # per GPU class, from the events
    seconds: float = 0.0

    @property
    def failed(self) -> list[JobResult]:
        return [j for j in self.jobs if not j.ok]

    @property
    def exit_code(self) -> int:
        """0 when every job completed; else the failed jobs' code when they agree, else 1."""
        codes = {j.exit_code for j in self.failed}
        if not codes:
            return 0
        if len(codes) == 1:
            code = codes.pop()
            return code if code is not None and code > 0 else 1
        return 1

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id, "engine": self.engine, "output": self.output, "events": self.events,
            "manifest": self.manifest, "exit_code": self.exit_code, "seconds": round(self.seconds, 3),
            "jobs": [j.to_dict() for j in self.jobs], "merged": self.merged,
            "shards": self.shards, "summary": self.summary,
        }


# --- placement --------------------------------------------------------------------------------

def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (no CUDA context made)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    try:
        count = torch.cuda.device_count()  # NVML-based where it can be: creates no context
    except Exception:  # noqa: BLE001 - a broken driver means no GPU for us
        return []
    return [str(i) for i in range(count)]


def plan_workers(config: SweepConfig, gpus: list[str] | None = None, cpu_count: int | None = None) -> list[Worker]:
    """One worker per GPU (devices = "auto" with GPUs, or a list), else K CPU workers."""
    n_jobs = sum(s.shards for s in config.specs)
    if config.devices != "cpu":
        if isinstance(config.devices, list):
            chosen = [str(d) for d in config.devices]
        else:
            chosen = visible_gpus() if gpus is None else list(gpus)
        if chosen:
            # each GPU job tokenizes on its share of the cores: one tokenizer thread would starve its GPU
            share = max(1, (cpu_count or os.cpu_count() or 1) // len(chosen))
            return [Worker(f"gpu{d}", "cuda", d, tokenizer_threads=share) for d in chosen]
    cores = cpu_count or os.cpu_count() or 1
    k = config.workers or max(1, min(n_jobs, cores))
    threads = max(1, cores // k)
    return [Worker(f"cpu{i}", "cpu", "", threads) for i in range(k)]


# --- running ----------------------------------------------------------------------------------

def job_env(worker: Worker, job: SweepJob, base: dict | None = None) -> dict:
    """The environment of one job's process."""
    from attnfallback.sweep.config import WORKER_ENV

    env = dict(os.environ if base is None else base)
    for name in envs.PER_JOB:
        env.pop(name, None)
    env["CUDA_VISIBLE_DEVICES"] = worker.visible
    env.update(WORKER_ENV)  # NVLink multicast off, whatever the parent has
    if worker.threads is not None:
        for name in _THREAD_ENV:
            env[name] = str(worker.threads)
    env[envs.RUN_ID] = job.run_id
    env[envs.SHARD] = str(job.shard)
    if worker.tokenizer_threads is not None:
        env.setdefault("TOKENIZERS_PARALLELISM", "true")
        env.setdefault("RAYON_NUM_THREADS", str(worker.tokenizer_threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def job_command(job: SweepJob, worker: Worker, resume: bool) -> list[str]:
    """Write the job's ScoreJob for `worker` to its job file; returns the command that runs it."""
    job.write_job_file(device=worker.device, resume=resume)
    return [sys.executable, "-m", "attnfallback.cli.app", *job.score_args()]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "did not start"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def read_error(log_path: Path) -> tuple[str | None, str | None]:
    """(last error line, whole error message) from a job's stderr log."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, None
    lines = [ln.rstrip() for ln in lines if ln.strip()]
    if not lines:
        return None, None
    start = max((i for i, ln in enumerate(lines) if ln.startswith("error:")), default=None)
    if start is None:
        return lines[-1], lines[-1]
    block = [lines[start]] + [ln for ln in lines[start + 1:] if ln.startswith((" ", "\t"))]
    return block[-1].strip(), "\n".join(block)


def read_result(path: Path) -> dict | None:
    """The result dict a job's process wrote (`score --result`); None where it wrote none (it
    failed, or was stopped) or the file is not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _Runner:
    """Runs jobs on a fixed set of workers, one thread per worker."""

    def __init__(self, state: SweepState, workers: list[Worker], resume: bool,
                 on_start: Callable[[SweepJob, subprocess.Popen], None] | None,
                 echo: Callable[[str], None] | None):
        self.state = state
        self.workers = workers
        self.resume = resume
        self.on_start = on_start
        self.echo = echo or (lambda _text: None)
        self.results: dict[str, JobResult] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def run(self, jobs: list[SweepJob]) -> None:
        todo: queue.Queue[SweepJob] = queue.Queue()
        for job in jobs:
            todo.put(job)
        threads = [threading.Thread(target=self._work, args=(w, todo), name=f"sweep-{w.name}", daemon=True)
                   for w in self.workers[: max(1, min(len(self.workers), len(jobs)))]]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except BaseException:
            # Ctrl-C (or a failure here): each job gets SIGINT, as `score` run by hand would, so it
            # finishes the part it is writing and records `shard_interrupted`; then it is killed
            self.stopping = True
            self._signal_jobs(signal.SIGINT)
            try:
                deadline = time.monotonic() + STOP_WAIT_S
                for t in threads:
                    t.join(max(0.0, deadline - time.monotonic()))
            finally:  # a second Ctrl-C cuts the wait short, never leaves a job running
                self._signal_jobs(signal.SIGKILL)
                for t in threads:
                    t.join(5)
            raise

    def _signal_jobs(self, sig: int) -> None:
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)  # the job's own session: its tokenizer process too
            except (ProcessLookupError, PermissionError):
                pass

    def _work(self, worker: Worker, todo: queue.Queue) -> None:
        while not self.stopping:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            self.results[job.key] = self._run_one(job, worker)

    def _run_one(self, job: SweepJob, worker: Worker) -> JobResult:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        job.output.parent.mkdir(parents=True, exist_ok=True)
        # --resume on every re-run: the scorer continues from its last committed part
        resume = self.resume and job.key in self.state.jobs
        job.result_file.unlink(missing_ok=True)  # an earlier run's result must not pass for this one's
        cmd = job_command(job, worker, resume)
        self.state.update_job(job.key, status="running", worker=worker.name, exit_code=None, error=None,
                              output=str(job.output), log=str(job.log), run_id=job.run_id, command=cmd[1:])
        self.echo(f"  start  {job.key:<24} on {worker.name}")
        t0 = time.perf_counter()
        with open(job.log, "ab") as err:
            err.write(f"--- {' '.join(cmd[3:])}\n".encode())
            err.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=job_env(worker, job),
                                    start_new_session=True)
            with self.lock:
                self.procs[job.key] = proc
            if self.on_start is not None:
                self.on_start(job, proc)
            proc.communicate()  # stdout: the result's text summary, not kept (the result file has it all)
            with self.lock:
                self.procs.pop(job.key, None)
        seconds = time.perf_counter() - t0
        code = proc.returncode
        score = read_result(job.result_file)
        ok = code == 0 and job.output.exists()
        error = error_text = None
        if not ok:
            error, error_text = read_error(job.log)
            if code == 0:
                error = error_text = f"exit 0 but no output at {job.output}"
            elif code is not None and code < 0:
                error = f"{describe_exit(code)}" + (f"; last output: {error}" if error else "")
        status = "done" if ok else ("interrupted" if self.stopping else "failed")
        self.state.update_job(job.key, status=status, exit_code=code, error=error, seconds=round(seconds, 3),
                              rows=(score or {}).get("rows_written"), skipped=(score or {}).get("rows_skipped"))
        if ok:
            used = ((score or {}).get("decision") or {}).get("used")
            self.echo(f"  done   {job.key:<24} {seconds:6.1f} s" + (f"  ({used})" if used else ""))
        elif status == "interrupted":
            self.echo(f"  STOP   {job.key:<24} {describe_exit(code)}: {error}")
        else:
            self.echo(f"  FAILED {job.key:<24} {describe_exit(code)}: {error}")
        return JobResult(job.spec.name, str(job.shard), job.run_id, status, code, str(job.output), str(job.log),
                         worker.name, round(seconds, 3), error, error_text, score)


def run_local(
    config: SweepConfig,
    *,
    resume: bool = False,
    on_start: Callable[[SweepJob, subprocess.Popen], None] | None = None,
    echo: Callable[[str], None] | None = None,
    gpus: list[str] | None = None,
) -> SweepResult:
    """Run a sweep on this machine; returns every job's outcome (failures included, not raised).

    `on_start(job, process)` is called as each job's process starts (for supervision and tests);
    `echo` receives one progress line per job start and end.
    """
    t0 = time.perf_counter()
    state = claim_output(config, resume, engine="local")
    jobs = config.jobs(state.run_id)
    workers = plan_workers(config, gpus=gpus)
    results: dict[str, JobResult] = {}
    pending = []
    for job in jobs:
        if resume and state.is_done(job.key, job.output):
            prev = state.jobs[job.key]
            results[job.key] = JobResult(job.spec.name, str(job.shard), job.run_id, "complete", prev.get("exit_code", 0),
                                         str(job.output), str(job.log), prev.get("worker"), prev.get("seconds"))
        else:
            pending.append(job)
    if echo:
        where = ", ".join(w.name for w in workers)
        echo(f"sweep {state.run_id}: {len(jobs)} jobs ({len(pending)} to run) on {len(workers)} "
             f"worker{'s' if len(workers) != 1 else ''} ({where})")
    runner = _Runner(state, workers, resume, on_start, echo)
    if pending:
        try:
            runner.run(pending)
        except KeyboardInterrupt:
            raise interrupted(config, state) from None
    results.update(runner.results)
    ordered = [results[j.key] for j in jobs if j.key in results]
    result = SweepResult(state.run_id, "local", str(config.output), str(config.events), str(state.path), ordered)
    finish(config, state, result)
    result.seconds = time.perf_counter() - t0
    return result


def _ids_are_row_numbers(outputs: list[Path]) -> bool:
    """Whether the shards' ids are row numbers: each shard's fingerprint names the id column it
    resolved (a configuration without id_column still uses the input's `id` column if it has one)."""
    from attnfallback.scoring.writer import read_output_metadata

    return all((read_output_metadata(p) or {}).get("fingerprint", {}).get("id_column", "?") is None for p in outputs)


def interrupted(config: SweepConfig, state: SweepState, total: int | None = None) -> Interrupted:
    """Ctrl-C: the manifest marks the jobs it stopped; the message says what is done and how to go on."""
    stopped = state.mark_interrupted()
    done = sum(1 for j in state.jobs.values() if j.get("status") == "done")
    total = total if total is not None else sum(s.shards for s in config.specs)
    how = (f"resume with: attnfallback sweep {config.path} --resume" if config.path is not None
           else "run it again to start afresh")
    return Interrupted(f"sweep {state.run_id}: {done} of {total} jobs done, {len(stopped)} interrupted "
                       f"({', '.join(stopped) or 'none'}; their committed parts are kept); {how} (manifest: {state.path})",
                       output=str(config.output), parts=done)


def finish(config: SweepConfig, state: SweepState, result: SweepResult) -> None:
    """Merge each fully done configuration's shards; read the run's events."""
    by_config: dict[str, list[JobResult]] = {}
    for j in result.jobs:
        by_config.setdefault(j.config, []).append(j)
    if config.merge:
        for spec in config.specs:
            jobs = by_config.get(spec.name, [])
            if len(jobs) != spec.shards or not all(j.ok for j in jobs):
                continue
            outputs = [Path(j.output) for j in jobs]
            merged = merge_outputs(outputs, config.config_dir(spec) / "scores.parquet",
                                   ids_are_row_numbers=_ids_are_row_numbers(outputs))
            result.merged[spec.name] = merged
            state.outputs[spec.name] = merged["path"]
    state.save()
    run_ids = sorted({j.run_id for j in result.jobs})
    result.shards, result.summary = read_run_events(config.events, run_ids)


def read_run_events(events: Path, run_ids: list[str]) -> tuple[list[dict], list[dict]]:
    """Per-shard rows and a per-GPU-class summary of these runs, from the events query."""
    if not Path(events).is_dir() or not run_ids:
        return [], []
    from attnfallback.errors import InputError
    from attnfallback.events import open_log

    if find_spec("duckdb") is None:
        log.warning("the events summary needs duckdb (pip install duckdb); the shards' own reports are shown instead")
        return [], []
    try:
        with open_log(events) as event_log:
            marks = ", ".join("?" for _ in run_ids)
            order = "TRY_CAST(split_part(shard, '/', 1) AS BIGINT), shard"
            shards = event_log.sql(
                f"SELECT run_id, shard, host, gpu_class, requested, used, fell_back, strict_failure, "
                f"failed_impl, reason, rows, skipped, rows_in, tokens, seconds, done, interrupted FROM shards WHERE run_id IN ({marks}) "
                f"ORDER BY run_id, {order}", run_ids).to_pylist()
            summary = event_log.sql(
                f"""WITH s AS (SELECT * FROM shards WHERE run_id IN ({marks})),
                    reasons AS (SELECT gpu_class, reason, count(*) AS n,
                                row_number() OVER (PARTITION BY gpu_class ORDER BY count(*) DESC, reason) AS rank
                                FROM s WHERE reason IS NOT NULL GROUP BY 1, 2)
                    SELECT s.gpu_class, count(*) AS shards, count(*) FILTER (WHERE fell_back) AS fell_back,
                           count(*) FILTER (WHERE fell_back) / count(*) AS rate,
                           count(*) FILTER (WHERE strict_failure) AS strict_failures,
                           any_value(r.reason) AS top_reason
                    FROM s LEFT JOIN reasons r ON r.gpu_class IS NOT DISTINCT FROM s.gpu_class AND r.rank = 1
                    GROUP BY s.gpu_class ORDER BY shards DESC, s.gpu_class""", run_ids).to_pylist()
    except InputError as e:  # no events were written (every job failed before loading)
        log.warning("no events to summarise: %s", e)
        return [], []
    return shards, summary
