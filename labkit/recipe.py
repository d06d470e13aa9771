"""The seed-002 training recipe as small parts that plug into :func:`labkit.train.train_one_epoch`.

- augmentation: :class:`RGBTransform` — per-image random-resized crop + flip, on the device;
- MixUp (α 0.2) / CutMix (α 1.0): :func:`mixup_cutmix` (``torchvision.transforms.v2``, soft labels);
- label smoothing 0.1: :func:`loss_fn` (``nn.CrossEntropyLoss(label_smoothing=…)``);
- AdamW, weight decay 1e-4: :func:`make_optimizer`; OneCycleLR (pct_start 0.3, cosine), stepped per
  batch: :func:`make_scheduler`;
- EMA of the weights: :func:`make_ema` (``torch.optim.swa_utils.AveragedModel``, decay warm-up);
- progressive resizing (64→128→224): :func:`progressive_sizes`, :func:`progressive_schedule`;
- LR range test: :func:`lr_finder`, :func:`suggest_lr`, :func:`plot_lr_finder`;
- every switch of one run: :class:`AblationConfig`, :func:`make_config`, :func:`schedule`, :func:`peak_lr`.

Gradient clipping, AMP and ``channels_last`` are handled by ``train_one_epoch`` itself.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.ops import roi_align
from torchvision.transforms import v2
from tqdm.auto import tqdm

from labkit.params import RULES, ParameterError, Rule
from labkit.train import scale_lr


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The seed's progressive resizing on ImageNet: (image size, batch size, epochs out of 90).
SEED_PHASES = ((64, 256, 30), (128, 128, 20), (224, 64, 40))


# --------------------------------------------------------------------------- augmentation
class RGBTransform(nn.Module):
    """uint8 ``[B, 3, H, W]`` (on any device) → normalised float ``[B, 3, size, size]``.

    ``train=True``: a random-resized crop (area ``scale``, aspect ``ratio``) and a horizontal flip,
    drawn **per image** yet done for the whole batch in one ``torchvision.ops.roi_align`` call on the
    device. ``train=False``: a plain (antialiased) resize. Then ImageNet mean/std normalisation.
    """

    def __init__(self, size: int, train: bool, scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"RGBTransform: scale={scale} must satisfy 0 < low <= high <= 1.")
        self.size, self.train_mode, self.scale, self.ratio, self.flip = int(size), train, scale, ratio, flip
        self.mean, self.std = list(mean), list(std)

    def extra_repr(self) -> str:
        return f"size={self.size}, train={self.train_mode}, scale={self.scale}, flip={self.flip}"

    def _boxes(self, b: int, h: int, w: int, device) -> torch.Tensor:
        area = torch.empty(b, device=device).uniform_(*self.scale) * h * w
        log_r = torch.empty(b, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        bw = (area * log_r.exp()).sqrt().clamp(1, w)
        bh = (area / log_r.exp()).sqrt().clamp(1, h)
        x1 = torch.rand(b, device=device) * (w - bw)
        y1 = torch.rand(b, device=device) * (h - bh)
        idx = torch.arange(b, device=device, dtype=torch.float32)
        return torch.stack([idx, x1, y1, x1 + bw, y1 + bh], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"RGBTransform expects [B, 3, H, W] images, got shape {tuple(x.shape)}.")
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        b, _, h, w = x.shape
        if self.train_mode:
            # sampling_ratio=-1 averages ~one sample per source pixel: antialiased when shrinking.
            x = roi_align(x, self._boxes(b, h, w, x.device), output_size=self.size, spatial_scale=1.0,
                          sampling_ratio=-1, aligned=True)
            if self.flip:
                mask = torch.rand(b, device=x.device) < 0.5
                x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        elif (h, w) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return v2.functional.normalize(x, self.mean, self.std)


def mixup_cutmix(num_classes: int, mixup_alpha: float = 0.2, cutmix_alpha: float = 1.0) -> Callable | None:
    """A batch transform ``(x, y) -> (x_mixed, soft_y [B, num_classes])`` or ``None`` when both are off.

    Each batch gets MixUp (blend two images, α ``mixup_alpha``) or CutMix (paste a box of one image
    into another, α ``cutmix_alpha``) with equal chance, via ``torchvision.transforms.v2``. The soft
    labels are the two classes weighted by the mixing proportion (they sum to 1).
    """
    for name, a in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if not isinstance(a, (int, float)) or a < 0:
            raise ValueError(f"mixup_cutmix: {name}={a!r} must be a number >= 0 (0 turns it off).")
    ops = []
    if mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
    if cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def loss_fn(label_smoothing: float = 0.1) -> nn.Module:
    """Cross-entropy with label smoothing; accepts class indices or soft targets (MixUp/CutMix)."""
    return nn.CrossEntropyLoss(label_smoothing=float(label_smoothing))


# --------------------------------------------------------------------------- optimiser and schedule
def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 1e-4) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the seed: weight decay 1e-4)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int,
                   pct_start: float = 0.3) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR, stepped once per batch: warm up for ``pct_start`` of the steps, then cosine down."""
    if total_steps < 1:
        raise ValueError(f"make_scheduler: total_steps={total_steps} must be >= 1 (no training batches?).")
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                               pct_start=pct_start, anneal_strategy="cos")


