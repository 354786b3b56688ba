"""Compiled bytecode for images that ship none.

Some images install their packages without bytecode (pip's --no-compile) and set
PYTHONDONTWRITEBYTECODE. Every process then compiles torch's and transformers' sources again before
it can import them: on the lent GPU's image (bench/NOTES.md, session 9), importing a model class took
14-18 s that way and 6.7 s with bytecode, in each shard's process, and the same for every
sentence-transformers script.

`use_bytecode_cache()` (the command line calls it before any heavy import; a library never changes
the interpreter on import) points the interpreter at a bytecode directory under the cache when torch
has none beside its sources and the interpreter would not write it there. The first process
fills it (below) and every later one on this machine, or on any machine sharing
$ATTNFALLBACK_CACHE with the same image, reads it. Python writes each file atomically and checks it
against its source's size and mtime, so concurrent shards and other images are safe.
$ATTNFALLBACK_BYTECODE: auto (the above), on (whenever the interpreter has no prefix of its own),
off.

With a prefix the interpreter reads bytecode only from it, so the first process would compile every
module it imports, the standard library's and those shipped with bytecode too. On a machine with
two cores or more, `precompile()` fills the prefix before the first import instead: bytecode found
beside its source is copied, the rest (torch, transformers without the model families a shard does
not load, ...) is compiled over all cores; once per image and cache, under a lock concurrent shards
wait on. A fresh machine's first shard then imports as a later one does.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import py_compile
import re
import shutil
import sys
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from collections.abc import MutableMapping
from pathlib import Path

from attnfallback import envs

PROBE_PACKAGE = "torch"  # the largest import every scoring process makes

# The packages a scoring process imports (with the standard library), filled into the prefix ahead.
# From pandas on: those transformers imports where they are installed (its availability checks),
# read off a shard's import log on the lent GPU's image (bench/NOTES.md, session 11: 3.3 s of a first
# shard's imports, 0.8 s of a later one's). One not installed is passed over.
PRECOMPILE_PACKAGES = ("torch", "transformers", "sympy", "scipy", "numpy", "mpmath", "huggingface_hub", "tokenizers",
                       "safetensors", "pyarrow", "pydantic", "typer", "click", "rich", "jinja2", "markupsafe", "yaml",
                       "filelock", "fsspec", "tqdm", "packaging", "regex", "networkx", "httpx", "httpcore", "anyio",
                       "h11", "idna", "certifi", "charset_normalizer", "PIL", "attnfallback",
                       "pandas", "sklearn", "torchvision", "torchaudio", "triton", "accelerate", "narwhals", "torchgen",
                       "opt_einsum", "joblib", "pygments", "dateutil", "pytz", "psutil", "sentencepiece",
                       "tabulate", "colorama", "cloudpickle", "threadpoolctl")
# Never imported by a shard (matched below each root's parent): tests, the standard library's
# site-packages, and transformers' model families but `auto` (a shard loads one
# family, whose few files compile on import).
PRECOMPILE_SKIP = re.compile(r"[/\\](tests?|idlelib|tkinter|lib2to3|ensurepip|site-packages|dist-packages)[/\\]"
                             r"|[/\\]transformers[/\\]models[/\\](?!auto[/\\])[^/\\]+[/\\]")
# On one core, compiling all of torch ahead costs about what compiling the modules imported does
# (and the copies save the rest); from two on it is ahead (bench/NOTES.md, session 10).
PRECOMPILE_MIN_CORES = 2

log = logging.getLogger(__name__)


def _source_of(package: str) -> str | None:
    """The path of `package`'s __init__.py, found without importing it; None when it is not
    installed or not a source package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return origin if origin and origin.endswith(".py") else None


def has_bytecode(package: str = PROBE_PACKAGE, source: str | None = None) -> bool | None:
    """Whether `package`'s __init__ (at `source`, else found) has compiled bytecode beside it;
    None when it is not installed or not a source package."""
    source = source or _source_of(package)
    if source is None:
        return None
    try:
        return Path(_bytecode_paths(source)[0]).is_file()
    except (NotImplementedError, ValueError):
        return None


