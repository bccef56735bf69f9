"""Kernel-launch and device-memory traffic accounting, reported by the launchers themselves.

Launchers of every compiled backend call ``note_launch`` once per kernel launch with the bytes
that kernel reads and writes; benchmarks and the CLI wrap a forward/backward in
``record_launches()`` to get launch counts and modeled traffic. Recording is off (a list
check) unless someone is listening.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List

# Modeled bandwidth for traffic -> time: H100 SXM HBM3.
H100_HBM_BYTES_PER_S = 3.35e12


@dataclass(frozen=True)
class Launch:
    kernel: str
    backend: str
    bytes_read: int
    bytes_written: int

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written


_listeners: List[List[Launch]] = []


def note_launch(kernel: str, backend: str, bytes_read: int, bytes_written: int) -> None:
    for log in _listeners:
        log.append(Launch(kernel, backend, int(bytes_read), int(bytes_written)))


def recording() -> bool:
    return bool(_listeners)


@contextlib.contextmanager
def record_launches() -> Iterator[List[Launch]]:
    log: List[Launch] = []
    _listeners.append(log)
    try:
        yield log
    finally:
        _listeners.remove(log)


def modeled_seconds(launches: List[Launch], bandwidth: float = H100_HBM_BYTES_PER_S) -> float:
    """Modeled time if every byte moved at ``bandwidth`` (memory-bound model, not measured)."""
    return sum(launch.bytes_moved for launch in launches) / bandwidth
