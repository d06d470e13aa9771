"""GPU benchmark: Lab 01's CNN and a ResNet-50 on one GPU, data resident and augmented on the device.

    .venv/bin/python benchmarks/gpu.py                        # one CUDA GPU, under 5 minutes
    .venv/bin/python benchmarks/gpu.py --no-compile           # leave out torch.compile (its compile time)
    .venv/bin/python benchmarks/gpu.py --device cpu --smoke   # dry run of every code path on a CPU, seconds

Prints one table. Rows, each after a warm-up, timed with the GPU synchronised:

- Lab 01's ``AlzheimerCNN`` at 128 px, a synthetic uint8 training set of the Alzheimer dataset's size
  (5,121 grayscale images) **resident on the GPU**, augmented there (``labkit.data.augment.BatchAugment``:
  flip + rotation by index gather, normalise), Adam: images/s in fp32, + AMP (bf16 where the GPU runs it
  natively, else fp16 with a ``GradScaler``: ``labkit.env.amp_dtype("auto", device)``), + ``channels_last``,
  + ``torch.compile``;
- model FLOPs utilisation (MFU): training FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``
  over one forward + backward) × images/s ÷ the GPU's dense bf16/fp16 tensor-core peak (a small table by
  GPU name; "unknown" for other GPUs);
- one full 5,121-image epoch (shuffled, last partial batch included) with the fastest mode: wall time;
  the target on an H100-class GPU is under 0.1 s (≥ 50k images/s); the source project took 11.3 s per
  epoch on a T4 (PIL decoding and augmentation in DataLoader workers);
- ResNet-50 at 224 px with AMP + ``channels_last`` (``labkit.models.resnet``);
- the input pipeline alone: ``BatchAugment`` on the device (index + gather + normalise), images/s.

Without CUDA it refuses with exit code 2 (``--device cpu`` runs the same code on the CPU; with ``--smoke``
the sizes are tiny, so ``tests/library/test_benchmarks.py`` can check the table in a few seconds).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from labkit import env
from labkit.data.augment import BatchAugment
from labkit.models.cnn import AlzheimerCNN

#: Dense (no sparsity) bf16/fp16 tensor-core peak, TFLOP/s, by GPU name (first match wins; vendor data sheets).
PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"H200", 989.0), (r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100|GH200", 989.0),
    (r"A100", 312.0), (r"\bL4\b", 121.0), (r"\bT4\b", 65.0), (r"V100", 125.0)]
ALZHEIMER_TRAIN = 5121   # images in the Kaggle Alzheimer training split
SOURCE_T4_EPOCH_S = 11.3  # the source project's epoch on a T4
TARGET_EPOCH_S = 0.1      # this benchmark's target on an H100-class GPU
NO_CUDA = ("benchmarks/gpu.py measures a CUDA GPU, and torch sees none on this machine "
           "(torch.cuda.is_available() is False). Run it on a machine with an NVIDIA GPU, or try the code path "
           "here with: python benchmarks/gpu.py --device cpu --smoke")


def peak_tflops(name: str) -> float | None:
    """The dense bf16/fp16 tensor-core peak of a GPU by its name, or ``None`` when it is not in the table."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls, after ``warmup`` calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    tick = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - tick) / steps


