"""Converted models under DistributedDataParallel, and synchronized BatchNorm: 2 CPU processes
over gloo, each test bounded in time. The test process hosts the rendezvous store on a port the
OS picks, so no worker races another program for a port or tears down the store's server.

Reference for synchronized BN: the same model trained in one process on the whole global batch
(nn.SyncBatchNorm computes exactly that, but refuses CPU tensors): with DDP averaging gradients,
one process's loss is the mean of the two processes' losses."""

import copy
import datetime
import faulthandler
import importlib
import os
from collections import Counter
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import fused_mbconv as fm
from fused_mbconv.convert import convert_sync_batchnorm
from fused_mbconv.distributed import ProcessGroupStatsSync
from tolerances import assert_close_by_rule

WORLD = 2
PER_RANK = 2
TIMEOUT_S = 50
STEPS = 2
FUSED_BATCH_NORMS = 3 + 3 + 2 + 3  # per block of small_model: expand (if any), depthwise, project


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
    "eager64": lambda drop: small_model(drop).double(),  # the reference of the tolerance rule
    "fused": lambda drop: fm.convert(small_model(drop)),
    "eager_sync": lambda drop: convert_sync_batchnorm(small_model(drop)),
    "fused_sync": lambda drop: fm.convert(small_model(drop), sync_bn=True),
}


def count_sync_calls(patch=setattr) -> Counter:
    """Count, from now on in this process, the fused blocks' reductions across processes
    (``patch``: a ``monkeypatch.setattr`` where the process outlives the test)."""
    calls = Counter()
    for name in ("batch_stats", "grad_sums"):
        def counted(self, *args, _name=name, _method=getattr(ProcessGroupStatsSync, name)):
            calls[_name] += 1
            return _method(self, *args)
        patch(ProcessGroupStatsSync, name, counted)
    return calls


def _worker(rank, port, variants, drop_path, out_dir):
    faulthandler.enable()  # a worker killed by a signal shows its Python stack in the report
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    try:
        x, weights = (t[rank * PER_RANK:(rank + 1) * PER_RANK] for t in global_batch())
        results = {"sync_calls": count_sync_calls()}
        for v in variants:
            dtype = torch.float64 if v.endswith("64") else torch.float32
            model = DistributedDataParallel(VARIANTS[v](drop_path).train())
            results[v] = train(model, x.to(dtype), weights.to(dtype))
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(tmp_path, variants, drop_path):
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    procs = [ctx.Process(target=_worker, args=(r, store.port, variants, drop_path, str(tmp_path)))
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


def assert_trained_by_rule(fused, eager, ref64, what):
    """Outputs per step and final states of a fused run against eager float32 and float64, by
    the tolerance rule compounded over the SGD steps (a fixed tolerance would test the
    machine's rounding, not the kernels)."""
    (f_out, f_state), (e_out, e_state), (r_out, r_state) = fused, eager, ref64
    for step, (a, b, r) in enumerate(zip(f_out, e_out, r_out)):
        assert_close_by_rule(a, b, r, torch.float32, f"{what} output step {step}", step + 1)
    assert f_state.keys() == e_state.keys() == r_state.keys(), what
    for k, r in r_state.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(f_state[k], e_state[k]), f"{what}: {k}"
        else:
            assert_close_by_rule(f_state[k], e_state[k], r, torch.float32, f"{what}: {k}", STEPS)


def test_ddp_trains_converted_model_like_the_original(tmp_path):
    ranks = run_distributed(tmp_path, ["eager", "eager64", "fused"], drop_path=0.2)
    for rank, results in enumerate(ranks):
        assert_trained_by_rule(results["fused"], results["eager"], results["eager64"],
                               f"rank {rank}")
    # DDP keeps parameters identical across ranks (buffers are broadcast from rank 0)
    for k, v in ranks[0]["fused"][1].items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(ranks[1]["fused"][1][k], v, rtol=0, atol=0)


def single_process_run(dtype):
    x, weights = global_batch()
    return train(small_model(0.0).to(dtype).train(), x.to(dtype), weights.to(dtype),
                 scale=1.0 / WORLD)


@pytest.mark.parametrize("variant", ["eager_sync", "fused_sync"])
def test_sync_batchnorm_matches_whole_batch_training(tmp_path, variant):
    eager, ref64 = single_process_run(torch.float32), single_process_run(torch.float64)
    ranks = run_distributed(tmp_path, [variant], drop_path=0.0)
    for rank, results in enumerate(ranks):
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        this_rank = [([out[rows] for out in outs], state) for outs, state in (eager, ref64)]
        assert_trained_by_rule(results[variant], *this_rank, f"{variant} rank {rank}")
        # the fused blocks reduced every BatchNorm's statistics and gradient sums themselves
        fused_reductions = STEPS * FUSED_BATCH_NORMS if variant == "fused_sync" else 0
        assert results["sync_calls"] == Counter(
            batch_stats=fused_reductions, grad_sums=fused_reductions), variant


def test_sync_batchnorm_without_process_group_is_batchnorm():
    model = small_model(0.0).train()
    synced = convert_sync_batchnorm(copy.deepcopy(model))
    assert sum(isinstance(m, fm.distributed.SyncBatchNorm) for m in synced.modules()) == 12
    assert list(synced.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(synced(x), model(x))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[k], v, msg=k)


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                    reason="no CUDA device with NCCL: the NCCL run needs a GPU")
@pytest.mark.parametrize("variant", ["eager_sync", "fused_sync"])
def test_nccl_sync_batchnorm_in_one_process_matches_batchnorm(tmp_path, variant, monkeypatch):
    """Synchronized BN over NCCL on CUDA tensors. A group of one never needs a reduction, so the
    test forces it: every all_gather / all_reduce of the fused blocks and of SyncBatchNorm runs
    through NCCL, and the result must be plain BatchNorm training by the rule."""
    # the module, not fm.convert, the function of the same name
    convert_module = importlib.import_module("fused_mbconv.convert")
    distributed = importlib.import_module("fused_mbconv.distributed")
    in_group = lambda process_group=None: dist.is_initialized()  # noqa: E731
    monkeypatch.setattr(distributed, "sync_enabled", in_group)
    monkeypatch.setattr(convert_module, "sync_enabled", in_group)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        x, weights = (t.cuda() for t in global_batch())
        calls = count_sync_calls(monkeypatch.setattr)
        runs = {}
        for label, make, dtype in (("synced", VARIANTS[variant], torch.float32),
                                   ("eager", VARIANTS["eager"], torch.float32),
                                   ("eager64", VARIANTS["eager64"], torch.float64)):
            model = make(0.0).cuda().train()
            runs[label] = train(model, x.to(dtype), weights.to(dtype))
    finally:
        dist.destroy_process_group()
    assert_trained_by_rule(runs["synced"], runs["eager"], runs["eager64"], f"nccl {variant}")
    fused_reductions = STEPS * FUSED_BATCH_NORMS if variant == "fused_sync" else 0
    assert calls == Counter(batch_stats=fused_reductions, grad_sums=fused_reductions), variant
