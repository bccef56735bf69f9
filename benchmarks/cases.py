"""What the benchmarks run: sizes, providers and the three levels (op, block, network).

Providers are discovered, never assumed: "compile" when torch.compile works here, one
"fused-<backend>" per ``fm.available_backends(device)``, and fused blocks / networks only
once ``fm.FusedMBConv`` / ``fm.convert`` exist. ``FUSED_MBCONV_BENCH_PROVIDERS`` names them
instead (e.g. the GPU check's ``eager,fused-triton,fused-cuda``; or the interpreted triton
backend, which discovery leaves out on CPU).

Every level runs in ``FUSED_MBCONV_BENCH_DTYPE`` (modules and inputs; default float32) and,
with ``FUSED_MBCONV_BENCH_CHANNELS_LAST=1``, on channels_last modules and inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn as nn

import fused_mbconv as fm
from fused_mbconv import profiling, verification
from fused_mbconv.geometry import BlockConfig, b0_blocks

SIZE_ENV = "FUSED_MBCONV_BENCH_SIZE"      # tiny | cpu | cuda | gpu-check
DEVICE_ENV = "FUSED_MBCONV_BENCH_DEVICE"  # cpu | cuda
PROVIDERS_ENV = "FUSED_MBCONV_BENCH_PROVIDERS"  # comma-separated, e.g. eager,fused-cuda
DTYPE_ENV = "FUSED_MBCONV_BENCH_DTYPE"    # float32 | bfloat16 | float16 | float64
CHANNELS_LAST_ENV = "FUSED_MBCONV_BENCH_CHANNELS_LAST"  # 1: channels_last, 0 (default): NCHW
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def device() -> torch.device:
    return torch.device(os.environ.get(DEVICE_ENV) or
                        ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass(frozen=True)
class Size:
    name: str
    op_batch: int
    block_batch: int
    resolution: int       # network input; block shapes follow from it
    network_batch: int
    rounds: int
    warmup: int


SIZES = {
    "tiny": Size("tiny", 2, 2, 32, 2, 1, 1),
    "cpu": Size("cpu", 4, 4, 224, 4, 3, 1),
    "cuda": Size("cuda", 64, 64, 224, 256, 20, 5),
    # benchmarks/gpu_check.sh: blocks at batch 128 (the network step runs through the CLI)
    "gpu-check": Size("gpu-check", 128, 128, 224, 256, 20, 5),
}


def size() -> Size:
    name = os.environ.get(SIZE_ENV) or ("cuda" if device().type == "cuda" else "cpu")
    if name not in SIZES:
        raise ValueError(f"{SIZE_ENV}={name!r}: choose from {sorted(SIZES)}")
    return SIZES[name]


def dtype() -> torch.dtype:
    name = os.environ.get(DTYPE_ENV) or "float32"
    if name not in DTYPES:
        raise ValueError(f"{DTYPE_ENV}={name!r}: choose from {sorted(DTYPES)}")
    return DTYPES[name]


def memory_format() -> torch.memory_format:
    value = os.environ.get(CHANNELS_LAST_ENV) or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{CHANNELS_LAST_ENV}={value!r}: choose 0 (NCHW) or 1 (channels_last)")
    return torch.channels_last if value == "1" else torch.contiguous_format


# ---------------------------------------------------------------- providers

def requested_providers() -> Optional[List[str]]:
    """The providers ``FUSED_MBCONV_BENCH_PROVIDERS`` names, in its order; None when unset."""
    value = os.environ.get(PROVIDERS_ENV)
    if not value:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    known = ["eager", "compile"] + [f"fused-{b}" for b in fm.backends.BACKENDS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{PROVIDERS_ENV}: unknown provider(s) {unknown}; choose from {known}")
    return names


def providers(level: str) -> List[str]:
    """Providers measurable at ``level`` now (or those ``FUSED_MBCONV_BENCH_PROVIDERS``
    names)."""
    requested = requested_providers()
    if requested is not None:
        return requested
    names = ["eager", "compile"]
    if size().name == "tiny" and level != "op":
        names.remove("compile")  # the smoke preset compiles once (op level): compiling is slow
    if level == "op":
        names += [f"fused-{b}" for b in fm.available_backends(device())]
    else:  # the op level keeps interpreted triton, for the launch accounting
        names += [f"fused-{b}" for b in verification.timed_block_backends(device())]
    return names


def backend_of(provider: str) -> Optional[str]:
    return provider[len("fused-"):] if provider.startswith("fused-") else None


# ---------------------------------------------------------------- op level

class DWConvBNSiLU(nn.Module):
    """Eager depthwise conv + BatchNorm + SiLU: the op-level baseline."""

    def __init__(self, channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride, kernel_size // 2,
                              groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class FusedDWConvBNSiLU(nn.Module):
    """The same parameters and BatchNorm state, through ``fm.functional.dwconv_bn_silu``."""

    def __init__(self, eager: DWConvBNSiLU):
        super().__init__()
        self.conv, self.bn = eager.conv, eager.bn

    def forward(self, x):
        bn = self.bn
        return fm.functional.dwconv_bn_silu(x, self.conv.weight, bn.running_mean,
                                            bn.running_var, bn.weight, bn.bias,
                                            self.conv.stride[0], self.training, bn.momentum,
                                            bn.eps)


def b0_block_shapes(resolution: int) -> List[BlockConfig]:
    """Distinct block configurations of efficientnet_b0 at ``resolution``
    (``geometry.b0_blocks``); the "tiny" smoke size keeps one without expansion and one with
    stride 2."""
    shapes = b0_blocks(resolution)
    if size().name == "tiny":
        shapes = [s for s in shapes if s.expand_ratio == 1][:1] + \
            [s for s in shapes if s.stride == 2][:1]
    return shapes


def op_shapes(resolution: int) -> List[BlockConfig]:
    """The depthwise stage of every distinct B0 block configuration with a distinct
    (channels, kernel, stride, resolution)."""
    seen = {}
    for s in b0_block_shapes(resolution):
        seen.setdefault(s.depthwise_id, s)
    return list(seen.values())[:1] if size().name == "tiny" else list(seen.values())


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` from seed 0, in the benchmark's device, dtype and memory format."""
    torch.manual_seed(0)
    return build().to(device(), dtype(), memory_format=memory_format())