# --------------------------------------------------------------------------- EMA
def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """The decay used at update ``step``: ``min(decay, (1 + step) / (10 + step))`` with warm-up (timm/TF).

    An EMA averages over roughly ``1 / (1 - decay)`` updates; the warm-up lets it follow the model
    closely at first, so a short run is not dominated by the random initial weights.
    """
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def ema_multi_avg_fn(decay: float, warmup: bool = True) -> Callable:
    """A ``multi_avg_fn`` for ``AveragedModel``: ``get_ema_multi_avg_fn`` with the warmed-up decay."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay={decay!r} must be in [0, 1] (e.g. 0.999).")

    def update(ema_params, model_params, num_averaged) -> None:
        get_ema_multi_avg_fn(ema_decay_at(int(num_averaged), decay, warmup))(ema_params, model_params, num_averaged)

    return update


def make_ema(model: nn.Module, decay: float = 0.999, warmup: bool = True) -> AveragedModel:
    """An EMA copy of ``model`` (unwrapped from DDP) that also averages BatchNorm buffers.

    Call ``ema.update_parameters(model)`` after each optimizer step (``train_one_epoch(ema=…)``
    does) and validate with ``ema.module``.
    """
    model = getattr(model, "module", model)
    return AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(decay, warmup), use_buffers=True)


# --------------------------------------------------------------------------- progressive resizing
def progressive_sizes(final_size: int,
                      ratios: Sequence[float] = tuple(s / SEED_PHASES[-1][0] for s, _, _ in SEED_PHASES),
                      multiple: int = 8, min_size: int = 16) -> tuple[int, ...]:
    """The seed's 64→128→224 scaled to ``final_size`` (e.g. 64 → (16, 40, 64)), multiples of ``multiple``."""
    sizes = [max(min_size, int(round(final_size * r / multiple)) * multiple) for r in ratios[:-1]]
    return (*[min(s, final_size) for s in sizes], int(final_size))


def progressive_schedule(epochs: int, sizes: Sequence[int] = (64, 128, 224),
                         batch_sizes: Sequence[int] = (256, 128, 64),
                         fractions: Sequence[float] = tuple(e for _, _, e in SEED_PHASES)) -> list[tuple[int, int]]:
    """``(image_size, batch_size)`` for each epoch: phase ``i`` covers ``fractions[i]`` of the run.

    The seed on 90 epochs: 1–30 at 64 px (batch 256), 31–50 at 128 (128), 51–90 at 224 (64). Epoch
    ``e`` (0-based) belongs to the first phase whose cumulative share reaches ``(e + 1) / epochs``,
    so the last epoch always runs at the final size, however short the run.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"progressive_schedule: epochs={epochs!r} must be an integer >= 1.")
    if not len(sizes) == len(batch_sizes) == len(fractions) or not sizes:
        raise ValueError("progressive_schedule: sizes, batch_sizes and fractions need one entry per phase.")
    total = float(sum(fractions))
    cum, acc = [], 0.0
    for f in fractions:
        acc += f / total
        cum.append(acc)
    plan = []
    for e in range(epochs):
        phase = next(i for i, c in enumerate(cum) if (e + 1) / epochs <= c + 1e-9)
        plan.append((int(sizes[phase]), int(batch_sizes[phase])))
    return plan


# --------------------------------------------------------------------------- LR range test
def lr_finder(model: nn.Module, loader, loss_fn: Callable, *, device, transform: Callable | None = None,
              batch_transform: Callable | None = None, optimizer: torch.optim.Optimizer | None = None,
              start_lr: float = 1e-7, end_lr: float = 1.0, steps: int = 100, smooth: float = 0.05,
              diverge: float = 4.0, progress: bool = True) -> pd.DataFrame:
    """LR range test: raise the learning rate exponentially from ``start_lr`` to ``end_lr`` over
    ``steps`` batches, recording the loss; stop early once the smoothed loss exceeds ``diverge`` ×
    its best (or is not finite). Model and optimizer state are restored afterwards.

    Returns a DataFrame with ``lr``, ``loss`` and ``smooth_loss`` (bias-corrected EMA of the loss).
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"lr_finder: need 0 < start_lr < end_lr, got {start_lr} and {end_lr}.")
    if steps < 2:
        raise ValueError(f"lr_finder: steps={steps} must be >= 2.")
    device = torch.device(device)
    opt = optimizer if optimizer is not None else make_optimizer(model, start_lr)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    was_training = model.training
    rows, avg, best = [], 0.0, math.inf
    try:
        model.train()
        batches = iter(loader)
        for i in tqdm(range(steps), desc="lr finder", leave=False, disable=not progress):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            for group in opt.param_groups:
                group["lr"] = lr
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            x, y = x.to(device), y.to(device)
            x = transform(x) if transform is not None else x.float()
            if batch_transform is not None:
                x, y = batch_transform(x, y)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            avg = smooth * value + (1 - smooth) * avg
            smoothed = avg / (1 - (1 - smooth) ** (i + 1))
            rows.append({"lr": lr, "loss": value, "smooth_loss": smoothed})
            if not math.isfinite(smoothed) or smoothed > diverge * best:
                break
            best = min(best, smoothed)
    finally:
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        model.train(was_training)
    return pd.DataFrame(rows)


