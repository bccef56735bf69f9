"""The CUDA kernels of csrc/cuda/, run on the CPU.

csrc/cuda/*.cu compile as C++ with -DFM_CUDA_EMULATION (csrc/include/fused_mbconv/cuda/
emulation.h runs each block's threads as fibers) into a library that registers them for CPU
tensors in place of the C++ CPU kernels. tests/emulated_cuda_suite.py loads it in child pytest
runs (FUSED_MBCONV_LIBRARY) of the "cpu" backend's parity tests, kernel by kernel and through
the ops: every CUDA kernel is checked against the reference on a machine without a GPU, and
under AddressSanitizer every one of its memory accesses too. What emulation cannot show
(device-side expf and division, the memory model, speed) waits for a GPU: the "cuda-cuda" cases
of test_kernel_interface.py run wherever one is present.
"""

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from background import Job
from emulated_cuda_suite import KERNEL_TESTS, OP_TESTS

HERE = Path(__file__).resolve().parent
CXX = shutil.which(os.environ.get("CXX", "g++"))


def emulation_job():
    if CXX is None:
        return None
    return Job(["bash", "-c", f'"{sys.executable}" "{HERE / "emulated_cuda_suite.py"}" "$OUT"'],
               scratch_env={"OUT": "."}, cwd=str(HERE.parent), timeout_s=2400)


def _collected(tests) -> int:
    """How many tests a suite selects: the emulated run must have run exactly these."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                             "no:cacheprovider"] + tests, cwd=HERE.parent, capture_output=True,
                            text=True)
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    return int(match.group(1))


def _junit(path: Path):
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed = [c.get("name") for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    return len(cases), failed, skipped


@pytest.mark.skipif(CXX is None, reason="no C++ compiler: cannot build the CUDA emulation")
@pytest.mark.background.with_args(emulation_job)
def test_cuda_kernels_pass_the_cpu_parity_suites_under_emulation(background_result):
    result = background_result()
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"emulated CUDA kernels failed:\n{log[-8000:]}"
    assert "the cpu backend runs" in log and "emulated.so" in log, log[-3000:]
    for report, tests in (("kernel.xml", KERNEL_TESTS), ("op.xml", OP_TESTS)):
        ran, failed, skipped = _junit(result.scratch / report)
        assert not failed, f"{report}: {failed}"
        assert not skipped, f"{report}: skipped {skipped}"  # the emulated backend runs them all
        selected = _collected(tests)
        assert ran == selected, f"{report}: {ran} tests ran of the {selected} it selects"
        print(f"{report}: {ran} tests passed on the emulated CUDA kernels")
    print(log.splitlines()[0])  # AddressSanitizer: on / off
