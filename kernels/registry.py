"""The compile registry: every Triton kernel specialization the launchers produce for
EfficientNet-B0 (the dwconv_bn_silu op and the MBConv block; train and eval, NCHW and
channels_last), with the argument types the JIT would see and the compile options the launchers
pass. ``compile_report`` compiles them for real GPUs without one.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
import triton.language as tl

from fused_mbconv.accounting import GEOMETRY_BATCHES

from . import common, dwconv_bn_silu as dw, mbconv as mb

# (channels, kernel size, stride) of every depthwise conv in EfficientNet-B0.
B0_DEPTHWISE_LAYERS = ((32, 3, 1), (96, 3, 2), (144, 3, 1), (144, 5, 2), (240, 5, 1),
                       (240, 3, 2), (480, 3, 1), (480, 5, 1), (672, 5, 1), (672, 5, 2),
                       (1152, 5, 1), (1152, 3, 1))
# (in, out, kernel, stride, expand) of every distinct EfficientNet-B0 block, real channels.
B0_BLOCKS = ((32, 16, 3, 1, 1), (16, 24, 3, 2, 6), (24, 24, 3, 1, 6), (24, 40, 5, 2, 6),
             (40, 40, 5, 1, 6), (40, 80, 3, 2, 6), (80, 80, 3, 1, 6), (80, 112, 5, 1, 6),
             (112, 112, 5, 1, 6), (112, 192, 5, 2, 6), (192, 192, 5, 1, 6),
             (192, 320, 3, 1, 6))
# Side of each B0_BLOCKS entry's input map at 224²: the GEMM's tiles shrink on small maps at
# small batches (mbconv.gemm_geometry), so the report compiles those at the geometry batches.
B0_INPUT_SIDES = (112, 112, 56, 56, 28, 28, 14, 14, 14, 14, 7, 7)
BLOCK_ACTIVATION, SE_GATE = "silu", "sigmoid"  # EfficientNet's
TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Pointer arguments in the activation dtype (the others are fp32 statistics and partials).
_DEPTHWISE_ACT_PTRS = {"x_ptr", "w_ptr", "d_ptr", "out_ptr", "go_ptr", "gc_ptr", "gx_ptr"}
_BLOCK_ACT_PTRS = {"a_ptr", "aux_ptr", "w_ptr", "out_ptr", "epi_ptr", "g_ptr", "g_aux_ptr",
                   "d_ptr", "q_ptr", "res_ptr", "x_ptr", "gc_ptr", "gx_ptr", "go_ptr"}
_SUM_ACT_PTRS = {"out0_ptr", "out1_ptr"}
_BIG = 56 * 56  # positions of a large map: every position tile at full size


def signature(kernel, constexprs, act: str, activation_ptrs=_DEPTHWISE_ACT_PTRS):
    """Argument types as the JIT would see them: activation tensors in ``act``, statistics
    and partials in fp32, eps fp32, sizes i32."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*" + (act if name in activation_ptrs else "fp32")
        return "fp32" if name.endswith("eps") else "i32"
    return {name: kind(name) for name in kernel.arg_names}


class Registry:
    """Distinct (kernel, signature, constexprs, label, options) specializations, first label
    wins."""

    def __init__(self):
        self.specs = {}

    def add(self, kernel, act, label, constexprs, options=common.COMPILE_OPTIONS, **kw):
        """``options``: the compile options its launcher passes."""
        key = (kernel.__name__, act, tuple(sorted((k, str(v)) for k, v in constexprs.items())))
        self.specs.setdefault(key, (kernel, signature(kernel, constexprs, act, **kw),
                                    constexprs, f"{kernel.__name__} {label}", options))

    def add_finalize(self, channels: int) -> None:
        block_c = common.finalize_block_c(channels)
        self.add(common.bn_stats_finalize_kernel, "fp32", f"statistics {block_c}",
                 dict(ACC=tl.float32, BLOCK_T=common.BLOCK_T, BLOCK_C=block_c))

    def add_sum_rows(self, act: str, label: str, activation_ptrs) -> None:
        for block_m in common.SUM_BLOCK_M:  # sum_rows_block_m narrows them for short grids
            self.add(common.sum_rows_kernel, act, f"{label} {block_m}",
                     dict(ACC=tl.float32, BLOCK_T=common.BLOCK_T, BLOCK_M=block_m),
                     activation_ptrs=activation_ptrs)

    def list(self):
        return list(self.specs.values())


