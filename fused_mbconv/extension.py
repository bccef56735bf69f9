"""The "cpu" and "cuda" backends: the kernel interface implemented by the compiled csrc/
extension (ops ``torch.ops.fused_mbconv_ext.*``, CPU and CUDA kernels registered per dispatch
key).

Where the compiled code comes from, in order:
0. ``$FUSED_MBCONV_LIBRARY``, when set: a library to load instead of ``fused_mbconv._C`` (the
   op schemas and CPU kernels). The test suite points it at csrc/cuda/ compiled for the CPU
   (``_build.emulation_command``), so the CUDA kernels run as the "cpu" backend;
1. ``fused_mbconv._C`` / ``fused_mbconv._C_cuda``, built by setup.py (``pip install
   --no-build-isolation [-e] .``);
2. a JIT build from a source checkout, made only when asked: ``fused_mbconv.extension.build()``
   or ``python -m fused_mbconv.extension build`` compiles csrc/ with ninja into
   ``$FUSED_MBCONV_BUILD_DIR`` (default ``~/.cache/fused_mbconv/<torch version>``); later
   processes load that library if no setup.py build is present.

Loading happens on the first ``status()`` call (a dlopen, never a compile: a build takes
minutes, the CPU kernels being compiled once per CPU capability, so it never happens implicitly
in ``import fused_mbconv`` or ``available_backends()``). A missing or broken build makes the
backend unavailable with the reason, never an import error.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import reference
from .accounting import dry_run, multiprocessors, note_launch, recording
from .interface import specified_by
from .tensors import NormArgs, accumulate_dtype

Tensor = torch.Tensor

_LIBRARIES = {"cpu": "_C", "cuda": "_C_cuda"}  # the CUDA library registers kernels only
_lock = threading.Lock()
_loaded: Dict[str, Tuple[bool, str]] = {}


def build_dir() -> Path:
    default = Path.home() / ".cache" / "fused_mbconv" / torch.__version__.replace("+", "-")
    return Path(os.environ.get("FUSED_MBCONV_BUILD_DIR", default))


def _built_library(module: str) -> Optional[str]:
    """$FUSED_MBCONV_LIBRARY for _C, else the setup.py build of fused_mbconv.<module>, else a
    JIT build in build_dir()."""
    override = os.environ.get("FUSED_MBCONV_LIBRARY")
    if module == "_C" and override:
        return override
    try:
        spec = importlib.util.find_spec(f"fused_mbconv.{module}")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.exists(spec.origin):
        return spec.origin
    jit = build_dir() / f"fused_mbconv{module}.so"
    return str(jit) if jit.exists() else None


def _load(kind: str) -> Tuple[bool, str]:
    """dlopen the library of ``kind`` ("cpu" or "cuda") once; (loaded, reason)."""
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind == "cuda":
            usable, reason = _load_unlocked("cpu")  # the op schemas live in the CPU library
            result = _load_unlocked("cuda") if usable else (False, reason)
        else:
            result = _load_unlocked("cpu")
        _loaded[kind] = result
        return result


def _load_unlocked(kind: str) -> Tuple[bool, str]:
    if kind in _loaded:
        return _loaded[kind]
    module = _LIBRARIES[kind]
    path = _built_library(module)
    if path is None:
        how = ("`pip install --no-build-isolation -e .` or `python -m fused_mbconv.extension "
               "build`")
        if kind == "cuda":
            how += " on a machine with nvcc and a CUDA build of torch"
        result = (False, f"{kind} extension not built ({how})")
    else:
        try:
            torch.ops.load_library(path)
            result = (True, f"compiled extension {path}")
        except Exception as exc:  # a stale build against another torch, missing symbols...
            result = (False, f"{kind} extension {path} failed to load: {exc}")
        if result[0] and kind == "cpu" and _has_capability_dispatch():
            try:
                capability = torch.ops.fused_mbconv_ext.cpu_capability()
                result = (True, f"{result[1]} (CPU capability {capability})")
            except RuntimeError as exc:  # FUSED_MBCONV_CPU_CAPABILITY names none it can run
                result = (False, f"{kind} extension {path}: {exc}")
    _loaded[kind] = result
    return result


def _has_capability_dispatch() -> bool:
    """Whether the loaded library chooses among CPU capabilities (csrc/cpu/dispatch.cpp); the
    CUDA emulation library (``FUSED_MBCONV_LIBRARY``) has no CPU kernels to choose."""
    return hasattr(torch.ops.fused_mbconv_ext, "cpu_capability")


def cpu_capability() -> Optional[str]:
    """The CPU capability whose kernels the "cpu" backend runs ("default", "avx2", "avx512"):
    the best this CPU supports, or ``$FUSED_MBCONV_CPU_CAPABILITY``, read once when the library
    loads. None when the backend is unusable (``status("cpu")`` says why) or the loaded library
    has no capability dispatch."""
    if not status("cpu")[0] or not _has_capability_dispatch():
        return None
    return torch.ops.fused_mbconv_ext.cpu_capability()


def cpu_capabilities() -> List[str]:
    """The CPU capabilities built for this architecture that this CPU runs, baseline first (any
    of them may be chosen with ``$FUSED_MBCONV_CPU_CAPABILITY``); empty when the library is not
    loaded or has no capability dispatch."""
    _load("cpu")
    return list(torch.ops.fused_mbconv_ext.cpu_capabilities()) if _has_capability_dispatch() else []


def status(name: str) -> Tuple[bool, str]:
    """(usable, reason) of the "cpu" or "cuda" backend."""
    if name not in _LIBRARIES:
        raise ValueError(f"the compiled extension provides 'cpu' and 'cuda', not {name!r}")
    usable, reason = _load(name)
    if usable and name == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device"
    return usable, reason


def build(cuda: Optional[bool] = None, verbose: bool = True) -> List[str]:
    """Compile csrc/ now with ninja (JIT, ``torch.utils.cpp_extension.load``) into build_dir()
    and load it. ``cuda=None`` builds the CUDA library when nvcc and a CUDA torch are present.
    Returns the paths of the built libraries."""
    from . import _build

    if not (_build.CSRC / "ops.cpp").exists():
        raise RuntimeError(f"no csrc/ sources beside this package ({_build.CSRC}): JIT builds "
                           "need a source checkout")
    # A library defining the op schemas can be loaded once per process, and a setup.py build
    # always wins at load time, so a JIT build only makes sense without one.
    installed = [m for m in _LIBRARIES.values() if _built_library(m) is not None
                 and not _built_library(m).startswith(str(build_dir()))]
    if installed:
        raise RuntimeError(f"a setup.py build of fused_mbconv.{installed[0]} is present and takes "
                           "precedence; rebuild it with `pip install --no-build-isolation -e .`")
    if any(ok for ok, _ in _loaded.values()):
        raise RuntimeError("the extension is already loaded in this process; build in a fresh "
                           "one (`python -m fused_mbconv.extension build`)")
    if cuda is None:
        cuda = _build.cuda_build_decision()[0]
    if cuda:
        _build.prepare_cuda_env()
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    specs = [("_C", _build.cpu_sources(), {})]
    if cuda:
        specs.append(("_C_cuda", _build.cuda_sources(), dict(
            extra_cuda_cflags=(_build.NVCC_FLAGS + _build.gencode_flags()
                               + _build.cuda_extra_include_flags()))))
    for module, sources, extra in specs:
        extra.setdefault("extra_include_paths", _build.include_dirs())
        cpp_extension.load(name=f"fused_mbconv{module}", sources=sources,
                           extra_cflags=_build.CXX_FLAGS, extra_ldflags=_build.LD_FLAGS,
                           build_directory=str(out), is_python_module=False, verbose=verbose,
                           **extra)
        path = str(out / f"fused_mbconv{module}.so")
        paths.append(path)
        with _lock:  # load() has just loaded it
            _loaded["cpu" if module == "_C" else "cuda"] = (True, f"compiled extension {path}")
    return paths


# ---- the kernel interface (see fused_mbconv.reference for the specification) ----------------

def _nbytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _backend(x: Tensor) -> str:
    return "cuda" if x.is_cuda else "cpu"


Grids = List[Tuple[str, int]]


def _launch_record():
    """The CUDA launchers' grid record (csrc/include/fused_mbconv/cuda/runtime.cuh) when the
    loaded library has the CUDA kernels (or their CPU emulation); None for the C++ CPU
    kernels."""
    try:
        ops = torch.ops.fused_mbconv_cuda_launches
        return ops.start, ops.stop
    except (AttributeError, RuntimeError):
        return None


@contextlib.contextmanager
def _device_grids(x: Tensor) -> Iterator[Optional[Grids]]:
    """While accounting listens: a list that receives the (kernel, programs) of every CUDA
    launch made in the block, as the C++ launchers report them (in a dry run they skip their
    kernels; the library calls, cuDNN / cuBLAS GEMMs, still run and are not in it). None
    without a grid record: the C++ CPU kernels, whose parallel chunks are not a grid."""
    record = _launch_record() if recording() and (x.is_cuda or _emulated()) else None
    if record is None:
        yield None
        return
    start, stop = record
    grids: Grids = []
    start(dry_run(), multiprocessors())
    try:
        yield grids
    finally:
        for line in stop().splitlines():
            name, programs = line.rsplit(" ", 1)
            grids.append((name, int(programs)))


def _emulated() -> bool:
    """True when the "cpu" backend runs the CUDA kernels under their CPU emulation."""
    return bool(os.environ.get("FUSED_MBCONV_LIBRARY")) and _launch_record() is not None


def _split(grids: Optional[Grids], belongs: Callable[[str], bool]):
    """(the grids ``belongs`` selects, the others); (None, None) without a record."""
    if grids is None:
        return None, None
    return [g for g in grids if belongs(g[0])], [g for g in grids if not belongs(g[0])]


def _noted(kernel: str, backend: str, read: int, written: int,
           grids: Optional[Grids]) -> None:
    """One logical kernel's launch; programs: its largest device launch (None: no record, or
    only library calls)."""
    programs = max((p for _, p in grids), default=None) if grids is not None else None
    note_launch(kernel, backend, read, written, programs, grids or ())


@specified_by(reference.dwconv_bn_silu_forward)
def dwconv_bn_silu_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                           training, eps, need_conv_out):
    with _device_grids(x) as grids:
        out, conv_out, mean, var = torch.ops.fused_mbconv_ext.dwconv_bn_silu_forward(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride, training, eps,
            need_conv_out)
    if recording():
        params = _nbytes(weight, bn_weight, bn_bias)
        backend = _backend(x)
        if training:
            # conv + per-tile statistics (writes d), merge, then BN + SiLU from d.
            apply, conv = _split(grids, lambda name: name == "bn_silu_apply")
            _noted("dwconv_stats", backend, _nbytes(x) + params, _nbytes(out), conv)
            _noted("bn_silu_apply", backend, _nbytes(out, mean, var),
                   _nbytes(out, conv_out if need_conv_out else None), apply)
        else:
            _noted("dwconv_bn_silu", backend, _nbytes(x, running_mean, running_var) + params,
                   _nbytes(out, conv_out if need_conv_out else None), grids)
    return out, conv_out, mean, var


@specified_by(reference.dwconv_bn_silu_backward)
def dwconv_bn_silu_backward(grad_out, x, weight, conv_out, bn_weight, bn_bias, mean, var, stride,
                            training, eps, output_mask):
    with _device_grids(x) as grids:
        grads = torch.ops.fused_mbconv_ext.dwconv_bn_silu_backward(
            grad_out, x, weight, conv_out, bn_weight, bn_bias, mean, var, stride, training, eps,
            list(output_mask))
    if recording():
        backend = _backend(x)
        stats = _nbytes(mean, var, bn_weight, bn_bias)
        reduce, conv = _split(grids, lambda name: name.startswith("bn_silu_grad"))
        _noted("bn_silu_grad_reduce", backend, _nbytes(grad_out, conv_out) + stats,
               2 * x.shape[1] * torch.finfo(accumulate_dtype(x.dtype)).bits // 8, reduce)
        if output_mask[0] or output_mask[1]:
            _noted("dwconv_grad", backend,
                   _nbytes(grad_out, conv_out, weight) + stats
                   + (_nbytes(x) if output_mask[1] else 0),
                   _nbytes(grads[0] if output_mask[0] else None,
                           grads[1] if output_mask[1] else None), conv)
    return tuple(g if m else None for g, m in zip(grads, output_mask))


# ---- MBConv block (K1..K6, B6..B1): one note_launch per logical kernel ----------------------

def _bn(bn: Optional[NormArgs]) -> tuple:
    """A NormArgs as the schema's (mean, var, weight, bias, eps); all None for "no BN"."""
    if bn is None:
        return None, None, None, None, 1.0
    return bn.mean, bn.var, bn.weight, bn.bias, float(bn.eps)


