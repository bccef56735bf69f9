"""Fused against eager, the whole of it: a fused copy of an eager model, the float32 eager
model and a float64 eager copy run the same inputs, drop-path draws and grad_outputs; every
output, gradient and buffer of the fused model is held to the tolerance rule, counts and every
buffer eager leaves untouched must match exactly, and a gradient eager leaves None stays None."""

import copy

import torch
import torch.nn as nn

import fused_mbconv as fm
from fused_mbconv.convert import iter_blocks
from tolerances import NETWORK_GRADIENT_ROUNDS, assert_close_by_rule


def randomize_bn_state(model, mean=0.5, var=(0.5, 1.5), batches_tracked=None):
    """Non-trivial BN affine parameters and running statistics (running mean in [-mean, mean],
    running variance in ``var``; num_batches_tracked set to ``batches_tracked`` if given), so
    roles and states can't be confused."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if m.track_running_stats:
                    m.running_mean.uniform_(-mean, mean)
                    m.running_var.uniform_(*var)
                    if batches_tracked is not None:
                        m.num_batches_tracked.fill_(batches_tracked)


def fuse(model):
    """A fused copy: from_module for a block (it takes any BatchNorm), convert for a network,
    which must fuse every block."""
    if isinstance(model, fm.MBConv):
        return fm.FusedMBConv.from_module(copy.deepcopy(model))
    fused = fm.convert(model)
    blocks = [b for _, b in iter_blocks(fused)]
    assert blocks and all(isinstance(b, fm.FusedMBConv) for b in blocks)
    return fused


def run(model, inputs, backend=None, forward=None):
    """Forward + backward per input, each with a fresh leaf of the input's requires_grad and
    the same drop-path draw and random grad_output in every model. Returns per step (output,
    gradients of the input and every parameter, None where autograd gives none), then the
    buffers."""
    dtype = next(model.parameters()).dtype
    steps = []
    for step, x in enumerate(inputs):
        x = x.detach().to(dtype, copy=True).requires_grad_(x.requires_grad)
        model.zero_grad(set_to_none=True)
        with fm.use_backend(backend):  # around backward too: checkpointing recomputes there
            torch.manual_seed(step)
            out = forward(model, x) if forward else model(x)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
            out.backward(grad.to(out.device, dtype))
        steps.append((out.detach(), {"input": x.grad,
                                     **{n: p.grad for n, p in model.named_parameters()}}))
    return steps, {n: b.clone() for n, b in model.named_buffers()}


def check(eager, inputs, what, backend, state, forward=None, grad_rounds=1, stat_rounds=1,
          make_fused=fuse):
    """``state`` puts each model in the state under test after copying (as a user does after
    conversion). ``stat_rounds``: the number of running-statistic updates. ``make_fused``
    builds the fused copy of ``eager``."""
    ref, fused = copy.deepcopy(eager).double(), make_fused(eager)
    for model in (ref, eager, fused):
        state(model)
    before = {n: b.clone() for n, b in eager.named_buffers()}
    r, e, f = run(ref, inputs, None, forward), run(eager, inputs, None, forward), \
        run(fused, inputs, backend, forward)
    what = f"{what} [{backend}]"
    for step, ((r_out, r_grads), (e_out, e_grads), (f_out, f_grads)) in enumerate(
            zip(r[0], e[0], f[0])):
        assert f_out.dtype == e_out.dtype, f"{what} step {step}: output dtype {f_out.dtype}"
        assert_close_by_rule(f_out, e_out, r_out, torch.float32, f"{what} step {step} output")
        assert f_grads.keys() == r_grads.keys(), what
        for name, g in r_grads.items():
            where = f"{what} step {step} grad {name}"
            if g is None:
                assert f_grads[name] is None, f"{where}: eager has none (frozen), fused has one"
            else:
                assert f_grads[name] is not None, f"{where}: None, eager has one"
                assert_close_by_rule(f_grads[name], e_grads[name], g, torch.float32, where,
                                     grad_rounds)
    assert f[1].keys() == r[1].keys(), what
    for name, value in r[1].items():
        fused_b, eager_b = f[1][name], e[1][name]
        if not value.is_floating_point():
            assert torch.equal(fused_b, eager_b), \
                f"{what} {name}: {fused_b.tolist()}, eager {eager_b.tolist()}"
        elif torch.equal(eager_b, before[name]):
            assert torch.equal(fused_b, eager_b), f"{what} {name}: changed, eager keeps it"
        else:
            assert_close_by_rule(fused_b, eager_b, value, torch.float32, f"{what} {name}",
                                 stat_rounds)


def assert_same_grads_and_buffers(model, other):
    """``model``'s parameter gradients and buffers equal ``other``'s, in order (a compiled or
    traced copy against the module it came from)."""
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(model.named_buffers(), other.buffers()):
        torch.testing.assert_close(b, c, msg=name)


def assert_autocast_grads_by_rule(fused, eager, reference, dtype):
    """After a backward under autocast to ``dtype``: float32 parameter gradients, the fused
    model's against eager's by the rule, through a whole network."""
    for (name, p), q, r in zip(fused.named_parameters(), eager.parameters(),
                               reference.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32, name
        assert_close_by_rule(p.grad, q.grad, r.grad, dtype, f"grad {name}",
                             rounds=NETWORK_GRADIENT_ROUNDS)


def assert_compiles_fullgraph_like_eager(model, x):
    """``model`` under torch.compile(fullgraph=True) (aot_eager: the ops' fake and autograd
    registrations, no codegen) gives an eager copy's output, gradients and buffers."""
    torch._dynamo.reset()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, expected = compiled(x), eager(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_same_grads_and_buffers(model, eager)
