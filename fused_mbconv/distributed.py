"""Batch statistics synchronized across processes (``torch.distributed``).

``nn.SyncBatchNorm`` only runs on GPUs; these helpers need nothing but a process group that can
``all_gather`` and ``all_reduce`` (gloo on CPU, nccl on CUDA), so converted models train with
synchronized BatchNorm on any device. Statistics travel in the accumulate dtype (fp32, fp64 for
fp64 inputs) as per-process (count, mean, M2) and are merged with Chan's parallel formula, which
stays accurate where sum / sum-of-squares would cancel.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .functional import update_running_stats
from .tensors import accumulate_dtype, like_input


def sync_enabled(process_group=None) -> bool:
    """Whether batch statistics must be reduced across processes: a group of more than one."""
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(process_group) > 1)


def _group(process_group):
    return process_group if process_group is not None else dist.group.WORLD


def merge_batch_stats(count: int, mean: Tensor, m2: Tensor, process_group=None
                      ) -> Tuple[int, Tensor, Tensor]:
    """Global (count, mean, biased variance) from each process's per-channel count, mean and
    M2 (sum of squared deviations from its own mean). Processes may hold different counts."""
    local = torch.cat([mean.new_full((1,), float(count)), mean, m2])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=_group(process_group))
    stats = torch.stack(gathered)
    counts, means, m2s = stats[:, :1], stats[:, 1:1 + mean.numel()], stats[:, 1 + mean.numel():]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    global_m2 = (m2s + counts * (means - global_mean).square()).sum(0)
    return int(total.item()), global_mean, global_m2 / total


def all_reduce_sum(t: Tensor, process_group=None) -> Tensor:
    """Per-channel sums over every process (for the backward's reductions)."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_group(process_group))
    return t


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, process_group):
        acc = accumulate_dtype(x.dtype)
        xf = x.to(acc)
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        local_count = x.numel() // x.shape[1]
        count, mean, var = merge_batch_stats(local_count, mean, var * local_count,
                                             process_group)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{count} over all processes")
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.process_group = count, process_group
        return like_input((xf * _channel(scale) + _channel(shift)).to(x.dtype), x)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        acc = invstd.dtype
        g = grad_out.to(acc)
        xhat = (x.to(acc) - _channel(mean)) * _channel(invstd)
        local = torch.stack([g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))])
        total = all_reduce_sum(local, ctx.process_group) / ctx.count
        scale = invstd if weight is None else invstd * weight.to(acc)
        grad_x = _channel(scale) * (g - _channel(total[0]) - xhat * _channel(total[1]))
        grad_w = None if weight is None else local[1].to(weight.dtype)
        grad_b = None if weight is None else local[0].to(weight.dtype)
        return like_input(grad_x.to(x.dtype), x), grad_w, grad_b, None, None, None, None, None


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    momentum: float = 0.1, eps: float = 1e-5, process_group=None) -> Tensor:
    """Training-mode ``F.batch_norm`` with statistics over every process of the group. The
    parameter gradients are each process's own share (DDP averages them)."""
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps,
                                process_group)


def bn_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count the batch in ``num_batches_tracked`` and return the running-average factor,
    exactly as ``nn.BatchNorm2d.forward`` does (``momentum=None``: cumulative average)."""
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


class SyncBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics span every process of ``process_group``
    (on any device). Without an initialized group of two or more, it is plain BatchNorm2d.

    Made by ``from_batch_norm``, which keeps the parameters and buffers (so state_dict keys
    and values) and, for timm's ``BatchNormAct2d``, its ``drop`` and ``act`` submodules."""

    process_group = None

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, process_group=None) -> "SyncBatchNorm":
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, name, getattr(bn, name))
        for name in ("drop", "act"):
            if name in bn._modules:
                sync.add_module(name, bn._modules[name])
        sync.process_group = process_group
        return sync.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and sync_enabled(self.process_group):
            track = self.track_running_stats
            x = sync_batch_norm(x, self.running_mean if track else None,
                                self.running_var if track else None, self.weight, self.bias,
                                bn_momentum(self) if track else 0.0, self.eps, self.process_group)
        else:
            x = super().forward(x)
        for name in ("drop", "act"):  # timm BatchNormAct2d's tail
            if name in self._modules:
                x = self._modules[name](x)
        return x


class ProcessGroupStatsSync:
    """``ops.mbconv.BatchStatsSync`` over a process group: the fused block's synchronized
    BatchNorm. Forward statistics merge as (count, mean, M2); backward sums are all-reduced."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self._totals: Dict[str, int] = {}

    def batch_stats(self, bn: str, mean: Tensor, var: Tensor, count: int
                    ) -> Tuple[Tensor, Tensor]:
        total, mean, var = merge_batch_stats(count, mean, var * count, self.process_group)
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{total} over all processes ({bn})")
        self._totals[bn] = total
        return mean, var

    def grad_sums(self, bn: str, sum_dy: Tensor, sum_dy_xhat: Tensor, count: int
                  ) -> Tuple[Tensor, Tensor]:
        total = all_reduce_sum(torch.stack([sum_dy, sum_dy_xhat]), self.process_group)
        total *= count / self._totals[bn]
        return total[0], total[1]

    def global_count(self, bn: str) -> int:
        return self._totals[bn]
