"""Measurements shared by ``benchmarks/`` and the ``fused-mbconv`` command.

What is measured, and how:

- ``saved_bytes``: bytes autograd keeps for backward, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` around a forward. Each storage counts once, in
  full (a saved view keeps its whole storage alive); tensors passed in ``exclude`` (e.g. the
  block input, the parameters: both live anyway) are not counted.
- ``count_traffic``: launches and device-memory bytes read + written, counted per aten op with
  a ``TorchDispatchMode``. Rule: every aten op that reads or writes at least one byte is one
  launch; it reads each tensor argument and writes each tensor output, a tensor's bytes being
  its distinct elements (broadcast dimensions, stride 0, count once) times the element size.
  Views and metadata-only ops (``func.is_view``, detach/alias, ``empty*``) move nothing and
  are skipped. Arguments an op only overwrites (``out=``, ``copy_``, ``fill_``, ``zero_``,
  random fills) count as written, not read. A ``fused_mbconv`` custom op counts as the launches
  its launchers report through ``fused_mbconv.accounting``; a backend whose kernels are aten
  ops (the "torch" reference) reports nothing, and then its aten ops are counted instead.
  Inductor-generated kernels bypass the dispatcher, so compiled code cannot be counted here.
- ``modeled_seconds``: traffic / 3.35 TB/s (H100 SXM HBM3), a memory-bound model, labelled
  *modeled*: not a measurement.
- ``time_fn``: warm-up runs excluded; on CUDA each repeat is timed with device events after a
  synchronize, on CPU with ``time.perf_counter``.
- ``peak_memory``: peak CUDA allocation above what was allocated before the call (CUDA only).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import accounting

_FUSED_NAMESPACE = "fused_mbconv"
_METADATA_OPS = {"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided",
                 "new_empty", "new_empty_strided", "set_", "resize_", "_reshape_alias"}
_OVERWRITE_OPS = {"copy_", "fill_", "zero_", "uniform_", "normal_", "bernoulli_", "random_",
                  "exponential_"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements times element size (a stride-0, broadcast dimension counts once)."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size() if t.numel() else 0


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


# ---------------------------------------------------------------- saved for backward

@dataclass
class SavedTensors:
    bytes: int
    tensors: int


def saved_bytes(forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> SavedTensors:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs."""
    excluded = {_storage_key(t) for t in exclude}
    seen: Dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    del result
    return SavedTensors(sum(seen.values()), len(seen))


# ---------------------------------------------------------------- launches and traffic

