"""Whole-batch augmentation on the device: random flip + rotation by index gather, then normalise.

The seed project rotated every PIL image in a DataLoader worker (``RandomRotation(10)``). Here a
batch of cached uint8 tensors is augmented at once, on whatever device it lives on: for one image
size the nearest-neighbour source index of every output pixel is computed once per angle (and for
the mirrored image), and each sample gathers its pixels through a randomly chosen map. Then
``torchvision.transforms.v2`` converts to float and normalises.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.transforms import v2


def rotation_index_maps(height: int, width: int, angles: Sequence[float], flips: Sequence[bool] = (False, True),
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Nearest-neighbour gather maps, int64 ``[len(angles) * len(flips), height * width]``.

    Entry ``[k, p]`` is the flat source index of output pixel ``p`` for map ``k = angle * len(flips)
    + flip`` (the image is mirrored first, then rotated counter-clockwise about its centre by the
    angle in degrees); ``height * width`` marks pixels that come from outside (filled with 0).
    """
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    cy, cx = (height - 1) / 2, (width - 1) / 2
    maps = []
    for angle in angles:
        t = math.radians(angle)
        sx = math.cos(t) * (xs - cx) - math.sin(t) * (ys - cy) + cx
        sy = math.sin(t) * (xs - cx) + math.cos(t) * (ys - cy) + cy
        ix, iy = sx.round().long(), sy.round().long()
        inside = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
        for flip in flips:
            col = (width - 1 - ix) if flip else ix
            maps.append(torch.where(inside, iy * width + col, height * width).flatten())
    return torch.stack(maps).to(device)


class BatchAugment(nn.Module):
    """uint8 ``[B, C, H, W]`` on any device → float32 ``[B, out_channels, H, W]``, normalised.

    With ``train=True`` each sample is mirrored with probability ½ (``flip``) and rotated by an
    angle drawn from ``[-degrees, degrees]`` in ``angle_step`` steps (nearest neighbour, corners
    filled with 0). Augmentation also stops when the module is put in ``.eval()`` mode. A grayscale
    input is repeated to ``out_channels``. ``seed`` makes the random choices repeatable.

    On the CPU the few passes over a batch are memory-bound and small, so they run on
    ``cpu_threads`` threads (default 1; ``None`` keeps torch's setting): more threads gain little
    there and slow down badly when other processes share the cores.
    """

    def __init__(self, train: bool, flip: bool = True, degrees: float = 10.0, mean: float | Sequence[float] = 0.5,
                 std: float | Sequence[float] = 0.5, out_channels: int = 3, angle_step: float = 1.0,
                 seed: int | None = None, cpu_threads: int | None = 1) -> None:
        super().__init__()
        if degrees < 0 or degrees > 180:
            raise ValueError(f"degrees={degrees!r}: need a value in [0, 180]")
        if out_channels not in (1, 3):
            raise ValueError(f"out_channels={out_channels!r}: use 1 (grayscale) or 3 (what RGB models expect)")
        if angle_step <= 0:
            raise ValueError(f"angle_step={angle_step!r}: need a positive step in degrees")
        self.augment, self.flip, self.degrees, self.out_channels = bool(train), bool(flip), float(degrees), out_channels
        n = int(round(2 * self.degrees / angle_step)) + 1 if self.degrees > 0 else 1
        self.angles = torch.linspace(-self.degrees, self.degrees, n).tolist() if n > 1 else [0.0]
        self.flips = (False, True) if self.flip else (False,)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.cpu_threads = cpu_threads
        mean = [float(mean)] * out_channels if isinstance(mean, (int, float)) else [float(m) for m in mean]
        std = [float(std)] * out_channels if isinstance(std, (int, float)) else [float(s) for s in std]
        if len(mean) != out_channels or len(std) != out_channels:
            raise ValueError(f"mean={mean} / std={std}: need one value or {out_channels} values")
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        # Grayscale in, equal statistics per channel: normalise the one channel, then repeat it (cheaper).
        uniform = len(set(mean)) == 1 and len(set(std)) == 1
        self.normalize_gray = (v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean[:1], std[:1])])
                               if uniform else None)
        self._maps: dict[tuple, torch.Tensor] = {}

    @property
    def random(self) -> bool:
        """True when this module augments (``train=True``, training mode, flip or rotation on)."""
        return self.augment and self.training and (self.flip or self.degrees > 0)

    def index_maps(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The gather maps for this image size on ``device`` (built once, then reused)."""
        key = (height, width, str(device))
        if key not in self._maps:
            self._maps[key] = rotation_index_maps(height, width, self.angles, self.flips, device)
        return self._maps[key]

    def flip_rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Mirror/rotate each sample of ``x`` (any dtype, ``[B, C, H, W]``) with its own random map."""
        b, c, h, w = x.shape
        maps = self.index_maps(h, w, x.device)
        choice = torch.randint(len(maps), (b,), generator=self.generator).to(x.device, non_blocking=True)
        flat = torch.cat([x.reshape(b, c, h * w), x.new_zeros(b, c, 1)], dim=2)
        index = maps[choice].unsqueeze(1).expand(b, c, h * w)
        return torch.gather(flat, 2, index).view(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Augment (when training) and normalise a uint8 batch; everything stays on ``x.device``."""
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"BatchAugment expects uint8 images [B, C, H, W]; got {x.dtype} with shape "
                             f"{tuple(x.shape)}. Pass the loader's batches before any conversion.")
        threads = torch.get_num_threads()
        limit = x.device.type == "cpu" and self.cpu_threads is not None and threads > self.cpu_threads
        if limit:
            torch.set_num_threads(self.cpu_threads)
        try:
            return self._augment_normalise(x)
        finally:
            if limit:
                torch.set_num_threads(threads)

    def _augment_normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.random:
            x = self.flip_rotate(x)
        if x.shape[1] == self.out_channels:
            return self.normalize(x)
        if x.shape[1] != 1:
            raise ValueError(f"images have {x.shape[1]} channels; out_channels={self.out_channels} needs 1 or "
                             f"{self.out_channels}")
        if self.normalize_gray is not None:
            return self.normalize_gray(x).repeat(1, self.out_channels, 1, 1)
        return self.normalize(x.expand(-1, self.out_channels, -1, -1))

    def extra_repr(self) -> str:
        return (f"train={self.augment}, flip={self.flip}, degrees={self.degrees}, angles={len(self.angles)}, "
                f"out_channels={self.out_channels}")


def batch_transform(train: bool, out_channels: int = 3, **kw) -> BatchAugment:
    """The standard batch transform of the labs: ``BatchAugment(train, out_channels=…, **kw)``."""
    return BatchAugment(train, out_channels=out_channels, **kw)