def add_depthwise_specializations(reg: Registry, act: str, channels_last: bool, channels: int,
                                  k: int, stride: int, block: bool, in_bn: bool = False) -> None:
    """The depthwise kernels the launchers compile for one layer: the dwconv_bn_silu op's
    (block=False) or the MBConv block's K2 / B3 / B2 (block=True; in_bn: the BN1 prologue of
    an expanded block)."""
    fmt = "nhwc" if channels_last else "nchw"
    big = 7 * 7  # positions of B0's smallest map: every tile at full size
    block_p, block_c = common.tile_sizes(channels, big, channels_last)
    tile = dict(BLOCK_P=block_p, BLOCK_C=block_c)
    flags = dict(HAS_GAMMA=True, HAS_BETA=True, ACT=BLOCK_ACTIVATION, ACC=tl.float32, **tile)
    inb = dict(IN_BN=in_bn, IN_HAS_GAMMA=in_bn, IN_HAS_BETA=in_bn)
    conv = dict(K=k, STRIDE=stride, CHANNELS_LAST=channels_last)
    where = f"k{k} s{stride} {act} {fmt} {block_p}x{block_c}" + (
        (" block bn1" if in_bn else " block") if block else "")
    for training in (True, False):
        apply = not (training or block)
        reg.add(dw.dwconv_bn_silu_fwd_kernel, act, f"{where} {'train' if training else 'eval'}",
                dict(STATS=training, APPLY=apply, WRITE_D=training or block, **conv, **flags,
                     **inb), options=dw.forward_options(k, apply))
    reg.add(dw.dwconv_bwd_grad_conv_kernel, act, f"{where} train",
            dict(TRAINING=True, WRITE_GC=True, NEED_GW=True, POOLED=block, **conv, **flags,
                 **inb))
    reg.add(dw.dwconv_bwd_input_kernel, act, where,
            dict(ACC=tl.float32, ACT=BLOCK_ACTIVATION, **conv, **tile, **inb))
    where = f"{act} {fmt} {block_p}x{block_c}"
    if not block:
        reg.add(dw.bn_silu_apply_kernel, act, where, dict(CHANNELS_LAST=channels_last, **flags))
    reg.add(dw.bn_silu_bwd_reduce_kernel, act, where + (" block" if block else ""),
            dict(CHANNELS_LAST=channels_last, POOLED=block, SCALE=False, **flags))
    reg.add_finalize(channels)


def add_dwconv_op(reg: Registry, layers=B0_DEPTHWISE_LAYERS, dtypes=tuple(TL_NAMES)) -> None:
    """Every variant the dwconv_bn_silu launchers produce for ``layers`` (at a large batch)."""
    reg.add_sum_rows("fp32", "bn grads", ())
    for dtype in dtypes:
        act = TL_NAMES[dtype]
        for channels_last in (False, True):
            for channels, k, stride in layers:
                add_depthwise_specializations(reg, act, channels_last, channels, k, stride,
                                              block=False)
        reg.add_sum_rows(act, f"{act} grad weight", _SUM_ACT_PTRS)


def _tile_of(channels: int, channels_last: bool) -> Tuple[int, int]:
    return common.tile_sizes(channels, _BIG, channels_last)


