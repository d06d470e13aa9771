"""The reusable parts of the seed-002 recipe that Lab 03's ablation sweep (:mod:`labkit.labs.ablations.sweep`) needs.

Lab 03 teaches each piece in its own notebook cell first (built from torchvision / torch directly);
what the sweep runner reuses lives here:

- augmentation: :class:`RGBTransform` — the seed's flip, ShiftScaleRotate, ColorJitter and
  CoarseDropout (``v2.RandomAffine`` / ``ColorJitter`` / ``RandomErasing``), each a switch;
- MixUp (α 0.2) / CutMix (α 1.0): :func:`mixup_cutmix` (``torchvision.transforms.v2``, soft labels);
- EMA of the weights: :func:`make_ema` (``torch.optim.swa_utils.AveragedModel``, decay warm-up);
- progressive resizing (64→128→224): :func:`progressive_sizes`, :func:`progressive_schedule`;
- every switch of one run: :class:`AblationConfig`, :func:`make_config`, :func:`schedule`, :func:`peak_lr`,
  :func:`lr_scheduler`, :func:`fit_error`; as command-line arguments of the lab's DDP script:
  :func:`add_switches`, :func:`config_from_args`, :func:`switch_args`.

AdamW, OneCycleLR and label smoothing are plain ``torch`` calls in :mod:`labkit.labs.ablations.sweep`; the LR
range test is written in the notebook.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2

from labkit.distributed import RULES as DISTRIBUTED_RULES
from labkit.errors import ParameterError
from labkit.params import RULES, Rule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The seed's progressive resizing on ImageNet: (image size, batch size, epochs out of 90).
SEED_PHASES = ((64, 256, 30), (128, 128, 20), (224, 64, 40))


# --------------------------------------------------------------------------- augmentation
class RGBTransform(nn.Module):
    """uint8 ``[B, 3, H, W]`` (on any device) → normalised float ``[B, 3, size, size]``.

    Every image is resized to ``size`` (antialiased). ``train=True`` then applies the seed's
    augmentations (its albumentations pipeline, in ``torchvision.transforms.v2``), each drawn **per
    image** and each a switch: ``flip`` (horizontal, p 0.5), ``affine`` (ShiftScaleRotate → ``v2.RandomAffine``:
    shift ≤ 6.25 %, scale 0.9–1.1, rotation ≤ 15°, p 0.5;
    the uncovered border is black, where albumentations reflected the image), ``color_jitter`` (``v2.ColorJitter(0.2, 0.2,
    0.2, 0.1)``, p 0.3) and ``erasing`` (CoarseDropout → ``v2.RandomErasing``: one square of a quarter of
    the side, filled with the mean colour, p 0.5). ``train=False`` only resizes. Then ImageNet mean/std
    normalisation. ``channels_last=True`` returns the batch in ``torch.channels_last`` memory format.
    """

    def __init__(self, size: int, train: bool, flip: bool = True, affine: bool = False,
                 color_jitter: bool = False, erasing: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = bool(channels_last)
        self.size, self.train_mode, self.flip = int(size), train, flip
        self.affine, self.color_jitter, self.erasing = affine, color_jitter, erasing
        self.mean, self.std = list(mean), list(std)
        steps = []
        if affine:
            steps.append(v2.RandomApply([v2.RandomAffine(degrees=15, translate=(0.0625, 0.0625), scale=(0.9, 1.1))],
                                        p=0.5))
        if color_jitter:
            steps.append(v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.1)], p=0.3))
        self.per_image = v2.Compose(steps) if steps else None
        # applied after normalisation, so value 0 is the mean colour (the seed's fill_value)
        self.erase = v2.RandomErasing(p=0.5, scale=(1 / 16, 1 / 16), ratio=(1.0, 1.0), value=0) if erasing else None

    def extra_repr(self) -> str:
        return (f"size={self.size}, train={self.train_mode}, flip={self.flip}, affine={self.affine}, "
                f"color_jitter={self.color_jitter}, erasing={self.erasing}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"RGBTransform expects [B, 3, H, W] images, got shape {tuple(x.shape)}.")
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        b, _, h, w = x.shape
        if (h, w) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if self.train_mode:
            if self.flip:
                mask = torch.rand(b, device=x.device) < 0.5
                x = torch.where(mask[:, None, None, None], x.flip(-1), x)
            if self.per_image is not None:  # v2 draws one set of parameters per call: one call per image
                x = torch.stack([self.per_image(img) for img in x]).clamp_(0, 1)
        x = v2.functional.normalize(x, self.mean, self.std)
        if self.train_mode and self.erase is not None:
            x = torch.stack([self.erase(img) for img in x])
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def train_transform(cfg: "AblationConfig", size: int, channels_last: bool = False) -> RGBTransform:
    """The training transform of a config's augmentation switches at ``size`` px."""
    return RGBTransform(size, train=True, flip=cfg.flip, affine=cfg.affine, color_jitter=cfg.color_jitter,
                        erasing=cfg.erasing, channels_last=channels_last)


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


