"""Kernel-launch and device-memory traffic accounting, reported by the launchers themselves.

Launchers of every compiled backend call ``note_launch`` once per kernel launch with the bytes
that kernel reads and writes and its grid's size in programs (thread blocks); benchmarks and
the CLI wrap a forward/backward in ``record_launches()`` to get launch counts, grids and
modeled traffic. Recording is off (a list check) unless someone is listening.

``record_launches(dry_run=True)`` records the launches without running the kernels: the
launchers run as they always do (checks, layouts, allocations, tiling and grid computation,
``note_launch``) and skip only the kernel call itself, so a launch geometry at full size costs
no kernel time. The outputs of a dry run are uninitialized memory: use it for accounting only.

The occupancy rule (``MIN_PROGRAMS``, ``BIG_LAUNCH_BYTES``, ``fills_gpu``) is the one issue 19
states: a kernel that moves more than 1 MB launches at least 4 programs per SM of a 132-SM
H100 / H200, whatever the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

# Modeled bandwidth for traffic -> time: H100 SXM HBM3.
H100_HBM_BYTES_PER_S = 3.35e12
H100_SMS = 132  # streaming multiprocessors of an H100 SXM / H200
MIN_PROGRAMS = 4 * H100_SMS  # programs a big launch needs to fill those SMs
BIG_LAUNCH_BYTES = 10 ** 6  # "moves more than 1 MB"
GEOMETRY_BATCHES = (32, 128)  # the batches the rule is checked at


@dataclass(frozen=True)
class Launch:
    """One kernel launch. ``programs``: its grid's size (product of the grid dimensions);
    None where the backend has no grid to report (the C++ CPU backend, a library call).
    ``grids``: for a backend that notes one launch per logical kernel (the compiled "cuda"
    kernels), the (device kernel, programs) of every launch that made it up, in order;
    ``programs`` is then the largest of them."""

    kernel: str
    backend: str
    bytes_read: int
    bytes_written: int
    programs: Optional[int] = None
    grids: Tuple[Tuple[str, int], ...] = ()

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written


_listeners: List[List[Launch]] = []
_dry_runs: List[bool] = []
_multiprocessors: List[int] = []


def grid_programs(grid: Sequence[int]) -> int:
    """Programs of a launch grid: the product of its dimensions."""
    programs = 1
    for size in grid:
        programs *= int(size)
    return programs


def note_launch(kernel: str, backend: str, bytes_read: int, bytes_written: int,
                programs: Optional[int] = None,
                grids: Sequence[Tuple[str, int]] = ()) -> None:
    for log in _listeners:
        log.append(Launch(kernel, backend, int(bytes_read), int(bytes_written),
                          None if programs is None else int(programs),
                          tuple((str(name), int(p)) for name, p in grids)))


def recording() -> bool:
    return bool(_listeners)


def dry_run() -> bool:
    """True inside ``record_launches(dry_run=True)``: launchers skip the kernel call."""
    return bool(_dry_runs) and _dry_runs[-1]


def multiprocessors() -> int:
    """The SM count the compiled CUDA launchers size their grids for while recording (0: the
    device's own; the CPU emulation's is 4)."""
    return _multiprocessors[-1] if _multiprocessors else 0


@contextlib.contextmanager
def record_launches(dry_run: bool = False, multiprocessors: Optional[int] = None
                    ) -> Iterator[List[Launch]]:
    """Launches noted inside, in order. ``dry_run``: the launchers skip their kernels (see the
    module docstring). ``multiprocessors``: the CUDA launchers size their grids for that many
    SMs (e.g. H100_SMS, to record an H100's geometry on the emulation)."""
    log: List[Launch] = []
    _listeners.append(log)
    _dry_runs.append(dry_run)
    _multiprocessors.append(multiprocessors or 0)
    try:
        yield log
    finally:
        _listeners.remove(log)
        _dry_runs.pop()
        _multiprocessors.pop()


def fills_gpu(launch: Launch) -> bool:
    """The occupancy rule: a launch moving more than BIG_LAUNCH_BYTES has at least
    MIN_PROGRAMS programs (a launch without a reported grid passes only if it is small)."""
    if launch.bytes_moved <= BIG_LAUNCH_BYTES:
        return True
    return launch.programs is not None and launch.programs >= MIN_PROGRAMS


def modeled_seconds(launches: List[Launch], bandwidth: float = H100_HBM_BYTES_PER_S) -> float:
    """Modeled time if every byte moved at ``bandwidth`` (memory-bound model, not measured)."""
    return sum(launch.bytes_moved for launch in launches) / bandwidth
