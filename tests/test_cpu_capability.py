"""The CPU kernels' capability dispatch (csrc/cpu/dispatch.cpp): the choice at load and its
override, their errors, the parity tests under every capability this CPU runs, and the
library's code outside the capability namespaces being baseline x86-64 code (no copy of a
shared inline function built for AVX2 / AVX-512 kept for baseline callers)."""

import functools
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import cli, extension
from background import Job

ROOT = Path(__file__).resolve().parents[1]
ENV = "FUSED_MBCONV_CPU_CAPABILITY"
NAMES = ["default", "avx2", "avx512"]

CPU_OK, CPU_REASON = fm.backends.backend_status("cpu")
SUPPORTED = extension.cpu_capabilities()
pytestmark = pytest.mark.skipif(not SUPPORTED,
                                reason=f"no CPU library with capability dispatch: {CPU_REASON}")

# What each child runs under its capability: the block's float32 parity cases and the
# depthwise op's parity grid (float64 / float32 / bfloat16 / float16) on the "cpu" backend.
SELECTION = ["tests/test_fused_mbconv.py", "tests/test_dwconv_bn_silu.py", "-k",
             "cpu and ((test_block_matches_eager and float32 and not efficientnet_b0) or "
             "(test_dwconv_bn_silu and test_matches_eager))"]


def _env(value=None):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if value is not None:
        env[ENV] = value
    return env


def _python(code, value=None):
    return subprocess.run([sys.executable, "-c", code], env=_env(value), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_best_supported_capability_is_chosen_by_default():
    assert SUPPORTED[0] == "default" and set(SUPPORTED) <= set(NAMES)
    assert SUPPORTED == [n for n in NAMES if n in SUPPORTED]  # baseline first, best last
    run = _python("from fused_mbconv import extension; print(extension.cpu_capability())")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [SUPPORTED[-1]]


def test_status_and_info_name_the_capability(capsys):
    chosen = extension.cpu_capability()
    assert chosen in SUPPORTED
    assert f"CPU capability {chosen}" in CPU_REASON
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = [line for line in out if line.startswith("cpu ")]
    assert len(row) == 1 and f"CPU capability {chosen}" in row[0], row
    assert f"CPU capability: {chosen} (this CPU runs {', '.join(SUPPORTED)};" in out[3], out


def test_the_override_is_read_when_the_library_loads():
    for name in SUPPORTED:
        run = _python("from fused_mbconv import extension; print(extension.cpu_capability())",
                      f" {name} ")
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == [name]


@pytest.mark.parametrize("value", ["sse9", "AVX2", "avx512bw"])
def test_an_unknown_value_makes_the_backend_unusable_with_the_reason(value):
    code = ("import fused_mbconv as fm\n"
            "from fused_mbconv import cli, extension\n"
            "print(fm.backends.backend_status('cpu'), fm.available_backends('cpu'))\n"
            "print(extension.cpu_capability())\n"
            "cli.main(['info'])\n")
    run = _python(code, value)
    assert run.returncode == 0, run.stderr  # the import and `info` work
    status, capability, *info = run.stdout.splitlines()
    message = f"{ENV}='{value}' is not a CPU capability: use default, avx2, avx512"
    assert status.startswith("(False, ") and message in status, status
    assert capability == "None"
    row = [line for line in info if line.startswith("cpu ")]
    assert len(row) == 1 and message in row[0], info


def test_the_rule():
    choose = torch.ops.fused_mbconv_ext.choose_cpu_capability
    assert choose("", ["default", "avx2"]) == "avx2"
    assert choose(" ", ["default"]) == "default"
    assert choose("default", ["default", "avx2", "avx512"]) == "default"
    assert choose("avx2\n", ["default", "avx2", "avx512"]) == "avx2"
    with pytest.raises(RuntimeError, match=rf"{ENV}=avx512, but this machine supports only "
                                           r"default, avx2 \(.*illegal instruction"):
        choose("avx512", ["default", "avx2"])
    with pytest.raises(RuntimeError, match=rf"{ENV}=avx2, but this machine supports only "
                                           r"default "):
        choose("avx2", ["default"])  # aarch64: only default is built
    with pytest.raises(ValueError, match=rf"{ENV}='x86-64-v3' is not a CPU capability"):
        choose("x86-64-v3", ["default", "avx2", "avx512"])


# ---- parity under every capability this CPU runs ---------------------------------------------

@functools.lru_cache(maxsize=None)
def _collected(selection):
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                          "no:cacheprovider", *selection], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    found = re.search(r"^(\d+)(?:/\d+)? tests? collected", run.stdout, re.M)
    assert found, run.stdout[-2000:] + run.stderr[-2000:]
    return int(found.group(1))


