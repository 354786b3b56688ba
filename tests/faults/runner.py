"""Run `attnfallback` commands in child processes that can be killed, cheaply and precisely.

Children are forked from a multiprocessing fork server that imported torch, transformers and the
scoring code once (about 6 s), so a child costs a fraction of a second; each child is still a
separate process with its own pid, killed with a real SIGKILL. A child can carry an `Injection`:
SIGKILL itself at the n-th call of one step (load, tokenize, forward, writing a part, fsync,
rename), count those calls, or run under a file-size limit (a full disk without root).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .tools import CliResult

PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "pyarrow.parquet",
    "tokenizers",
    "attnfallback.cli.app",
    "attnfallback.cli.score",
    "attnfallback.loader",
    "attnfallback.scoring.job",
    "attnfallback.scoring.pipeline",
    "attnfallback.scoring.writer",
    "attnfallback.events",
    "rich.console",
    "rich.progress",
]

# Steps a child can be killed in, in the order a run reaches them.
STEPS = ("load", "verify", "tokenize", "forward", "write_part", "fsync", "rename_before", "rename_after")

_context = None


def context():
    """The fork-server context (started on first use; preloads PRELOAD and this module)."""
    global _context
    if _context is None:
        from multiprocessing import forkserver

        package = __name__.rsplit(".", 1)[0]
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD + [__name__, f"{package}.forkserver_warmup"])
        # Python < 3.12 does not hand sys.path to the server: it finds this package through
        # PYTHONPATH, set only while the server starts.
        package_parent = str(Path(__file__).resolve().parents[1 + package.count(".")])
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, saved) if p)
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        _context = ctx
    return _context


@dataclass(frozen=True)
class Injection:
    """What to do to a child: `kill_step` + `occurrence` (SIGKILL at that call of that step),
    `count_to` (a JSON file receiving how often each step ran), `file_size_limit` (bytes),
    `pause_step` (hold the run there for a while, e.g. to start a second run meanwhile)."""

    kill_step: str | None = None
    occurrence: int = 1
    count_to: str | None = None
    file_size_limit: int | None = None
    pause_step: str | None = None  # sleep `pause_seconds` at the first call of this step,
    pause_seconds: float = 0.0  # after creating the file `pause_marker`
    pause_marker: str | None = None


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(injection: Injection) -> dict:
    """Wrap each step so it is counted, and killed at the chosen call."""
    import pyarrow.parquet as pq

    import attnfallback.loader as loader
    import attnfallback.verify as verify
    from attnfallback.scoring import pipeline, tokenize

    counts = {step: 0 for step in STEPS}

    def hit(step: str) -> bool:
        counts[step] += 1
        if injection.pause_step == step and counts[step] == 1:
            if injection.pause_marker:
                Path(injection.pause_marker).write_text(str(os.getpid()))
            time.sleep(injection.pause_seconds)
        return injection.kill_step == step and counts[step] == injection.occurrence

    def after(step, func):
        def wrapped(*args, **kwargs):
            result = func(*args, **kwargs)
            if hit(step):
                _kill_self()
            return result
        return wrapped

    loader.from_pretrained = after("load", loader.from_pretrained)
    verify.verify_forward = after("verify", verify.verify_forward)
    tokenize.TextEncoder.encode = after("tokenize", tokenize.TextEncoder.encode)
    pipeline.Scorer._forward = after("forward", pipeline.Scorer._forward)

    real_write_table = pq.write_table

    def write_table(table, where, *args, **kwargs):
        if hit("write_part"):  # half a part on disk, then death
            import io

            buffer = io.BytesIO()
            real_write_table(table, buffer, *args, **kwargs)
            data = buffer.getvalue()
            where.write(data[: len(data) // 2])
            where.flush()
            _kill_self()
        return real_write_table(table, where, *args, **kwargs)

    pq.write_table = write_table
    os.fsync = after("fsync", os.fsync)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if hit("rename_before"):
            _kill_self()
        real_replace(src, dst, *args, **kwargs)
        if hit("rename_after"):
            _kill_self()

    os.replace = replace
    return counts


def _child(argv, env, cwd, out_path, err_path, injection: Injection | None) -> None:
    out = open(out_path, "w", buffering=1)
    err = open(err_path, "w", buffering=1)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = out, err
    os.environ.update(env or {})
    os.chdir(cwd)
    import torch

    torch.set_num_threads(1)  # every child computes the same way: results comparable bit for bit
    counts = None
    if injection is not None:
        if injection.file_size_limit is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (injection.file_size_limit, injection.file_size_limit))
        counts = _install(injection)
    from attnfallback.cli.app import main

    code = main([str(a) for a in argv])
    if injection is not None and injection.count_to:
        Path(injection.count_to).write_text(json.dumps(counts))
    out.flush()
    err.flush()
    os._exit(code)


class Child:
    """A running `attnfallback` child process."""

    def __init__(self, process, out_path: Path, err_path: Path):
        self.process = process
        self.out_path = out_path
        self.err_path = err_path
        self.started = time.perf_counter()
        self.seconds: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)

    def wait(self, timeout: float = 300) -> CliResult:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            self.process.join(10)
            raise TimeoutError(f"child {self.pid} still running after {timeout} s: {_read(self.err_path)[-2000:]}")
        self.seconds = time.perf_counter() - self.started
        return CliResult(self.process.exitcode, _read(self.out_path), _read(self.err_path))


def _read(path: Path) -> str:
    """A child's log; empty if it was killed before it opened the file."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def start(argv, *, cwd, logs: Path, env: dict | None = None, injection: Injection | None = None) -> Child:
    """Start `attnfallback ARGV...` in a child; stdout and stderr go to files under `logs`."""
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    out_path, err_path = logs / f"{n:03d}.out", logs / f"{n:03d}.err"
    process = context().Process(target=_child, args=([str(a) for a in argv], env, str(cwd), str(out_path), str(err_path), injection),
                                daemon=True)
    process.start()
    return Child(process, out_path, err_path)


def run(argv, *, cwd, logs: Path, env: dict | None = None, injection: Injection | None = None, timeout: float = 300) -> CliResult:
    """Run `attnfallback ARGV...` in a child to completion (or death)."""
    return start(argv, cwd=cwd, logs=logs, env=env, injection=injection).wait(timeout)
