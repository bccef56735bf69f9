"""Launch geometry (issue 19): every Triton launch reports its grid; the dry-run recording the
geometry table uses sees exactly the launches of a real call; the big launches of every B0
block fill a 132-SM GPU at batch 32 and 128; the per-chunk partials and the two-level
reductions stay deterministic (bit-identical reruns) and exact to the tolerance rule. All on
CPU tensors: the Triton interpreter, and dry runs at full size."""

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import accounting, geometry
from fused_mbconv.kernels import common
from tolerances import assert_close_by_rule

# A block whose maps split: positions chunks in the GEMMs, wgrad and squeeze, and more
# partial rows than one reduction step.
SPLIT_BLOCK = geometry.BlockConfig(8, 8, 4, 3, 1, 24, 32)
# The kernels split by positions: each moves more than 1 MB in every B0 block.
SPLIT_KERNELS = ("pointwise_conv_kernel", "pointwise_wgrad_kernel", "squeeze_kernel")


def _signature(launches):
    return [(launch.kernel, launch.programs, launch.bytes_read, launch.bytes_written)
            for launch in launches]


def test_dry_run_records_the_launches_of_a_real_call():
    real = geometry.block_launches(SPLIT_BLOCK, 3, "triton", dry_run=False)
    dry = geometry.block_launches(SPLIT_BLOCK, 3, "triton", dry_run=True)
    for phase, got, want in zip(("forward", "backward"), dry, real):
        assert want and _signature(got) == _signature(want), phase
        assert all(launch.backend == "triton" and launch.programs >= 1 for launch in want)
    names = {launch.kernel for launch in real[0] + real[1]}
    assert set(SPLIT_KERNELS) <= names


def test_split_block_splits_positions():
    """The small block really takes the split paths the B0 blocks take at full size."""
    forward, backward = geometry.block_launches(SPLIT_BLOCK, 3, "triton")
    names = [launch.kernel for launch in forward + backward]
    # squeeze shares and the gate gradient's per-chunk rows are summed by sum_rows
    assert names.count("sum_rows_kernel") >= 3, names
    gemm = next(launch for launch in forward if launch.kernel == "pointwise_conv_kernel")
    out_blocks = 1  # 32 expanded channels: one BLOCK_N
    assert gemm.programs > out_blocks * 3, "the expand GEMM did not split positions"


@pytest.mark.parametrize("batch", geometry.GEOMETRY_BATCHES)
def test_every_big_b0_launch_fills_the_gpu(batch):
    """The rule of issue 19 for every launch of every B0 block, forward and backward."""
    rows = geometry.launch_geometry("triton", batches=(batch,))
    assert {row.block for row in rows} == {b.id for b in geometry.b0_blocks()}
    assert {row.phase for row in rows} == {"forward", "backward"}
    assert all(row.launch.programs is not None for row in rows)
    assert set(SPLIT_KERNELS) <= {row.launch.kernel for row in rows}
    short = [(row.block, row.phase, row.launch.kernel, row.launch.programs)
             for row in rows if not row.fills_gpu]
    assert not short, short
    big = [row for row in rows if row.launch.kernel in SPLIT_KERNELS
           and row.launch.bytes_moved > accounting.BIG_LAUNCH_BYTES]
    assert big and all(row.launch.programs >= accounting.MIN_PROGRAMS for row in big)


def test_geometry_table_lists_every_launch_and_the_shortfalls():
    rows = geometry.launch_geometry("triton", batches=(32,), blocks=[SPLIT_BLOCK])
    lines = geometry.geometry_markdown(rows)
    table = [line for line in lines if line.startswith(f"| {SPLIT_BLOCK.id} ")]
    assert len(table) == len(rows)
    short = sum(not row.fills_gpu for row in rows)
    assert f"{short} of {len(rows)} launches fall short" in "\n".join(lines)


