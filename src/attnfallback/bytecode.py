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
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

from attnfallback import envs

PROBE_PACKAGE = "torch"  # the largest import every scoring process makes


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


def use_bytecode_cache(env: MutableMapping[str, str] | None = None, cache_dir: str | os.PathLike | None = None) -> str | None:
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
    return str(directory)
