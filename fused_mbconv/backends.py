"""Kernel backends and how one is chosen.

Every custom op under ``torch.ops.fused_mbconv`` has one schema; inside it, the backend chosen
here supplies the kernels. A backend is a module implementing the kernel interface (see
``fused_mbconv.reference``, the "torch" backend, for the full list of functions). ``TABLE``
holds one ``Backend`` record per backend, fastest first: its name, the device types it runs,
its module and its probe. Everything else here (names, per-device defaults, device checks)
derives from it:

- "triton": Triton kernels (``fused_mbconv.kernels``); CPU tensors only under
  ``TRITON_INTERPRET=1`` and only when chosen.
- "cuda" / "cpu": the compiled extension built from ``csrc/``.
- "torch": a reference composite of aten ops, always present, on any device.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, cheaply (probe caches)
class Backend:
    """One backend: the tensors it runs, its kernel-interface module, and how to tell whether
    it works here."""

    name: str
    # Device types whose tensors it runs; None: any.
    devices: Optional[Tuple[str, ...]]
    module: str
    # (usable, reason) of this backend on a device type it runs, on this machine now.
    probe: Callable[["Backend", str], Tuple[bool, str]]
    # Device types it runs only when chosen (use_backend/set_backend), never by default.
    opt_in: Tuple[str, ...] = ()

    def runs(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def is_default_on(self, device_type: str) -> bool:
        return self.runs(device_type) and device_type not in self.opt_in


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_version() -> Tuple[bool, str]:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable: {exc}"
    return True, f"triton {triton.__version__}"


def _triton_probe(backend: Backend, device_type: str) -> Tuple[bool, str]:
    importable, version = _triton_version()
    if not importable:
        return False, version
    if device_type == "cuda":
        return (True, version) if torch.cuda.is_available() else (False, "no CUDA device")
    # Read at every call: TRITON_INTERPRET may change during a session.
    if not _triton_interpret():
        return False, "CPU tensors run Triton kernels only under TRITON_INTERPRET=1"
    return True, f"{version} interpreter (TRITON_INTERPRET=1)"


@functools.lru_cache(maxsize=None)  # the library loads once per process: so does the answer
def _extension_probe(backend: Backend, device_type: str) -> Tuple[bool, str]:
    try:
        extension = importlib.import_module(backend.module)
    except Exception as exc:
        return False, f"extension failed to load: {exc}"
    return extension.status(backend.name)


def _reference_probe(backend: Backend, device_type: str) -> Tuple[bool, str]:
    return True, "reference composite of aten ops"


# Fastest first: on each device type, the default is the first usable backend that runs it
# by default and implements the op's kernels.
TABLE = (
    Backend("triton", ("cuda", "cpu"), "fused_mbconv.kernels", _triton_probe, opt_in=("cpu",)),
    Backend("cuda", ("cuda",), "fused_mbconv.extension", _extension_probe),
    Backend("cpu", ("cpu",), "fused_mbconv.extension", _extension_probe),
    Backend("torch", None, "fused_mbconv.reference", _reference_probe),
)
BACKENDS = tuple(b.name for b in TABLE)
_BY_NAME = {b.name: b for b in TABLE}
# The device types ``fused-mbconv info`` reports and ``available_backends()`` looks at.
DEVICE_TYPES = ("cpu", "cuda")

_state = threading.local()
_global_choice: Optional[str] = None


def record(name: str) -> Backend:
    """The table's record of backend ``name``."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown backend {name!r}; choose from {list(BACKENDS)}")
    return _BY_NAME[name]


def machine_device_types() -> List[str]:
    """The DEVICE_TYPES this machine has devices of."""
    return [d for d in DEVICE_TYPES if d != "cuda" or torch.cuda.is_available()]


@functools.lru_cache(maxsize=None)
def preference(device_type: str) -> Tuple[str, ...]:
    """The backends the default may choose for tensors of ``device_type``, fastest first."""
    return tuple(b.name for b in TABLE if b.is_default_on(device_type))


def backend_status(name: str, device_type: Optional[str] = None) -> Tuple[bool, str]:
    """(usable, reason) for a backend on a device type ("cpu" or "cuda"; default CPU when the
    backend runs CPU tensors, else its first device type)."""
    backend = record(name)
    if device_type is None:
        device_type = "cpu" if backend.runs("cpu") else backend.devices[0]
    if not backend.runs(device_type):
        kinds = " and ".join(d.upper() for d in backend.devices)
        return False, f"the {name} backend runs {kinds} tensors only"
    return backend.probe(backend, device_type)


def available_backends(device=None) -> List[str]:
    """Backends usable here, fastest first. With ``device``, those usable for tensors on it;
    without, those usable on any device of this machine."""
    if device is not None:
        device_type = torch.device(device).type
        # The defaults on this device type first, then those it runs only when chosen (the
        # CPU Triton interpreter).
        defaults = preference(device_type)
        ordered = defaults + tuple(b.name for b in TABLE
                                   if b.runs(device_type) and b.name not in defaults)
        return [n for n in ordered if backend_status(n, device_type)[0]]
    device_types = machine_device_types()
    return [b.name for b in TABLE
            if any(backend_status(b.name, d)[0] for d in device_types if b.runs(d))]


def set_backend(name: Optional[str]) -> None:
    """Choose the backend for every op; ``None`` restores the per-device default."""
    global _global_choice
    if name is not None:
        record(name)
    _global_choice = name


def get_backend() -> Optional[str]:
    """The backend chosen by ``use_backend``/``set_backend``, or None for the default."""
    return getattr(_state, "choice", None) or _global_choice


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Scoped ``set_backend`` (this thread only)."""
    if name is not None:
        record(name)
    previous = getattr(_state, "choice", None)
    _state.choice = name
    try:
        yield
    finally:
        _state.choice = previous


def implements(name: str, functions: Sequence[str]) -> bool:
    """Whether backend ``name`` provides every kernel-interface function in ``functions``
    (a backend may implement some ops' kernels before others')."""
    backend = record(name)
    if not functions:
        return True
    try:
        module = importlib.import_module(backend.module)
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
    for name in preference(device.type):
        if backend_status(name, device.type)[0] and implements(name, functions):
            return name
    raise NotImplementedError(f"no fused_mbconv backend for {device.type} tensors implements "
                              f"the kernels {list(functions)}")


def kernels_for(device: torch.device, functions: Sequence[str] = ()):
    """The kernel-interface module of the backend that runs ``device`` now; with
    ``functions``, the default skips backends that lack any of them."""
    return importlib.import_module(record(resolve_backend(device, functions)).module)


def missing_kernels(name: str, functions: Sequence[str]) -> List[str]:
    """The kernel-interface functions among ``functions`` that backend ``name`` lacks."""
    return [f for f in functions if not implements(name, [f])]


def kernels_with_reference(device: torch.device, functions: Sequence[str]
                           ) -> Tuple[SimpleNamespace, str, List[str]]:
    """``functions`` for tensors on ``device`` from the backend that runs them now (the chosen
    one, else the default), taking the reference's ("torch") for those it lacks: an explicit
    fallback, for ops whose functions not every backend has. Returns (the functions by name,
    the backend's name, the names taken from the reference)."""
    name = resolve_backend(device)
    module = importlib.import_module(record(name).module)
    missing = missing_kernels(name, functions)
    reference = importlib.import_module(record("torch").module)
    return (SimpleNamespace(**{f: getattr(reference if f in missing else module, f)
                               for f in functions}), name, missing)