def suggest_lr(df: pd.DataFrame) -> float:
    """A learning rate from an LR range test: a tenth of the LR at the lowest smoothed loss (fast.ai)."""
    if df.empty:
        raise ValueError("suggest_lr: the LR range test recorded no steps.")
    finite = df[df["smooth_loss"].map(math.isfinite)]
    return float(finite.loc[finite["smooth_loss"].idxmin(), "lr"]) / 10


def plot_lr_finder(df: pd.DataFrame, path: str | os.PathLike, suggestion: float | None = None):
    """Loss against learning rate (log scale), with the suggestion marked; saved atomically as PNG."""
    import matplotlib.pyplot as plt

    from labkit.plotting import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.plot(df["lr"], df["loss"], alpha=0.3, label="loss")
    ax.plot(df["lr"], df["smooth_loss"], label="smoothed loss")
    if suggestion is not None:
        ax.axvline(suggestion, color="C3", linestyle="--", label=f"suggested lr {suggestion:.1e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
    finite = df["smooth_loss"][df["smooth_loss"].map(math.isfinite)]
    if len(finite):  # hide the divergence spike so the useful part is readable
        low = min(finite.min(), df["loss"][df["loss"].map(math.isfinite)].min())
        ax.set_ylim(low * 0.95, max(finite.iloc[0] * 1.5, finite.min() * 1.05))
    ax.legend()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return fig


# --------------------------------------------------------------------------- one run's switches
MODELS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}

