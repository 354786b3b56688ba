"""CUDA's primary context, made through the driver without holding Python's GIL.

torch makes its CUDA context in `torch.cuda.init()` (C++ `lazyInitDevice`) with the GIL held, so a
thread that makes it beside the main thread's imports stops those imports for as long as it takes.
The driver's own calls through ctypes release the GIL. The CUDA runtime, and so torch, runs on each
device's primary context: `retain_primary_context` makes that context while the imports go on, and
torch's init later finds it made. Nothing here imports torch or runs at import.

$ATTNFALLBACK_CUDA_CONTEXT: driver (the above, the default) or torch (torch makes it, as before).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re

from attnfallback import envs

DRIVER_LIBRARY = "libcuda.so.1"
CUDA_SUCCESS = 0
MODES = ("driver", "torch")
_DEVICE = re.compile(r"^(auto|cuda)(?::(\d+))?$")


def mode(env=None) -> str:
    """How a shard makes CUDA's context: "driver" or "torch" ($ATTNFALLBACK_CUDA_CONTEXT)."""
    return envs.choice(envs.CUDA_CONTEXT, MODES, "driver", env)


def device_index(device: str) -> int | None:
    """The CUDA ordinal a `--device` value runs on ("cuda" and "auto": 0, "cuda:N": N); None for
    anything that is not CUDA ("cpu", "mps")."""
    match = _DEVICE.match(device.strip().lower())
    if match is None:
        return None
    return int(match.group(2) or 0)


def torch_built_with_cuda(package_dir: str | os.PathLike | None = None) -> bool:
    """Whether the installed torch (or the one at `package_dir`) is a CUDA build: its libtorch_cuda
    library is on disk. Found without importing torch."""
    if package_dir is None:
        try:
            spec = importlib.util.find_spec("torch")
        except (ImportError, ValueError):
            return False
        if spec is None or not spec.origin:
            return False
        package_dir = os.path.dirname(spec.origin)
    lib = os.path.join(package_dir, "lib")
    try:
        return any(name.startswith("libtorch_cuda") for name in os.listdir(lib))
    except OSError:
        return False


def retain_primary_context(index: int, driver=None) -> str | None:
    """Make (retain) device `index`'s primary context through the CUDA driver, the GIL released.
    None when it is made; else why not (no driver library, no such device, the driver's error).
    The context is kept for the process's life, as torch keeps it. `driver`: the driver library's
    functions (default: libcuda through ctypes), injectable for tests."""
    if driver is None:
        try:
            driver = ctypes.CDLL(DRIVER_LIBRARY)
        except OSError as e:
            return f"no CUDA driver library ({DRIVER_LIBRARY}: {e})"
    device = ctypes.c_int(0)
    context = ctypes.c_void_p(None)
    for name, args in (("cuInit", (0,)), ("cuDeviceGet", (ctypes.byref(device), index)),
                       ("cuDevicePrimaryCtxRetain", (ctypes.byref(context), device))):
        try:
            code = getattr(driver, name)(*args)
        except AttributeError:
            return f"the CUDA driver has no {name}"
        if code != CUDA_SUCCESS:
            return f"{name} returned CUDA error {code}" + (f" (device {index})" if name != "cuInit" else "")
    return None
