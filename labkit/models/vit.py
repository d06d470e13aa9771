"""A Vision Transformer with a convolutional stem (lab 04, the lung classifier of seed 004).

Shape walk-through for a 128 × 128 image and the defaults (``dim=256``, ``depth=6``, ``heads=8``)::

    image        [B, 3, 128, 128]
    conv stem    3 × (3×3 conv – BN – ReLU) at full resolution, then two stride-2 3×3 convs
                 -> [B, 64, 32, 32]              (4× smaller per side: 16× fewer positions)
    tokens       flatten the 32 × 32 grid -> 1024 tokens, Linear(64 -> 256) each -> [B, 1024, 256]
    + [CLS]      one learnable token in front -> [B, 1025, 256]; + learnable position embedding
    blocks       depth × pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))
    head         LN -> Linear(256 -> num_classes) on the [CLS] token -> logits [B, num_classes]

Patchifying the raw image into 4 × 4 patches would give the same 1024 tokens; the stem gets there
with overlapping convolutions that keep edges and small textures (small lesions). Attention cost
grows with the square of the token count, so the 4× stem divides sequence length by 16 and the
attention matrix by 256 compared with one token per pixel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_int(name: str, value, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"ViT: {name}={value!r} must be an integer >= {low}.")


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3×3 convolution (padding 1, no bias) → BatchNorm → ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def conv_stem(in_channels: int = 3, channels: int = 64) -> nn.Sequential:
    """Three 3×3 conv–BN–ReLU blocks at full resolution, then two stride-2 convs: ``[B, C, H, W]`` →
    ``[B, channels, H/4, W/4]``."""
    half = max(1, channels // 2)
    return nn.Sequential(
        conv_bn_relu(in_channels, half),
        conv_bn_relu(half, half),
        conv_bn_relu(half, channels),
        conv_bn_relu(channels, channels, stride=2),
        conv_bn_relu(channels, channels, stride=2),
    )


class Attention(nn.Module):
    """Multi-head self-attention computed by ``F.scaled_dot_product_attention`` (fused kernels)."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.drop = nn.Dropout(dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each [B, heads, N, head_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(x.shape)
        return self.drop(self.proj(out))

    @torch.no_grad()
    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention probabilities ``[B, heads, N, N]``, recomputed explicitly (the fused kernel
        never materialises them) — for visualisation only, not used in training."""
        q, k, _ = self._qkv(x)
        return torch.softmax((q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim), dim=-1)


class MLP(nn.Sequential):
    """Linear(dim → mlp_dim) → GELU → dropout → Linear(mlp_dim → dim) → dropout."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp_dim, dim), nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    Normalising *before* each sub-layer keeps the residual path an identity, so gradients reach
    the first block unchanged and training is stable without a learning-rate warm-up trick.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer with a convolutional stem; input float ``[B, in_channels, H, W]`` with ``H``
    and ``W`` divisible by 4, output logits ``[B, num_classes]``.

    The position embedding is learned for ``image_size``; other sizes (divisible by 4) work too —
    the embedding grid is interpolated bicubically, so a model trained at 128 px runs at 224 px.
    The defaults have about 5.1 M parameters at 128 px (the seed's "~5 M").
    """

    def __init__(self, num_classes: int = 9, image_size: int = 128, in_channels: int = 3, dim: int = 256,
                 depth: int = 6, heads: int = 8, mlp_dim: int = 1024, stem_channels: int = 64,
                 dropout: float = 0.1, attn_dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("dim", dim),
                            ("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim),
                            ("stem_channels", stem_channels)):
            _check_int(name, value)
        _check_int("image_size", image_size, low=4)
        if dim % heads:
            near = [h for h in range(1, min(dim, 64) + 1) if dim % h == 0]
            raise ValueError(
                f"ViT: dim={dim} is not divisible by heads={heads} (each head gets dim/heads features); "
                f"use heads in {near[-6:]} for dim={dim}, or dim={math.ceil(dim / heads) * heads}.")
        if image_size % 4:
            raise ValueError(
                f"ViT: image_size={image_size} is not divisible by 4 (the conv stem downsamples 4× per side); "
                f"use {max(4, image_size // 4 * 4)} or {image_size // 4 * 4 + 4}.")
        for name, value in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"ViT: {name}={value!r} must be in [0, 1).")
        self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
        self.dim, self.depth, self.heads, self.mlp_dim = dim, depth, heads, mlp_dim
        self.grid = image_size // 4

        self.stem = conv_stem(in_channels, stem_channels)
        self.to_tokens = nn.Linear(stem_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout, attn_dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Embeddings ~ N(0, 0.02²); convolutions He-initialised; linear layers keep PyTorch's fan-in-scaled
        default (std 1/√(3·fan_in)). A fixed std of 0.02 for every linear layer (BERT's choice, tuned for width
        768) is several times smaller than that at this ViT's widths: query and key start so small that every
        attention row is almost uniform, [CLS] sees only the mean of the tokens, and a short run on a few
        hundred images never leaves "which modality is it" (balanced accuracy 2/9 on the lung stand-in)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def no_weight_decay(self) -> set[str]:
        """Parameters that are embeddings, not weights of a layer: AdamW leaves them undecayed (timm's
        convention; see ``labkit.labs.lung_vit.lightning_module.no_decay_names``)."""
        return {"pos_embed", "cls_token"}

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The position embedding for an ``h × w`` token grid (interpolated when it differs from the
        grid the model was built for); ``[1, 1 + h*w, dim]``."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.reshape(1, self.grid, self.grid, self.dim).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, self.dim)], dim=1)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stem + projection + [CLS] + position: ``[B, 1 + h*w, dim]`` and the grid ``(h, w)``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ViT(in_channels={self.in_channels}) got input of shape {tuple(x.shape)}; "
                             f"expected [B, {self.in_channels}, H, W].")
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"ViT: input image_size {tuple(x.shape[-2:])} is not divisible by 4 "
                             f"(the conv stem downsamples 4× per side); resize to a multiple of 4.")
        feats = self.stem(x)                                   # [B, C, H/4, W/4]
        h, w = feats.shape[-2:]
        tokens = self.to_tokens(feats.flatten(2).transpose(1, 2))  # [B, h*w, dim]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embedding(h, w)
        return self.pos_drop(tokens), (h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised [CLS] embedding ``[B, dim]``."""
        tokens, _ = self.tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(self.forward_features(x))

    @torch.no_grad()
    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """How much the [CLS] token attends to each grid position in the last block:
        ``[B, heads, H/4, W/4]`` (each map sums to at most 1; the rest goes to [CLS] itself).

        The last block's attention probabilities are recomputed explicitly for this picture.
        """
        tokens, (h, w) = self.tokens(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        attn = self.blocks[-1].attn.weights(self.blocks[-1].norm1(tokens))  # [B, heads, N, N]
        return attn[:, :, 0, 1:].reshape(x.shape[0], self.heads, h, w)

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, grid={self.grid}x{self.grid}, dim={self.dim}, depth={self.depth}, "
                f"heads={self.heads}, mlp_dim={self.mlp_dim}")


def sequence_stats(image_size: int, downsample: int = 4) -> dict:
    """Token counts and attention-matrix sizes with and without the stem's downsampling (for the lab).

    ``{"pixels": S*S, "tokens": (S/d)^2, "sequence_ratio": d^2, "attention_pixels": (S*S)^2,
    "attention_tokens": (S/d)^4, "attention_ratio": d^4}`` — the [CLS] token is left out.
    """
    if image_size % downsample:
        raise ValueError(f"image_size={image_size} is not divisible by {downsample}.")
    pixels, tokens = image_size * image_size, (image_size // downsample) ** 2
    return {"pixels": pixels, "tokens": tokens, "sequence_ratio": pixels // tokens,
            "attention_pixels": pixels ** 2, "attention_tokens": tokens ** 2,
            "attention_ratio": pixels ** 2 // tokens ** 2}