def _input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=device(), dtype=dtype()).contiguous(
        memory_format=memory_format())


def _wrap(provider: str, eager: nn.Module, fuse: Callable[[nn.Module], nn.Module]) -> nn.Module:
    if provider == "eager":
        return eager
    if provider == "compile":
        return torch.compile(eager)
    return fuse(eager)


def cached(build):
    """One workload per (shape, provider, batch), shared by the three modes, so a provider
    that compiles compiles once per shape rather than once per mode."""
    workloads = {}

    def get(shape, provider, batch):
        key = (shape, provider, batch)
        if key not in workloads:
            workloads.clear()  # parametrization runs one shape/provider's modes together
            workloads[key] = build(shape, provider, batch)
        return workloads[key]
    get.__doc__ = build.__doc__
    return get


@cached
def op_workload(shape: BlockConfig, provider: str, batch: int) -> profiling.Workload:
    eager = _seeded(lambda: DWConvBNSiLU(shape.hidden_channels, shape.kernel_size,
                                         shape.stride)).train()
    # The depthwise conv sees the expanded map at the block's input resolution.
    x = _input(batch, shape.hidden_channels, shape.side, shape.side)
    module = _wrap(provider, eager, FusedDWConvBNSiLU)
    return profiling.Workload.build(module, x, shape_from=eager)


@cached
def block_workload(shape: BlockConfig, provider: str, batch: int) -> profiling.Workload:
    eager = _seeded(lambda: fm.MBConv(shape.in_channels, shape.out_channels, shape.kernel_size,
                                      shape.stride, shape.expand_ratio)).train()
    x = _input(batch, shape.in_channels, shape.side, shape.side)
    module = _wrap(provider, eager, lambda m: fm.FusedMBConv.from_module(m))
    return profiling.Workload.build(module, x, shape_from=eager)


def network_step(provider: str, batch: int, resolution: int) -> profiling.TrainStep:
    eager = _seeded(fm.efficientnet_b0).train()
    module = _wrap(provider, eager, verification.convert)
    return profiling.TrainStep.build(module, batch, resolution, num_classes=1000,
                                     dtype=dtype(), memory_format=memory_format())
