"""A deterministic synthetic image-classification set: coloured shapes on noise.

Four classes (disk, square, triangle, ring), each image with a random colour, size, position
and background, all drawn from a seed: nothing is downloaded, and the same seed gives the same
images on every machine.
"""

from __future__ import annotations

from typing import Tuple

import torch

CLASSES = ("disk", "square", "triangle", "ring")


def shapes_batch(batch: int, resolution: int, generator: torch.Generator
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (batch, 3, resolution, resolution), labels (batch,)) from ``generator``."""
    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    labels = torch.randint(0, len(CLASSES), (batch,), generator=generator)
    axis = torch.linspace(-1, 1, resolution)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    cx, cy = uniform(-0.35, 0.35, batch, 1, 1), uniform(-0.35, 0.35, batch, 1, 1)
    r = uniform(0.3, 0.55, batch, 1, 1)
    dx, dy = xx - cx, yy - cy
    dist = (dx ** 2 + dy ** 2).sqrt()
    masks = torch.stack([
        dist < r,
        torch.maximum(dx.abs(), dy.abs()) < 0.8 * r,
        (dy.abs() < 0.8 * r) & (dx.abs() < 0.5 * (dy + 0.8 * r)),
        (dist < r) & (dist > 0.6 * r),
    ], dim=1)                                            # (batch, classes, H, W)
    mask = masks[torch.arange(batch), labels].unsqueeze(1).float()
    colour = uniform(0.4, 1.0, batch, 3, 1, 1)
    background = uniform(0.0, 0.3, batch, 3, 1, 1) + 0.1 * torch.randn(
        batch, 3, resolution, resolution, generator=generator)
    images = mask * colour + (1 - mask) * background
    return (images - 0.5) / 0.3, labels
