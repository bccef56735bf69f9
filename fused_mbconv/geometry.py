"""Launch geometry of the fused MBConv blocks: for each distinct EfficientNet-B0 block, forward
and backward, every kernel launch's grid (programs) and bytes, at the batches asked for.

How it is recorded: the block runs through ``FusedMBConv`` on the chosen backend inside
``accounting.record_launches(dry_run=True)``: the launchers take the very path of a real call
(argument checks, layouts, allocations, tiling, grid computation, ``note_launch``) and skip
only the kernel call. At 224² and batch 128 that costs allocations, not kernel time, even under
the Triton interpreter; the inputs are uninitialized (``torch.empty``), since nothing reads
them. A smaller spatial size would not do: tiling depends on the map's size.

The compiled CUDA kernels report the grids their C++ launchers used (the launch record of
csrc/include/fused_mbconv/cuda/runtime.cuh), sized for an H100's 132 SMs
(``accounting.H100_SMS``) whatever the device, also under their CPU emulation; their library
calls (the cuDNN 1x1 convolutions, the cuBLAS SE weight gradients) still run and have no
grid of ours, nor do the C++ CPU kernels ("n/a"), which also cannot skip.

The kernels run on channels_last maps on the CPU (``ops.mbconv.kernel_input``), so the table is
recorded with channels_last inputs on every device: the same geometry everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from . import accounting
from .backends import use_backend
from .blocks import MBConv
from .fused_block import FusedMBConv

GEOMETRY_BATCHES = accounting.GEOMETRY_BATCHES
RESOLUTION = 224


@dataclass(frozen=True)
class BlockConfig:
    """One distinct EfficientNet-B0 block at its stage's input size."""

    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel_size: int
    stride: int
    side: int
    hidden_channels: int

    @property
    def id(self) -> str:
        return (f"{self.in_channels}-{self.out_channels}_e{self.expand_ratio}"
                f"_k{self.kernel_size}_s{self.stride}_{self.side}px")

    @property
    def depthwise_id(self) -> str:
        """The id of its depthwise stage alone (dwconv_bn_silu's benchmark cases)."""
        return f"c{self.hidden_channels}_k{self.kernel_size}_s{self.stride}_{self.side}px"


@dataclass(frozen=True)
class GeometryRow:
    block: str
    phase: str  # "forward" or "backward"
    batch: int
    launch: accounting.Launch

    @property
    def fills_gpu(self) -> bool:
        return accounting.fills_gpu(self.launch)


def b0_blocks(resolution: int = RESOLUTION) -> List[BlockConfig]:
    """Distinct block configurations of efficientnet_b0 with the input side each has at
    ``resolution``, read off a forward with hooks."""
    from .efficientnet import efficientnet_b0

    model = efficientnet_b0().eval()
    found: Dict[BlockConfig, None] = {}

    def hook(block, inputs, _output):
        found.setdefault(BlockConfig(block.in_channels, block.out_channels,
                                     int(block.expand_ratio), block.kernel_size, block.stride,
                                     inputs[0].shape[-1], block.hidden_channels))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MBConv)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, resolution, resolution))
    finally:
        for h in handles:
            h.remove()
    return list(found)


def block_launches(config: BlockConfig, batch: int, backend: str,
                   device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32, dry_run: bool = True):
    """(forward launches, backward launches) of one training forward + backward of a fused
    ``config`` block at ``batch``."""
    torch.manual_seed(0)
    block = MBConv(config.in_channels, config.out_channels, config.kernel_size, config.stride,
                   config.expand_ratio).train()
    fused = FusedMBConv.from_module(block).to(device, dtype, memory_format=torch.channels_last)
    shape = (batch, config.in_channels, config.side, config.side)
    make = torch.empty if dry_run else torch.randn
    x = make(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    record = dict(dry_run=dry_run, multiprocessors=accounting.H100_SMS)
    with use_backend(backend):
        with accounting.record_launches(**record) as forward:
            out = fused(x)
        grad = (torch.empty_like if dry_run else torch.randn_like)(out)
        with accounting.record_launches(**record) as backward:
            out.backward(grad)
    return list(forward), list(backward)


def launch_geometry(backend: str, batches: Sequence[int] = GEOMETRY_BATCHES,
                    blocks: Optional[Iterable[BlockConfig]] = None,
                    device: torch.device = torch.device("cpu"),
                    dtype: torch.dtype = torch.float32) -> List[GeometryRow]:
    """Every launch of every B0 block, forward and backward, at each of ``batches``."""
    rows = []
    for config in (b0_blocks() if blocks is None else blocks):
        for batch in batches:
            forward, backward = block_launches(config, batch, backend, device, dtype)
            rows += [GeometryRow(config.id, "forward", batch, launch) for launch in forward]
            rows += [GeometryRow(config.id, "backward", batch, launch) for launch in backward]
    return rows


def _programs(launch: accounting.Launch) -> str:
    if launch.grids:
        return " + ".join(f"{name} {p}" for name, p in launch.grids)
    return "n/a" if launch.programs is None else str(launch.programs)


def geometry_markdown(rows: Sequence[GeometryRow]) -> List[str]:
    """The table, one line per launch, and the launches that break the occupancy rule."""
    lines = [f"Rule: a launch moving more than {accounting.BIG_LAUNCH_BYTES / 1e6:g} MB has at "
             f"least {accounting.MIN_PROGRAMS} programs (4 per SM of a "
             f"{accounting.H100_SMS}-SM H100 / H200). Recorded with dry-run launches "
             "(fused_mbconv.geometry), channels_last, float32; programs n/a: no grid of ours "
             "(a cuDNN / cuBLAS call, or the C++ CPU kernels).", "",
             "| block | pass | batch | kernel | backend | programs | MB | fills |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        launch = row.launch
        lines.append(f"| {row.block} | {row.phase} | {row.batch} | {launch.kernel} | "
                     f"{launch.backend} | {_programs(launch)} | "
                     f"{launch.bytes_moved / 1e6:.2f} | {'yes' if row.fills_gpu else 'NO'} |")
    short = [row for row in rows if not row.fills_gpu]
    lines += ["", f"{len(short)} of {len(rows)} launches fall short of the rule" +
              (":" if short else ".")]
    lines += [f"- {row.block} {row.phase} batch {row.batch}: {row.launch.kernel} "
              f"({_programs(row.launch)} programs, {row.launch.bytes_moved / 1e6:.2f} MB)"
              for row in short]
    return lines