def _empty_none(t: Tensor, wanted: bool) -> Optional[Tensor]:
    return t if wanted else None


def _note(kernel: str, x: Tensor, read: int, written: int,
          grids: Optional[Grids] = None) -> None:
    if recording():
        _noted(kernel, _backend(x), read, written, grids)


def _one_launch(kernel: str, x: Tensor, op: str, args: tuple, read: int):
    """The library's ``op`` on ``args``: one logical kernel, noted as reading ``read`` bytes and
    writing its results."""
    with _device_grids(x) as grids:
        out = getattr(torch.ops.fused_mbconv_ext, op)(*args)
    _note(kernel, x, read, _nbytes(*out) if isinstance(out, tuple) else _nbytes(out), grids)
    return out


def _dgrad_wgrad(grids: Optional[Grids], output_mask: List[bool]):
    """(dgrad grids, wgrad grids) of a [2] function: launches named *wgrad* are the wgrad's,
    the rest (shared passes included) the dgrad's, or the wgrad's when it runs alone."""
    wgrad, rest = _split(grids, lambda name: "wgrad" in name)
    if grids is not None and not output_mask[0]:
        wgrad = wgrad + rest
    return rest, wgrad


@specified_by(reference.mbconv_expand_forward)
def mbconv_expand_forward(x, weight, need_stats):
    return _one_launch("mbconv_expand", x, "mbconv_expand_forward", (x, weight, need_stats),
                       _nbytes(x, weight))


