"""CPU wall time of the fused block's depthwise kernels alone
(csrc/cpu/kernels/mbconv_depthwise.cpp), beside aten's depthwise convolution at the same shape as
a reference point on a shared machine.

    python benchmarks/mbconv_dwconv_ops_cpu.py [--shape N C H k stride] [--reps 30] [--threads 2]

Default shape: EfficientNet-B0 stage 3.1's depthwise layer at batch 8 (240 channels, 28x28, k5).
Set FUSED_MBCONV_LIBRARY to time another build of the kernels.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fused_mbconv as fm


def median_ms(fn, reps):
    fn()
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=5, default=[8, 240, 28, 5, 1],
                        metavar=("N", "C", "H", "K", "STRIDE"))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    available, why = fm.backends.backend_status("cpu", "cpu")
    if not available:
        raise SystemExit(f"the C++ CPU kernels are not available: {why}")
    n, c, hw, k, s = args.shape
    torch.manual_seed(0)
    h = torch.randn(n, c, hw, hw).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k)
    bn = (torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c))
    ops = torch.ops.fused_mbconv_ext
    d = ops.mbconv_dwconv_forward(h, weight, s, *bn, 1e-5, "silu", True)[0]
    grad_a2, grad_pooled = torch.randn_like(d), torch.randn(n, c)
    sums = (torch.randn(c), torch.randn(c))

    def backward(mask):
        return lambda: ops.mbconv_dwconv_backward(grad_a2, grad_pooled, d, h, weight, s, *bn,
                                                  1e-5, "silu", *sums, *bn, 1e-5, True, mask)

    cases = {
        "dwconv_forward (BN1 + SiLU prologue, stencil, BN2 moments)":
            lambda: ops.mbconv_dwconv_forward(h, weight, s, *bn, 1e-5, "silu", True),
        "dwconv_backward, input and weight gradients": backward([True, True]),
        "dwconv_backward, input gradient": backward([True, False]),
        "dwconv_backward, weight gradient": backward([False, True]),
        "aten depthwise conv2d forward (reference)":
            lambda: F.conv2d(h, weight, None, s, k // 2, 1, c),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape N={n} C={c} "
          f"H=W={hw} k={k} stride={s}, channels_last")
    for name, fn in cases.items():
        print(f"{name:62s} {median_ms(fn, args.reps):8.3f} ms")


if __name__ == "__main__":
    main()