def use_bytecode_cache(env: MutableMapping[str, str] | None = None, cache_dir: str | os.PathLike | None = None,
                       precompile_min_cores: int = PRECOMPILE_MIN_CORES) -> str | None:
    """Turn the bytecode cache on where it helps (see the module docstring); the directory in use,
    or None when left as it was. Child processes inherit it through PYTHONPYCACHEPREFIX."""
    env = os.environ if env is None else env
    setting = envs.choice(envs.BYTECODE, ("auto", "on", "off"), "auto", env)
    if setting == "off" or sys.pycache_prefix:
        return None
    if setting == "auto":
        source = _source_of(PROBE_PACKAGE)
        writes_beside = not sys.dont_write_bytecode and source is not None and os.access(os.path.dirname(source), os.W_OK)
        if has_bytecode(source=source) is not False or writes_beside:
            return None
    directory = envs.cache_directory(cache_dir, env) / "bytecode"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(directory, os.W_OK):
        return None
    sys.pycache_prefix = str(directory)
    sys.dont_write_bytecode = False
    env["PYTHONPYCACHEPREFIX"] = str(directory)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if usable_cores() >= precompile_min_cores:
        precompile(directory)
    return str(directory)


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def precompile_roots(packages=PRECOMPILE_PACKAGES, stdlib: bool = True) -> list[str]:
    """The directories `precompile` fills: the standard library's and those of the installed `packages`."""
    roots = [sysconfig.get_paths()["stdlib"]] if stdlib else []
    for package in packages:
        source = _source_of(package)
        if source is not None and source.endswith("__init__.py"):
            roots.append(os.path.dirname(source))
    return [r for r in roots if os.path.isdir(r)]


def _bytecode_paths(source: str) -> tuple[str, str]:
    """(beside, in the prefix): where `source`'s bytecode lies without a prefix, and with the one in use."""
    prefix = sys.pycache_prefix
    try:
        sys.pycache_prefix = None
        beside = importlib.util.cache_from_source(source)
    finally:
        sys.pycache_prefix = prefix
    return beside, importlib.util.cache_from_source(source)


def _fill(jobs: list[tuple[str, str, str | None]]) -> tuple[int, int]:
    """Bytecode for each (source, target, beside or None): the beside file linked or copied (its
    header names the source's mtime and size, checked on import), else compiled. (copied, compiled)."""
    copied = compiled = 0
    for source, target, beside in jobs:
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if beside is not None:
                try:
                    os.link(beside, target)
                except OSError:  # another file system, or no links there
                    shutil.copyfile(beside, target)
                copied += 1
            elif py_compile.compile(source, cfile=target, doraise=True, quiet=2):
                compiled += 1
        except FileExistsError:
            pass  # another process filled it
        except (py_compile.PyCompileError, OSError, ValueError):
            pass  # the import will compile it, or say why it cannot
    return copied, compiled


def precompile(directory: str | os.PathLike, packages=PRECOMPILE_PACKAGES, workers: int | None = None,
               stdlib: bool = True) -> dict | None:
    """Fill the bytecode prefix in use (sys.pycache_prefix, which must be `directory`) for the standard
    library and `packages`: bytecode beside a source is copied, the rest compiled over `workers`
    processes (all cores). Once per image, marked in `directory`; concurrent callers wait on a lock
    and find the mark. Returns what it did ({"copied", "compiled", "seconds"}), None when nothing was
    to do or the directory cannot be written (imports then compile as they go)."""
    directory = Path(directory)
    roots = precompile_roots(packages, stdlib)
    if not roots or sys.pycache_prefix is None or Path(sys.pycache_prefix) != directory:
        return None
    key = hashlib.sha256("\n".join([sys.implementation.cache_tag or "", *roots,
                                     *(str(os.stat(r).st_mtime_ns) for r in roots)]).encode()).hexdigest()[:16]
    mark = directory / f".precompiled-{key}"
    if mark.exists():
        return None
    try:
        with open(directory / ".precompile.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if mark.exists():  # another shard filled it while this one waited
                return None
            start = time.perf_counter()
            jobs = []
            for root in roots:
                for folder, subdirs, files in os.walk(root):
                    inside = os.sep + os.path.relpath(folder, os.path.dirname(root)) + os.sep  # e.g. /torch/nn/
                    if PRECOMPILE_SKIP.search(inside):
                        subdirs[:] = []
                        continue
                    for name in files:
                        if name.endswith(".py"):
                            source = os.path.join(folder, name)
                            beside, target = _bytecode_paths(source)
                            if not os.path.exists(target):
                                jobs.append((source, target, beside if os.path.exists(beside) else None))
            workers = max(1, workers or usable_cores())
            chunks = [jobs[i::workers * 4] for i in range(workers * 4)]
            copied = compiled = 0
            if workers == 1 or len(jobs) < 64:
                copied, compiled = _fill(jobs)
            else:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    for c, m in pool.map(_fill, chunks):
                        copied, compiled = copied + c, compiled + m
            mark.write_text("\n".join(roots) + "\n")
            facts = {"copied": copied, "compiled": compiled, "seconds": round(time.perf_counter() - start, 2)}
            log.info("bytecode under %s: %s", directory, facts)
            return facts
    except OSError as e:  # a read-only or full cache: imports compile as they go, as without it
        log.warning("bytecode not compiled ahead under %s: %s", directory, e)
        return None