@specified_by(reference.mbconv_dwconv_forward)
def mbconv_dwconv_forward(h, weight, stride, in_bn, activation, need_stats):
    return _one_launch("mbconv_dwconv", h, "mbconv_dwconv_forward",
                       (h, weight, stride, *_bn(in_bn), activation, need_stats),
                       _nbytes(h, weight, *_bn(in_bn)[:4]))


@specified_by(reference.mbconv_squeeze_forward)
def mbconv_squeeze_forward(d, bn2, activation):
    return _one_launch("mbconv_squeeze", d, "mbconv_squeeze_forward", (d, *_bn(bn2), activation),
                       _nbytes(d, *_bn(bn2)[:4]))


@specified_by(reference.mbconv_excite_forward)
def mbconv_excite_forward(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, se_activation, gate):
    weights = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return _one_launch("mbconv_excite", pooled, "mbconv_excite_forward",
                       (pooled, *weights, se_activation, gate), _nbytes(pooled, *weights))


@specified_by(reference.mbconv_project_forward)
def mbconv_project_forward(d, gate_values, weight, bn2, activation, need_stats):
    return _one_launch("mbconv_project", d, "mbconv_project_forward",
                       (d, gate_values, weight, *_bn(bn2), activation, need_stats),
                       _nbytes(d, gate_values, weight, *_bn(bn2)[:4]))


