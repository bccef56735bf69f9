"""What both Triton kernel modules launch with: the problem description (shapes, layout,
tiling), argument packing, byte accounting, and the cross-program reduction kernels (batch
statistics from per-tile (mean, M2) partials; column sums of partial rows) with their
launchers. Every cross-program reduction goes through partials summed in a fixed order:
deterministic, no atomics.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fused_mbconv.accounting import MIN_PROGRAMS, dry_run, grid_programs, note_launch
from fused_mbconv.tensors import NormArgs, accumulate_dtype, memory_format_of

from .jit_helpers import chan_merge

Tensor = torch.Tensor

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float32: tl.float32, torch.float64: tl.float64}
# 4 elements of a 1024-element tile per thread: the depthwise K² tap loop needs ~half the
# registers; 4 warps spill in the GEMM gate-gradient epilogue and the SE backward.
NUM_WARPS = 8
COMPILE_OPTIONS = dict(num_warps=NUM_WARPS)
BLOCK_T = 64  # partial rows merged per step by the finalize / sum kernels
SUM_BLOCK_M = (128, 64, 32, 16)  # sum_rows_kernel's column blocks, widest first
TILE_ELEMENTS = 1024


# ----------------------------------------------------------------------------- kernels

@triton.jit
def bn_stats_finalize_kernel(part_ptr, mean_ptr, var_ptr, C, HW, TILES, T, TILE_P, ROWS,
                             OUT_STRIDE, DIVIDE, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """Merge per-tile (mean, M2) into the batch mean and biased variance (Chan et al.); row t
    is tile t % TILES (of TILE_P positions) of an image of HW positions. Program (c block, g)
    merges rows [g·ROWS, (g+1)·ROWS) into mean_ptr / var_ptr + g·OUT_STRIDE, storing M2
    itself instead of the variance when DIVIDE is 0 (the first level of a tree). A block of
    BLOCK_T tiles is combined around its own mean, then merged into the running result; no
    E[x²]−E[x]² cancellation anywhere."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    first = tl.program_id(1) * ROWS
    end = tl.minimum(first + ROWS, T)
    n_a = tl.zeros([BLOCK_C], ACC)
    mean_a = tl.zeros([BLOCK_C], ACC)
    m2_a = tl.zeros([BLOCK_C], ACC)
    for t0 in range(first, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        count = tl.minimum(HW - (t % TILES) * TILE_P, TILE_P)
        count = tl.where(t < end, count, 0).to(ACC)[:, None]
        m = (t < end)[:, None] & mc[None, :]
        rows = part_ptr + t[:, None].to(tl.int64) * (2 * C) + c[None, :]
        mu = tl.load(rows, mask=m, other=0.0)
        q = tl.load(rows + C, mask=m, other=0.0)
        n_b = tl.sum(count, axis=0)
        mean_b = tl.sum(count * mu, axis=0) / n_b
        m2_b = tl.sum(q + count * (mu - mean_b[None, :]) * (mu - mean_b[None, :]), axis=0)
        n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    out = tl.program_id(1) * OUT_STRIDE + c
    tl.store(mean_ptr + out, mean_a, mask=mc)
    tl.store(var_ptr + out, m2_a / tl.where(DIVIDE != 0, n_a, 1.0), mask=mc)


@triton.jit
def sum_rows_kernel(part_ptr, out0_ptr, out1_ptr, T, M, ROWS, OUT_STRIDE, ACC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    """out_j[g·OUT_STRIDE + m] = Σ_t part[t, j·M + m] over rows t in [g·ROWS, (g+1)·ROWS),
    g = program_id(2), in a fixed order (deterministic); j = program_id(1) in {0, 1} for
    two-output rows [a | b] (separate tensors, as custom ops must not return views of one
    buffer); stored in the output's dtype."""
    half = tl.program_id(1)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = m < M
    row_len = M * tl.num_programs(1)
    first = tl.program_id(2) * ROWS
    end = tl.minimum(first + ROWS, T)
    total = tl.zeros([BLOCK_M], ACC)
    for t0 in range(first, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        total += tl.sum(tl.load(part_ptr + t[:, None].to(tl.int64) * row_len + half * M
                                + m[None, :], mask=(t < end)[:, None] & mm[None, :], other=0.0),
                        axis=0)
    out = tl.program_id(2) * OUT_STRIDE + m
    if half == 0:
        tl.store(out0_ptr + out, total.to(out0_ptr.dtype.element_ty), mask=mm)
    else:
        tl.store(out1_ptr + out, total.to(out1_ptr.dtype.element_ty), mask=mm)


# ----------------------------------------------------------------------------- launch config

def tile_sizes(channels: int, positions: int, channels_last: bool) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for ``positions`` per image: wide along the unit-stride dimension."""
    block_c = min(triton.next_power_of_2(channels), 32 if channels_last else 16)
    block_p = min(triton.next_power_of_2(positions), TILE_ELEMENTS // block_c)
    return block_p, block_c


def problem_tile(channels: int, positions: int, channels_last: bool, images: int
                 ) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the (position tile, channel block, image) grids: tile_sizes',
    with shorter position tiles (down to 16) on maps too small for MIN_PROGRAMS programs."""
    block_p, block_c = tile_sizes(channels, positions, channels_last)

    def programs(bp: int) -> int:
        return triton.cdiv(positions, bp) * triton.cdiv(channels, block_c) * images

    while (programs(block_p) < MIN_PROGRAMS and block_p > 16
           and programs(block_p // 2) > programs(block_p)):
        block_p //= 2
    return block_p, block_c


def finalize_block_c(channels: int) -> int:
    """BLOCK_C of bn_stats_finalize_kernel."""
    return min(triton.next_power_of_2(channels), 32)


def acc_type(dtype: torch.dtype):
    """The Triton type math and statistics run in for ``dtype`` inputs."""
    return _TL_DTYPES[accumulate_dtype(dtype)]


def check_dtype(x: Tensor, op: str = "dwconv_bn_silu") -> None:
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"triton {op} supports float16, bfloat16, float32 and float64 inputs, "
                        f"got {x.dtype}")


def _check_depthwise(x: Tensor, weight: Tensor, op: str) -> None:
    check_dtype(x, op)
    if weight.dtype != x.dtype:
        raise TypeError(f"triton {op}: conv weight dtype {weight.dtype} must match the input "
                        f"dtype {x.dtype}")
    k = weight.shape[-1]
    if weight.shape != (x.shape[1], 1, k, k) or k % 2 == 0:
        raise ValueError(f"triton {op}: conv weight must be (C, 1, k, k) with odd k and "
                         f"C={x.shape[1]}, got {tuple(weight.shape)}")


def nbytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bn_args(bn: Optional[NormArgs], placeholder: Tensor, prefix: str = ""):
    """(pointer tuple (mean, var, gamma, beta), eps, constexpr flags) of an optional BN; absent
    pointers are ``placeholder`` (never read)."""
    if bn is None:
        return (placeholder,) * 4, 1.0, {f"{prefix}HAS_GAMMA": False, f"{prefix}HAS_BETA": False}
    ptrs = (bn.mean, bn.var, bn.weight if bn.weight is not None else placeholder,
            bn.bias if bn.bias is not None else placeholder)
    return ptrs, bn.eps, {f"{prefix}HAS_GAMMA": bn.weight is not None,
                          f"{prefix}HAS_BETA": bn.bias is not None}


def bn_bytes(bn: Optional[NormArgs]) -> int:
    return 0 if bn is None else nbytes(bn.mean, bn.var, bn.weight, bn.bias)


class Problem:
    """Shapes, layout and tiling of one depthwise call (or, without ``weight``, of one
    elementwise pass over ``x``), shared by the forward and backward launchers."""

    def __init__(self, x: Tensor, weight: Optional[Tensor] = None, stride: int = 1,
                 op: str = "dwconv_bn_silu"):
        if weight is None:
            check_dtype(x, op)
        else:
            _check_depthwise(x, weight, op)
        self.fmt = memory_format_of(x)
        self.channels_last = self.fmt == torch.channels_last
        self.n, self.c, self.h, self.w = x.shape
        self.k = 1 if weight is None else weight.shape[-1]
        self.stride = stride
        pad = self.k // 2
        self.oh = (self.h + 2 * pad - self.k) // stride + 1
        self.ow = (self.w + 2 * pad - self.k) // stride + 1
        self.count = self.n * self.oh * self.ow  # values per channel
        self.block_p, self.block_c = problem_tile(self.c, self.oh * self.ow,
                                                  self.channels_last, self.n)
        self.tiles = triton.cdiv(self.oh * self.ow, self.block_p)  # per image
        self.rows = self.n * self.tiles  # partial-result rows, one per (image, tile)
        self.grid = (self.tiles, triton.cdiv(self.c, self.block_c), self.n)
        self.acc_dtype = accumulate_dtype(x.dtype)
        self.acc = acc_type(x.dtype)

    def layout(self, t: Tensor) -> Tensor:
        return t.contiguous(memory_format=self.fmt)

    def empty_out(self, x: Tensor, dtype=None) -> Tensor:
        return torch.empty((self.n, self.c, self.oh, self.ow), dtype=dtype or x.dtype,
                           device=x.device, memory_format=self.fmt)

    def stats(self, x: Tensor) -> Tensor:
        return torch.empty(self.c, dtype=self.acc_dtype, device=x.device)

    def partials(self, x: Tensor, width: int) -> Tensor:
        return torch.empty((self.rows, width), dtype=self.acc_dtype, device=x.device)


# ----------------------------------------------------------------------------- launchers

def launch(kernel, grid: Tuple[int, ...], bytes_read: int, bytes_written: int, *args,
           **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, noted with its bytes and its grid's programs: every
    Triton launch goes through here, so the accounting is the launch's own grid. In a dry run
    (``fused_mbconv.accounting.record_launches(dry_run=True)``) only noted."""
    if not dry_run():
        kernel[grid](*args, **kwargs)
    note_launch(kernel.__name__, "triton", bytes_read, bytes_written, grid_programs(grid))


def splits_to_fill(work_programs: int, items: int) -> int:
    """Into how many parts (at most ``items``) to split each of ``work_programs`` programs'
    work so that the grid has MIN_PROGRAMS programs."""
    return max(1, min(items, triton.cdiv(MIN_PROGRAMS, max(1, work_programs))))


def sum_rows_block_m(columns: int, outs: int = 1) -> int:
    """BLOCK_M of sum_rows_kernel for ``outs`` outputs of ``columns`` elements: narrower blocks
    (down to SUM_BLOCK_M[-1]) while the grid falls short of MIN_PROGRAMS."""
    block_m = min(triton.next_power_of_2(columns), SUM_BLOCK_M[0])
    while block_m > SUM_BLOCK_M[-1] and triton.cdiv(columns, block_m) * outs < MIN_PROGRAMS:
        block_m //= 2
    return block_m


def sum_rows(part: Tensor, outs: Tuple[Tensor, ...], acc) -> None:
    """Column sums of ``part`` [T, len(outs)·M] into the M-element tensors ``outs``. Too few
    column blocks for many rows: first each group of (at least two) rows is summed into an
    ACC row of a [groups, len(outs)·M] buffer, then those rows (a tree of two levels, fixed
    order)."""
    m, width, rows = outs[0].numel(), part.shape[1], part.shape[0]
    block_m = sum_rows_block_m(m, len(outs))
    columns = (triton.cdiv(m, block_m), len(outs))
    rows_per_group = max(2, rows // splits_to_fill(grid_programs(columns), rows))
    if rows > BLOCK_T and rows_per_group < rows:
        groups = triton.cdiv(rows, rows_per_group)
        group_sums = torch.empty((groups, width), dtype=part.dtype, device=part.device)
        second_half = group_sums[:, m:] if len(outs) > 1 else group_sums
        launch(sum_rows_kernel, (*columns, groups), nbytes(part), nbytes(group_sums),
               part, group_sums, second_half, rows, m, rows_per_group, width, ACC=acc,
               BLOCK_T=BLOCK_T, BLOCK_M=block_m, **COMPILE_OPTIONS)
        part, rows = group_sums, groups
    launch(sum_rows_kernel, columns, nbytes(part), nbytes(*outs),
           part, outs[0], outs[-1], rows, m, rows, 0, ACC=acc, BLOCK_T=BLOCK_T,
           BLOCK_M=block_m, **COMPILE_OPTIONS)


def _stats_groups(rows: int, tiles: int, wanted: int) -> int:
    """Rows per first-level group of finalize_stats: at most rows / ``wanted``, and either
    whole images (a multiple of ``tiles``) or a divisor of ``tiles`` (a group never straddles
    two images), so each merged row is again a tile of uniform size but for the image's
    last."""
    most = rows // wanted
    if most >= tiles:
        return most // tiles * tiles
    return max(r for r in range(1, most + 1) if tiles % r == 0) if most >= 1 else 1


def finalize_stats(part: Tensor, mean: Tensor, var: Tensor, positions: int, tiles: int,
                   tile_p: int, acc) -> None:
    """Batch mean and biased variance from (mean, M2) rows of ``tile_p``-position tiles,
    ``tiles`` per image of ``positions``. Too few channel blocks for many rows: first each
    group of rows (whole images, or a whole fraction of one) is merged into one (mean, M2)
    row, then those rows (a tree of two levels, fixed order)."""
    c, rows = mean.numel(), part.shape[0]
    block_c = finalize_block_c(c)
    columns = (triton.cdiv(c, block_c),)
    group = _stats_groups(rows, tiles, splits_to_fill(columns[0], rows)) if rows > BLOCK_T \
        else 1
    if group > 1:
        groups = triton.cdiv(rows, group)
        merged = torch.empty((groups, 2 * c), dtype=part.dtype, device=part.device)
        launch(bn_stats_finalize_kernel, (*columns, groups), nbytes(part), nbytes(merged),
               part, merged, merged[:, c:], c, positions, tiles, rows, tile_p, group, 2 * c,
               0, ACC=acc, BLOCK_T=BLOCK_T, BLOCK_C=block_c, **COMPILE_OPTIONS)
        if group >= tiles:  # row g: group / tiles whole images, one "tile" of all of them
            images = group // tiles
            positions, tiles, tile_p = rows // tiles * positions, groups, images * positions
        else:  # row g: tile g % (tiles / group) of group·tile_p positions of its image
            tiles, tile_p = tiles // group, group * tile_p
        part, rows = merged, groups
    launch(bn_stats_finalize_kernel, columns, nbytes(part), nbytes(mean, var),
           part, mean, var, c, positions, tiles, rows, tile_p, rows, 0, 1,
           ACC=acc, BLOCK_T=BLOCK_T, BLOCK_C=block_c, **COMPILE_OPTIONS)
