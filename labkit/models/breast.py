"""Seed 001's breast-cancer CNN (Lab 05), in PyTorch."""
from __future__ import annotations

import torch
from torch import nn


def _side(image_size: int) -> int:
    """Height (= width) of the last feature map for ``image_size`` inputs (valid convolutions)."""
    s = (image_size - 2) // 2          # conv 3×3, max-pool 2
    s = (s - 2) // 2                   # conv 3×3, max-pool 2
    return s - 1                       # conv 2×2


class BreastCancerCNN(nn.Module):
    """The seed's Keras ``Sequential`` CNN, layer for layer (valid padding, like Keras' default).

    ``features``: conv 3×3 → 128, ReLU, max-pool 2, BatchNorm, dropout 0.2; conv 3×3 → 64, ReLU,
    max-pool 2, BatchNorm, dropout 0.1; conv 2×2 → 32, ReLU, BatchNorm. ``classifier``: flatten,
    dense 64 + ReLU, dropout 0.1, dense 16 + ReLU, dense 1. It returns **one logit** per image,
    shape ``[B]`` (the seed's sigmoid lives in ``BCEWithLogitsLoss`` and in ``torch.sigmoid`` at
    evaluation). The three BatchNorm layers carry running statistics and a ``num_batches_tracked``
    counter: buffers that federated averaging must average too.
    """

    def __init__(self, image_size: int = 128, in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(image_size, int) or isinstance(image_size, bool) or _side(image_size) < 1:
            raise ValueError(f"BreastCancerCNN: image_size={image_size!r} must be an integer >= 12 "
                             f"(two 2×2 poolings and three valid convolutions).")
        self.image_size, self.in_channels = image_size, in_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 128, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.BatchNorm2d(128),
            nn.Dropout(0.2),
            nn.Conv2d(128, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.BatchNorm2d(64), nn.Dropout(0.1),
            nn.Conv2d(64, 32, 2), nn.ReLU(inplace=True), nn.BatchNorm2d(32),
        )
        side = _side(image_size)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(inplace=True), nn.Dropout(0.1),
            nn.Linear(64, 16), nn.ReLU(inplace=True), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per image, ``[B]``, for images ``[B, in_channels, image_size, image_size]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"BreastCancerCNN(image_size={self.image_size}) got input of shape {tuple(x.shape)}; "
                             f"expected [B, {self.in_channels}, {self.image_size}, {self.image_size}].")
        return self.classifier(self.features(x)).squeeze(1)