@specified_by(reference.mbconv_output_forward)
def mbconv_output_forward(q, bn3, sample_scale, residual):
    return _one_launch("mbconv_output", q, "mbconv_output_forward",
                       (q, *_bn(bn3), sample_scale, residual),
                       _nbytes(q, residual, sample_scale, *_bn(bn3)[:4]))


@specified_by(reference.mbconv_output_backward_stats)
def mbconv_output_backward_stats(grad_out, q, bn3, sample_scale):
    return _one_launch("mbconv_output_grad_reduce", q, "mbconv_output_backward_stats",
                       (grad_out, q, *_bn(bn3), sample_scale),
                       _nbytes(grad_out, q, sample_scale, *_bn(bn3)[:4]))


@specified_by(reference.mbconv_project_backward)
def mbconv_project_backward(grad_out, q, d, gate_values, weight, bn2, activation, bn3, sum_dy3,
                            sum_dy3_xhat3, sample_scale, training, output_mask):
    with _device_grids(d) as grids:
        grad_a2, grad_gate, grad_weight = torch.ops.fused_mbconv_ext.mbconv_project_backward(
            grad_out, q, d, gate_values, weight, *_bn(bn2), activation, *_bn(bn3), sum_dy3,
            sum_dy3_xhat3, sample_scale, training, list(output_mask))
    stats = _nbytes(sum_dy3, sum_dy3_xhat3, *_bn(bn3)[:4], sample_scale)
    dgrad, wgrad = _dgrad_wgrad(grids, output_mask)
    if output_mask[0]:  # gq built from grad_out and q, GEMM, then gate apply + gate reduction
        _note("mbconv_project_dgrad", d, _nbytes(grad_out, q, d, gate_values, weight) + stats,
              _nbytes(grad_a2, grad_gate), dgrad)
    if output_mask[1]:  # gq and a3 built on load, GEMM
        _note("mbconv_project_wgrad", d, _nbytes(grad_out, q, d, gate_values) + stats,
              _nbytes(grad_weight), wgrad)
    return (_empty_none(grad_a2, output_mask[0]), _empty_none(grad_gate, output_mask[0]),
            _empty_none(grad_weight, output_mask[1]))


