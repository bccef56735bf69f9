"""The kernel interface's signatures, written once.

``fused_mbconv.reference`` (the "torch" backend) is the specification: it declares each
kernel-interface function with its annotations and its contract. Every other backend's
function takes both with ``@specified_by(reference.<name>)``, which checks when the backend is
imported that the function's parameters are the specification's, by name and in order.
"""

from __future__ import annotations

import inspect
from typing import Callable, List, TypeVar

F = TypeVar("F", bound=Callable)


def parameter_names(fn: Callable) -> List[str]:
    return list(inspect.signature(fn).parameters)


def specified_by(spec: Callable) -> Callable[[F], F]:
    """Decorator: ``fn`` implements the kernel-interface function ``spec``."""
    def attach(fn: F) -> F:
        got, want = parameter_names(fn), parameter_names(spec)
        if fn.__name__ != spec.__name__ or got != want:
            raise TypeError(f"{fn.__module__}.{fn.__name__}({', '.join(got)}) does not match "
                            f"the kernel interface's {spec.__name__}({', '.join(want)})")
        fn.__annotations__ = dict(spec.__annotations__)
        fn.__doc__ = "\n\n".join(doc for doc in (spec.__doc__, fn.__doc__) if doc) or None
        return fn
    return attach
