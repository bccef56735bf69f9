"""pytest plugin for benchmarks/gpu_check.sh: ``-p gpu_check_shard`` with
``GPU_CHECK_SHARD=k/n`` keeps every n-th collected test, from the k-th (0-based), so n pytest
processes with k = 0..n-1 run disjoint parts of one selection side by side (no pytest-xdist on
the GPU machine). Interleaved, not contiguous: each part gets a share of every grid."""

import os

import pytest


def _shard():
    value = os.environ.get("GPU_CHECK_SHARD", "0/1")
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise pytest.UsageError(f"GPU_CHECK_SHARD={value!r}: expected k/n, e.g. 0/4")
    if not 0 <= index < count:
        raise pytest.UsageError(f"GPU_CHECK_SHARD={value!r}: need 0 <= k < n")
    return index, count


def pytest_collection_modifyitems(config, items):
    index, count = _shard()
    if count == 1:
        return
    kept = [item for i, item in enumerate(items) if i % count == index]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items)
                                         if i % count != index])
    items[:] = kept
