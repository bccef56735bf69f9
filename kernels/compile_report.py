"""Compile every registered Triton kernel specialization for real GPUs, without one.

``registry.specializations()`` lists (kernel, signature, constexprs, label, options) tuples
covering the variants the launchers produce for EfficientNet-B0, with the compile options
(num_warps, ...) the launchers pass. Each is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, whose PTX Triton
assembles with the ``ptxas -v`` it ships; that log gives registers and spills.

    python -m fused_mbconv.kernels.compile_report [--arch 80 90] [--dtype bf16 ...] [--jobs N]

Exits non-zero on any compile error or spill. Must run without TRITON_INTERPRET (interpreted
kernels are not compilable JIT functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import re
import sys

DTYPE_TOKENS = ("fp16", "bf16", "fp32")


def registry(dtypes=DTYPE_TOKENS):
    """The registry's specializations whose label's activation dtype is in dtypes (labels
    without one, e.g. fp32 statistics kernels, are always kept)."""
    from .registry import specializations
    return [spec for spec in specializations()
            if set(spec[3].split()) & set(dtypes) or not set(spec[3].split()) & set(DTYPE_TOKENS)]


def compile_one(index: int, arch: int, dtypes) -> dict:
    """Compile specialization ``index`` of ``registry(dtypes)`` for ``arch``; ptxas -v it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, label, options = registry(dtypes)[index]
    row = dict(label=label, arch=arch, regs=None, spill_stores=None, spill_loads=None,
               error=None)
    try:
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values())
                 if t.startswith("*")}
        # Triton assembles its PTX with `ptxas -v`; keep that log (printed when asked for)
        # instead of assembling a second time: the counts are those of the cubin it loads.
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                           target=GPUTarget("cuda", arch, 32), options=options)
        out = log.getvalue()
        row["regs"] = int(re.search(r"Used (\d+) registers", out).group(1))
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
        row["spill_stores"], row["spill_loads"] = int(spill.group(1)), int(spill.group(2))
    except Exception as exc:  # reported per row; the run fails at the end
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPE_TOKENS), choices=DTYPE_TOKENS)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_report: unset TRITON_INTERPRET (interpreted kernels cannot be "
              "compiled for a GPU)", file=sys.stderr)
        return 2
    work = [(i, arch) for i in range(len(registry(args.dtype))) for arch in args.arch]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_one, *zip(*work), [args.dtype] * len(work)))
    width = max(len(r["label"]) for r in rows)
    print(f"{'kernel specialization':<{width}}  arch    regs  spill st/ld  status")
    failed = 0
    for r in rows:
        bad = r["error"] or r["spill_stores"] or r["spill_loads"]
        failed += bool(bad)
        spills = "" if r["error"] else f"{r['spill_stores']}/{r['spill_loads']}"
        print(f"{r['label']:<{width}}  sm_{r['arch']}  {r['regs'] or '':>6}  {spills:>11}  "
              f"{r['error'] or ('SPILL' if bad else 'ok')}")
    print(f"{len(rows)} compiled ({len(rows) // len(args.arch)} specializations x "
          f"{len(args.arch)} targets), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