# --------------------------------------------------------------------------- one run's switches
MODELS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}
LR_SCHEDULES = ("onecycle", "cosine", "constant")

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
                                      "parts of the epochs (the seed's 64->128->224)")
    halve_batch: bool = _switch(True, "with --progressive: halve the per-rank batch in each later phase (the seed's "
                                      "256->128->64; more optimizer steps); off: the same batch and step count "
                                      "as without progressive resizing")
    progressive_sizes: Any = _switch(None, "image size per progressive phase, e.g. 16 40 64 (default: the seed's "
                                           "ratios of --image-size)")
    epochs: int = _switch(90, "passes over the training data")
    batch_size: int = _switch(256, "images per step PER RANK in the first phase (global batch = world size x this)")
    lr: float = _switch(3e-4, "OneCycleLR peak learning rate (AdamW) at a global batch of 256 (the seed's), "
                              "before --lr-scaling")
    lr_scaling: str = _switch("sqrt", "grow the lr with the global batch B: none | linear (x B/256) | "
                                      "sqrt (x sqrt(B/256))")
    weight_decay: float = _switch(1e-4, "AdamW weight decay")
    lr_schedule: str = _switch("onecycle", "onecycle (warm-up, then cosine down: the seed's) | cosine (cosine "
                                           "down from the peak, no warm-up) | constant (the peak throughout)")
    pct_start: float = _switch(0.3, "share of the steps OneCycleLR warms up for (then cosine down)")
    grad_clip: float = _switch(1.0, "clip the gradient norm to this (0 = off)")
    label_smoothing: float = _switch(0.1, "cross-entropy label smoothing")
    flip: bool = _switch(True, "random horizontal flip (p 0.5)")
    affine: bool = _switch(True, "ShiftScaleRotate as v2.RandomAffine: shift 6.25%%, scale 0.9-1.1, 15 deg (p 0.5)")
    color_jitter: bool = _switch(True, "v2.ColorJitter(0.2, 0.2, 0.2, 0.1) (p 0.3)")
    erasing: bool = _switch(True, "CoarseDropout as v2.RandomErasing: a square of 1/4 the side, mean fill (p 0.5)")
    mixup: float = _switch(0.2, "MixUp alpha (0 = off); each batch gets MixUp or CutMix")
    cutmix: float = _switch(1.0, "CutMix alpha (0 = off)")
    drop_path_rate: float = _switch(0.0, "stochastic depth: drop rate of the last block (linear from 0)")
    use_blurpool: bool = _switch(False, "anti-aliased (blur) downsampling in every stride-2 step")
    ema_decay: float = _switch(0.0, "EMA of the weights, used for validation (0 = off, the seed's advice; "
                                    "0.999 suits short runs)")
    ema_warmup: bool = _switch(True, "EMA decay min(d, (1+n)/(10+n)) so short runs do not stay near the init")
    sync_bn: bool = _switch(False, "SyncBatchNorm (GPU ranks only); off: rank 0's BatchNorm statistics are "
                                   "broadcast to every rank before each evaluation and checkpoint")
    amp: Any = _switch("auto", "mixed precision: auto (bf16 where the GPU or CPU runs it natively, "
                                 "fp16 + GradScaler on older GPUs, else fp32) | bf16 | fp16 | off")
    seed: int = _switch(0, "random seed")