class Trainer:
    """One training setup: model, Adam, loss, augmentation and precision; ``step(x_uint8, y)`` trains one batch."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None, channels_last: bool,
                 compile_model: bool, augment: nn.Module | None) -> None:
        self.device, self.dtype, self.channels_last, self.augment = device, dtype, channels_last, augment
        self.model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=device.type == "cuda")
        self.scaler = env.grad_scaler(dtype, device)  # fp16 only
        self.loss_fn = nn.CrossEntropyLoss()
        self.forward = torch.compile(self.model) if compile_model else self.model

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment is not None:
            x = self.augment(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.loss_fn(self.forward(self.prepare(x)), y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Forward, loss, backward, Adam step; no ``.item()``: nothing waits for the GPU."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()


def train_flops_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Training FLOPs per image (forward + backward; matmuls and convolutions), counted in fp32 on the
    first 8 images (FLOPs grow linearly with the batch; a small one fits any GPU's memory in fp32)."""
    x, y = x[:8], y[:8]
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu (a dry run of the code path)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (with --device cpu: seconds)")
    p.add_argument("--batch-size", type=int, default=512, help="Lab 01 CNN rows (the lab itself uses 32)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--images", type=int, default=ALZHEIMER_TRAIN, help="synthetic training set size")
    p.add_argument("--steps", type=int, default=40, help="timed steps per row (after warm-up)")
    p.add_argument("--resnet-batch", type=int, default=128)
    p.add_argument("--resnet-size", type=int, default=224)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.image_size, args.images = min(args.batch_size, 8), 32, min(args.images, 24)
        args.steps, args.resnet_batch, args.resnet_size = 1, 2, 32
        args.no_compile = True  # compiling takes minutes on a CPU; the GPU run compiles
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"--device {args.device}: use cuda, cuda:N or cpu.", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # a dry run: one thread suffers least from other processes on the cores
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    name = env.environment(device)["device_name"] if device.type == "cuda" else "CPU (dry run)"
    peak = peak_tflops(name) if device.type == "cuda" else None
    dtype = env.amp_dtype("auto", device)
    note = ""
    if dtype is None:  # a CPU without native bf16: force it, so that the dry run still takes the AMP path
        dtype, note = torch.bfloat16, " (forced for the dry run: this CPU only emulates bf16)"
    precision = env.precision_name(dtype) + (" + GradScaler" if dtype == torch.float16 else "")
    warmup = 1 if args.smoke else 5
    print(f"device: {name}; torch {torch.__version__}; AMP = {precision}{note}; peak "
          f"{f'{peak:.0f} TFLOP/s dense bf16/fp16' if peak else 'unknown (GPU not in the table)'}")
    size, bs = args.image_size, args.batch_size
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.images, 1, size, size), dtype=torch.uint8, device=device, generator=gen)
    labels = torch.randint(0, 4, (args.images,), device=device, generator=gen)
    print(f"Lab 01 data: {args.images} synthetic uint8 grayscale {size}px images resident on {device} "
          f"({images.numel() / 2**20:.0f} MiB), batch {bs}, augmented on the device")
    rows: list[dict] = []

    def add(row: str, ips: float, flops: float | None = None, extra: str = "") -> None:
        mfu = f"{flops * ips / (peak * 1e12):.1%}" if flops and peak else ("unknown" if flops else "")
        rows.append({"row": row, "img/s": f"{ips:,.0f}" if ips >= 100 else f"{ips:.2f}", "MFU": mfu, "note": extra})

    xb, yb = images[:bs], labels[:bs]
    flops = train_flops_per_image(AlzheimerCNN(4, size).to(device), BatchAugment(True).to(device)(xb), yb)
    modes = [("fp32", None, False, False), (f"+ AMP {env.precision_name(dtype)}", dtype, False, False),
             ("+ channels_last", dtype, True, False)]
    if not args.no_compile:
        modes.append(("+ torch.compile", dtype, True, True))
    best, best_ips = None, 0.0
    for label, dt, cl, comp in modes:
        torch.manual_seed(0)
        trainer = Trainer(AlzheimerCNN(4, size), device, dt, cl, comp, BatchAugment(True).to(device))
        tick = time.perf_counter()
        trainer.step(xb, yb)  # first step: cuDNN autotuning, and compiling for torch.compile
        sync(device)
        first = time.perf_counter() - tick
        s = timed(lambda: trainer.step(xb, yb), device, args.steps, warmup)
        add(f"Lab 01 CNN {size}px {label}", bs / s, flops, f"first step {first:.1f} s" if comp else "")
        if bs / s > best_ips:
            best, best_ips = (label, trainer), bs / s

    label, trainer = best
    order = torch.randperm(args.images, device=device, generator=gen)

    def epoch() -> None:
        for i in range(0, args.images, bs):
            idx = order[i:i + bs]
            trainer.step(images[idx], labels[idx])

    epoch()  # warm-up epoch: the last partial batch's shapes (cuDNN plans, a recompile)
    seconds = timed(epoch, device, 1 if args.smoke else 3, 0)
    verdict = ""
    if device.type == "cuda":
        verdict = (f"target < {TARGET_EPOCH_S} s on H100-class: {'met' if seconds < TARGET_EPOCH_S else 'not met'}; "
                   f"source project on a T4: {SOURCE_T4_EPOCH_S} s")
    add(f"Lab 01 full epoch, {args.images} images ({label.lstrip('+ ')})", args.images / seconds, flops,
        f"{seconds:.3f} s/epoch; {verdict}".rstrip("; "))

    from labkit.models.resnet import resnet

    rs, rb = args.resnet_size, args.resnet_batch
    x = torch.randn(rb, 3, rs, rs, device=device, generator=gen)
    y = torch.randint(0, 1000, (rb,), device=device, generator=gen)
    r50 = resnet(50, 1000, small_input=False).to(device)
    r50_flops = train_flops_per_image(r50, x, y)
    trainer = Trainer(r50, device, dtype, True, False, None)
    s = timed(lambda: trainer.step(x, y), device, args.steps, warmup)
    add(f"ResNet-50 {rs}px AMP {env.precision_name(dtype)} + channels_last", rb / s, r50_flops, f"batch {rb}")
    trainer = r50 = x = None  # free the GPU memory before the next rows
    if device.type == "cuda":
        torch.cuda.empty_cache()

    augment = BatchAugment(True).to(device)
    s = timed(lambda: augment(xb).contiguous(memory_format=torch.channels_last), device, args.steps, warmup)
    add(f"input pipeline alone: BatchAugment {size}px on {device.type}", bs / s, None,
        f"{bs / s / best_ips:.0f}x the best training rate")

    print(f"training FLOPs per image: Lab 01 CNN {flops / 1e9:.2f} GFLOP, ResNet-50 {r50_flops / 1e9:.2f} GFLOP "
          "(forward + backward, FlopCounterMode)")
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("row", "img/s", "MFU")}
    print(f"{'row':<{widths['row']}}  {'img/s':>{widths['img/s']}}  {'MFU':>{widths['MFU']}}  note")
    for r in rows:
        print(f"{r['row']:<{widths['row']}}  {r['img/s']:>{widths['img/s']}}  {r['MFU']:>{widths['MFU']}}  {r['note']}")
    if device.type == "cuda":
        print(f"best Lab 01 training rate: {best_ips:,.0f} img/s ({label.lstrip('+ ')}); target on an H100-class GPU: "
              f">= {ALZHEIMER_TRAIN / TARGET_EPOCH_S:,.0f} img/s, i.e. a {ALZHEIMER_TRAIN}-image epoch in < {TARGET_EPOCH_S} s")
    if device.type == "cpu":
        print("dry run on the CPU: the code path works; the numbers say nothing about a GPU.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
