"""Transformers' optional imports that a text scorer never uses, kept out of a shard's process.

Importing a model class imports transformers' modeling utilities and, with them, each of these
packages where it is installed: scipy (the object-detection losses' matcher), Pillow and torchvision
(image utilities), torchaudio (audio utilities), scikit-learn (assisted generation's metrics). None
of them serves text; on the lent H200's image,
keeping them out took a shard's facts phase from 7.16 s to 5.47 s (bench/fixed_cost_ab.py,
bench/NOTES.md, session 14).

`hidden()` marks those not yet imported absent while a model's code is imported: None in
sys.modules, so `importlib.util.find_spec` answers None and transformers' availability checks say
no. Afterwards they are importable again; transformers keeps the answers it cached (its image and
audio helpers stay off in this process). A model whose own code needs one fails with ImportError in
the window; `needed_hidden(error)` says so, and the caller imports again with them visible.

Only where $ATTNFALLBACK_LEAN_IMPORTS is `on`: the command line sets it for its own processes;
a library caller's process is left as it is (default off).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from attnfallback import envs

# scikit-learn: transformers' assisted generation imports sklearn.metrics where it is installed, and
# sklearn imports scipy. With scipy hidden and sklearn not, a first shard on the GPU image still
# imported scipy, pandas and sklearn (about 800 modules compiled on import, bench/NOTES.md, session
# 18), most likely because that import failed and the model's code was read again with everything
# visible (not yet traced there).
UNUSED_BY_TEXT = ("scipy", "PIL", "torchvision", "torchaudio", "sklearn")


def enabled(env: Mapping[str, str] | None = None) -> bool:
    return envs.choice(envs.LEAN_IMPORTS, ("on", "off"), "off", env) == "on"


@contextmanager
def hidden(names: tuple[str, ...] | None = None, env: Mapping[str, str] | None = None) -> Iterator[list[str]]:
    """Within the block, `names` (default UNUSED_BY_TEXT) not yet imported cannot be found or
    imported (when enabled); yields the names hidden."""
    names = UNUSED_BY_TEXT if names is None else names
    marked = [n for n in names if n not in sys.modules] if enabled(env) else []
    for name in marked:
        sys.modules[name] = None
    try:
        yield marked
    finally:
        for name in marked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def needed_hidden(error: BaseException, names: tuple[str, ...] | None = None) -> bool:
    """Whether `error` (or an error behind it) is an import of one of `names` (default
    UNUSED_BY_TEXT) that hiding stopped."""
    names = UNUSED_BY_TEXT if names is None else names
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError):
            top = (error.name or "").partition(".")[0]
            if top in names or "None in sys.modules" in str(error):
                return True
        error = error.__cause__ or error.__context__
    return False
