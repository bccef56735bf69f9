"""Converted models under DistributedDataParallel, and synchronized BatchNorm: 2 CPU processes
over gloo on a free localhost port, each test bounded in time.

Reference for synchronized BN: the same model trained in one process on the whole global batch
(nn.SyncBatchNorm computes exactly that, but refuses CPU tensors): with DDP averaging gradients,
one process's loss is the mean of the two processes' losses."""

import copy
import datetime
import os
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import fused_mbconv as fm
from fused_mbconv.convert import convert_sync_batchnorm

WORLD = 2
PER_RANK = 2
TIMEOUT_S = 50
STEPS = 2


def small_model(drop_path: float) -> nn.Module:
    """One block of every recognized kind (torchvision, timm, this package), stem and head."""
    from timm.models._efficientnet_blocks import (DepthwiseSeparableConv, InvertedResidual,
                                                  SqueezeExcite)
    from torchvision.models.efficientnet import MBConv, MBConvConfig

    torch.manual_seed(0)
    hard_se = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
        MBConv(MBConvConfig(4, 3, 1, 16, 16, 1), drop_path, nn.BatchNorm2d),
        InvertedResidual(16, 24, 5, stride=2, exp_ratio=3, act_layer=nn.Hardswish,
                         se_layer=hard_se),
        DepthwiseSeparableConv(24, 24, 3, act_layer=nn.ReLU6, drop_path_rate=drop_path),
        fm.MBConv(24, 32, 3, 2, 6, drop_path=drop_path),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def global_batch():
    g = torch.Generator().manual_seed(123)
    return (torch.randn(WORLD * PER_RANK, 3, 16, 16, generator=g),
            torch.randn(WORLD * PER_RANK, 10, generator=g))


def train(model, x, weights, scale=1.0):
    """SGD steps; per step the output, then the final state_dict (parameters and BN state)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outputs = []
    for step in range(STEPS):
        torch.manual_seed(10 + step)
        out = model(x)
        opt.zero_grad()
        ((out * weights).sum() * scale).backward()
        outputs.append(out.detach())
        opt.step()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return outputs, {k: v.detach().clone() for k, v in module.state_dict().items()}


VARIANTS = {
    "eager": lambda drop: small_model(drop),
    "fused": lambda drop: fm.convert(small_model(drop)),
    "eager_sync": lambda drop: convert_sync_batchnorm(small_model(drop)),
    "fused_sync": lambda drop: fm.convert(small_model(drop), sync_bn=True),
}


def _worker(rank, port, variants, drop_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        x, weights = (t[rank * PER_RANK:(rank + 1) * PER_RANK] for t in global_batch())
        results = {v: train(DistributedDataParallel(VARIANTS[v](drop_path).train()), x, weights)
                   for v in variants}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(tmp_path, variants, drop_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, variants, drop_path, str(tmp_path)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * WORLD, f"worker exit codes {codes} (timeout {TIMEOUT_S} s)"
    return [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]


def assert_states_close(a, b, what, **tol):
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"{what}: {k}", **tol)


def test_ddp_trains_converted_model_like_the_original(tmp_path):
    ranks = run_distributed(tmp_path, ["eager", "fused"], drop_path=0.2)
    for rank, results in enumerate(ranks):
        (e_out, e_state), (f_out, f_state) = results["eager"], results["fused"]
        for step, (a, b) in enumerate(zip(f_out, e_out)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"rank {rank} step {step}")
        assert_states_close(f_state, e_state, f"rank {rank}", rtol=1e-4, atol=1e-5)
    # DDP keeps parameters identical across ranks (buffers are broadcast from rank 0)
    for k, v in ranks[0]["fused"][1].items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(ranks[1]["fused"][1][k], v, rtol=0, atol=0)


def single_process_reference():
    x, weights = global_batch()
    return train(small_model(0.0).train(), x, weights, scale=1.0 / WORLD)


@pytest.mark.parametrize("variant", ["eager_sync", "fused_sync"])
def test_sync_batchnorm_matches_whole_batch_training(tmp_path, variant):
    ref_out, ref_state = single_process_reference()
    ranks = run_distributed(tmp_path, [variant], drop_path=0.0)
    for rank, results in enumerate(ranks):
        outs, state = results[variant]
        for step, out in enumerate(outs):
            expected = ref_out[step][rank * PER_RANK:(rank + 1) * PER_RANK]
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5,
                                       msg=f"{variant} rank {rank} step {step}")
        assert_states_close(state, ref_state, f"{variant} rank {rank}", rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_without_process_group_is_batchnorm():
    model = small_model(0.0).train()
    synced = convert_sync_batchnorm(copy.deepcopy(model))
    assert sum(isinstance(m, fm.distributed.SyncBatchNorm) for m in synced.modules()) == 12
    assert list(synced.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(synced(x), model(x))
    assert_states_close(synced.state_dict(), model.state_dict(), "buffers")
