"""Lab 03's training: seed 002's ImageNet recipe on DDP ranks, as a Python API and as a command.

    python -m labkit.labs.ablations --world-size 2 --quick                # a 1-minute CPU run
    python -m labkit.labs.ablations --world-size 4 --data-dir /data/ILSVRC --model resnet50 \\
        --epochs 90 --batch-size 256 --lr 3e-4 --drop-path-rate 0.2 --use-blurpool
    python -m labkit.labs.ablations --resume results/03_ablations/checkpoints/run/last.pt

The notebook's sweep runs the notebook's own ``torchrun`` script (:mod:`labkit.labs.ablations.script`), so
the table measures the taught code; this module keeps the lab's table (:func:`ablation_table`), its configs
(:func:`prepare`) and a terminal twin of the script for long sweeps without the notebook:
:func:`run_ablations` runs a list of configs in one process group (spawn and rendezvous paid once),
refusing a config without a full batch per rank before any rank starts. Each rank runs :func:`labkit.train.train_one_epoch`
unchanged, with the recipe's parts (:mod:`labkit.labs.ablations.recipe`) plugged into its hooks, in the precision
``labkit.env`` picks (bf16 + ``channels_last`` on GPUs and CPUs that run bf16 natively).
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from labkit import env, metrics
from labkit.distributed import RULES as DISTRIBUTED_RULES
from labkit.distributed import ddp
from labkit.env import seed_everything
from labkit.errors import ParameterError
from labkit.labs.ablations import recipe
from labkit.labs.ablations.recipe import MODELS, SWITCH_RULES, AblationConfig, make_config, peak_lr, schedule
from labkit.models.resnet import resnet
from labkit.params import Rule
from labkit.results import lab_dir
from labkit.train import evaluate, shard_indices, train_one_epoch

LAB = "03_imagenet_ddp_ablations"


def ablation_configs(ablations: list[dict], repeats: int = 1, **base) -> list[AblationConfig]:
    """Configs for the notebook's ``ablations`` list: each dict (``name`` + switches) over ``base``.

    Every row becomes ``repeats`` runs with the same seeds ``seed, seed + 1, …``, named ``<name>#1``,
    ``<name>#2``, … when ``repeats > 1``: run ``k`` of a row and run ``k`` of the baseline (the first row) share
    a seed, so their difference is free of what that seed does to both (:func:`ablation_table` pairs them).
    """
    if not isinstance(ablations, (list, tuple)) or not ablations:
        raise ParameterError(f"{LAB}: ablations must be a non-empty list of dicts, got {ablations!r}.")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ParameterError(f"{LAB}: repeats={repeats!r} must be an integer >= 1.")
    configs = []
    for i, item in enumerate(ablations):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ParameterError(f"{LAB}: ablations[{i}] = {item!r} must be a dict with a 'name' and switches.")
        if REPEAT in item["name"]:
            raise ParameterError(f"{LAB}: ablation name {item['name']!r} may not contain {REPEAT!r} (it marks repeats).")
        if repeats > 1:
            seed = {**base, **item}.get("seed", 0)
            configs += [make_config({**base, **item, "name": f"{item['name']}{REPEAT}{k + 1}", "seed": seed + k})
                        for k in range(repeats)]
        else:
            configs.append(make_config({**base, **item}))
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ParameterError(f"{LAB}: ablation names must be unique, got {names}.")
    return configs


#: Rules for the notebook's own parameters: ``labkit.params.check(LAB, rules=LAB_RULES, ...)``.
LAB_RULES: dict[str, Rule] = {
    "world_size": DISTRIBUTED_RULES["world_size"], "lr_scaling": DISTRIBUTED_RULES["lr_scaling"],
    "model": SWITCH_RULES["model"], "width": SWITCH_RULES["width"],
    "progressive_sizes": SWITCH_RULES["progressive_sizes"],
    "layout": Rule(str, choices=("auto", "ilsvrc", "tiny-imagenet", "plain")),
    "standin_classes": Rule(int, 2, 1000, help="classes of the synthetic stand-in"),
    "lr_finder_steps": Rule(int, 0, 10_000, help="batches of the LR range test (0 = skip it)"),
    "ablations": Rule(list, help="named configs: [{'name': ..., '<switch>': value, ...}, ...]"),
    "quick_ablations": Rule(list, help="names of the rows quick mode keeps (the first row is the baseline)"),
    "repeats": Rule(int, 1, 100, optional=True, help="seeds every row is trained with, the same for all rows "
                                                     "(None: 2 quick, 3 full)"),
    "test_size": Rule(int, 0, 10_000_000, help="training images held out as the test split (0: none)"),
    "memory_budget": Rule((int, float), 0, 2**50, optional=True,
                          help="bytes of decoded images kept in RAM; above it a memory-mapped cache on disk "
                               "(None: half the available memory)"),
}

#: Quick mode's recipe: a learning rate for a ~200-step run of a quarter-width ResNet-18 (the seed's 3e-4
#: suits 90 epochs of a ResNet-50), a shorter warm-up, and how many images are held out as the test split.
QUICK_RECIPE = {"lr": 3e-3, "pct_start": 0.2, "test_size": 300}
#: The separator of a repeated run's name: "baseline#2" is the baseline's second seed.
REPEAT = "#"


def prepare(cfg: dict) -> list[AblationConfig]:
    """The lab's ablation configs from its checked parameters (``cfg`` from ``labkit.params.check``).

    The first row of ``ablations`` is the baseline. Every row runs ``repeats`` times, with the same seeds
    ``seed``, ``seed + 1``, … (runs named ``baseline#1``, ``baseline#2``, …), so the table can judge each
    row's difference to the baseline seed by seed. Quick mode keeps only the rows named in ``quick_ablations``
    and shrinks the network (ResNet-18, width ≤ 0.25, batch ≤ 32 and small enough that each of ``world_size``
    ranks gets a full batch of ``max_train`` images) and the recipe
    (:data:`QUICK_RECIPE`) so that each row learns in seconds on a CPU; ``cfg`` is updated in place
    so the echo shows what runs.
    """
    rows = cfg["ablations"]
    if cfg.get("quick"):
        wanted = cfg.get("quick_ablations")
        if wanted:
            names = [r.get("name") for r in rows if isinstance(r, dict)]
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise ParameterError(f"{LAB}: quick_ablations names {unknown}, which are not rows of ablations "
                                     f"({names}).")
            rows = [r for r in rows if r.get("name") in wanted or r is rows[0]]
        # a batch that fits: every rank must get at least one full batch of its share of max_train images
        fits = max(1, (cfg.get("max_train") or 10**9) // cfg.get("world_size", 1))
        cfg.update(model="resnet18", width=min(cfg["width"], 0.25), batch_size=min(cfg["batch_size"], 32, fits),
                   lr_finder_steps=min(cfg.get("lr_finder_steps", 0), 20), ablations=rows)
        if cfg.get("progressive_sizes"):
            cfg["progressive_sizes"] = sorted({min(s, cfg["image_size"]) for s in cfg["progressive_sizes"]}
                                              | {cfg["image_size"]})
        cfg.setdefault("lr", QUICK_RECIPE["lr"])
        cfg["lr"] = max(cfg["lr"], QUICK_RECIPE["lr"])
        cfg["test_size"] = min(cfg.get("test_size", QUICK_RECIPE["test_size"]), QUICK_RECIPE["test_size"])
    if cfg.get("repeats") is None:
        cfg["repeats"] = 2 if cfg.get("quick") else 3
    keys = ("model", "width", "image_size", "progressive_sizes", "epochs", "batch_size", "lr", "lr_scaling",
            "amp", "seed")
    base = {k: cfg[k] for k in keys if k in cfg}
    if cfg.get("quick"):
        base["pct_start"] = QUICK_RECIPE["pct_start"]
    return ablation_configs(rows, repeats=cfg["repeats"], **base)


def row_name(run_name: str) -> str:
    """The ablation row of a run: ``"baseline#2"`` → ``"baseline"``."""
    return run_name.split(REPEAT)[0]


def slug(name: str) -> str:
    """A folder name for a run name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


# --------------------------------------------------------------------------- one rank
def _keep_format(mix, channels_last: bool):
    """``mix`` (MixUp/CutMix) returning its images in ``channels_last`` again when the run uses it."""
    if mix is None or not channels_last:
        return mix

    def mixed(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = mix(x, y)
        return x.contiguous(memory_format=torch.channels_last), y

    return mixed


def _train_config(rank: int, world_size: int, device: torch.device, data, cfg: AblationConfig,
                  options: dict) -> dict:
    """Train and validate one config on this rank; rank 0 returns the history and final metrics."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    num_classes = len(data.classes)
    amp_dtype = env.amp_dtype(cfg.amp, device)          # bf16 / fp16 / None (fp32)
    scaler = env.grad_scaler(amp_dtype, device)         # fp16 only
    channels_last = env.use_channels_last(device, amp_dtype)
    model = resnet(MODELS[cfg.model], num_classes, cfg.variant, cfg.drop_path_rate, cfg.use_blurpool,
                   cfg.width, small_input=cfg.image_size < 128)
    if cfg.sync_bn:
        if device.type != "cuda":
            raise ValueError(f"{cfg.name}: sync_bn=True needs GPU ranks (SyncBatchNorm does not run on CPUs); "
                             "leave it off: rank 0's BatchNorm statistics are then broadcast before evaluation.")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = recipe.make_ema(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None

    plan = schedule(cfg)
    train_set = data.splits["train"]
    sampler = DistributedSampler(range(len(train_set.labels)), num_replicas=world_size, rank=rank,
                                 shuffle=True, seed=cfg.seed)
    too_small = recipe.fit_error(len(train_set.labels), world_size, cfg)
    if too_small:
        raise ValueError(too_small)
    steps = [sampler.num_samples // bs for _, bs in plan]  # drop_last=True
    lr = peak_lr(cfg, world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    scheduler = recipe.lr_scheduler(optimizer, cfg, lr, sum(steps))
    mix = _keep_format(recipe.mixup_cutmix(num_classes, cfg.mixup, cfg.cutmix), channels_last)
    train_loss, eval_loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), nn.CrossEntropyLoss()
    eval_tf = recipe.RGBTransform(cfg.image_size, train=False, channels_last=channels_last)
    n_val = len(data.splits["val"].labels)
    gap_idx = torch.randperm(len(train_set.labels), generator=torch.Generator().manual_seed(cfg.seed))[:n_val]
    eval_bs = max(bs for _, bs in plan)
    val_loader = data.loader("val", eval_bs, shuffle=False, sampler=shard_indices(n_val, rank, world_size))
    gap_loader = data.loader("train", eval_bs, shuffle=False, sampler=shard_indices(gap_idx, rank, world_size))
    n_test = len(data.splits["test"].labels) if "test" in data.splits else 0
    test_loader = (data.loader("test", eval_bs, shuffle=False, sampler=shard_indices(n_test, rank, world_size))
                   if n_test else None)

    history, start = [], 0
    ckpt_path = Path(options["save_dir"]) / slug(cfg.name) / "last.pt"
    if options.get("resume"):
        state = ddp.load_checkpoint(options["resume"], map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, start = list(state["history"]), int(state["epoch"])
    if rank == 0:
        ddp.report({"type": "start", "name": cfg.name, "epochs": cfg.epochs, "start_epoch": start})

    for epoch in range(start, cfg.epochs):
        size, bs = plan[epoch]
        seed_everything(cfg.seed + 1009 * (epoch + 1) + rank)  # same draws whether resumed or not
        sampler.set_epoch(epoch)
        loader = data.loader("train", bs, shuffle=False, sampler=sampler, drop_last=True)
        lr_now = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(net, loader, optimizer, train_loss, device=device,
                                transform=recipe.train_transform(cfg, size, channels_last=channels_last),
                                batch_transform=mix,
                                amp_dtype=amp_dtype, scaler=scaler, scheduler=scheduler,
                                grad_clip=cfg.grad_clip or None, ema=ema,
                                progress=options.get("batch_progress", False) and rank == 0,
                                desc=f"{cfg.name} {epoch + 1}/{cfg.epochs}")
        train = ddp.reduce_metrics(stats, ("loss", "acc"), device)
        if not cfg.sync_bn:  # every rank's BatchNorm statistics = rank 0's, before evaluating and saving
            ddp.broadcast_buffers(model, *([ema.module] if ema is not None else []))
        judged = ema.module if ema is not None else model
        val = ddp.reduce_metrics(evaluate(judged, val_loader, eval_loss, device=device, transform=eval_tf,
                                          amp_dtype=amp_dtype, topk=(1, 5)), ("loss", "acc", "top5"), device)
        fit = ddp.reduce_metrics(evaluate(judged, gap_loader, eval_loss, device=device, transform=eval_tf,
                                          amp_dtype=amp_dtype), ("acc",), device)
        record = {"epoch": epoch + 1, "image_size": size, "batch_size": bs, "lr": lr_now,
                  "loss": train["loss"], "acc": train["acc"], "train_top1": fit["acc"],
                  "val_loss": val["loss"], "val_acc": val["acc"], "val_top5": val["top5"],
                  "gap": fit["acc"] - val["acc"], "seconds": train["seconds"],
                  "images_per_s": train["images_per_s"], "val_seconds": val["seconds"]}
        if ema is not None:
            raw = ddp.reduce_metrics(evaluate(model, val_loader, eval_loss, device=device, transform=eval_tf,
                                              amp_dtype=amp_dtype), ("acc",), device)
            record["raw_val_acc"] = raw["acc"]
        history.append(record)
        if rank == 0:
            ddp.save_checkpoint(ckpt_path, {
                "format": 1, "epoch": epoch + 1, "world_size": world_size, "config": asdict(cfg),
                "run": {**options.get("run_args", {}), "world_size": world_size},
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "ema": ema.state_dict() if ema is not None else None, "history": history})
            ddp.report({"type": "epoch", "name": cfg.name, "epochs": cfg.epochs, **record})
        if options.get("stop_after") and epoch + 1 >= options["stop_after"]:
            break
    if options.get("replica_dir"):  # every rank saves its replica: to check that they are identical
        replica = {"model": model.state_dict(), "ema": ema.module.state_dict() if ema is not None else {}}
        ddp.save_checkpoint(Path(options["replica_dir"]) / slug(cfg.name) / f"rank{rank}.pt", replica)
    test = None
    if test_loader is not None:  # the held-out split: measured once, at the end; nothing is chosen on it
        judged = ema.module if ema is not None else model
        outputs = evaluate(judged, test_loader, eval_loss, device=device, transform=eval_tf, amp_dtype=amp_dtype,
                           topk=(1, 5), return_outputs=True)
        outputs.pop("probs")
        y_true, y_pred = ddp.gather_arrays(outputs.pop("y_true"), outputs.pop("y_pred"))
        test = {**ddp.reduce_metrics(outputs, ("acc", "top5"), device),
                **metrics.summarize(y_true, y_pred, num_classes, train_labels=train_set.labels)}
    seconds = ddp.reduce_max(time.perf_counter() - started, device)
    if rank != 0:
        return {}
    last = history[-1]
    train_s = sum(h["seconds"] for h in history[start:]) or 1e-9
    images = sum(h["images_per_s"] * h["seconds"] for h in history[start:])
    final = {"top1": last["val_acc"], "top5": last["val_top5"], "train_top1": last["train_top1"],
             "test_top1": test["acc"] if test else float("nan"), "test_top5": test["top5"] if test else float("nan"),
             **{f"test_{k}": test[k] if test else float("nan") for k in ("balanced_acc", "macro_f1", "majority_rate")},
             "chance": 1.0 / num_classes,
             "gap": last["gap"], "seconds": seconds, "images_per_s": images / train_s,
             "epochs": last["epoch"], "peak_lr": lr, "global_batch": cfg.batch_size * world_size,
             "precision": env.precision_name(amp_dtype), "channels_last": channels_last,
             "parameters": sum(p.numel() for p in model.parameters())}
    return {"name": cfg.name, "row": row_name(cfg.name), "seed": cfg.seed, "config": asdict(cfg), "history": history,
            "final": final,
            "checkpoint": str(ckpt_path), "world_size": world_size}


def train_rank(rank: int, world_size: int, device: torch.device, data, configs: list[AblationConfig],
               options: dict) -> list[dict]:
    """The function every rank runs (:func:`labkit.distributed.ddp.launch` target): the configs one after another."""
    return [_train_config(rank, world_size, device, data, cfg, options) for cfg in configs]


# --------------------------------------------------------------------------- the caller's side
class _Progress:
    """Parent-side view of the ranks' events: a tqdm bar over all epochs and one line per epoch."""

    def __init__(self, total: int, show: bool, bar: bool = True) -> None:
        self.bar = tqdm(total=total, desc="ablations", unit="epoch", disable=not (show and bar),
                        dynamic_ncols=True)
        self.show = show

    def __call__(self, event: dict) -> None:
        if event.get("type") == "start" and event.get("start_epoch"):
            self.bar.update(event["start_epoch"])
        if event.get("type") != "epoch":
            return
        self.bar.update(1)
        if self.show:
            tqdm.write(f"{event['name']:<18} epoch {event['epoch']}/{event['epochs']} {event['image_size']:>3}px "
                       f"loss {event['loss']:.3f}  val top-1 {event['val_acc']:.3f} top-5 {event['val_top5']:.3f}  "
                       f"gap {event['gap']:+.3f}  {event['images_per_s']:.0f} img/s")


def run_ablations(configs: list[AblationConfig | dict], data, *, world_size: int = 2, device: str = "auto",
                  save_dir: str | Path | None = None, resume: str | Path | None = None,
                  stop_after: int | None = None, progress: bool = True, batch_progress: bool = False,
                  timeout_s: float = 600, run_args: dict | None = None,
                  replica_dir: str | Path | None = None) -> list[dict]:
    """Train each config on ``world_size`` DDP ranks (one process group for all); one result each.

    A result holds ``name``, ``config``, ``history`` (per-epoch dicts), ``final`` (``top1``, ``top5``,
    ``gap`` = clean train top-1 − val top-1, ``seconds``, ``images_per_s``, …) and ``checkpoint``.
    ``data`` is an ``ImageData`` with ``train`` and ``val`` splits (``labkit.data.imagenet.load_imagenet``).
    ``resume`` continues the (single) config from a checkpoint; ``stop_after`` ends after that epoch.
    ``progress`` prints one line per epoch under a bar over all epochs; ``batch_progress`` adds rank 0's
    per-batch bar (for a terminal; the epoch bar is then left out). ``run_args`` (data options) are
    stored in the checkpoints, so that ``--resume`` finds the same data. ``replica_dir``: every rank
    saves its final weights and buffers there (``<run>/rank<N>.pt``), to compare the replicas.
    """
    configs = [c if isinstance(c, AblationConfig) else make_config(c) for c in configs]
    too_small = [e for c in configs if (e := recipe.fit_error(len(data.splits["train"].labels), world_size, c))]
    if too_small:  # before any rank starts
        raise ParameterError("\n".join(dict.fromkeys(too_small)))
    if resume and len(configs) != 1:
        raise ValueError("run_ablations: resume continues one run; pass exactly one config with resume=.")
    missing = [s for s in ("train", "val") if s not in data.splits]
    if missing:
        raise ValueError(f"run_ablations: the data has no {missing} split(s); it has {sorted(data.splits)}.")
    options = {"save_dir": str(save_dir or lab_dir(LAB) / "checkpoints"), "resume": str(resume) if resume else None,
               "stop_after": stop_after, "batch_progress": batch_progress, "run_args": dict(run_args or {}),
               "replica_dir": str(replica_dir) if replica_dir else None}
    view = _Progress(sum(c.epochs for c in configs), progress, bar=not batch_progress)
    try:
        return ddp.launch(train_rank, world_size, (data, configs, options), device=device,
                          timeout_s=timeout_s, on_event=view)
    finally:
        view.bar.close()


def run_ablation(config: AblationConfig | dict, data, **kw) -> dict:
    """:func:`run_ablations` for one config."""
    return run_ablations([config], data, **kw)[0]


def ablation_table(results: list[dict], level: float = 0.95):
    """One row per ablation (its seeds averaged), as a pandas DataFrame.

    Columns: ``seeds`` (runs), ``top1`` (mean validation top-1), ``top1_spread`` (max − min over the
    seeds; NaN for a single run), ``top5``, ``test_top1``, ``test_balanced_acc``, ``test_macro_f1`` (means on the
    held-out split), ``gap``, ``seconds``, ``images_per_s`` (means); then the comparison with the first row (the
    baseline), seed by seed: ``diff`` (mean of the paired top-1 differences), ``bound`` (its two-sided ``level``
    bound, Student's t at seeds − 1 degrees of freedom) and ``verdict`` (:func:`labkit.metrics.paired_difference`:
    "beyond noise" when 0 lies outside ``diff ± bound``; "baseline" for the first row; "no spread measured" with
    one seed). Runs pair by their ``seed`` (in order where a result has none).
    """
    rows, order = {}, []
    for r in results:
        row = r.get("row") or row_name(r["name"])
        if row not in rows:
            rows[row] = []
            order.append(row)
        rows[row].append(r)
    table = []
    for row in order:
        finals = [r["final"] for r in rows[row]]
        mean = lambda k: sum(f.get(k, float("nan")) for f in finals) / len(finals)  # noqa: E731
        top1 = [f["top1"] for f in finals]
        table.append({"ablation": row, "seeds": len(finals), "top1": mean("top1"),
                      "top1_spread": max(top1) - min(top1) if len(top1) > 1 else float("nan"),
                      "top5": mean("top5"), "test_top1": mean("test_top1"),
                      "test_balanced_acc": mean("test_balanced_acc"), "test_macro_f1": mean("test_macro_f1"),
                      "gap": mean("gap"), "seconds": mean("seconds"), "images_per_s": mean("images_per_s")})

    def by_seed(row: str) -> dict:
        return {r.get("seed", k): r["final"]["top1"] for k, r in enumerate(rows[row])}

    base = by_seed(order[0])
    for t in table:
        if t["ablation"] == order[0]:
            t.update(diff=0.0, bound=float("nan"), verdict="baseline", paired_seeds=len(base))
            continue
        this = by_seed(t["ablation"])
        shared = sorted(set(this) & set(base))
        if not shared:
            raise ValueError(f"ablation {t['ablation']!r} shares no seed with the baseline {order[0]!r} "
                             f"(seeds {sorted(this)} vs {sorted(base)}): run every row with the same seeds.")
        judged = metrics.paired_difference([this[k] for k in shared], [base[k] for k in shared], level)
        t.update(diff=judged["diff"], bound=judged["bound"], verdict=judged["verdict"], paired_seeds=judged["n"])
    return pd.DataFrame(table)
