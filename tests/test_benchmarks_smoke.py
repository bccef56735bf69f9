"""The benchmark suite runs end to end at tiny sizes (one round each) and its report script
turns the results into a table and a plot."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fused_mbconv as fm
from background import Job

ROOT = Path(__file__).resolve().parents[1]


def benchmark_suite_job():
    env = dict(os.environ, FUSED_MBCONV_BENCH_SIZE="tiny", FUSED_MBCONV_BENCH_DEVICE="cpu",
               FUSED_MBCONV_BENCH_LABEL="smoke")
    return Job([sys.executable, "-m", "pytest", "benchmarks", "-q", "-x", "-p",
                "no:cacheprovider", "--benchmark-min-rounds=1"], env,
               scratch_env={"FUSED_MBCONV_BENCH_RESULTS": "run.json"}, cwd=str(ROOT),
               timeout_s=600)


@pytest.mark.background.with_args(benchmark_suite_job)
def test_benchmark_suite_and_report(background_result):
    run = background_result()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = run.scratch / "run.json"
    data = json.loads(results.read_text())
    assert data["meta"]["label"] == "smoke" and data["meta"]["commit"]
    records = data["records"]
    for level in ("op", "block", "network"):
        eager = [r for r in records if r["level"] == level and r["provider"] == "eager"]
        assert eager, level
        assert all(r["time_s"] > 0 and r["launches"] > 0 and r["bytes_read"] > 0 for r in eager)
    assert all(r["saved_bytes"] > 0 for r in records if r["mode"] in ("forward", "step"))
    table = results.with_suffix(".md").read_text()
    assert "| case | mode | eager ms |" in table
    assert results.with_suffix(".png").stat().st_size > 0

    results.with_suffix(".md").unlink()
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"),
                             str(results)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert results.with_suffix(".md").read_text() == table


def test_a_session_that_timed_nothing_writes_no_results(tmp_path):
    results = tmp_path / "run.json"
    env = dict(os.environ, FUSED_MBCONV_BENCH_SIZE="tiny", FUSED_MBCONV_BENCH_DEVICE="cpu",
               FUSED_MBCONV_BENCH_RESULTS=str(results))
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p",
                          "no:cacheprovider", "--benchmark-disable",
                          "-k", "dwconv_bn_silu and eager"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout
    assert not results.exists()


CPU_OK, CPU_REASON = fm.backends.backend_status("cpu", "cpu")


@pytest.mark.skipif(not CPU_OK, reason=f"cpu extension unavailable: {CPU_REASON}")
def test_cpu_kernel_benchmarks_run(tmp_path):
    """The scripts behind the committed CPU results, at one small case each."""
    ops = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mbconv_dwconv_ops_cpu.py"),
                          "--shape", "2", "12", "7", "5", "2", "--reps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert ops.returncode == 0, ops.stderr[-3000:]
    timings = [line for line in ops.stdout.splitlines() if line.endswith(" ms")]
    assert len(timings) == 5 and all(float(t.split()[-2]) > 0 for t in timings), ops.stdout

    out = tmp_path / "block.csv"
    block = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mbconv_block_cpu.py"),
                            "--batch", "1", "--reps", "1", "--no-compile", "--layout", "nchw",
                            "--shapes", "stage3.1 40->40 k5 s1 28x28", "--csv", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert block.returncode == 0, block.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["eager", "fused[torch]", "fused[cpu]"]
    assert all(float(r["median_ms"]) > 0 and float(r["speedup_vs_eager"]) > 0 for r in rows)
