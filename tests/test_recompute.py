"""``recompute`` levels of FusedMBConv / functional.mbconv / convert / efficientnet_bN:
False keeps the expand output e and the depthwise output d for backward, "dwconv" keeps e,
True keeps neither (backward recomputes e with the expand GEMM, then d). Every level must give
eager's outputs, gradients and running statistics, on every backend, and save less in turn."""

import copy
import pickle
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fused_mbconv as fm
from fused_mbconv.functional import BatchNormParams
from parity import check
from test_fused_mbconv import (B0_CONFIGS, BACKENDS, GPU_BACKENDS, _gradcheck_inputs,
                               _mbconv_kwargs, check_parity, make_block, run)

LEVELS = [False, "dwconv", True]
# The levels other than False, which test_fused_mbconv's block grid runs (the models of the
# other tests run the default, "dwconv").
RECOMPUTING = ["dwconv", True]
# Modes of the parity grid: (dtype, channels_last, training).
MODES = [(torch.float32, False, True), (torch.bfloat16, True, True),
         (torch.float32, True, False)]
# On the Triton interpreter (10-30 s a case): one case per level.
TRITON_CASE = ("e6-k5-s1-res", torch.float32, False, True)


def _parity_cases():
    cases = []
    for level in RECOMPUTING:
        for name in ("e1-k3-s1", "e6-k3-s2", "e6-k5-s1-res"):
            for dtype, cl, training in MODES:
                targets = [("cpu", b) for b in BACKENDS
                           if b != "triton" or (name, dtype, cl, training) == TRITON_CASE]
                targets += [("cuda", b) for b in GPU_BACKENDS]
                for device, backend in targets:
                    where = backend if device == "cpu" else f"cuda-{backend}"
                    cases.append(pytest.param(
                        B0_CONFIGS[name], dtype, cl, training, device, backend, level,
                        id=f"{name}-{dtype}-{'nhwc' if cl else 'nchw'}-"
                           f"{'train' if training else 'eval'}-{where}-recompute={level}"))
    return cases


@pytest.mark.parametrize("config, dtype, channels_last, training, device, backend, recompute",
                         _parity_cases())
def test_levels_match_eager(config, dtype, channels_last, training, device, backend,
                            recompute):
    block = make_block(config, drop_path=0.5).to(device)  # drops samples in residual blocks
    shape = (2, 5, 7) if backend == "triton" else (4, 7, 9)
    x = torch.randn(shape[0], config[0], *shape[1:], device=device) * 2 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check_parity(block, x, dtype, training, backend, f"recompute={recompute}", recompute)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", [(6, 8, 5, 2, 6), (8, 8, 3, 1, 1)], ids=["e6", "e1"])
