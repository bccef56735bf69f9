"""The "cpu" and "cuda" backends: the kernel interface implemented by the compiled csrc/
extension (ops ``torch.ops.fused_mbconv_ext.*``, CPU and CUDA kernels registered per dispatch
key).

Where the compiled code comes from, in order:
1. ``fused_mbconv._C`` / ``fused_mbconv._C_cuda``, built by setup.py (``pip install
   --no-build-isolation [-e] .``);
2. a JIT build from a source checkout, made only when asked: ``fused_mbconv.extension.build()``
   or ``python -m fused_mbconv.extension build`` compiles csrc/ with ninja into
   ``$FUSED_MBCONV_BUILD_DIR`` (default ``~/.cache/fused_mbconv/<torch version>``); later
   processes load that library if no setup.py build is present.

Loading happens on the first ``status()`` call (a dlopen, never a compile: a build takes about
a minute and a half for the CPU kernels, several for CUDA, so it never happens implicitly in
``import fused_mbconv`` or ``available_backends()``). A missing or broken build makes the
backend unavailable with the reason, never an import error.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .accounting import note_launch, recording
from .tensors import accumulate_dtype

Tensor = torch.Tensor

_LIBRARIES = {"cpu": "_C", "cuda": "_C_cuda"}  # the CUDA library registers kernels only
_lock = threading.Lock()
_loaded: Dict[str, Tuple[bool, str]] = {}


def build_dir() -> Path:
    default = Path.home() / ".cache" / "fused_mbconv" / torch.__version__.replace("+", "-")
    return Path(os.environ.get("FUSED_MBCONV_BUILD_DIR", default))


def _built_library(module: str) -> Optional[str]:
    """The setup.py build of fused_mbconv.<module>, else a JIT build in build_dir()."""
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
    _loaded[kind] = result
    return result


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


def dwconv_bn_silu_forward(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor],
                           bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], stride: int, training: bool,
                           eps: float, need_conv_out: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    out, conv_out, mean, var = torch.ops.fused_mbconv_ext.dwconv_bn_silu_forward(
        x, weight, bn_weight, bn_bias, running_mean, running_var, stride, training, eps,
        need_conv_out)
    if recording():
        params = _nbytes(weight, bn_weight, bn_bias)
        backend = _backend(x)
        if training:
            # conv + per-tile statistics (writes d), merge, then BN + SiLU from d.
            note_launch("dwconv_stats", backend, _nbytes(x) + params, _nbytes(out))
            note_launch("bn_silu_apply", backend, _nbytes(out, mean, var),
                        _nbytes(out, conv_out if need_conv_out else None))
        else:
            note_launch("dwconv_bn_silu", backend, _nbytes(x, running_mean, running_var) + params,
                        _nbytes(out, conv_out if need_conv_out else None))
    return out, conv_out, mean, var


def dwconv_bn_silu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, conv_out: Tensor,
                            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            mean: Tensor, var: Tensor, stride: int, training: bool, eps: float,
                            output_mask: List[bool]
                            ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                       Optional[Tensor]]:
    grads = torch.ops.fused_mbconv_ext.dwconv_bn_silu_backward(
        grad_out, x, weight, conv_out, bn_weight, bn_bias, mean, var, stride, training, eps,
        list(output_mask))
    if recording():
        backend = _backend(x)
        stats = _nbytes(mean, var, bn_weight, bn_bias)
        note_launch("bn_silu_grad_reduce", backend, _nbytes(grad_out, conv_out) + stats,
                    2 * x.shape[1] * torch.finfo(accumulate_dtype(x.dtype)).bits // 8)
        if output_mask[0] or output_mask[1]:
            note_launch("dwconv_grad", backend,
                        _nbytes(grad_out, conv_out, weight) + stats
                        + (_nbytes(x) if output_mask[1] else 0),
                        _nbytes(grads[0] if output_mask[0] else None,
                                grads[1] if output_mask[1] else None))
    return tuple(g if m else None for g, m in zip(grads, output_mask))


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
