"""Compiled bytecode for images that ship none.

Some images install their packages without bytecode (pip's --no-compile) and set
PYTHONDONTWRITEBYTECODE. Every process then compiles torch's and transformers' sources again before
it can import them: on the lent GPU's image (bench/NOTES.md, session 9), importing a model class took
14-18 s that way and 6.7 s with bytecode, in each shard's process, and the same for every
sentence-transformers script.

`use_bytecode_cache()` (the command line calls it before any heavy import; a library never changes
the interpreter on import) points the interpreter at a bytecode directory under the cache when torch
has none beside its sources and the interpreter would not write it there. The first process
compiles as before and writes; every later one on this machine, or on any machine sharing
$ATTNFALLBACK_CACHE with the same image, reads. Python writes each file atomically and checks it
against its source's size and mtime, so concurrent shards and other images are safe.
$ATTNFALLBACK_BYTECODE: auto (the above), on (whenever the interpreter has no prefix of its own),
off.

On a machine with cores to spare, the first process does not compile as it imports, one file after
another: `precompile()` first compiles the packages that lack bytecode (torch, transformers without
the model families a shard does not load, ...) over all cores, once per image and cache, under a
lock that concurrent shards wait on. A fresh machine's first shard then imports as a later one does.
"""

from __future__ import annotations

import compileall
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path

from attnfallback import envs

PROBE_PACKAGE = "torch"  # the largest import every scoring process makes

# What a scoring process imports, compiled ahead where it has no bytecode. transformers' model
# families are left out but for `auto`: a shard loads one family, whose few files compile on import.
PRECOMPILE_PACKAGES = ("torch", "transformers", "safetensors", "huggingface_hub", "tokenizers", "numpy", "jinja2")
PRECOMPILE_SKIP = re.compile(r"[/\\]transformers[/\\]models[/\\](?!auto[/\\])[^/\\]+[/\\]")
# Below this many cores compiling everything ahead costs more than compiling what is imported.
PRECOMPILE_MIN_CORES = 4

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
    """Whether `package`'s __init__ (at `source`, else found) has compiled bytecode where the
    interpreter looks for it; None when it is not installed or not a source package."""
    source = source or _source_of(package)
    if source is None:
        return None
    try:
        return Path(importlib.util.cache_from_source(source)).is_file()
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


def _package_dirs(packages) -> list[str]:
    """The source directories of those `packages` that are installed and lack bytecode."""
    dirs = []
    for package in packages:
        source = _source_of(package)
        if source is not None and source.endswith("__init__.py") and has_bytecode(source=source) is False:
            dirs.append(os.path.dirname(source))
    return dirs


def precompile(directory: str | os.PathLike, packages=PRECOMPILE_PACKAGES, workers: int | None = None) -> list[str]:
    """Compile `packages` that lack bytecode into the prefix in use (sys.pycache_prefix, which must
    be `directory`) over `workers` processes (all cores): once per image, marked in `directory`;
    concurrent callers wait on a lock and find the mark. Returns the directories compiled now."""
    directory = Path(directory)
    dirs = _package_dirs(packages)
    if not dirs:
        return []
    key = hashlib.sha256("\n".join([sys.implementation.cache_tag or "", *dirs,
                                     *(str(os.stat(d).st_mtime_ns) for d in dirs)]).encode()).hexdigest()[:16]
    mark = directory / f".precompiled-{key}"
    if mark.exists():
        return []
    try:
        with open(directory / ".precompile.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if mark.exists():  # another shard compiled while this one waited
                return []
            start = time.perf_counter()
            for d in dirs:
                compileall.compile_dir(d, quiet=2, workers=workers or usable_cores(), rx=PRECOMPILE_SKIP)
            mark.write_text("\n".join(dirs) + "\n")
            log.info("compiled the bytecode of %s in %.1f s", ", ".join(dirs), time.perf_counter() - start)
    except OSError as e:  # a read-only or full cache: imports compile as they go, as without it
        log.warning("bytecode not compiled ahead under %s: %s", directory, e)
        return []
    return dirs
