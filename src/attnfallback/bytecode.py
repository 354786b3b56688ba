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
two cores or more, `precompile()` fills the prefix before the first import instead, with the
modules a shard imports (data/shard_modules.txt): bytecode found beside its source is copied, the
rest compiled over all cores; once per image and cache, under a lock concurrent shards wait on. A
fresh machine's first shard then imports as a later one does.
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
import time
from concurrent.futures import ProcessPoolExecutor
from collections.abc import MutableMapping
from pathlib import Path

from attnfallback import envs

PROBE_PACKAGE = "torch"  # the largest import every scoring process makes

# The modules a scoring process imports, in the order it imports them: recorded from shards of every
# task (bench/record_imports.py), on this machine and on the lent GPU's image. `precompile` fills
# the prefix with these only; a module a shard imports beyond them compiles on its import, once
# per image and cache (bench/NOTES.md, session 12: a third of what filling whole packages compiled).
SHARD_MODULES = Path(__file__).resolve().parent / "data" / "shard_modules.txt"
# A shard loads one model family; the others' modules are never listed (`auto` is every shard's).
FAMILY_MODULE = re.compile(r"^transformers\.models\.(?!auto(\.|$))[^.]+\.")
# On one core, compiling ahead costs about what compiling the modules imported does (and the
# copies save the rest); from two on it is ahead (bench/NOTES.md, session 10).
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


def shard_modules(path: str | os.PathLike | None = None) -> list[str]:
    """The module names in `path` (default SHARD_MODULES; one a line, `#` starts a comment), model
    families' left out."""
    try:
        lines = Path(SHARD_MODULES if path is None else path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    names = (line.split("#", 1)[0].strip() for line in lines)
    return [n for n in dict.fromkeys(names) if n and not FAMILY_MODULE.match(n)]


def _package_base(top: str) -> tuple[str, str | None] | None:
    """(the directory holding `top`, its file when `top` is a single-file module) without importing
    it; None for what has no Python source: not installed, built-in, frozen, an extension, a
    namespace package."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return None
    if os.path.basename(origin) == "__init__.py":
        return os.path.dirname(os.path.dirname(origin)), None
    return os.path.dirname(origin), origin


def module_sources(names, bases: dict | None = None) -> list[str]:
    """The source files of the modules `names`, found without importing them; a module without
    Python source is passed over."""
    bases = {} if bases is None else bases
    sources = []
    for name in names:
        top, _, rest = name.partition(".")
        if top not in bases:
            bases[top] = _package_base(top)
        if bases[top] is None:
            continue
        folder, single = bases[top]
        if single is not None:
            if not rest:
                sources.append(single)
            continue
        path = os.path.join(folder, *name.split("."))
        for candidate in (path + ".py", os.path.join(path, "__init__.py")):
            if os.path.isfile(candidate):
                sources.append(candidate)
                break
    return sources


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


def _fill_key(names: list[str], bases: dict) -> str:
    """Names the list and the installed packages it resolves in (their directories and mtimes)."""
    tops = dict.fromkeys(n.partition(".")[0] for n in names)
    parts = [sys.implementation.cache_tag or "", hashlib.sha256("\n".join(names).encode()).hexdigest()]
    for top in tops:
        bases[top] = _package_base(top)
        if bases[top] is not None:
            place = bases[top][1] or os.path.join(bases[top][0], top)
            try:
                parts.append(f"{place} {os.stat(place).st_mtime_ns}")
            except OSError:
                parts.append(place)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def precompile(directory: str | os.PathLike, modules=None, workers: int | None = None) -> dict | None:
    """Fill the bytecode prefix in use (sys.pycache_prefix, which must be `directory`) for `modules`
    (default: the shard's, `shard_modules()`): bytecode beside a source is copied, the rest compiled
    over `workers` processes (all cores). Once per image and list, marked in `directory`; concurrent
    callers wait on a lock and find the mark. Returns what it did ({"copied", "compiled", "seconds"}),
    None when nothing was to do or the directory cannot be written (imports then compile as they go)."""
    directory = Path(directory)
    names = shard_modules() if modules is None else list(modules)
    if not names or sys.pycache_prefix is None or Path(sys.pycache_prefix) != directory:
        return None
    bases: dict = {}
    mark = directory / f".precompiled-{_fill_key(names, bases)}"
    if mark.exists():
        return None
    try:
        with open(directory / ".precompile.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if mark.exists():  # another shard filled it while this one waited
                return None
            start = time.perf_counter()
            jobs = []
            for source in module_sources(names, bases):
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
            mark.write_text(f"{len(names)} modules\n")
            facts = {"copied": copied, "compiled": compiled, "seconds": round(time.perf_counter() - start, 2)}
            log.info("bytecode under %s: %s", directory, facts)
            return facts
    except OSError as e:  # a read-only or full cache: imports compile as they go, as without it
        log.warning("bytecode not compiled ahead under %s: %s", directory, e)
        return None