#: Rules for the switches that labkit.params.RULES and labkit.distributed.RULES do not already know.
SWITCH_RULES: dict[str, Rule] = {
    "name": Rule(str, help="a label for the run"),
    "model": Rule(str, choices=tuple(MODELS)),
    "variant": Rule(str, choices=("basic", "preact", "convhead")),
    "width": Rule(float, 0, 4, open_low=True, help="channel multiplier"),
    "progressive": Rule(bool), "halve_batch": Rule(bool),
    "lr_schedule": Rule(str, choices=LR_SCHEDULES),
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
    "flip": Rule(bool), "affine": Rule(bool), "color_jitter": Rule(bool), "erasing": Rule(bool),
    "sync_bn": Rule(bool),
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
        rule = SWITCH_RULES.get(key) or RULES.get(key) or DISTRIBUTED_RULES.get(key)
        why = rule.error(value) if rule else None
        if why:
            raise ParameterError(f"config {values.get('name', '?')!r}: switch {key!r} = {value!r} {why}; "
                                 f"allowed: {rule.allowed()}.")
    return AblationConfig(**values)


#: The global batch the seed's learning rate (3e-4) belongs to.
REFERENCE_BATCH = 256


def peak_lr(cfg: AblationConfig, world_size: int) -> float:
    """The OneCycleLR peak: ``cfg.lr`` (meant for a global batch of 256, the seed's) scaled to this run's
    global batch ``world_size × cfg.batch_size`` by ``cfg.lr_scaling`` (none | linear | sqrt)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"peak_lr: world_size={world_size!r} must be an integer >= 1.")
    ratio = world_size * cfg.batch_size / REFERENCE_BATCH
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}.get(cfg.lr_scaling)
    if factor is None:
        raise ValueError(f"peak_lr: lr_scaling={cfg.lr_scaling!r} is unknown; use none, linear or sqrt.")
    return float(cfg.lr) * factor


def schedule(cfg: AblationConfig) -> list[tuple[int, int]]:
    """``(image_size, per-rank batch size)`` per epoch (progressive, or fixed)."""
    if not cfg.progressive:
        return [(cfg.image_size, cfg.batch_size)] * cfg.epochs
    sizes = list(cfg.progressive_sizes or progressive_sizes(cfg.image_size))
    if sizes[-1] != cfg.image_size:
        raise ParameterError(f"progressive_sizes={sizes} must end at image_size={cfg.image_size}.")
    fractions = [e for _, _, e in SEED_PHASES] if len(sizes) == 3 else [1] * len(sizes)
    batches = [max(1, cfg.batch_size // 2**i) if cfg.halve_batch else cfg.batch_size for i in range(len(sizes))]
    return progressive_schedule(cfg.epochs, sizes, batches, fractions)


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: AblationConfig, peak: float, total_steps: int):
    """The per-step learning-rate schedule of ``cfg.lr_schedule``, peaking at ``peak``: ``OneCycleLR`` (warm-up
    for ``cfg.pct_start`` of the steps, then cosine down), ``CosineAnnealingLR`` from the peak, or constant."""
    if cfg.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps,
                                                   pct_start=cfg.pct_start, anneal_strategy="cos")
    for group in optimizer.param_groups:
        group["lr"] = peak
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ParameterError(f"lr_schedule={cfg.lr_schedule!r} is unknown; use one of {LR_SCHEDULES}.")


def fit_error(n_train: int, world_size: int, cfg: AblationConfig) -> str | None:
    """Why ``cfg`` cannot train on ``n_train`` images over ``world_size`` ranks, or None when it can.

    ``DistributedSampler(drop_last=True)`` gives each rank ``n_train // world_size`` images and the loader keeps
    only full batches: a rank with fewer images than its largest per-rank batch would take no step at all
    (OneCycleLR then fails with "Expected positive integer total_steps")."""
    per_rank = n_train // world_size
    biggest = max(bs for _, bs in schedule(cfg))
    if biggest <= per_rank:
        return None
    most_ranks = n_train // biggest
    return (f"{cfg.name}: {n_train} training images over {world_size} ranks give each rank {per_rank}, fewer than "
            f"one batch of {biggest} images per rank (only full batches are trained on). Lower batch_size to "
            f"<= {max(per_rank, 1)}, "
            + (f"use world_size <= {most_ranks}, " if most_ranks >= 1 else "")
            + "or train on more images (max_train, test_size).")


# --------------------------------------------------------------------------- switches as command-line arguments
def add_switches(parser) -> None:
    """One ``--flag`` per switch of :class:`AblationConfig` on an ``argparse`` parser, each defaulting to None
    (= the config's default). Booleans take ``--flag`` / ``--no-flag``; ``--amp off`` is fp32."""
    import argparse

    group = parser.add_argument_group("recipe switches (defaults: the seed's)")
    defaults = AblationConfig()
    for f in dataclasses.fields(AblationConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        text = f"{f.metadata['help']} (default {default})"
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "progressive_sizes":
            group.add_argument(flag, type=int, nargs="+", default=None, metavar="PX", help=text)
        elif f.name == "amp":
            group.add_argument(flag, default=None, choices=("auto", "bf16", "fp16", "off"), help=text)
        elif f.name == "lr_schedule":
            group.add_argument(flag, default=None, choices=LR_SCHEDULES, help=text)
        else:
            group.add_argument(flag, type=type(default), default=None, help=text)


def given_switches(args) -> dict:
    """The switches set on the command line (parsed by a parser with :func:`add_switches`)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AblationConfig)
             if getattr(args, f.name, None) is not None}
    if given.get("amp") == "off":
        given["amp"] = False
    return given


def config_from_args(args) -> AblationConfig:
    """The validated config of parsed arguments: the defaults overridden by what was given."""
    return make_config(given_switches(args))


def switch_args(cfg: AblationConfig) -> list[str]:
    """``cfg`` as command-line arguments, every switch explicit: ``config_from_args(parse(switch_args(cfg)))``
    gives ``cfg`` back."""
    argv = []
    for f in dataclasses.fields(AblationConfig):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name == "amp" and value is False:
            argv += [flag, "off"]
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
