"""CPU wall time of one EfficientNet-B0 MBConv block, training forward + backward.

Providers, same process, inputs and weights, interleaved round-robin: eager ``fm.MBConv``,
that block under torch.compile (inductor), and ``fm.FusedMBConv`` on the "torch" (reference
composite) and "cpu" (csrc/ C++ kernels) backends. Batch 8 at B0's stage shapes; inputs in
channels_last (``--layout nchw`` for NCHW).

    python benchmarks/mbconv_block_cpu.py [--reps 10] [--threads 2] [--layout channels_last]
                                          [--shapes NAME ...] [--csv out.csv] [--no-compile]
"""

import argparse
import copy

import torch

import fused_mbconv as fm
from cpu_timing import on_backend, report, time_ms, write_csv

SHAPES = {  # name: (in, out, kernel, stride, expand, input H = W)
    "stage2.0 16->24 k3 s2 112x112": (16, 24, 3, 2, 6, 112),
    "stage2.1 24->24 k3 s1 56x56": (24, 24, 3, 1, 6, 56),
    "stage3.0 24->40 k5 s2 56x56": (24, 40, 5, 2, 6, 56),
    "stage3.1 40->40 k5 s1 28x28": (40, 40, 5, 1, 6, 28),
}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--providers", nargs="*",
                        default=["eager", "torch.compile", "fused[torch]", "fused[cpu]"])
    parser.add_argument("--csv")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, layout {args.layout}, "
          f"batch {args.batch}, backends {fm.available_backends('cpu')}")
    rows = []
    for name in args.shapes:
        cin, cout, k, s, expand, hw = SHAPES[name]
        eager = fm.MBConv(cin, cout, k, s, expand).train().to(memory_format=fmt)
        fused = fm.FusedMBConv.from_module(copy.deepcopy(eager)).train()
        x = torch.randn(args.batch, cin, hw, hw).contiguous(memory_format=fmt)
        with torch.no_grad():
            grad = torch.randn_like(copy.deepcopy(eager)(x))
        providers = {"eager": eager, "fused[torch]": on_backend(fused, "torch"),
                     "fused[cpu]": on_backend(fused, "cpu")}
        if not args.no_compile:
            providers["torch.compile"] = torch.compile(copy.deepcopy(eager))
        providers = {p: providers[p] for p in args.providers if p in providers}
        results = time_ms(providers, x, grad, args.reps)
        rows += report(name, results, layout=args.layout, threads=torch.get_num_threads())
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