@dataclass
class Traffic:
    launches: List[accounting.Launch] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.launches)

    @property
    def bytes_read(self) -> int:
        return sum(launch.bytes_read for launch in self.launches)

    @property
    def bytes_written(self) -> int:
        return sum(launch.bytes_written for launch in self.launches)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def modeled_seconds(self) -> float:
        """Modeled, not measured: bytes / H100 HBM3 bandwidth."""
        return accounting.modeled_seconds(self.launches)

    def by_kernel(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for launch in self.launches:
            counts[launch.kernel] = counts.get(launch.kernel, 0) + 1
        return counts


def _python_impl(func) -> Optional[Callable]:
    """The Python implementation of a ``torch.library.custom_op`` (private torch API: None
    when it is not available, and the op is then counted as a single launch)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return None
    opdef = OPDEFS.get(func._schema.name)
    return getattr(opdef, "_init_fn", None)


class _TrafficMode(TorchDispatchMode):
    def __init__(self, fused_log: List[accounting.Launch]):
        super().__init__()
        self.fused_log = fused_log
        self.stack: List[List[accounting.Launch]] = [[]]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == _FUSED_NAMESPACE:
            return self._fused(func, args, kwargs)
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if func.is_view or name in _METADATA_OPS:
            return out
        read = 0
        for schema_arg, value in _schema_values(func, args, kwargs):
            tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            overwritten = schema_arg.alias_info is not None and schema_arg.alias_info.is_write \
                and (schema_arg.name == "out" or name in _OVERWRITE_OPS)
            if not overwritten:
                read += sum(tensor_bytes(t) for t in tensors)
        written = sum(tensor_bytes(t) for t in tree_flatten(out)[0]
                      if isinstance(t, torch.Tensor))
        if read or written:
            self.stack[-1].append(accounting.Launch(name, "aten", read, written))
        return out

    def _fused(self, func, args, kwargs):
        impl = _python_impl(func)
        reported = len(self.fused_log)
        self.stack.append([])
        try:
            if impl is None:
                out = func(*args, **kwargs)
            else:
                with self:
                    out = impl(*args, **kwargs)
        finally:
            inner = self.stack.pop()
        if len(self.fused_log) == reported:  # no launcher reported: its aten ops are the kernels
            if impl is None:
                inner = [accounting.Launch(func.__name__.split(".")[0], "custom op",
                                           _bytes_of(args, kwargs), _bytes_of(out))]
            self.stack[-1].extend(inner)
        return out


def _schema_values(func, args, kwargs):
    arguments = func._schema.arguments
    for schema_arg, value in zip(arguments, args):
        yield schema_arg, value
    by_name = {a.name: a for a in arguments}
    for name, value in kwargs.items():
        if name in by_name:
            yield by_name[name], value


def _bytes_of(*trees) -> int:
    return sum(tensor_bytes(t) for t in tree_flatten(trees)[0] if isinstance(t, torch.Tensor))


def count_traffic(fn: Callable[[], Any]) -> Traffic:
    """Launches and bytes read/written by ``fn()`` (aten ops plus reported fused launches)."""
    with accounting.record_launches() as fused_log:
        mode = _TrafficMode(fused_log)
        with mode:
            fn()
    return Traffic(mode.stack[0] + list(fused_log))


# ---------------------------------------------------------------- time and memory

def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    samples: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)


def time_fn(fn: Callable[..., Any], device, warmup: int = 2, repeats: int = 5,
            setup: Optional[Callable[[], Sequence]] = None,
            progress: Optional[Callable[[], None]] = None) -> Timing:
    """Seconds per ``fn(*setup())`` call; ``warmup`` calls first, untimed; ``setup`` untimed."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    samples = []
    for i in range(warmup + repeats):
        args = tuple(setup()) if setup is not None else ()
        synchronize(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            fn(*args)
            elapsed = time.perf_counter() - begin
        if i >= warmup:
            samples.append(elapsed)
        if progress is not None:
            progress()
    return Timing(samples)


def peak_memory(fn: Callable[[], Any], device) -> Optional[int]:
    """Peak CUDA bytes allocated during ``fn()`` above those allocated before; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# ---------------------------------------------------------------- workloads and modes

MODES = ("forward", "backward", "forward+backward")


@dataclass
class Workload:
    """A training-mode forward and its backward, on fixed inputs.

    ``forward()`` clears gradients (so every backward writes, not accumulates, them) and
    returns the output; ``backward(out)`` back-propagates the fixed ``grad_output``."""

    module: torch.nn.Module
    inputs: torch.Tensor
    grad_output: torch.Tensor

    @classmethod
    def build(cls, module: torch.nn.Module, inputs: torch.Tensor,
              shape_from: Optional[torch.nn.Module] = None) -> "Workload":
        """A workload with a random output gradient shaped by one no-grad forward of
        ``shape_from`` (default ``module``; pass the eager module for a compiled one)."""
        with torch.no_grad():
            out = (shape_from or module)(inputs)
        return cls(module, inputs.requires_grad_(), torch.randn_like(out))

    def forward(self) -> torch.Tensor:
        for p in self.module.parameters():
            p.grad = None
        self.inputs.grad = None
        return self.module(self.inputs)

    def backward(self, out: torch.Tensor) -> None:
        out.backward(self.grad_output)

    def step(self, mode: str):
        """(fn, setup) that run ``mode`` as ``fn(*setup())``."""
        if mode == "forward":
            return self.forward, None
        if mode == "backward":
            return self.backward, lambda: (self.forward(),)
        if mode == "forward+backward":
            return lambda: self.backward(self.forward()), None
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")

    def activation_exclusions(self) -> List[torch.Tensor]:
        """Tensors alive whatever the implementation: the input and the parameters."""
        return [self.inputs, *self.module.parameters()]


_compile_status: Optional[tuple] = None


def compile_status() -> tuple:
    """(usable, reason) for ``torch.compile`` here (e.g. no C++ compiler for CPU Inductor)."""
    global _compile_status
    if _compile_status is None:
        try:
            fn = torch.compile(lambda t: torch.nn.functional.silu(t) * 2)
            fn(torch.randn(4))
            _compile_status = (True, f"torch.compile (Inductor), torch {torch.__version__}")
        except Exception as exc:  # a missing compiler or a broken toolchain
            _compile_status = (False, f"torch.compile is unavailable: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    return _compile_status


@dataclass
class TrainStep:
    """One classification training step: forward, cross-entropy loss, backward, SGD step.

    ``images`` carry the step's dtype and memory format (the model is expected in the same);
    with ``autocast`` the forward and loss run under ``torch.autocast`` in that dtype, and a
    float16 step scales the loss with a ``GradScaler``, as float16 mixed-precision training
    does."""

    model: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    optimizer: torch.optim.Optimizer
    autocast: Optional[torch.dtype] = None
    scaler: Optional[Any] = None

    @classmethod
    def build(cls, model: torch.nn.Module, batch: int, resolution: int, num_classes: int,
              seed: int = 0, dtype: torch.dtype = torch.float32,
              memory_format: torch.memory_format = torch.contiguous_format,
              autocast: Optional[torch.dtype] = None) -> "TrainStep":
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(batch, 3, resolution, resolution, generator=generator)
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None
        images = images.to(device, dtype).contiguous(memory_format=memory_format)
        return cls(model, images, labels.to(device), optimizer, autocast, scaler)

    def loss(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.images.device.type, dtype=self.autocast,
                            enabled=self.autocast is not None):
            return torch.nn.functional.cross_entropy(self.model(self.images), self.labels)

    def __call__(self) -> torch.Tensor:
        loss = self.loss()
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()

    def activation_exclusions(self) -> List[torch.Tensor]:
        return [self.images, *self.model.parameters()]
