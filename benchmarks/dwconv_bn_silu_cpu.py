"""CPU wall time of depthwise conv + BatchNorm (training) + SiLU, forward + backward.

Providers, same process and inputs: eager nn.Conv2d(groups=C) + nn.BatchNorm2d + SiLU, that
module under torch.compile (inductor), and fused_mbconv.functional.dwconv_bn_silu on the "torch"
(reference composite) and "cpu" (csrc/ C++ kernels) backends. Shapes: EfficientNet-B0's two
largest depthwise layers at batch 8.

    python benchmarks/dwconv_bn_silu_cpu.py [--reps 10] [--csv results.csv] [--no-compile]
"""

import argparse

import torch

import fused_mbconv as fm
from cases import DWConvBNSiLU, FusedDWConvBNSiLU
from cpu_timing import on_backend, report, time_ms, write_csv

SHAPES = {  # name: (N, C, H, W, k, stride)
    "b0-112x112-c96-k3-s2": (8, 96, 112, 112, 3, 2),
    "b0-56x56-c144-k3-s1": (8, 144, 56, 56, 3, 1),
}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--csv")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave torch.compile out (skips its compile time)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"backends {fm.available_backends('cpu')}")
    for name, (n, c, h, w, k, s) in SHAPES.items():
        module = DWConvBNSiLU(c, k, s).train()
        x = torch.randn(n, c, h, w)
        with torch.no_grad():
            grad = torch.randn_like(module(x))
        fused = FusedDWConvBNSiLU(module)
        providers = {"eager": module, "fused[torch]": on_backend(fused, "torch"),
                     "fused[cpu]": on_backend(fused, "cpu")}
        if not args.no_compile:
            providers["torch.compile"] = torch.compile(module)
        results = time_ms(providers, x, grad, args.reps)
        rows += report(name, results)
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
