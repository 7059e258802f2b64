"""Loading of the compiled kernels and choice of backend per call.

``MDUS_KERNEL_BACKEND`` (read at every call, so tests and users can switch it at run time):

* ``auto`` (default): CUDA tensors use each op's preferred GPU kernel (Triton unless the op says its CUDA C++
  kernel is faster); CPU tensors use the C++ kernel; the PyTorch reference is the last resort.
* ``triton``, ``cuda``, ``cpp``, ``reference``: force that backend. ``triton`` on CPU tensors needs
  ``TRITON_INTERPRET=1`` set before ``mdus_kernels`` is imported. A forced backend that cannot run the call
  raises ``RuntimeError`` rather than silently running something else.
"""

import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")


def _torch_release(version: str) -> str:
    return version.split("+")[0]


@functools.cache
def load_extension():
    """Imports ``mdus_kernels._C`` (registering the C++/CUDA kernels), or returns None with a warning.

    The torch version recorded at build time is checked *before* loading: a stale extension can fail to load or,
    worse, crash during static registration, and import must never crash.
    """
    if importlib.util.find_spec("mdus_kernels._C") is None:
        warnings.warn("mdus_kernels._C is not built; using Triton/reference kernels. Build it with "
                      "`pip install --no-build-isolation .`", RuntimeWarning, stacklevel=2)
        return None
    try:
        from mdus_kernels import _build_info
        built_for = _build_info.TORCH_VERSION
    except ImportError:
        built_for = "unknown"
    if _torch_release(built_for) != _torch_release(torch.__version__):
        warnings.warn(f"mdus_kernels._C was built for torch {built_for} but torch {torch.__version__} is running; "
                      "not loading it, using Triton/reference kernels. Rebuild with "
                      "`pip install --no-build-isolation .`", RuntimeWarning, stacklevel=2)
        return None
    try:
        return importlib.import_module("mdus_kernels._C")
    except Exception as exc:  # a broken .so raises ImportError/OSError; any failure means "fall back"
        warnings.warn(f"mdus_kernels._C (built for torch {built_for}) failed to load: {exc}; using "
                      "Triton/reference kernels", RuntimeWarning, stacklevel=2)
        return None


@functools.cache
def triton_module():
    """The ``triton`` module, or None when it is not installed."""
    try:
        return importlib.import_module("triton")
    except ImportError:
        return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_native_kernel(op: str, device: torch.device) -> bool:
    """Whether ``mdus::<op>`` has a compiled kernel for ``device`` (``cpu`` -> C++, ``cuda`` -> CUDA C++)."""
    if load_extension() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"mdus::{op}", key)


def requested_backend() -> str:
    value = os.environ.get("MDUS_KERNEL_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MDUS_KERNEL_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def _available(backend: str, native_op: str | None, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        if triton_module() is None:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"Triton cannot run {device.type} tensors (for CPU tensors set TRITON_INTERPRET=1 before import)"
    expected = {"cpp": "cpu", "cuda": "cuda"}[backend]
    if device.type != expected:
        return f"the {backend} backend runs {expected} tensors, got {device.type} tensors"
    if native_op is None:  # the op's native path is ATen's own C++ kernels (CPU only)
        return None if backend == "cpp" else "this op has no CUDA C++ kernel"
    if not has_native_kernel(native_op, device):
        return f"mdus_kernels._C has no {expected} kernel for mdus::{native_op} (not built, or failed to load)"
    return None


def choose_backend(native_op: str | None, device: torch.device, *, gpu_default: str = "triton") -> str:
    """The backend that runs this call. ``native_op`` names the C++/CUDA kernel in ``_C`` (None when the op's
    CPU path is built from ATen's own C++ kernels), ``gpu_default`` the faster GPU backend for the op (as measured
    by its benchmark)."""
    backend = requested_backend()
    if backend != "auto":
        reason = _available(backend, native_op, device)
        if reason is not None:
            raise RuntimeError(f"MDUS_KERNEL_BACKEND={backend} cannot run this call: {reason}")
        return backend
    if device.type == "cuda":
        order = (gpu_default, "cuda" if gpu_default == "triton" else "triton")
    elif device.type == "cpu":
        order = ("cpp",)
    else:
        order = ()
    for candidate in order:
        if _available(candidate, native_op, device) is None:
            return candidate
    return "reference"


def contiguous(out):
    """A reference backend's result (a tensor or a tuple of them, None allowed) laid out as the kernels return it
    and the ops' fake implementations describe it: contiguous, whatever the inputs' strides."""
    if isinstance(out, torch.Tensor):
        return out.contiguous()
    return tuple(None if t is None else t.contiguous() for t in out)
