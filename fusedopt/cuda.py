"""The GPU path: the only module that imports CuPy.

CuPy is imported lazily, the first time a CuPy array or a "gpu" device is met, so
`import fusedopt` works on machines without CuPy or a GPU.
"""

import contextlib
import functools

import numpy as np


# ---------------------------------------------------------------- array modules
def is_gpu_array(x):
    """True for a CuPy array, decided without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "device")


@functools.lru_cache(maxsize=None)
def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "the GPU path needs CuPy: pip install 'fusedopt[cuda12]' or 'fusedopt[cuda13]'"
        ) from e
    return cupy


def device_of(x):
    """"cpu" for NumPy arrays, "gpu:N" for CuPy arrays on device N."""
    return f"gpu:{x.device.id}" if is_gpu_array(x) else "cpu"


def normalize_device(device):
    """Accept "cpu", "gpu", "cuda", "gpu:N", "cuda:N"; return "cpu" or "gpu:N"."""
    if not isinstance(device, str):
        raise TypeError(f"`device` must be a string such as 'cpu' or 'gpu', got {device!r}")
    name, _, index = device.strip().lower().partition(":")
    if name == "cpu" and not index:
        return "cpu"
    if name in ("gpu", "cuda"):
        if not index:
            return f"gpu:{_cupy().cuda.Device().id}"
        if index.isdigit():
            return f"gpu:{int(index)}"
    raise ValueError(f"`device` must be 'cpu', 'gpu' or 'gpu:N', got {device!r}")


def module_for(device):
    return np if device == "cpu" else _cupy()


def on_device(device):
    """Context manager making `device` current for CuPy allocations (no-op on CPU)."""
    if device == "cpu":
        return contextlib.nullcontext()
    return _cupy().cuda.Device(int(device.split(":")[1]))


def to_device(array, device):
    """Copy `array` (NumPy or CuPy) to `device`."""
    if device == "cpu":
        return _cupy().asnumpy(array) if is_gpu_array(array) else np.array(array)
    with on_device(device):
        return _cupy().array(array)


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        return _cupy().cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return False
