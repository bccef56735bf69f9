"""Kernel backends and how one is chosen.

Every custom op under ``torch.ops.fused_mbconv`` has one schema; inside it, the backend chosen
here supplies the kernels. A backend is a module implementing the kernel interface (see
``fused_mbconv.reference``, the "torch" backend, for the full list of functions):

- "triton": Triton kernels (``fused_mbconv.kernels``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``.
- "cuda" / "cpu": the compiled extension built from ``csrc/``.
- "torch": a reference composite of aten ops, always present.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
# Fastest first, per device type.
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_MODULES = {
    "triton": "fused_mbconv.kernels",
    "cuda": "fused_mbconv.extension",
    "cpu": "fused_mbconv.extension",
    "torch": "fused_mbconv.reference",
}

_state = threading.local()
_global_choice: Optional[str] = None
_status_cache: Dict[Tuple[str, str], Tuple[bool, str]] = {}


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe(name: str, device_type: str) -> Tuple[bool, str]:
    if name == "torch":
        return True, "reference composite of aten ops"
    if name == "triton":
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            return False, f"triton is not importable: {exc}"
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return False, "no CUDA device"
            return True, f"triton {triton.__version__}"
        if not _triton_interpret():
            return False, "CPU tensors run Triton kernels only under TRITON_INTERPRET=1"
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1)"
    # "cpu" and "cuda": the compiled extension.
    try:
        extension = importlib.import_module(_MODULES[name])
    except Exception as exc:
        return False, f"extension failed to load: {exc}"
    return extension.status(name)


def backend_status(name: str, device_type: Optional[str] = None) -> Tuple[bool, str]:
    """(usable, reason) for a backend on a device type ("cpu" or "cuda")."""
    _check_name(name)
    if device_type is None:
        device_type = "cuda" if name == "cuda" else "cpu"
    if name == "cuda" and device_type != "cuda":
        return False, "the cuda backend runs CUDA tensors only"
    if name == "cpu" and device_type != "cpu":
        return False, "the cpu backend runs CPU tensors only"
    key = (name, device_type)
    if name == "triton" and device_type == "cpu":
        return _probe(name, device_type)  # depends on TRITON_INTERPRET, which may change
    if key not in _status_cache:
        _status_cache[key] = _probe(name, device_type)
    return _status_cache[key]


def available_backends(device=None) -> List[str]:
    """Backends usable here, fastest first. With ``device``, those usable for tensors on it;
    without, those usable on any device of this machine."""
    if device is not None:
        device_type = torch.device(device).type
        # The device's preference order; others usable there (the CPU Triton interpreter) last.
        preference = _PREFERENCE.get(device_type, ())
        ordered = list(preference) + [n for n in BACKENDS if n not in preference]
        return [n for n in ordered if backend_status(n, device_type)[0]]
    device_types = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    return [n for n in BACKENDS if any(backend_status(n, d)[0] for d in device_types
                                       if not (n == "cuda" and d == "cpu")
                                       and not (n == "cpu" and d == "cuda"))]


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {list(BACKENDS)}")


def set_backend(name: Optional[str]) -> None:
    """Choose the backend for every op; ``None`` restores the per-device default."""
    global _global_choice
    if name is not None:
        _check_name(name)
    _global_choice = name


def get_backend() -> Optional[str]:
    """The backend chosen by ``use_backend``/``set_backend``, or None for the default."""
    return getattr(_state, "choice", None) or _global_choice


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Scoped ``set_backend`` (this thread only)."""
    if name is not None:
        _check_name(name)
    previous = getattr(_state, "choice", None)
    _state.choice = name
    try:
        yield
    finally:
        _state.choice = previous


def implements(name: str, functions: Sequence[str]) -> bool:
    """Whether backend ``name`` provides every kernel-interface function in ``functions``
    (a backend may implement some ops' kernels before others')."""
    _check_name(name)
    if not functions:
        return True
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception:
        return False
    return all(hasattr(module, f) for f in functions)


def resolve_backend(device: torch.device, functions: Sequence[str] = ()) -> str:
    """The backend that runs tensors on ``device`` now: the chosen one, else the fastest that
    implements ``functions``."""
    choice = get_backend()
    if choice is not None:
        usable, reason = backend_status(choice, device.type)
        if not usable:
            raise RuntimeError(f"fused_mbconv backend {choice!r} cannot run {device.type} "
                               f"tensors: {reason}")
        if not implements(choice, functions):
            raise NotImplementedError(
                f"fused_mbconv backend {choice!r} does not implement the kernels "
                f"{[f for f in functions if not implements(choice, [f])]}; choose another "
                f"backend (fm.use_backend) or None for the default")
        return choice
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if backend_status(name, device.type)[0] and implements(name, functions):
            return name
    return "torch"


def kernels_for(device: torch.device, functions: Sequence[str] = ()):
    """The kernel-interface module of the backend that runs ``device`` now; with
    ``functions``, the default skips backends that lack any of them."""
    return importlib.import_module(_MODULES[resolve_backend(device, functions)])
