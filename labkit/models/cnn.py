"""The Alzheimer MRI baseline CNN of lab 01 (and the model every distributed lab scales out)."""
from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 convolution (padding 1) → BatchNorm → ReLU → 2×2 max-pool: halves height and width."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class AlzheimerCNN(nn.Module):
    """Four conv blocks (32/64/128/256 channels) and a three-layer classifier head.

    ``features``: 4 × (conv 3×3 – BN – ReLU – max-pool 2), so an ``S×S`` image becomes
    ``256 × S/16 × S/16``; ``classifier``: flatten → FC 512 + ReLU + dropout 0.5 → FC 128 + ReLU +
    dropout 0.3 → FC ``num_classes`` (logits; use ``softmax`` for probabilities).

    The first FC layer is sized from ``image_size``, which must be divisible by 16. At 128 px the
    model has about **8.8 M** parameters (the source project's README says "~16.7 M", which does
    not match this architecture); 95 % of them sit in the first FC layer (16384 × 512). Use
    :func:`labkit.models.summary.count_parameters` for the exact number.

    Input: float ``[B, in_channels, image_size, image_size]`` (normalised); output ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 4, image_size: int = 128, in_channels: int = 3) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 1), ("image_size", image_size, 16),
                                 ("in_channels", in_channels, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"AlzheimerCNN: {name}={value!r} must be an integer >= {low}.")
        if image_size % 16:
            raise ValueError(
                f"AlzheimerCNN: image_size={image_size} is not divisible by 16 (four 2×2 poolings); "
                f"use e.g. {max(16, image_size // 16 * 16)} or {image_size // 16 * 16 + 16}.")
        self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
        channels = (in_channels, 32, 64, 128, 256)
        self.features = nn.Sequential(*(conv_block(c_in, c_out) for c_in, c_out in zip(channels, channels[1:])))
        side = image_size // 16
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * side * side, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, 128), nn.ReLU(inplace=True), nn.Dropout(0.3),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, in_channels, image_size, image_size]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"AlzheimerCNN(image_size={self.image_size}, in_channels={self.in_channels}) got input of shape "
                f"{tuple(x.shape)}; expected [B, {self.in_channels}, {self.image_size}, {self.image_size}] "
                f"(build the model with the image_size of your data).")
        return self.classifier(self.features(x))
