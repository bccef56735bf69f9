"""An op's argument list as one ordered table, from which its schema, its named view of the
arguments and autograd's per-argument gradient tuple all derive (no position kept by hand)."""

from __future__ import annotations

import collections
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

from torch import Tensor


class Arg(NamedTuple):
    name: str
    type: str  # its schema type: "Tensor", "Tensor?", "SymInt", "float[]"...
    grad: bool = False  # whether autograd returns a gradient for it
    # Its default (a bool or number, written as is in the schema): an argument added to a
    # released op goes last with one, so calls and saved programs written before it keep their
    # meaning. torch.library omits an argument equal to its default when it calls the
    # Python kernels, so the values_type fills it in again.
    default: Optional[Union[bool, int, float]] = None


def schema(args: Sequence[Arg], returns: str) -> str:
    """The torch.library schema of a functional op taking ``args``."""
    return "(" + ", ".join(f"{a.type} {a.name}" + ("" if a.default is None else f"={a.default}")
                           for a in args) + ") -> " + returns


def tensors(count: int) -> str:
    """The schema return of ``count`` tensors."""
    return "(" + ", ".join(["Tensor"] * count) + ")"


def backward_args(inputs: Sequence[Arg], saved: Sequence[str], options: Sequence[str]
                  ) -> Tuple[Arg, ...]:
    """A backward op's arguments: grad_out, the tensors the forward saved (an input keeps its
    type, an output is always a tensor), the forward's ``options`` it needs, and
    output_mask, which of the gradients to compute."""
    types = {a.name: a.type for a in inputs}
    return (Arg("grad_out", "Tensor"), *(Arg(n, types.get(n, "Tensor")) for n in saved),
            *(Arg(n, types[n]) for n in options), Arg("output_mask", "bool[]"))


def values_type(typename: str, args: Sequence[Arg]):
    """A namedtuple type holding one call's values of ``args``, by name (with their
    defaults)."""
    defaults = [a.default for a in args if a.default is not None]
    if any(a.default is None for a in args[len(args) - len(defaults):]):
        raise ValueError(f"{typename}: arguments with defaults must come last")
    return collections.namedtuple(typename, [a.name for a in args], defaults=defaults or None)


def grad_names(args: Sequence[Arg]) -> Tuple[str, ...]:
    return tuple(a.name for a in args if a.grad)


def needs_grad(args: Sequence[Arg], needs_input_grad: Sequence[bool]) -> Dict[str, bool]:
    """autograd's ``ctx.needs_input_grad`` by argument name (shorter by the trailing
    defaulted arguments torch.library did not pass: those take no gradient)."""
    missing = args[len(needs_input_grad):]
    if any(a.default is None for a in missing):
        raise ValueError(f"needs_input_grad has {len(needs_input_grad)} entries for "
                         f"{len(args)} arguments")
    return dict(zip((a.name for a in args), [*needs_input_grad, *[False] * len(missing)],
                    strict=True))


def input_grads(args: Sequence[Arg], grads: Dict[str, Optional[Tensor]]
                ) -> Tuple[Optional[Tensor], ...]:
    """autograd's backward result: one entry per argument, None where ``grads`` has none."""
    return tuple(grads.get(a.name) for a in args)