@specified_by(reference.mbconv_excite_backward)
def mbconv_excite_backward(grad_gate, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                           se_activation, gate):
    weights = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return _one_launch("mbconv_excite_grad", pooled, "mbconv_excite_backward",
                       (grad_gate, pooled, *weights, se_activation, gate),
                       _nbytes(grad_gate, pooled, *weights))


@specified_by(reference.mbconv_dwconv_backward_stats)
def mbconv_dwconv_backward_stats(grad_a2, grad_pooled, d, bn2, activation):
    return _one_launch("mbconv_dwconv_grad_reduce", d, "mbconv_dwconv_backward_stats",
                       (grad_a2, grad_pooled, d, *_bn(bn2), activation),
                       _nbytes(grad_a2, grad_pooled, d, *_bn(bn2)[:4]))


@specified_by(reference.mbconv_dwconv_backward)
def mbconv_dwconv_backward(grad_a2, grad_pooled, d, h, weight, stride, bn2, activation, sum_dy2,
                           sum_dy2_xhat2, in_bn, training, output_mask):
    with _device_grids(h) as grids:
        grads = torch.ops.fused_mbconv_ext.mbconv_dwconv_backward(
            grad_a2, grad_pooled, d, h, weight, stride, *_bn(bn2), activation, sum_dy2,
            sum_dy2_xhat2, *_bn(in_bn), training, list(output_mask))
    grad_h, grad_weight, sum_dy1, sum_dy1_xhat1 = grads
    read = _nbytes(grad_a2, grad_pooled, d, weight, sum_dy2, sum_dy2_xhat2, *_bn(bn2)[:4],
                   *_bn(in_bn)[:4])
    dgrad, wgrad = _dgrad_wgrad(grids, output_mask)
    if output_mask[0]:
        _note("mbconv_dwconv_dgrad", h, read + (_nbytes(h) if in_bn is not None else 0),
              _nbytes(grad_h, sum_dy1, sum_dy1_xhat1), dgrad)
    if output_mask[1]:
        _note("mbconv_dwconv_wgrad", h, read + _nbytes(h), _nbytes(grad_weight), wgrad)
    return (_empty_none(grad_h, output_mask[0]), _empty_none(grad_weight, output_mask[1]),
            sum_dy1, sum_dy1_xhat1)


@specified_by(reference.mbconv_expand_backward)
def mbconv_expand_backward(grad_y1, e, x, weight, bn1, sum_dy1, sum_dy1_xhat1, training,
                           grad_residual, output_mask):
    with _device_grids(x) as grids:
        grad_x, grad_weight = torch.ops.fused_mbconv_ext.mbconv_expand_backward(
            grad_y1, e, x, weight, *_bn(bn1), sum_dy1, sum_dy1_xhat1, training, grad_residual,
            list(output_mask))
    read = _nbytes(grad_y1, e, sum_dy1, sum_dy1_xhat1, *_bn(bn1)[:4])
    dgrad, wgrad = _dgrad_wgrad(grids, output_mask)
    if output_mask[0]:
        _note("mbconv_expand_dgrad", x, read + _nbytes(weight, grad_residual), _nbytes(grad_x),
              dgrad)
    if output_mask[1]:
        _note("mbconv_expand_wgrad", x, read + _nbytes(x), _nbytes(grad_weight), wgrad)
    return _empty_none(grad_x, output_mask[0]), _empty_none(grad_weight, output_mask[1])


def _main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fused_mbconv.extension")
    parser.add_argument("command", choices=["build", "status"])
    parser.add_argument("--cuda", choices=["auto", "yes", "no"], default="auto")
    args = parser.parse_args(argv)
    if args.command == "build":
        for path in build({"auto": None, "yes": True, "no": False}[args.cuda]):
            print(path)
    for name in _LIBRARIES:
        print(name, *status(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
