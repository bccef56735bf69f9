"""The (device, backend) pairs a test runs on, and their ids: a CPU case is named after its
backend, a CUDA one ``cuda-<backend>`` (benchmarks/gpu_check.sh picks the GPU tests by ``cuda``
in their ids, tests/emulated_cuda_suite.py the "cpu" backend's by ``cpu``)."""

from typing import List, Optional, Sequence

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv.backends import TABLE, backend_status, implements

REFERENCE = "torch"  # the specification: what the kernel-interface suites compare with


def target_id(device: str, backend: str) -> str:
    return backend if device == "cpu" else f"{device}-{backend}"


def cpu_backends(functions: Sequence[str] = ()) -> List[str]:
    """The backends usable here for CPU tensors that implement ``functions``, as
    ``available_backends`` orders them (the defaults first, then the Triton interpreter)."""
    return [b for b in fm.available_backends("cpu") if implements(b, functions)]


def gpu_backends(functions: Sequence[str] = ()) -> List[str]:
    """The compiled backends usable for CUDA tensors that implement ``functions``; none
    without a GPU."""
    if not torch.cuda.is_available():
        return []
    return [b for b in fm.available_backends("cuda")
            if b != REFERENCE and implements(b, functions)]


def targets(cpu: Optional[Sequence[str]] = None, functions: Sequence[str] = ()):
    """Params ``(device, backend)``: each of the ``cpu`` backends (default: every one of
    ``cpu_backends(functions)``) on CPU tensors, then every GPU backend on CUDA tensors."""
    cpu = cpu_backends(functions) if cpu is None else cpu
    return ([pytest.param("cpu", b, id=target_id("cpu", b)) for b in cpu]
            + [pytest.param("cuda", b, id=target_id("cuda", b)) for b in gpu_backends(functions)])


def kernel_targets(functions: Sequence[str]):
    """Params ``(device, backend)`` of a kernel-interface suite: every backend but the
    reference that implements ``functions``, on every device type it runs, skipped with the
    reason where it cannot run here (no GPU; Triton on CPU tensors without the interpreter).
    Triton's compiled kernels for CUDA tensors are left to the op grids (each kernel-interface
    case would compile its own variants, minutes of the GPU check)."""
    params = []
    for device in ("cpu", "cuda"):
        for backend in TABLE:
            if (backend.name == REFERENCE or not backend.runs(device)
                    or (device, backend.name) == ("cuda", "triton")
                    or not implements(backend.name, functions)):
                continue
            usable, reason = backend_status(backend.name, device)
            marks = () if usable else pytest.mark.skip(
                reason=f"the {backend.name} backend on {device} tensors: {reason}")
            params.append(pytest.param(device, backend.name, id=target_id(device, backend.name),
                                       marks=marks))
    return params
