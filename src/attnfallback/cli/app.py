"""The `attnfallback` entry point: builds the Typer app from one module per command and maps
errors to exit codes (0 ok, 1 unexpected, 2 bad usage or input, 3 attention unavailable under
strict policy, 4 parity over tolerance, 130 interrupted by Ctrl-C). A lost CUDA context exits with
1 at once (os._exit), without the CUDA teardown that would abort the process."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

from attnfallback import envs
from attnfallback.bytecode import use_bytecode_cache
from attnfallback.errors import AttnFallbackError, Interrupted, is_fatal_device_error

# Each module defines `register(app)`; heavy imports (torch, transformers) stay inside commands.
COMMANDS = ("probe", "plan", "load", "score", "events", "parity", "bench", "sweep", "demo")


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="attnfallback",
        help="Portable transformer scorers: the fastest attention implementation this GPU supports.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for name in COMMANDS:
        module_name = f"attnfallback.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        module.register(app)
    return app


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (tests swap it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    level = envs.value(envs.LOG, "WARNING").upper()
    logger = logging.getLogger("attnfallback")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns (and, as a script, exits with) the exit code."""
    _setup_logging()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault(envs.LEAN_IMPORTS, "on")  # this process and its shards score text (lean_imports.py)
    use_bytecode_cache()  # before torch is imported: images without bytecode compile it in every process
    app = build_app()
    try:
        # standalone mode: Typer itself turns usage errors into exit 2 and typer.Exit into its code
        app(args=argv, prog_name="attnfallback")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        interrupt = _interrupt_behind(e)
        if interrupt is not None:  # Typer turns a Ctrl-C into exit 130 itself; say what it stopped
            typer.echo(f"interrupted: {interrupt}" if isinstance(interrupt, Interrupted) else "interrupted", err=True)
            code = 130
        return _exit(code, argv)
    except AttnFallbackError as e:
        typer.echo(f"error: {e}", err=True)
        return _exit(e.exit_code, argv)
    except KeyboardInterrupt as e:
        # 130 = 128 + SIGINT, as shells report a Ctrl-C
        typer.echo(f"interrupted: {e}" if isinstance(e, Interrupted) else "interrupted", err=True)
        return _exit(130, argv)
    except Exception as e:  # noqa: BLE001 - the last line of defence, turned into exit 1
        if is_fatal_device_error(e):
            return _fatal_device_exit(e, argv)
        if envs.value(envs.DEBUG):
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {e} (set ATTNFALLBACK_DEBUG=1 for the traceback)", err=True)
        return _exit(1, argv)
    return _exit(0, argv)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt an exception was raised from or while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


FATAL_DEVICE_EXIT = 1


def _fatal_device_exit(exc: BaseException, argv) -> int:
    """A CUDA context lost to a device-side assert (or another sticky error): say so and exit with
    1 at once. Python's normal exit would run CUDA's destructors on the dead context, which abort
    the process (SIGABRT, "terminate called ..."); the events and committed parts were written
    before the error got here (the shard_failed event, the part store closed), so --resume works."""
    first = (str(exc).strip().splitlines() or [""])[0]
    typer.echo(f"error: the GPU failed and its CUDA context cannot be used again ({type(exc).__name__}: {first}); "
               "the events record it (shard_failed) and committed parts are kept: --resume continues from them "
               "(CUDA_LAUNCH_BLOCKING=1 shows which kernel failed)", err=True)
    if argv is not None:  # called from Python (tests, an embedding program): the caller decides
        return FATAL_DEVICE_EXIT
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(FATAL_DEVICE_EXIT)


def _exit(code: int, argv) -> int:
    if argv is None:
        if code == 0:
            _process_exit(code)
        sys.exit(code)
    return code


def _process_exit(code: int) -> None:
    """End a process whose work is done and written: the other threads joined, the exit handlers
    run (logging flushed, child processes ended, temporary files removed), then os._exit, without
    the interpreter tearing down torch's and transformers' thousands of objects and the CUDA context
    one by one: 1.5 s or more of every shard on the lent GPU (bench/NOTES.md, session 9). Every file
    a command writes is closed (its output fsynced, its events written line by line) before this.
    Only a clean exit (0) takes it: an interrupted or failed process ends the ordinary way, which
    lets a sweep's interrupted shards finish their last words (a race seen in session 9)."""
    import atexit
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # an interpreter without it: the ordinary exit
        return
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    run_exit_handlers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
