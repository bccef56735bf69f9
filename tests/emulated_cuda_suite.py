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
sys.path.insert(0, str(ROOT))

from fused_mbconv import _build  # noqa: E402

KERNEL_TESTS = [f"tests/test_extension.py::{name}" for name in (
    "test_kernel_interface_matches_reference",
    "test_low_precision_outputs_are_finite_and_close",
    "test_statistics_have_no_cancellation",
    "test_forward_entry_point_rejects",
    "test_backward_entry_point_rejects",
    "test_block_functions_match_reference_float64",
    "test_block_functions_low_precision_by_the_tolerance_rule",
    "test_block_launches_are_accounted",
    "test_block_entry_points_reject",
)] + [  # more than 32 channels (several channel tiles), several chunks per image
    f"tests/test_extension.py::test_block_functions_match_reference_on_chunked_shapes[{shape}-both]"
    for shape in ("k3-s1-banded-nhwc", "k3-s1-banded-nchw", "k5-s2-banded-nhwc",
                  "k5-s2-banded-nchw")]
# Through the ops: every block (at every recompute level) and dwconv_bn_silu case of the "cpu"
# backend (now the CUDA kernels), but the whole-network training step and torch.compile:
# minutes emulated, and no kernel or variant that the block cases leave out.
OP_TESTS = ["tests/test_fused_mbconv.py", "tests/test_recompute.py",
            "tests/test_dwconv_bn_silu.py", "-k", "cpu and not efficientnet_b0 and not compile"]

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
