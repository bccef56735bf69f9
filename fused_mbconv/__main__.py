"""``python -m fused_mbconv``: build EfficientNet-B0 and run one training step on random data."""

import time

import torch

import fused_mbconv as fm


def main() -> None:
    torch.manual_seed(0)
    model = fm.efficientnet_b0()
    params = sum(p.numel() for p in model.parameters())
    images = torch.randn(2, 3, 224, 224)
    labels = torch.randint(0, 1000, (2,))
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    elapsed = time.perf_counter() - start
    print(f"fused_mbconv {fm.__version__}, torch {torch.__version__}, "
          f"backends: {', '.join(fm.available_backends())}")
    print(f"efficientnet_b0: {params:,} parameters; one forward+backward at batch 2, 224x224 "
          f"on CPU: loss {loss.item():.4f}, {elapsed:.2f} s")


if __name__ == "__main__":
    main()
