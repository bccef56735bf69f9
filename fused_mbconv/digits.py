"""Real images for the training demo without a download: scikit-learn's bundled handwritten
digits (``load_digits``: 1,797 8x8 grey images of 0..9), upsampled to the network's resolution,
split once into training and held-out images by a seed."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .verification import MissingPackage

CLASSES = tuple(str(d) for d in range(10))
HELD_OUT = 0.2  # fraction of the images never trained on


@dataclass
class DigitSplit:
    train_images: torch.Tensor  # (N, 3, R, R), normalized
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor

    def batches(self, batch: int, steps: int, generator: torch.Generator):
        """``steps`` (images, labels) batches: the training images in a fresh seeded order each
        epoch, so the same generator state gives the same batches."""
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if len(order) < batch:
                order = torch.cat([order, torch.randperm(len(self.train_labels),
                                                         generator=generator)])
            idx, order = order[:batch], order[batch:]
            yield self.train_images[idx], self.train_labels[idx]


def load(resolution: int, seed: int) -> DigitSplit:
    """The digits at ``resolution`` x ``resolution`` (bilinear), as 3 equal channels
    normalized to zero mean and unit variance, split by ``seed``."""
    if importlib.util.find_spec("sklearn") is None:
        raise MissingPackage("--data digits needs scikit-learn, which is not installed: "
                             "pip install scikit-learn (or use --data synthetic)")
    datasets = importlib.import_module("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear",
                           align_corners=False)
    images = ((images - images.mean()) / images.std()).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held_out = int(round(HELD_OUT * len(labels)))
    val, train = order[:held_out], order[held_out:]
    return DigitSplit(images[train], labels[train], images[val], labels[val])
