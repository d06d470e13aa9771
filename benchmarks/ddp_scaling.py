"""DDP scaling on a CPU machine, measured two ways in one run: fair (fixed compute per rank) and the lab's.

    .venv/bin/python benchmarks/ddp_scaling.py                 # ~2-3 min on 2 CPU cores
    .venv/bin/python benchmarks/ddp_scaling.py --skip-lab      # only the fair measurement (~40 s)
    .venv/bin/python benchmarks/ddp_scaling.py --buckets 25 1 0.25

1. **Fair DDP overhead** (what DDP itself costs). Every rank gets the same compute: one intra-op thread
   (``torch.set_num_threads(1)``), the same per-rank batch of Lab 03's quick network (ResNet-18 ×0.25,
   32 px, from ``labkit.models.resnet``) on synthetic tensors already in memory (no data loading, no
   augmentation). One rank × 1 thread (a plain model, no DDP; rank 0 while rank 1 idles in a barrier) is the
   baseline; two ranks × 1 thread each run DDP over gloo. ``efficiency = images/s(2 ranks) / (2 × images/s(1 rank))``. For each
   ``bucket_cap_mb`` the 2-rank step is timed normally and inside ``no_sync()`` (the same backward without
   the gradient all-reduce): ``exposed all-reduce share = (step - no_sync step) / step`` is the part of a
   step spent waiting for communication that DDP did not hide behind the backward pass. A bare
   ``dist.all_reduce`` of all gradients (one flat buffer) shows what the communication costs on its own.
   A last mode adds ``gradient_as_bucket_view=True`` and ``static_graph=True`` (views/static) to the largest
   bucket size. Modes are interleaved over rounds and the best round counts (a shared machine's drift hits all alike).
2. **The lab's figure — core sharing, not DDP**: the quick Lab 03 workload through
   ``labkit.labs.ablations.sweep.run_ablations`` on world size 1 and 2 with the default threads (one rank uses
   *both* cores; two ranks get one each), so it mostly measures giving up a core, not DDP.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from labkit import env
from labkit.distributed import ddp
from labkit.labs.ablations import sweep
from labkit.params import QUICK

WHY_CPU = """\
Why the lab's figure is well under 100%: one rank alone uses both cores (cpu_count // world_size
intra-op threads), two ranks get one core each, so the 'speed-up' compares 2 cores with 2 cores: it
measures core sharing, memory bus and cache contention and gloo's loopback all-reduce running on the
same cores, not what DDP costs. The fair figure above keeps the compute per rank fixed."""


# --------------------------------------------------------------------------- 1. fair: fixed compute per rank
def _model(opts: dict) -> nn.Module:
    from labkit.models.resnet import resnet

    torch.manual_seed(0)
    return resnet(18, opts["classes"], "basic", width=opts["width"], small_input=opts["image_size"] < 128)


def _batches(opts: dict, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + rank)
    s, b = opts["image_size"], opts["batch_size"]
    return [(torch.randn(b, 3, s, s, generator=g), torch.randint(0, opts["classes"], (b,), generator=g))
            for _ in range(4)]


def _timed_steps(net: nn.Module, opt: torch.optim.Optimizer, batches: list, steps: int,
                 no_sync: bool = False) -> float:
    """Seconds of ``steps`` training steps (forward, loss, backward [+ all-reduce], optimizer step)."""
    loss_fn = nn.CrossEntropyLoss()

    def one(i: int) -> None:
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    tick = time.perf_counter()
    for i in range(steps):
        if no_sync:
            with net.no_sync():
                one(i)
        else:
            one(i)
    return time.perf_counter() - tick


SOLO = ("1 rank, plain model", "1 rank, DDP (world size 1)")


def fair_rank(rank: int, world_size: int, device: torch.device, opts: dict) -> dict:
    """Rank function (``labkit.distributed.ddp.launch``, 2 ranks): best seconds per step of each mode over ``rounds``
    interleaved rounds. The 1-rank modes run on rank 0 while rank 1 waits idle in a barrier (a blocking
    socket read: no CPU), so both figures come from the same processes, interleaved in time."""
    torch.set_num_threads(opts["threads"])  # launch(threads=1) did this already; said again for the reader
    batches = _batches(opts, rank)
    solo_group = dist.new_group([0])  # every rank must create it; rank 0 alone uses it (DDP at world size 1)
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, bool]] = {}
    if rank == 0:
        model = _model(opts)
        runs[SOLO[0]] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), False)
        model = _model(opts)
        net = DDP(model, process_group=solo_group, bucket_cap_mb=25)
        runs[SOLO[1]] = (net, torch.optim.AdamW(model.parameters(), lr=1e-3), False)
    else:
        runs.update({name: (None, None, False) for name in SOLO})
    specs = [(mb, False) for mb in opts["buckets"]] + [(max(opts["buckets"]), True)]
    for mb, tuned in specs:  # tuned: gradients live in the buckets (no copy), graph fixed after step 1
        model = _model(opts)
        net = DDP(model, bucket_cap_mb=mb, gradient_as_bucket_view=tuned, static_graph=tuned)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        name = f"2 ranks, bucket {mb:g} MB" + (" + views/static" if tuned else "")
        runs[name] = (net, opt, False)
        runs[f"{name}, no_sync"] = (net, opt, True)

    def measure(name: str, steps: int) -> float:
        net, opt, nosync = runs[name]
        dist.barrier()
        seconds = _timed_steps(net, opt, batches, steps, nosync) if net is not None else 0.0
        return ddp.reduce_max(seconds)  # the slowest rank's seconds (rank 1 reports 0 in the 1-rank modes)

    for name in runs:  # warm-up (allocator, oneDNN kernels, gloo buffers)
        measure(name, opts["warmup"])
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(opts["rounds"]):
        for name in runs:
            rounds[name].append(measure(name, opts["steps"]) / opts["steps"])
    out = {"step_s": {name: min(t) for name, t in rounds.items()}, "rounds": rounds,
           "params": sum(p.numel() for p in _model(opts).parameters())}
    flat = torch.randn(out["params"])  # the communication alone: all gradients as one flat fp32 buffer
    for _ in range(3):
        dist.all_reduce(flat)
    times = []
    for _ in range(20):
        dist.barrier()
        tick = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - tick)
    out["allreduce_s"] = statistics.median(times)
    return out


def fair(args: argparse.Namespace) -> dict:
    """The fair measurement: one 2-rank launch, 1 intra-op thread per rank."""
    opts = {"classes": 200, "width": args.width, "image_size": args.image_size, "batch_size": args.batch_size,
            "threads": 1, "buckets": args.buckets, "steps": args.steps, "warmup": 3, "rounds": args.rounds}
    return ddp.launch(fair_rank, 2, (opts,), device="cpu", threads=1)


def print_fair(res: dict, args: argparse.Namespace) -> float:
    """Print the fair table; return the best 2-rank efficiency."""
    b = args.batch_size
    step = res["step_s"]
    base = step["1 rank, plain model"]
    mb = res["params"] * 4 / 2**20
    print(f"\n== 1. fair DDP overhead: fixed compute per rank (1 thread each), resnet18 x{args.width} at "
          f"{args.image_size}px, batch {b} per rank, {res['params']:,} parameters = {mb:.1f} MB of fp32 gradients")
    print(f"{'mode':<40}{'ms/step':>9}{'img/s':>9}{'efficiency':>12}{'exposed all-reduce':>20}")
    best_eff = 0.0
    for name, s in step.items():
        if name.endswith("no_sync"):
            continue
        ranks = 2 if name.startswith("2 ranks") else 1
        ips = ranks * b / s
        eff = ips / (ranks * b / base)
        share = ""
        if name + ", no_sync" in step:
            share = f"{(s - step[name + ', no_sync']) / s:.1%}"
            best_eff = max(best_eff, eff)
        print(f"{name:<40}{1000 * s:9.1f}{ips:9.0f}{eff:12.1%}{share:>20}")
        if name + ", no_sync" in step:
            ns = step[name + ", no_sync"]
            print(f"{'  same, inside no_sync()':<40}{1000 * ns:9.1f}{2 * b / ns:9.0f}{2 * b / ns / (2 * b / base):12.1%}")
    print(f"bare dist.all_reduce of all gradients (one {mb:.1f} MB buffer, gloo over loopback): "
          f"{1000 * res['allreduce_s']:.1f} ms = {res['allreduce_s'] / base:.1%} of a 1-rank step")
    solo = res["rounds"][SOLO[0]]
    per_round = {name: statistics.median(s1 / s2 for s1, s2 in zip(solo, t))
                 for name, t in res["rounds"].items() if name.startswith("2 ranks") and not name.endswith("no_sync")}
    print("per-round efficiency (1-rank and 2-rank steps timed seconds apart in each round; median over "
          f"{len(solo)} rounds): " + ", ".join(f"{n.removeprefix('2 ranks, ')} {e:.0%}" for n, e in per_round.items()))
    print(f"fair ddp scaling efficiency (best bucket size): {best_eff:.0%} from the best step times, "
          f"{max(per_round.values()):.0%} as the median per-round ratio   (goal >= 90%)")
    return best_eff


# --------------------------------------------------------------------------- 2. the lab's figure (core sharing)
def measure(data, world_size: int, cfg: sweep.AblationConfig, device: str, repeats: int = 2) -> dict:
    """Train ``cfg`` ``repeats`` times on ``world_size`` ranks (one process group); the best images/s
    over the epochs after the first (the best of the repeats shrugs off other load on the machine)."""
    configs = [sweep.make_config({**cfg.__dict__, "name": f"{cfg.name}{i}"}) for i in range(repeats)]
    runs = sweep.run_ablations(configs, data, world_size=world_size, device=device, progress=False,
                                  save_dir=os.environ.get("TMPDIR", "/tmp") + "/labkit_ddp_bench")
    best = None
    for result in runs:
        timed = result["history"][1:] or result["history"]
        images = sum(h["images_per_s"] * h["seconds"] for h in timed)
        seconds = sum(h["seconds"] for h in timed)
        if best is None or images / seconds > best["images_per_s"]:
            best = {"world_size": world_size, "images_per_s": images / seconds, "seconds": seconds}
    return best


def amp_comparison(data, cfg: sweep.AblationConfig, device: str) -> None:
    """One rank, ``amp="auto"`` (bf16/fp16 + channels_last) against fp32 (channels_last only on CUDA)."""
    fast = measure(data, 1, sweep.make_config({**cfg.__dict__, "amp": "auto"}), device)
    slow = measure(data, 1, sweep.make_config({**cfg.__dict__, "amp": False}), device)
    dtype = env.precision_name(env.amp_dtype("auto", torch.device(device)))
    print(f"{device}, 1 rank: {dtype} + channels_last {fast['images_per_s']:.0f} img/s, fp32 "
          f"{slow['images_per_s']:.0f} img/s -> speed-up x{fast['images_per_s'] / slow['images_per_s']:.2f}")


def lab_figure(args: argparse.Namespace) -> None:
    from labkit.data.imagenet import load_imagenet

    data = load_imagenet("auto", "data/tiny-imagenet", image_size=args.image_size, max_train=args.max_train,
                         max_val=200, progress=False)
    cfg = sweep.make_config(name="bench", model="resnet18", width=args.width, image_size=args.image_size,
                               epochs=args.epochs, batch_size=args.batch_size, progressive=False, lr=1e-3,
                               affine=False, color_jitter=False, erasing=False)  # per-image augmentation off:
    # it runs in a Python loop and would measure the augmentation, not DDP's scaling
    print(f"\n== 2. the lab's figure: core sharing, not DDP (default threads: 1 rank x {os.cpu_count()} threads "
          f"vs 2 ranks x {max(1, (os.cpu_count() or 1) // 2)})\nworkload: resnet18 width {args.width}, "
          f"{args.image_size}px, {len(data['train'])} train images, batch {args.batch_size} per rank, "
          f"MixUp/CutMix on, {args.epochs} epochs (first = warm-up)")
    one = measure(data, 1, cfg, args.device)
    two = measure(data, 2, cfg, args.device)
    for r in (one, two):
        print(f"world size {r['world_size']}: {r['images_per_s']:7.1f} img/s  ({r['seconds']:.1f}s timed)")
    eff = two["images_per_s"] / (2 * one["images_per_s"])
    print(f"speed-up x{two['images_per_s'] / one['images_per_s']:.2f} with 2 ranks")
    print(f"core-sharing scaling efficiency (not DDP's overhead): {eff:.0%}")
    if torch.device(args.device).type == "cpu":
        print(WHY_CPU)
    if torch.cuda.is_available():
        amp_comparison(data, cfg, "cuda")
    elif env.cpu_has_native_bf16():
        amp_comparison(data, cfg, "cpu")
    else:
        print("mixed precision vs fp32: skipped (no GPU, and this CPU does not run bf16 natively).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--buckets", type=float, nargs="+", default=[25.0, 1.0],
                   help="DDP bucket_cap_mb values to compare (25 = PyTorch's default)")
    p.add_argument("--steps", type=int, default=10, help="fair part: timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=6, help="fair part: interleaved rounds (the best counts)")
    p.add_argument("--skip-lab", action="store_true", help="leave out part 2 (the lab's core-sharing figure)")
    p.add_argument("--epochs", type=int, default=2, help="part 2: epochs per measurement (the first is warm-up)")
    p.add_argument("--max-train", type=int, default=QUICK["03_imagenet_ddp_ablations"]["max_train"])
    p.add_argument("--device", default="cpu", help="part 2 only; part 1 is a CPU measurement")
    args = p.parse_args(argv)

    load = os.getloadavg()
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, gloo; load average (1 min) {load[0]:.1f}")
    eff = print_fair(fair(args), args)
    if not args.skip_lab:
        lab_figure(args)
    print(f"\nload average (1 min) before / after: {load[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          "cores (other processes running at the same time lower the 2-rank figures)")
    return 0 if eff > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