def test_occupancy_rule():
    small = accounting.Launch("k", "triton", accounting.BIG_LAUNCH_BYTES, 0, 1)
    big_short = accounting.Launch("k", "triton", accounting.BIG_LAUNCH_BYTES, 1,
                                  accounting.MIN_PROGRAMS - 1)
    big_full = accounting.Launch("k", "triton", accounting.BIG_LAUNCH_BYTES, 1,
                                 accounting.MIN_PROGRAMS)
    no_grid = accounting.Launch("k", "cpu", accounting.BIG_LAUNCH_BYTES, 1)
    assert accounting.fills_gpu(small) and accounting.fills_gpu(big_full)
    assert not accounting.fills_gpu(big_short) and not accounting.fills_gpu(no_grid)


def _train_step(seed_model, x):
    torch.manual_seed(seed_model)
    block = fm.MBConv(8, 8, 3, 1, 4).train()
    fused = fm.FusedMBConv.from_module(block)
    x = x.clone().requires_grad_()
    with fm.use_backend("triton"):
        out = fused(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return [out, x.grad, *(p.grad for p in fused.parameters()), *fused.buffers()]


def test_reruns_are_bit_identical():
    x = torch.randn(3, 8, 24, 24, generator=torch.Generator().manual_seed(2))
    first, second = _train_step(0, x), _train_step(0, x)
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {i} differs between two identical runs"


@pytest.mark.parametrize("rows,columns,outs", [(1000, 3, 2), (700, 40, 1), (40, 5, 2)])
def test_sum_rows_tree_matches_the_sum(rows, columns, outs):
    part = torch.randn(rows, columns * outs)
    got = [torch.full((columns,), float("nan")) for _ in range(outs)]  # poisoned
    common.sum_rows(part, tuple(got), common.acc_type(torch.float32))
    ref = part.double().sum(0).view(outs, columns)
    for j in range(outs):
        assert_close_by_rule(got[j], part.view(rows, outs, columns)[:, j].sum(0), ref[j],
                             torch.float32, f"output {j}")


@pytest.mark.parametrize("images,tiles,tile_p,positions,channels",
                         [(300, 2, 32, 50, 3), (70, 3, 16, 40, 40), (4, 5, 8, 37, 2)])
def test_finalize_tree_matches_the_batch_statistics(images, tiles, tile_p, positions,
                                                    channels):
    """(mean, M2) rows of tiles of ``positions``-position images, merged by the tree, equal
    the statistics of the values the tiles summarize."""
    values = torch.randn(images, positions, channels) * 3 + 5
    part = torch.empty(images * tiles, 2 * channels)
    for t in range(tiles):
        chunk = values[:, t * tile_p:(t + 1) * tile_p].double()
        mean = chunk.mean(1)
        part[t::tiles, :channels] = mean.float()
        part[t::tiles, channels:] = ((chunk - mean[:, None]) ** 2).sum(1).float()
    mean = torch.full((channels,), float("nan"))
    var = torch.full((channels,), float("nan"))
    common.finalize_stats(part, mean, var, positions, tiles, tile_p,
                          common.acc_type(torch.float32))
    flat = values.reshape(-1, channels)
    ref_var, ref_mean = torch.var_mean(flat.double(), dim=0, unbiased=False)
    eager_var, eager_mean = torch.var_mean(flat, dim=0, unbiased=False)
    assert_close_by_rule(mean, eager_mean, ref_mean, torch.float32, "mean")
    assert_close_by_rule(var, eager_var, ref_var, torch.float32, "variance")


def test_cpu_backend_reports_its_launchers_grids():
    """The "cpu" backend: the C++ CPU kernels have no grid ("n/a"); under the CUDA emulation
    (tests/emulated_cuda_suite.py loads csrc/cuda/ as the "cpu" backend) each logical kernel
    carries the grids its C++ launchers used, the same in a dry run as in a real one."""
    from fused_mbconv import extension

    usable, reason = fm.backends.backend_status("cpu", "cpu")
    assert usable or "not built" in reason, reason
    if not usable:  # nothing compiled to run here; the build check is test_extension's
        return
    real = geometry.block_launches(SPLIT_BLOCK, 3, "cpu", dry_run=False)
    launches = real[0] + real[1]
    assert launches and all(launch.backend == "cpu" for launch in launches)
    if not extension._emulated():
        assert all(launch.programs is None and not launch.grids for launch in launches)
        return
    dry = geometry.block_launches(SPLIT_BLOCK, 3, "cpu", dry_run=True)
    assert [(launch.kernel, launch.grids) for launch in dry[0] + dry[1]] == \
        [(launch.kernel, launch.grids) for launch in launches]
    for launch in launches:
        if launch.grids:
            assert launch.programs == max(p for _, p in launch.grids) >= 1
    gridded = {launch.kernel for launch in launches if launch.grids}
    for kernel in ("mbconv_dwconv", "mbconv_squeeze", "mbconv_excite", "mbconv_output",
                   "mbconv_output_grad_reduce", "mbconv_dwconv_grad_reduce",
                   "mbconv_dwconv_dgrad", "mbconv_dwconv_wgrad", "mbconv_excite_grad",
                   "mbconv_project_wgrad", "mbconv_expand_wgrad"):
        assert kernel in gridded, kernel


@pytest.mark.parametrize("batch", geometry.GEOMETRY_BATCHES)
def test_cpu_backend_cuda_kernels_fill_the_gpu(batch):
    """The rule of issue 19 for the CUDA kernels (the "cpu" backend under their emulation):
    every launch of every B0 block, forward and backward, grids sized for 132 SMs. Each has a
    grid of ours, the 1x1 weight gradients (mbconv_expand_wgrad, mbconv_project_wgrad) too;
    the cuDNN 1x1 convolutions run inside launches whose grids are ours."""
    from fused_mbconv import extension

    if not (fm.backends.backend_status("cpu", "cpu")[0] and extension._emulated()):
        pytest.skip("the cpu backend does not run the CUDA kernels' emulation")
    rows = geometry.launch_geometry("cpu", batches=(batch,))
    assert {row.block for row in rows} == {b.id for b in geometry.b0_blocks()}
    assert {"mbconv_excite", "mbconv_excite_grad", "mbconv_expand_wgrad",
            "mbconv_project_wgrad"} <= {row.launch.kernel for row in rows}
    ungridded = {row.launch.kernel for row in rows if row.launch.programs is None}
    assert not ungridded, ungridded
    short = [(row.block, row.phase, row.launch.kernel, row.launch.programs)
             for row in rows if not row.fills_gpu]
    assert not short, short


def test_compile_registry_covers_every_b0_launch(monkeypatch):
    """The spill-free compile report compiles kernels/registry.py's variants: every tiling
    the B0 blocks launch at the geometry batches (tiles shrink with the batch on small maps),
    with its layout and GEMM prologue / epilogue, must be among them (flags that select no
    code, e.g. the activation of a raw operand, are the registry's own choice)."""
    from fused_mbconv.kernels import dwconv_bn_silu, mbconv, registry

    def tiling(kernel_name, constexprs):
        kept = {k: str(v) for k, v in constexprs.items()
                if k.startswith("BLOCK_") or k in ("CHANNELS_LAST", "EPILOGUE", "A_KIND")}
        return kernel_name, tuple(sorted(kept.items()))

    launched = set()
    real_launch = common.launch

    def spy(kernel, grid, bytes_read, bytes_written, *args, **kwargs):
        launched.add(tiling(kernel.__name__, kwargs))
        real_launch(kernel, grid, bytes_read, bytes_written, *args, **kwargs)

    for module in (common, mbconv, dwconv_bn_silu):
        monkeypatch.setattr(module, "launch", spy)
    geometry.launch_geometry("triton")
    compiled = {tiling(kernel.__name__, constexprs)
                for kernel, _, constexprs, _, _ in registry.specializations()}
    missing = sorted(launched - compiled)
    assert launched and not missing, missing[:5]