def _switch(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class AblationConfig:
    """One training run: every switch of the recipe, with the seed's defaults (help: ``--help``)."""

    name: str = _switch("run", "run name (its checkpoint folder)")
    model: str = _switch("resnet50", "network: resnet18 | resnet34 | resnet50")
    variant: str = _switch("basic", "basic (post-activation) | preact (no ReLU on the skip path) | "
                                    "convhead (1x1 conv instead of the last FC: the seed's best)")
    width: float = _switch(1.0, "channel multiplier (1.0 = standard ResNet; 0.25 for quick CPU runs)")
    image_size: int = _switch(64, "final image size in px (Tiny ImageNet 64, ImageNet 224)")
    progressive: bool = _switch(True, "progressive resizing: 29%%, 57%%, 100%% of --image-size over 30/20/40 "
                                      "parts of the epochs, batch halved per phase (the seed's 64->128->224, "
                                      "256->128->64)")
    progressive_sizes: Any = _switch(None, "image size per progressive phase, e.g. 16 40 64 (default: the seed's "
                                           "ratios of --image-size)")
    epochs: int = _switch(90, "passes over the training data")
    batch_size: int = _switch(256, "images per step PER RANK in the first phase (global batch = world size x this)")
    lr: float = _switch(3e-4, "OneCycleLR peak learning rate (AdamW) for one rank, before --lr-scaling")
    lr_scaling: str = _switch("sqrt", "grow the lr with the world size: none | linear (x N) | sqrt (x sqrt N)")
    weight_decay: float = _switch(1e-4, "AdamW weight decay")
    pct_start: float = _switch(0.3, "share of the steps OneCycleLR warms up for (then cosine down)")
    grad_clip: float = _switch(1.0, "clip the gradient norm to this (0 = off)")
    label_smoothing: float = _switch(0.1, "cross-entropy label smoothing")
    mixup: float = _switch(0.2, "MixUp alpha (0 = off); each batch gets MixUp or CutMix")
    cutmix: float = _switch(1.0, "CutMix alpha (0 = off)")
    drop_path_rate: float = _switch(0.0, "stochastic depth: drop rate of the last block (linear from 0)")
    use_blurpool: bool = _switch(False, "anti-aliased (blur) downsampling in every stride-2 step")
    ema_decay: float = _switch(0.0, "EMA of the weights, used for validation (0 = off, the seed's advice; "
                                    "0.999 suits short runs)")
    ema_warmup: bool = _switch(True, "EMA decay min(d, (1+n)/(10+n)) so short runs do not stay near the init")
    amp: Any = _switch("auto", "mixed precision: auto (bf16/fp16 on a GPU, off on CPU) | bf16 | fp16 | off")
    seed: int = _switch(0, "random seed")


#: Rules for the switches that labkit.params.RULES does not already know.
SWITCH_RULES: dict[str, Rule] = {
    "name": Rule(str, help="a label for the run"),
    "model": Rule(str, choices=tuple(MODELS)),
    "variant": Rule(str, choices=("basic", "preact", "convhead")),
    "width": Rule(float, 0, 4, open_low=True, help="channel multiplier"),
    "progressive": Rule(bool),
    "progressive_sizes": Rule((list, tuple), optional=True, test=lambda v: None if v and all(
        isinstance(x, int) and not isinstance(x, bool) and 8 <= x <= 1024 for x in v) and list(v) == sorted(v)
        else "must list rising sizes in px (integers 8-1024)"),
    "weight_decay": Rule(float, 0, 1),
    "pct_start": Rule(float, 0, 1, open_low=True),
    "grad_clip": Rule(float, 0, 1e6, help="0 = no clipping"),
    "label_smoothing": Rule(float, 0, 0.5),
    "mixup": Rule(float, 0, 100, help="MixUp alpha, 0 = off"),
    "cutmix": Rule(float, 0, 100, help="CutMix alpha, 0 = off"),
    "drop_path_rate": Rule(float, 0, 0.99),
    "use_blurpool": Rule(bool),
    "ema_decay": Rule(float, 0, 1, help="0 = off"),
    "ema_warmup": Rule(bool),
}
SWITCHES = tuple(f.name for f in dataclasses.fields(AblationConfig))


def make_config(switches: dict | None = None, **more) -> AblationConfig:
    """An :class:`AblationConfig` from ``switches`` (+ keywords), validated.

    Raises :class:`labkit.params.ParameterError` naming an unknown switch (and listing the known
    ones) or a bad value.
    """
    values = {**(switches or {}), **more}
    for key, value in values.items():
        if key not in SWITCHES:
            raise ParameterError(f"unknown switch {key!r} (in {values.get('name', 'a config')!r}); "
                                 f"known switches: {', '.join(SWITCHES)}.")
        rule = SWITCH_RULES.get(key) or RULES.get(key)
        why = rule.error(value) if rule else None
        if why:
            raise ParameterError(f"config {values.get('name', '?')!r}: switch {key!r} = {value!r} {why}; "
                                 f"allowed: {rule.allowed()}.")
    return AblationConfig(**values)


def peak_lr(cfg: AblationConfig, world_size: int) -> float:
    """The OneCycleLR peak: ``cfg.lr`` scaled for the world size by ``cfg.lr_scaling``."""
    return scale_lr(cfg.lr, world_size, cfg.lr_scaling)


def schedule(cfg: AblationConfig) -> list[tuple[int, int]]:
    """``(image_size, per-rank batch size)`` per epoch (progressive, or fixed)."""
    if not cfg.progressive:
        return [(cfg.image_size, cfg.batch_size)] * cfg.epochs
    sizes = list(cfg.progressive_sizes or progressive_sizes(cfg.image_size))
    if sizes[-1] != cfg.image_size:
        raise ParameterError(f"progressive_sizes={sizes} must end at image_size={cfg.image_size}.")
    fractions = [e for _, _, e in SEED_PHASES] if len(sizes) == 3 else [1] * len(sizes)
    batches = [max(1, cfg.batch_size // 2**i) for i in range(len(sizes))]
    return progressive_schedule(cfg.epochs, sizes, batches, fractions)
