"""Bytes autograd saves in one training forward + loss of a model, side by side in one run:
eager, converted with the blocks fused only (the stem and head put back eager: before the
stem/head ops) and converted with the blocks, stem and head fused. Input and parameters are
excluded (``fused_mbconv.profiling.saved_bytes``, as ``fused-mbconv bench`` counts them).

    python benchmarks/stem_head_saved_bytes.py [--model timm:efficientnet_b0] [--batch 8]
                                                [--resolution 224]
"""

import argparse
import copy

import torch

import fused_mbconv as fm
from fused_mbconv import profiling, verification
from fused_mbconv.convert_stem_head import unfuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:efficientnet_b0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = verification.build_model(args.model).train()
    fused = fm.convert(eager)
    blocks_only = unfuse(copy.deepcopy(fused))
    print(f"{args.model}, batch {args.batch}, {args.resolution}x{args.resolution}, training "
          f"forward + loss, float32, torch {torch.__version__}")
    print(f"{'model':<28} {'saved MB':>9} {'tensors':>8} {'fewer than eager':>17}")
    base = None
    for label, model in (("eager", eager), ("blocks fused", blocks_only),
                         ("blocks + stem + head fused", fused)):
        step = profiling.TrainStep.build(model, args.batch, args.resolution, num_classes=1000,
                                         seed=0)
        saved = profiling.saved_bytes(step.loss, step.activation_exclusions())
        base = base or saved.bytes
        print(f"{label:<28} {saved.bytes / 1e6:>9.1f} {saved.tensors:>8} "
              f"{base / saved.bytes:>16.2f}x")


if __name__ == "__main__":
    main()