def _add_block(reg: Registry, act: str, channels_last: bool, side: int, cin: int, cout: int,
               k: int, stride: int, expand: int) -> None:
    """The kernels of one block, K1..K6 and B6..B1, of an input map side x side."""
    fmt = "nhwc" if channels_last else "nchw"
    hidden = cin * expand
    squeeze = max(1, int(cin * 0.25))
    residual = stride == 1 and cin == cout
    where = f"{cin}->{hidden}->{cout} k{k} s{stride} {act} {fmt}"
    layout = dict(CHANNELS_LAST=channels_last, ACC=tl.float32)

    def gemm(label, kc, nc, positions, **flags):
        tiles = {mb.gemm_blocks(kc, nc, _BIG)}
        tiles.update(mb.gemm_geometry(kc, nc, positions, batch)[:3]
                     for batch in GEOMETRY_BATCHES)
        for bp, bk, bn in sorted(tiles, reverse=True):
            base = dict(A_KIND=mb.RAW, ACT=BLOCK_ACTIVATION, GATE=False, SCALE=False,
                        TRAINING=False, A_HAS_GAMMA=False, A_HAS_BETA=False,
                        EPILOGUE=mb.PLAIN, E_HAS_GAMMA=False, E_HAS_BETA=False, UPCAST=False,
                        BLOCK_P=bp, BLOCK_K=bk, BLOCK_N=bn, **layout)
            base.update(flags)
            reg.add(mb.pointwise_conv_kernel, act, f"{label} {where} {bp}x{bn}", base,
                    options=mb.gemm_options(base["EPILOGUE"]), activation_ptrs=_BLOCK_ACT_PTRS)

    def wgrad(label, gc, ac, **flags):
        bp, bm, bn = mb.wgrad_blocks(gc, ac, _BIG)
        base = dict(A_KIND=mb.RAW, ACT=BLOCK_ACTIVATION, GATE=False, SCALE=False,
                    TRAINING=True, G_HAS_GAMMA=True, A_HAS_GAMMA=False, A_HAS_BETA=False,
                    UPCAST=False, BLOCK_P=bp, BLOCK_M=bm, BLOCK_N=bn, **layout)
        base.update(flags)
        reg.add(mb.pointwise_wgrad_kernel, act, f"{label} {where}", base,
                options=mb.CAPPED_OPTIONS, activation_ptrs=_BLOCK_ACT_PTRS)

    bn_in = dict(A_HAS_GAMMA=True, A_HAS_BETA=True)
    inputs, outputs = side * side, (side // stride) ** 2
    if expand != 1:
        gemm("K1 train", cin, hidden, inputs, EPILOGUE=mb.STATS)
        gemm("K1 eval", cin, hidden, inputs)
        gemm("B1 dgrad", hidden, cin, inputs, A_KIND=mb.BN_BWD, TRAINING=True,
             A_HAS_GAMMA=True, EPILOGUE=mb.RESIDUAL if residual else mb.PLAIN)
        wgrad("B1 wgrad", hidden, cin)
    gemm("K5 train", hidden, cout, outputs, A_KIND=mb.ACT_BN, GATE=True, EPILOGUE=mb.STATS,
         **bn_in)
    gemm("K5 eval/recompute", hidden, cout, outputs, A_KIND=mb.ACT_BN, GATE=True, **bn_in)
    gemm("B5 dgrad", cout, hidden, outputs, A_KIND=mb.BN_BWD, SCALE=residual, TRAINING=True,
         A_HAS_GAMMA=True, EPILOGUE=mb.GATE_GRAD, E_HAS_GAMMA=True, E_HAS_BETA=True)
    wgrad("B5 wgrad", cout, hidden, A_KIND=mb.ACT_BN, GATE=True, SCALE=residual, **bn_in)
    sq_p, sq_c = mb.squeeze_tile(hidden, _BIG, channels_last)
    reg.add(mb.squeeze_kernel, act, f"K3 {where}",
            dict(HAS_GAMMA=True, HAS_BETA=True, ACT=BLOCK_ACTIVATION, BLOCK_P=sq_p,
                 BLOCK_C=sq_c, **layout), activation_ptrs=_BLOCK_ACT_PTRS)
    bs, bc = mb.excite_weight_blocks(hidden, squeeze)
    reg.add(mb.excite_bwd_weight_kernel, "fp32", f"B4 {hidden}/{squeeze}",
            dict(ACC=tl.float32, BLOCK_S=bs, BLOCK_C=bc))
    for batch in GEOMETRY_BATCHES:  # the per-image kernels narrow BLOCK_C for small batches
        bs, bc = mb.excite_blocks(hidden, squeeze, batch)
        ex = dict(ACC=tl.float32, BLOCK_S=bs, BLOCK_C=bc)
        reg.add(mb.excite_kernel, "fp32", f"K4 {hidden}/{squeeze} {bc}",
                dict(SE_ACT=BLOCK_ACTIVATION, GATE_ACT=SE_GATE, **ex))
        reg.add(mb.excite_bwd_sample_kernel, "fp32", f"B4 {hidden}/{squeeze} {bc}",
                dict(SE_ACT=BLOCK_ACTIVATION, GATE_ACT=SE_GATE, **ex))
    output_tiles = {_tile_of(cout, channels_last)}
    output_tiles.update(common.problem_tile(cout, outputs, channels_last, batch)
                        for batch in GEOMETRY_BATCHES)
    for op, oc in sorted(output_tiles, reverse=True):
        for training in (True, False):
            reg.add(mb.output_kernel, act, f"K6 {where} {'train' if training else 'eval'}",
                    dict(HAS_GAMMA=True, HAS_BETA=True, SCALE=residual and training,
                         RESIDUAL=residual, BLOCK_P=op, BLOCK_C=oc, **layout),
                    activation_ptrs=_BLOCK_ACT_PTRS)
        reg.add(dw.bn_silu_bwd_reduce_kernel, act, f"B6 {act} {fmt} {op}x{oc}",
                dict(HAS_GAMMA=True, HAS_BETA=True, ACT="identity", POOLED=False,
                     SCALE=residual, CHANNELS_LAST=channels_last, BLOCK_P=op, BLOCK_C=oc,
                     ACC=tl.float32))
    add_depthwise_specializations(reg, act, channels_last, hidden, k, stride, block=True,
                                  in_bn=expand != 1)
    for c in (hidden, cout):
        reg.add_finalize(c)


def add_mbconv_block(reg: Registry, blocks=B0_BLOCKS, dtypes=tuple(TL_NAMES)) -> None:
    """Every variant the block launchers produce for ``blocks`` at a large batch and
    resolution: SiLU / sigmoid, as EfficientNet uses."""
    for dtype in dtypes:
        act = TL_NAMES[dtype]
        for channels_last in (False, True):
            for side, block in zip(B0_INPUT_SIDES, blocks):
                _add_block(reg, act, channels_last, side, *block)
        reg.add_sum_rows(act, f"{act} grad weight", _SUM_ACT_PTRS)


@functools.lru_cache(maxsize=None)
def specializations():
    """(kernel, signature, constexprs, label, options) of every distinct variant, the
    dwconv_bn_silu op's first (a variant both produce keeps the op's label)."""
    reg = Registry()
    add_dwconv_op(reg)
    add_mbconv_block(reg)
    return reg.list()