def test_levels_give_identical_results_and_update_statistics_once(config, training, backend):
    """The recomputed tensors are the forward's, bit for bit (the same kernels on the same
    inputs), so every level gives the same output, gradients and statistics; the statistics
    are updated once per forward (num_batches_tracked 0 -> 1), never in the recomputation."""
    block = make_block(config, drop_path=0.5)
    x = torch.randn(3, config[0], 9, 7)
    with torch.no_grad():
        grad_out = torch.randn(copy.deepcopy(block).train(training)(x).shape)
    runs = {level: run(block, x, torch.float32, training, grad_out, fused=True,
                       backend=backend, recompute=level) for level in LEVELS}
    kept = runs[False]
    for level in RECOMPUTING:
        out, grads, state = runs[level]
        assert torch.equal(out, kept[0]), level
        for name, g in kept[1].items():
            assert torch.equal(grads[name], g), (level, name)
        for name, b in kept[2].items():
            assert torch.equal(state[name], b), (level, name)
    for name, b in kept[2].items():
        if name.endswith("num_batches_tracked"):
            assert b.item() == (1 if training else 0), name


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("recompute", RECOMPUTING)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(training, recompute, backend):
    x, params = _gradcheck_inputs(1, True, True)
    hidden, cout = params[0].shape[0], params[-1].shape[0]
    f64 = dict(dtype=torch.float64)
    stats = [(torch.randn(c, **f64) * 0.1, torch.rand(c, **f64) + 0.5)
             for c in (hidden, hidden, cout)]

    def f(x, *p):
        bns = [BatchNormParams(w, b, m.clone(), v.clone(), torch.tensor(0), 0.1, 1e-5)
               for (w, b), (m, v) in zip([(p[1], p[2]), (p[4], p[5]), (p[-2], p[-1])], stats)]
        torch.manual_seed(0)  # the same drop-path draw on every evaluation
        return fm.functional.mbconv(
            x, p[3], bns[1], p[-3], bns[2], expand_weight=p[0], bn1=bns[0],
            se_weights=p[6:10], stride=1, training=training, residual=True, drop_path=0.5,
            recompute=recompute)

    with fm.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def _saved_shapes(module, x):
    """Shapes of what one forward saves for backward, other than x and the parameters."""
    owned = {t.data_ptr() for t in (x, *module.parameters())}
    shapes = []

    def pack(t):
        if t.data_ptr() not in owned:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return shapes


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_recompute_true_saves_no_expanded_map(backend):
    """At True the block keeps per-channel and per-sample vectors only: neither e nor d (nor
    any other map of the expanded size); at "dwconv" e is kept, at False e and d."""
    n, hidden, cin = 2, 24, 4
    block = fm.FusedMBConv(cin, 8, 3, 2, hidden // cin).train()
    x = torch.randn(n, cin, 10, 10, requires_grad=True)
    shapes = {}
    for level in LEVELS:
        copied = copy.deepcopy(block)
        copied.recompute = level
        with fm.use_backend(backend):
            shapes[level] = _saved_shapes(copied, x)
    e, d = (n, hidden, 10, 10), (n, hidden, 5, 5)
    assert e in shapes[False] and d in shapes[False]
    assert e in shapes["dwconv"] and d not in shapes["dwconv"]
    largest = max(torch.Size(s).numel() for s in shapes[True])
    assert largest <= n * hidden, shapes[True]


def test_bad_levels_are_refused_naming_the_allowed_values():
    allowed = r"recompute must be False .* 'dwconv' .* True"
    for bad in ("all", "none", 1, 0, "True"):
        with pytest.raises(ValueError, match=allowed):
            fm.FusedMBConv(6, 6, 3, 1, 6, recompute=bad)
    block = fm.FusedMBConv(6, 6, 3, 1, 6, recompute="dwconv")
    for bad in ("yes", None):  # None is the constructors' "default", not a level
        with pytest.raises(ValueError, match=allowed):
            block.recompute = bad
    assert block.recompute == "dwconv"
    with pytest.raises(ValueError, match="recompute=True needs fused=True"):
        fm.efficientnet_b0(recompute=True)
    with pytest.raises(ValueError, match=allowed):
        fm.efficientnet_b0(fused=True, recompute="e")


def test_functional_bad_level_changes_no_state():
    args = _mbconv_kwargs()
    state = [t for bn in (args["bn1"], args["bn2"], args["bn3"])
             for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    before = [t.clone() for t in state]
    with pytest.raises(ValueError, match="recompute must be"):
        fm.functional.mbconv(**args, recompute="expand")
    assert all(torch.equal(a, b) for a, b in zip(before, state))


def test_convert_with_a_bad_level_leaves_the_model_alone():
    model = fm.efficientnet_b0(num_classes=10)
    with pytest.raises(ValueError, match="recompute must be"):
        fm.convert(model, inplace=True, recompute=2)
    assert not any(isinstance(m, fm.FusedMBConv) for m in model.modules())


def test_recompute_dwconv_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="recompute='dwconv'"):
        block = fm.FusedMBConv(6, 6, 3, 1, 6, recompute_dwconv=True)
    assert block.recompute == "dwconv"
    with pytest.warns(DeprecationWarning, match="recompute_dwconv is deprecated"):
        assert block.recompute_dwconv is True
    with pytest.warns(DeprecationWarning):
        block.recompute_dwconv = False
    assert block.recompute is False
    block.recompute = True
    with pytest.warns(DeprecationWarning):
        assert block.recompute_dwconv is True  # True recomputes d as well
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not both"):
        fm.FusedMBConv(6, 6, 3, 1, 6, recompute=True, recompute_dwconv=True)
    with pytest.warns(DeprecationWarning):  # False through the alias, over the default
        assert fm.FusedMBConv(6, 6, 3, 1, 6, recompute_dwconv=False).recompute is False
    args = _mbconv_kwargs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns of nothing
        torch.manual_seed(0)
        new = fm.functional.mbconv(**copy.deepcopy(args), recompute="dwconv")
    with pytest.warns(DeprecationWarning, match="recompute_dwconv is deprecated"):
        torch.manual_seed(0)
        old = fm.functional.mbconv(**copy.deepcopy(args), recompute_dwconv=True)
    assert torch.equal(new, old)


def _levels(model):
    return {type(m).__name__ + ":" + str(m.recompute) for m in model.modules()
            if isinstance(m, fm.FusedMBConv)}


def test_levels_reach_every_block_and_survive_conversion_and_copies():
    eager = fm.efficientnet_b0(num_classes=10)
    keys = list(eager.state_dict())
    built = fm.efficientnet_b0(num_classes=10, fused=True, recompute=True)
    assert _levels(built) == {"FusedMBConv:True"}
    assert list(built.state_dict()) == keys
    converted = fm.convert(eager, recompute="dwconv")
    assert _levels(converted) == {"FusedMBConv:dwconv"}
    assert list(converted.state_dict()) == keys
    assert _levels(fm.convert(eager)) == {"FusedMBConv:dwconv"}  # the default
    assert _levels(fm.efficientnet_b0(num_classes=10, fused=True)) == {"FusedMBConv:dwconv"}
    assert fm.FusedMBConv(6, 6, 3, 1, 6).recompute == fm.DEFAULT_RECOMPUTE == "dwconv"
    # Already fused blocks keep their level, whatever convert is asked for new ones.
    assert _levels(fm.convert(built)) == {"FusedMBConv:True"}
    assert _levels(fm.convert(built, sync_bn=True)) == {"SyncFusedMBConv:True"}
    block = built.stages[1][0]
    assert fm.FusedMBConv.from_module(block).recompute is True
    assert copy.deepcopy(block).recompute is True
    assert pickle.loads(pickle.dumps(block)).recompute is True
    # The eager block it stands for knows nothing of the level.
    reverted = fm.revert(built)
    assert not any(hasattr(m, "_recompute") for m in reverted.modules())
    assert list(reverted.state_dict()) == keys


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("how", ["reentrant", "non-reentrant", "compiled"])
def test_recompute_true_under_checkpoint_and_compile(how, backend):
    """Activation checkpointing recomputes the block's forward (statistics updated twice, as
    eager's are); torch.compile sees the op with its flags (fullgraph)."""
    def fused_at_true(block):
        fused = fm.FusedMBConv.from_module(copy.deepcopy(block))
        fused.recompute = True
        return fused

    def forward(model, x):
        if how == "compiled":
            if isinstance(model, fm.FusedMBConv):
                model = torch.compile(model, fullgraph=True, backend="aot_eager")
            return model(x)
        return checkpoint(model, x, use_reentrant=how == "reentrant")

    inputs = [torch.randn(2, 8, 7, 7, requires_grad=True) for _ in range(2)]
    check(make_block((8, 8, 3, 1, 4), drop_path=0.2), inputs, f"recompute=True {how}", backend,
          lambda m: m.train(), forward, stat_rounds=2 * len(inputs) if how != "compiled" else 2,
          make_fused=fused_at_true)
