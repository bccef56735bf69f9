"""benchmarks/gpu_check.sh, the one-command GPU check: its dry run (every stage on the CPU at
tiny sizes, Triton interpreted, the CUDA kernels emulated) runs in CI in the background, so the
GPU command cannot rot; the checks below read what it wrote."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from background import Job

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("env", "build", "parity", "blocks", "bandwidth", "network", "compile")
sys.path.insert(0, str(ROOT / "benchmarks"))

import cases  # noqa: E402


def dry_run_job():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return None
    return Job(["bash", "-c", f'bash "{SCRIPT}" --dry-run "$OUT/check"'],
               env=dict(os.environ, PYTHON=sys.executable), scratch_env={"OUT": "."},
               cwd=str(ROOT), timeout_s=3600)


def _section(summary: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", summary, re.M | re.S)
    assert match, f"no section {title!r} in\n{summary}"
    return match.group(1)


def _table_rows(section: str):
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ")]
    return rows[0], rows[1:]  # header, body (the |---| line does not start with "| ")


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="no C++ compiler: the dry run's build compiles the CUDA emulation")
@pytest.mark.background.with_args(dry_run_job)
def test_dry_run_writes_every_stage_and_table(background_result):
    run = background_result()
    log = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    out = run.scratch / "check"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "summary.md" in files, files
    (results,) = [name for name in files if name.endswith("-gpu-check.json")]
    slug = results[:-len(".json")]
    assert re.fullmatch(r"dry-run-\d+-core-cpu-\d{4}-\d\d-\d\d-gpu-check", slug), slug
    assert {f"{slug}.md", f"{slug}.png", f"{slug}.log"} <= set(files)
    summary = (out / "summary.md").read_text()
    assert summary in run.stdout  # and it was printed

    header, stages = _table_rows(_section(summary, "Stages"))
    assert header == ["stage", "status", "seconds", "time box s"]
    assert [(row[0], row[1]) for row in stages] == \
        [(name, "skipped (dry run)" if name == "compile" else "ok") for name in STAGES]

    header, suites = _table_rows(_section(summary, "Parity"))
    assert header == ["suite", "passed", "failed", "errors", "skipped"]
    assert len(suites) == 2 and all(int(row[1]) > 0 and row[2:4] == ["0", "0"]
                                    for row in suites), suites
    collected = re.search(r"The GPU selection collects (\d+) tests", summary)
    assert collected and int(collected.group(1)) > 0, summary

    header, blocks = _table_rows(_section(summary, "Benchmarks: EfficientNet-B0 blocks"))
    assert header[:4] == ["block", "provider", "ms", "img/s"]
    assert {row[1] for row in blocks} == {"eager", "fused-triton", "fused-cpu"}
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in blocks)
    assert "float16, channels_last" in summary.split("## Benchmarks: EfficientNet-B0")[1][:200]

    header, network = _table_rows(_section(summary, "Benchmarks: training step"))
    assert [row[0] for row in network] == ["eager", "fused-cpu"]
    assert all(float(row[1]) > 0 for row in network)
    assert "AMP float16, channels_last" in _section(summary, "Benchmarks: training step")

    section = _section(summary, "Bandwidth")
    assert re.search(r"Copy bandwidth \d+\.\d GB/s", section)
    header, kernels = _table_rows(section)
    assert "% of copy" in header
    assert {row[1] for row in kernels} == {"triton", "cpu"}
    assert {row[2] for row in kernels} == {
        "mbconv_dwconv_forward", "mbconv_squeeze_forward", "mbconv_excite_forward",
        "mbconv_output_forward", "mbconv_output_backward_stats", "mbconv_excite_backward",
        "mbconv_dwconv_backward_stats", "mbconv_dwconv_backward", "dwconv_bn_silu_forward",
        "dwconv_bn_silu_backward"}  # every memory-bound launcher, no GEMM
    assert all(row[8].endswith("%") and float(row[8][:-1]) > 0 for row in kernels)

    data = json.loads((out / results).read_text())
    parity = data["gpu_check"]["parity"]
    assert [str(parity[k]["passed"]) for k in ("gpu", "interpreter")] == \
        [row[1] for row in suites]
    assert data["records"] and data["meta"]["dtype"] == "float16"
    assert "| case | mode | eager ms |" in (out / f"{slug}.md").read_text()


def _check(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, PYTHON=sys.executable,
                                                          **(env or {})))


def test_without_a_gpu_it_refuses_at_once(tmp_path):
    run = _check(str(tmp_path / "out"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 1
    assert "no CUDA device here" in run.stderr and "--dry-run" in run.stderr
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(tmp_path):
    assert _check().returncode == 2
    (tmp_path / "stale.txt").write_text("from an earlier run")
    run = _check("--dry-run", str(tmp_path))
    assert run.returncode == 2 and "is not empty" in run.stderr


# ---- the benchmark suite's switches the check uses (benchmarks/cases.py) ---------------------

def test_bench_switches_set_providers_dtype_and_layout(monkeypatch):
    monkeypatch.setenv(cases.PROVIDERS_ENV, "eager, fused-torch,compile")
    monkeypatch.setenv(cases.DTYPE_ENV, "bfloat16")
    monkeypatch.setenv(cases.CHANNELS_LAST_ENV, "1")
    monkeypatch.setenv(cases.SIZE_ENV, "tiny")
    monkeypatch.setenv(cases.DEVICE_ENV, "cpu")
    assert cases.providers("block") == ["eager", "fused-torch", "compile"]
    shape = cases.b0_block_shapes(cases.size().resolution)[0]
    work = cases.block_workload(shape, "eager", 2)
    assert work.inputs.dtype == torch.bfloat16
    assert work.inputs.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.bfloat16 for p in work.module.parameters())
    assert work.grad_output.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("env, value, message", [
    (cases.PROVIDERS_ENV, "eager,fused-rocm", "unknown provider(s) ['fused-rocm']"),
    (cases.DTYPE_ENV, "int8", "FUSED_MBCONV_BENCH_DTYPE='int8'"),
    (cases.CHANNELS_LAST_ENV, "yes", "FUSED_MBCONV_BENCH_CHANNELS_LAST='yes'"),
])
def test_bad_bench_switches_name_the_value(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError) as exc:
        cases.providers("block"), cases.dtype(), cases.memory_format()
    assert message in str(exc.value)
