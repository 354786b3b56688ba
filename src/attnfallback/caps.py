"""What this machine can do: the device (`DeviceCaps`) and the installed kernels (`SoftwareCaps`).

Probing is separate from deciding: the planner takes these as plain values, so a test (or
`attnfallback plan --gpus T4`) can inject an H100 or a T4 without touching CUDA. Nothing here
runs at import time; optional packages are found with `find_spec` plus package metadata,
never imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from attnfallback import catalog
from attnfallback.errors import UnknownNameError, UsageError


@dataclass(frozen=True)
class DeviceCaps:
    """One device. kind: cpu | cuda | mps; compute_capability only for CUDA."""

    kind: str = "cpu"
    name: str = "cpu"
    gpu_class: str | None = None
    compute_capability: tuple[int, int] | None = None
    memory_gb: float | None = None
    bf16: bool = False
    index: int | None = None
    # which GPU of the host: its index there (this process's CUDA_VISIBLE_DEVICES entry) and UUID
    host_index: int | None = None
    uuid: str | None = None

    @property
    def cc_text(self) -> str | None:
        return None if self.compute_capability is None else "%d.%d" % self.compute_capability

    @property
    def torch_device(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @classmethod
    def cpu(cls) -> DeviceCaps:
        return cls()

    @classmethod
    def from_class(cls, name: str) -> DeviceCaps:
        """The caps of a GPU class from the catalog (for planning and tests, no CUDA)."""
        gpu = catalog.lookup(name)
        return cls(
            kind="cuda",
            name=gpu.aliases[-1] if gpu.aliases else gpu.name,
            gpu_class=gpu.name,
            compute_capability=gpu.compute_capability,
            memory_gb=gpu.memory_gb,
            bf16=gpu.bf16,
            index=0,
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "class": self.gpu_class,
            "cc": self.cc_text,
            "memory_gb": None if self.memory_gb is None else round(self.memory_gb, 1),
            "bf16": self.bf16,
        }


# distribution names (package metadata) and the module each provides
OPTIONAL_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "flash_attn": (("flash-attn", "flash_attn"), "flash_attn"),
    "flash_attn_3": (("flash-attn-3", "flash_attn_3"), "flash_attn_interface"),
    "flash_attn_4": (("flash-attn-4", "flash_attn_4"), "flash_attn.cute"),
    "kernels": (("kernels",), "kernels"),
}
PACKAGE_LABELS = {"flash_attn": "flash-attn", "flash_attn_3": "flash-attn-3", "flash_attn_4": "flash-attn-4", "kernels": "kernels"}


@dataclass(frozen=True)
class SoftwareCaps:
    """Versions of what the planner cares about; None means absent."""

    torch: str | None = None
    cuda: str | None = None
    transformers: str | None = None
    flash_attn: str | None = None
    flash_attn_3: str | None = None
    flash_attn_4: str | None = None
    kernels: str | None = None
    hub_offline: bool = False
    # attention names this transformers knows (None: not probed, assume all)
    transformers_attn: frozenset[str] | None = None

    def with_installed(self, packages: Iterable[str]) -> SoftwareCaps:
        """The same caps with some optional packages assumed installed (`--assume-installed`)."""
        updates = {}
        for pkg in packages:
            key = _package_key(pkg)
            updates[key] = getattr(self, key) or "assumed"
        new = replace(self, **updates)
        if new.transformers_attn is not None and updates:
            known = set(new.transformers_attn)
            known |= {f"flash_attention_{n}" for n, k in (("2", "flash_attn"), ("3", "flash_attn_3"), ("4", "flash_attn_4")) if k in updates}
            new = replace(new, transformers_attn=frozenset(known))
        return new

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("transformers_attn")
        return d


def _package_key(name: str) -> str:
    text = name.strip().lower().replace("-", "_")
    aliases = {"flash_attn_2": "flash_attn", "fa2": "flash_attn", "fa3": "flash_attn_3", "fa4": "flash_attn_4"}
    text = aliases.get(text, text)
    if text not in OPTIONAL_PACKAGES:
        raise UnknownNameError("package", name, list(PACKAGE_LABELS.values()))
    return text


def _dist_version(names: Iterable[str]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _module_present(module: str) -> bool:
    """find_spec on the top-level module only, so no package code runs."""
    top, _, rest = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not rest:
        return True
    for base in spec.submodule_search_locations or ():
        if os.path.exists(os.path.join(base, *rest.split("."))):
            return True
    return False


def _optional_version(key: str) -> str | None:
    dists, module = OPTIONAL_PACKAGES[key]
    version = _dist_version(dists)
    if version is None or not _module_present(module):
        return None
    return version


def _transformers_attention_names() -> frozenset[str] | None:
    try:
        import transformers.utils as tu
    except ImportError:
        return None
    names = {"eager", "sdpa", "flex_attention", "flash_attention_2"}
    if hasattr(tu, "is_flash_attn_3_available"):
        names.add("flash_attention_3")
    if hasattr(tu, "is_flash_attn_4_available"):
        names.add("flash_attention_4")
    return frozenset(names)


def _hub_offline(env: Mapping[str, str]) -> bool:
    return any(env.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def probe_software(env: Mapping[str, str] | None = None, refresh: bool = False) -> SoftwareCaps:
    """Installed versions, found without importing optional packages (once per process
    unless `refresh`; the hub's offline flag is read from `env` every time)."""
    env = os.environ if env is None else env
    if refresh:
        _probe_packages.cache_clear()
    return replace(_probe_packages(), hub_offline=_hub_offline(env))


@lru_cache(maxsize=1)
def _probe_packages() -> SoftwareCaps:
    torch_version = cuda_version = None
    try:
        import torch

        torch_version = torch.__version__.split("+")[0]
        cuda_version = torch.version.cuda
    except ImportError:
        pass
    return SoftwareCaps(
        torch=torch_version,
        cuda=cuda_version,
        transformers=_dist_version(["transformers"]),
        transformers_attn=_transformers_attention_names(),
        **{key: _optional_version(key) for key in OPTIONAL_PACKAGES},
    )


def probe_device(device: str = "auto") -> DeviceCaps:
    """The caps of `device` (auto: the first CUDA GPU, else MPS, else the CPU)."""
    import torch

    text = (device or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            text = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            text = "mps"
        else:
            text = "cpu"
    kind, _, idx = text.partition(":")
    if kind == "cpu":
        return DeviceCaps.cpu()
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"device {device!r} is not available here: no MPS (Apple silicon's GPU) device; use auto or cpu")
        return DeviceCaps(kind="mps", name="mps", bf16=True)
    if kind != "cuda":
        raise UnknownNameError("device", device, ["auto", "cpu", "cuda", "cuda:N", "mps"])
    if not torch.cuda.is_available():
        raise UnknownNameError("device", f"{device} (no CUDA device is visible)", ["auto", "cpu"])
    index = int(idx) if idx else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    cc = (props.major, props.minor)
    gpu = catalog.find(props.name)
    return DeviceCaps(
        kind="cuda",
        name=props.name,
        gpu_class=gpu.name if gpu else props.name,
        compute_capability=cc,
        memory_gb=props.total_memory / 1e9,
        bf16=cc >= (8, 0),
        index=index,
        host_index=host_gpu_index(index),
        uuid=_gpu_uuid(props),
    )


def host_gpu_index(index: int, env: Mapping[str, str] | None = None) -> int | None:
    """The host's index of this process's CUDA device `index`: its CUDA_VISIBLE_DEVICES entry (None
    where that names a UUID or MIG instance), else `index`. CUDA's numbering: nvidia-smi's where the
    GPUs are alike or CUDA_DEVICE_ORDER=PCI_BUS_ID; the UUID names a GPU either way."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    entry = entries[index] if 0 <= index < len(entries) else ""
    return int(entry) if entry.isdigit() else None


def _gpu_uuid(props) -> str | None:
    """The device's UUID as nvidia-smi prints it (GPU-8-4-4-4-12); None where torch has none."""
    value = getattr(props, "uuid", None)  # an older torch, or another backend: none
    text = "" if value is None else str(value)
    if not text:
        return None
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


@dataclass(frozen=True)
class Caps:
    device: DeviceCaps
    software: SoftwareCaps

    def to_dict(self) -> dict:
        return {"device": self.device.to_dict(), "software": self.software.to_dict()}


def probe(device: str = "auto") -> Caps:
    """Probe the device and the installed software."""
    return Caps(probe_device(device), probe_software())
