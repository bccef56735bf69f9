"""Providers x modes x levels: dwconv+BN+SiLU op, every distinct EfficientNet-B0 block, and a
whole efficientnet_b0 training step. Timing by pytest-benchmark (warm-up rounds excluded,
device synchronized after each call); saved bytes, launches, traffic and peak memory by
``fused_mbconv.profiling`` in the same run."""

from __future__ import annotations

import pytest

import cases
import fused_mbconv as fm
from fused_mbconv import profiling

SIZE = cases.size()
DEVICE = cases.device()
OP_SHAPES = cases.op_shapes(SIZE.resolution)
BLOCK_SHAPES = cases.b0_block_shapes(SIZE.resolution)


def _skip_unavailable(provider: str) -> None:
    if provider == "compile":
        usable, reason = profiling.compile_status()
        if not usable:
            pytest.skip(reason)


def _synchronized(fn):
    def call(*args):
        out = fn(*args)
        profiling.synchronize(DEVICE)
        return out
    return call


def _time(benchmark, fn, setup):
    def pedantic_setup():
        args = tuple(setup()) if setup is not None else ()
        profiling.synchronize(DEVICE)
        return args, {}

    benchmark.pedantic(_synchronized(fn), setup=pedantic_setup, rounds=SIZE.rounds,
                       warmup_rounds=SIZE.warmup, iterations=1)
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    return (stats.median, stats.min, len(stats.data)) if stats is not None else (None, None, 0)


def _measure(benchmark, records, level, case, provider, mode, batch, fn, setup, forward,
             exclusions):
    benchmark.group = f"{level} {case} {mode}"
    median, best, rounds = _time(benchmark, fn, setup)
    record = dict(level=level, case=case, provider=provider, backend=cases.backend_of(provider),
                  mode=mode, batch=batch, device=str(DEVICE), time_s=median, time_min_s=best,
                  rounds=rounds, notes=[])
    if mode in ("forward", "step"):
        saved = profiling.saved_bytes(forward, exclusions)
        record.update(saved_bytes=saved.bytes, saved_tensors=saved.tensors)
    if provider == "compile":
        record["notes"].append("traffic not counted: Inductor kernels bypass the aten dispatcher")
    else:
        args = tuple(setup()) if setup is not None else ()
        traffic = profiling.count_traffic(lambda: fn(*args))
        record.update(launches=traffic.count, bytes_read=traffic.bytes_read,
                      bytes_written=traffic.bytes_written,
                      modeled_s=traffic.modeled_seconds)
    args = tuple(setup()) if setup is not None else ()
    record["peak_bytes"] = profiling.peak_memory(lambda: fn(*args), DEVICE)
    if median and level == "network":
        record["images_per_s"] = batch / median
    records.append(record)
    return record


def _modes():
    return pytest.mark.parametrize("mode", profiling.MODES)


@_modes()
@pytest.mark.parametrize("provider", cases.providers("op"))
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: s.depthwise_id)
def test_dwconv_bn_silu(benchmark, records, shape, provider, mode):
    _skip_unavailable(provider)
    backend = cases.backend_of(provider)
    with fm.use_backend(backend):
        work = cases.op_workload(shape, provider, SIZE.op_batch)
        fn, setup = work.step(mode)
        _measure(benchmark, records, "op", shape.depthwise_id, provider, mode, SIZE.op_batch, fn,
                 setup, work.forward, work.activation_exclusions())


@_modes()
@pytest.mark.parametrize("provider", cases.providers("block"))
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=lambda s: s.id)
def test_b0_block(benchmark, records, shape, provider, mode):
    _skip_unavailable(provider)
    with fm.use_backend(cases.backend_of(provider)):
        work = cases.block_workload(shape, provider, SIZE.block_batch)
        fn, setup = work.step(mode)
        _measure(benchmark, records, "block", shape.id, provider, mode, SIZE.block_batch, fn,
                 setup, work.forward, work.activation_exclusions())


@pytest.mark.parametrize("provider", cases.providers("network"))
def test_efficientnet_b0_train_step(benchmark, records, provider):
    _skip_unavailable(provider)
    with fm.use_backend(cases.backend_of(provider)):
        step = cases.network_step(provider, SIZE.network_batch, SIZE.resolution)
        _measure(benchmark, records, "network", f"efficientnet_b0_{SIZE.resolution}px",
                 provider, "step", SIZE.network_batch, step, None, step.loss,
                 step.activation_exclusions())