def capability_suite_job(capability):
    return Job([sys.executable, str(ROOT / "tests" / "cpu_capability_suite.py"), *SELECTION],
               _env(capability), cwd=str(ROOT), timeout_s=900)


@pytest.mark.parametrize("capability", SUPPORTED)
@pytest.mark.background.with_args(capability_suite_job)
def test_parity_under_each_supported_capability(capability, background_result):
    expected = _collected(tuple(SELECTION))
    assert expected >= 80
    run = background_result()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["capability"] == capability and report["usable"], report
    assert f"CPU capability {capability}" in report["reason"]
    assert report["exit"] == 0 and report["failed"] == report["skipped"] == 0, \
        run.stdout[-3000:]
    assert report["passed"] == expected, report


# ---- the library's code outside the capability namespaces is baseline -----------------------

# Instructions baseline x86-64 lacks: every VEX / EVEX one is spelled v... in AT&T syntax
# (SSE's are not), and AVX-512's registers.
BEYOND_BASELINE = re.compile(r"^v|%[yz]mm|%k[0-7]\b")
BEYOND_AVX2 = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$")


def _capability_of(function):
    for name in ("AVX512", "AVX2"):
        if f"fused_mbconv::cpu::{name}::" in function:
            return name
    return "baseline"


def _offending_functions(library):
    """{capability: {function: first instruction it should not have}} and how many functions
    of each capability use ymm / zmm registers at all."""
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library],
                          capture_output=True, text=True, timeout=300, check=True).stdout
    offending = defaultdict(dict)
    wide = defaultdict(set)
    function = capability = None
    for line in dump.splitlines():
        head = FUNCTION.match(line)
        if head:
            function = head.group(1)
            capability = _capability_of(function)
            continue
        insn = INSTRUCTION.match(line)
        if not insn or function is None:
            continue
        text = f"{insn.group(1)} {insn.group(2)}"
        if "%ymm" in text or "%zmm" in text:
            wide[capability, "zmm" if "%zmm" in text else "ymm"].add(function)
        rule = {"baseline": BEYOND_BASELINE, "AVX2": BEYOND_AVX2}.get(capability)
        if rule and rule.search(text) and function not in offending[capability]:
            offending[capability][function] = text
    return offending, wide


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                    reason="x86-64 instruction sets")
def test_only_capability_namespaces_hold_avx_code():
    library = CPU_REASON.split("compiled extension ", 1)[1].split(" (CPU capability")[0]
    offending, wide = _offending_functions(library)
    assert not offending["baseline"], list(offending["baseline"].items())[:20]
    assert not offending["AVX2"], list(offending["AVX2"].items())[:20]
    # the target pragmas took effect: the AVX2 kernels use 256-bit vectors, AVX-512's 512-bit
    assert len(wide["AVX2", "ymm"]) >= 10 and len(wide["AVX512", "zmm"]) >= 10, \
        {k: len(v) for k, v in wide.items()}
    # and so did each capability's vector width: the register-blocked GEMM's vector types
    # (rows.h's Simd) are the capability's widest, not SSE's 16 bytes
    for capability, register in (("AVX2", "ymm"), ("AVX512", "zmm")):
        assert any(f"{capability}::gemm_tn" in f for f in wide[capability, register]), capability
