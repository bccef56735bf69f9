"""The measurement rules of fused_mbconv.profiling, on cases whose answer is known."""

import torch

import fused_mbconv as fm
from fused_mbconv import accounting, profiling


def test_tensor_bytes_counts_broadcast_dimensions_once():
    x = torch.randn(4, 8)
    assert profiling.tensor_bytes(x) == 4 * 8 * 4
    assert profiling.tensor_bytes(torch.randn(8).expand(4, 8)) == 8 * 4
    assert profiling.tensor_bytes(torch.empty(0, 3)) == 0


def test_traffic_of_an_add_and_views_are_free():
    x, y = torch.randn(1000), torch.randn(1000)
    traffic = profiling.count_traffic(lambda: (x.view(10, 100).t(), x + y))
    assert traffic.by_kernel() == {"add": 1}
    assert (traffic.bytes_read, traffic.bytes_written) == (8000, 4000)
    assert traffic.modeled_seconds == 12000 / accounting.H100_HBM_BYTES_PER_S


def test_overwritten_arguments_are_written_not_read():
    x, y = torch.randn(100), torch.randn(100)
    traffic = profiling.count_traffic(lambda: x.copy_(y))
    assert (traffic.bytes_read, traffic.bytes_written) == (400, 400)


def test_unreported_fused_op_counts_its_aten_ops():
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    with fm.use_backend("torch"):
        traffic = profiling.count_traffic(
            lambda: fm.functional.dwconv_bn_silu(x, w, torch.zeros(8), torch.ones(8),
                                                 training=True))
    kernels = traffic.by_kernel()
    assert "conv2d" in kernels or "convolution" in kernels
    assert not any(name.startswith("dwconv_bn_silu") for name in kernels)


@torch.library.custom_op("fused_mbconv::_profiling_probe", mutates_args=())
def _probe(x: torch.Tensor) -> torch.Tensor:
    accounting.note_launch("probe_kernel", "test", 111, 222)
    return x * 2  # an implementation detail the launcher's report replaces


def test_reported_launches_replace_the_ops_inside_a_fused_op():
    x = torch.randn(10)
    traffic = profiling.count_traffic(lambda: torch.ops.fused_mbconv._profiling_probe(x) + 1)
    assert traffic.by_kernel() == {"probe_kernel": 1, "add": 1}
    assert traffic.bytes_read == 111 + 40


def test_saved_bytes_excludes_given_tensors_and_counts_storages_once():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64, requires_grad=True)

    def forward():
        h = x @ w          # saves x and w (both need gradients)
        return torch.sigmoid(h) * h  # saves sigmoid's output and h (twice: once)

    everything = profiling.saved_bytes(forward)
    activations = profiling.saved_bytes(forward, exclude=[x, w])
    assert everything.bytes == activations.bytes + x.nbytes + w.nbytes
    assert activations.bytes == 2 * 32 * 64 * 4


def test_time_fn_excludes_warmup_and_runs_setup_untimed():
    calls = []
    timing = profiling.time_fn(lambda v: calls.append(v), "cpu", warmup=2, repeats=3,
                               setup=lambda: (len(calls),))
    assert calls == [0, 1, 2, 3, 4] and len(timing.samples) == 3
    assert profiling.peak_memory(lambda: None, "cpu") is None
