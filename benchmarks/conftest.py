"""Benchmark session: collects one record per measurement, writes one results JSON per run
(plus its Markdown table and PNG plot, via report.py) when the session ends.

Environment: FUSED_MBCONV_BENCH_SIZE (tiny | cpu | cuda), FUSED_MBCONV_BENCH_DEVICE,
FUSED_MBCONV_BENCH_LABEL (machine description kept with the results),
FUSED_MBCONV_BENCH_RESULTS (results JSON path; default benchmarks/results/<label>-<date>.json);
what runs: FUSED_MBCONV_BENCH_PROVIDERS, FUSED_MBCONV_BENCH_DTYPE,
FUSED_MBCONV_BENCH_CHANNELS_LAST (cases.py).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases  # noqa: E402
import report  # noqa: E402

import fused_mbconv as fm  # noqa: E402
from fused_mbconv import profiling  # noqa: E402

_records = []

# CPU threads: 1 unless FUSED_MBCONV_BENCH_THREADS says otherwise. On a shared machine,
# OpenMP threads competing with other processes make timings swing by an order of magnitude;
# one thread gives repeatable ratios. Recorded in the results.
if cases.device().type == "cpu":
    torch.set_num_threads(int(os.environ.get("FUSED_MBCONV_BENCH_THREADS", "1")))


@pytest.fixture(scope="session")
def records():
    return _records


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_label(device: torch.device) -> str:
    if os.environ.get("FUSED_MBCONV_BENCH_LABEL"):
        return os.environ["FUSED_MBCONV_BENCH_LABEL"]
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    gpu = "GPU present, not used" if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU, {gpu}"


def metadata() -> dict:
    device = cases.device()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "label": machine_label(device),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "size": cases.size().__dict__,
        "dtype": str(cases.dtype()).replace("torch.", ""),
        "channels_last": cases.memory_format() == torch.channels_last,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fused_mbconv": fm.__version__,
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backends": fm.available_backends(device),
        "compile": profiling.compile_status()[1],
        "modeled_bandwidth_bytes_per_s": fm.accounting.H100_HBM_BYTES_PER_S,
    }


def pytest_sessionfinish(session, exitstatus):
    # Nothing timed (e.g. --benchmark-disable): no file, which could replace a real result.
    if not any(r.get("time_s") is not None for r in _records):
        return
    meta = metadata()
    path = os.environ.get("FUSED_MBCONV_BENCH_RESULTS")
    if not path:
        slug = re.sub(r"[^a-z0-9]+", "-", meta["label"].lower()).strip("-")
        path = HERE / "results" / f"{slug}-{meta['date'][:10]}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "records": _records}, indent=1) + "\n")
    markdown, plot = report.write_report(path)
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(
        f"benchmark results: {path}\n  table: {markdown}\n  plot: {plot}")
