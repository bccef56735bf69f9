"""Build csrc/cuda/ for the CPU (the CUDA emulation) and run the "cpu" backend's parity tests
on it; tests/test_cuda_emulation.py runs this in the background and reads its reports.

    python tests/emulated_cuda_suite.py OUT_DIR [--no-sanitize]

Writes OUT_DIR/emulated.so, OUT_DIR/kernel.xml and OUT_DIR/op.xml (JUnit); exits non-zero on
the first step that fails.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # run as a script: the checkout's package. Imported by a test, it
    # must not put the repository root first on sys.path: its kernels/ would then shadow the
    # `kernels` package transformers imports.
    sys.path.insert(0, str(ROOT))

from fused_mbconv import _build  # noqa: E402

# Kernel by kernel: the "cpu" cases of the kernel-interface suite (now the CUDA kernels) and
# the extension's entry-point checks and launch accounting. Of the suite, every float64 case
# (each function, mask, activation and shape) but the chunked shapes' single-gradient masks, and
# for each op the low-precision cases the emulation ran before the suite existed (each dtype's
# loads and stores; dwconv_bn_silu in NCHW, the block in both layouts): the suite's other
# low-precision cases repeat the same index math for minutes more under AddressSanitizer.
KERNEL_TESTS = ["tests/test_kernel_interface.py"] + [
    f"tests/test_extension.py::{name}" for name in (
        "test_forward_entry_point_rejects",
        "test_backward_entry_point_rejects",
        "test_block_launches_are_accounted",
        "test_block_entry_points_reject",
    )] + ["-k", " and not ".join((
        "cpu", "(chunked and (dgrad or wgrad))",
        "(test_dwconv_matches_reference and not float64 and not (k3-s2 and train and nchw"
        " and not no-affine))",
        "(low_precision and not (k5-s2-odd and train and bn2-affine))")) + " or test_extension"]
# Through the ops: every block (at every recompute level), dwconv_bn_silu and stem/head case of
# the "cpu" backend (now the CUDA kernels; the pooled head runs the block's K1, K3 and B1), but
# the whole-network training step and torch.compile: minutes emulated, and no kernel or variant
# that the block cases leave out.
OP_TESTS = ["tests/test_fused_mbconv.py", "tests/test_recompute.py",
            "tests/test_dwconv_bn_silu.py", "tests/test_stem_head.py",
            "tests/test_launch_geometry.py", "-k", "cpu and not efficientnet_b0 and not compile"]

# The CUDA kernels, not the C++ CPU ones, are what the "cpu" backend runs.
CHECK_LOADED = """
import torch, fused_mbconv as fm
ok, why = fm.backends.backend_status("cpu")
assert ok and why.endswith("emulated.so"), why
for op in ("mbconv_dwconv_forward", "dwconv_bn_silu_backward"):
    where = torch._C._dispatch_dump(f"fused_mbconv_ext::{op}").split("CPU: registered at")[1]
    assert "csrc/cuda/" in where, where
print("the cpu backend runs", why)
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-sanitize", action="store_true")
    args = parser.parse_args()
    preload = None if args.no_sanitize else _build.asan_preload()
    args.out.mkdir(parents=True, exist_ok=True)
    library = args.out / "emulated.so"
    # One thread: the emulation is single-threaded anyway, and ATen's OpenMP threads would
    # spin against the parent test run on the other core (10x slower on 2 cores).
    env = dict(os.environ, FUSED_MBCONV_LIBRARY=str(library), ASAN_OPTIONS="detect_leaks=0",
               OMP_NUM_THREADS="1")
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    print("AddressSanitizer:", "on" if preload else "off", flush=True)
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    for command, step_env in [
        (_build.emulation_command(str(library), sanitize=preload is not None), os.environ),
        ([sys.executable, "-c", CHECK_LOADED], env),
    ]:
        code = subprocess.run(command, cwd=ROOT, env=step_env).returncode
        if code:
            return code
    # The two suites side by side: each is single-threaded, and this job is the tail of a CI
    # run, when the main test run has left both cores to it.
    suites = [subprocess.Popen(pytest + [f"--junitxml={args.out / report}"] + tests, cwd=ROOT,
                               env=env)
              for report, tests in (("kernel.xml", KERNEL_TESTS), ("op.xml", OP_TESTS))]
    codes = [suite.wait() for suite in suites]
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
