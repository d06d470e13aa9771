"""CPU precision: fp32 vs channels_last vs bf16 autocast vs bf16 + channels_last, in one run.

    .venv/bin/python benchmarks/cpu_precision.py              # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/cpu_precision.py --accuracy   # + quick Lab 01 trainings per precision (~4 min more)

Measures one Adam training step (forward, loss, backward, step) at batch 32 for Lab 01's CNN and Lab 03's
ResNet, in images per second, each layout/precision after a warm-up, interleaved over rounds so a slow
drift of a shared machine hits every mode alike. Prints a table and the speed-up of each mode over fp32.

With ``--accuracy`` it also trains Lab 01's quick configuration with ``amp=False`` (fp32) and with bf16
for two seeds each and prints the final test accuracies: the precision effect should be smaller than the
seed-to-seed spread. Where the CPU has no native bf16 (``env.cpu_has_native_bf16()`` is False) labkit's
``amp="auto"`` stays in fp32, and this benchmark says so.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from labkit import env
from labkit.models.cnn import AlzheimerCNN
from labkit.models.resnet import resnet

MODES = {"fp32": (None, False), "fp32 + channels_last": (None, True),
         "bf16 autocast": (torch.bfloat16, False), "bf16 + channels_last": (torch.bfloat16, True)}


def step_rate(model: nn.Module, size: int, dtype: torch.dtype | None, channels_last: bool,
              steps: int, batch: int = 32) -> float:
    """Images per second of ``steps`` training steps (after 2 warm-up steps)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()
    for _ in range(2):
        one()
    tick = time.perf_counter()
    for _ in range(steps):
        one()
    return steps * batch / (time.perf_counter() - tick)


def speed_table(rounds: int, steps: int) -> list[tuple[str, int, dict[str, float]]]:
    models = [("AlzheimerCNN (Lab 01)", 64, lambda: AlzheimerCNN(num_classes=4, image_size=64)),
              ("AlzheimerCNN (Lab 01)", 128, lambda: AlzheimerCNN(num_classes=4, image_size=128)),
              ("ResNet-18 (Lab 03)", 64, lambda: resnet(18, num_classes=4))]
    rows = []
    for name, size, build in models:
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(rounds):
            for mode, (dtype, cl) in MODES.items():
                torch.manual_seed(0)
                rates[mode].append(step_rate(build(), size, dtype, cl, steps))
        rows.append((name, size, {m: statistics.median(v) for m, v in rates.items()}))
    return rows


def accuracy_runs(seeds: tuple[int, ...]) -> dict[str, list[float]]:
    """Lab 01's quick configuration trained with fp32 and with bf16 autocast (+ channels_last)."""
    from labkit.data.alzheimer import load_alzheimer
    from labkit.data.augment import batch_transform
    from labkit.params import check
    from labkit.train import evaluate, fit

    out: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for seed in seeds:
        cfg = check("01_baseline", quick=True, seed=seed, epochs=3, image_size=64, batch_size=32, lr=1e-3, show=False)
        ds = load_alzheimer(data="auto", data_dir="data/alzheimer", image_size=cfg.image_size,
                            max_train=cfg.max_train, max_test=cfg.max_test, seed=seed)
        for name, amp in (("fp32", False), ("bf16", "bf16")):
            env.seed_everything(seed)
            model = AlzheimerCNN(num_classes=len(ds.classes), image_size=cfg.image_size)
            test_loader = ds.loader("test", batch_size=cfg.batch_size)
            fit(model, ds.loader("train", batch_size=cfg.batch_size, seed=seed), test_loader,
                epochs=cfg.epochs, lr=cfg.lr, device="cpu", amp=amp, progress=False,
                transform_train=batch_transform(train=True), transform_eval=batch_transform(train=False))
            out[name].append(evaluate(model, test_loader, device="cpu", transform=batch_transform(train=False))["acc"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements per mode (median)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--accuracy", action="store_true", help="also train Lab 01 quick per precision (2 seeds)")
    args = parser.parse_args()
    native = env.cpu_has_native_bf16()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16 on this CPU: {native}"
          + ("" if native else " (labkit's amp='auto' stays in fp32 here; bf16 below is emulated)"))
    print("\n| model | px | " + " | ".join(MODES) + " |")
    print("|---|---|" + "---|" * len(MODES))
    for name, size, rates in speed_table(args.rounds, args.steps):
        base = rates["fp32"]
        cells = [f"{r:,.0f} img/s ({r / base:.1f}×)" for r in rates.values()]
        print(f"| {name} | {size} | " + " | ".join(cells) + " |")
    if args.accuracy:
        accs = accuracy_runs((0, 1))
        print("\nLab 01 quick (64 px, 3 epochs), final test accuracy per seed:")
        for name, values in accs.items():
            print(f"  {name}: " + ", ".join(f"{v:.3f}" for v in values))
        seed_spread = max(abs(v[0] - v[1]) for v in accs.values())
        precision_gap = statistics.mean(abs(a - b) for a, b in zip(accs["fp32"], accs["bf16"]))
        print(f"  seed-to-seed spread {seed_spread:.3f}; mean |fp32 - bf16| at the same seed {precision_gap:.3f}"
              f" ({'within' if precision_gap <= seed_spread else 'beyond'} the seed spread)")


if __name__ == "__main__":
    main()
