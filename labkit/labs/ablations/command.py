"""``python -m labkit.labs.ablations``: Lab 03's sweep runner as a command — one config on DDP ranks, a checkpoint
every epoch, ``--resume``, and a run record. The training itself is :mod:`labkit.labs.ablations.sweep`; this module is its
command line (switches from :class:`labkit.labs.ablations.recipe.AblationConfig`, data and launch options, resume rules).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

from labkit.data.imagenet import load_imagenet
from labkit.distributed import ddp
from labkit.env import environment
from labkit.labs.ablations.recipe import AblationConfig, add_switches, given_switches, make_config, peak_lr
from labkit.labs.ablations.sweep import LAB, QUICK_RECIPE, run_ablation
from labkit.labs.ablations.sweep import __doc__ as IMAGENET_DOC
from labkit.params import QUICK, ParameterError
from labkit.results import RunRecord, save


# --------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    """The command's arguments; recipe switches default to None (= the config default, or the checkpoint's)."""
    p = argparse.ArgumentParser(prog="python -m labkit.labs.ablations", epilog=IMAGENET_DOC.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Seed 002's ImageNet/Tiny-ImageNet recipe on DDP ranks (gloo on CPU, "
                                            "nccl on GPUs). Writes a checkpoint every epoch and a run record.")
    g = p.add_argument_group("run")
    g.add_argument("--world-size", type=int, default=None,
                   help="DDP processes, one GPU each on a GPU machine (default 2)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda")
    g.add_argument("--data", default=None, choices=("auto", "real", "synthetic"),
                   help="auto: the real dataset when found under --data-dir, else a synthetic stand-in")
    g.add_argument("--data-dir", default=None,
                   help="folder with ILSVRC/, tiny-imagenet-200/ or plain train/ val/ "
                   "(default data/tiny-imagenet; a stand-in is written there when empty)")
    g.add_argument("--layout", default=None, help="auto | ilsvrc | tiny-imagenet | plain (default auto: detect)")
    g.add_argument("--subset", action="store_true", default=None,
                   help="train on a class-balanced subset (the seed's --subset)")
    g.add_argument("--subset-size", type=int, default=None, help="images in the subset")
    g.add_argument("--max-train", type=int, default=None, help="cap on training images")
    g.add_argument("--max-val", type=int, default=None, help="cap on validation images")
    g.add_argument("--standin-classes", type=int, default=None, help="classes of the synthetic stand-in (default 10)")
    g.add_argument("--quick", action="store_true", help="the lab's quick mode: few epochs, small images and "
                   "data, resnet18 width 0.25, batch 32, lr 3e-3")
    g.add_argument("--save-dir", default=None, help="checkpoint folder (default results/03_ablations/checkpoints)")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue from a last.pt at the next epoch, with its settings and data options")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch as if interrupted (to try --resume)")
    g.add_argument("--timeout", type=float, default=600,
                   help="seconds a rank waits for its peers before failing (default 600)")
    add_switches(p)
    return p


#: The command's data and launch options (not recipe switches); a checkpoint keeps them for --resume.
RUN_DEFAULTS = {"world_size": 2, "data": "auto", "data_dir": "data/tiny-imagenet", "layout": "auto",
                "subset": False, "subset_size": None, "max_train": None, "max_val": None, "standin_classes": 10}


def _resolve(given: dict, saved: dict | None, defaults: dict, what: str, resume: str | None) -> dict:
    """Values for ``defaults``' keys: given on the command line, else the checkpoint's, else the default.
    On --resume a given value that differs from the checkpoint's is an error naming the switch."""
    if saved is not None:
        changed = [f"--{k.replace('_', '-')} {v!r} (checkpoint: {saved[k]!r})" for k, v in given.items()
                   if k in saved and saved[k] != v]
        if changed:
            raise ParameterError(f"--resume {resume}: a resumed run keeps its {what}; these differ: "
                                 f"{'; '.join(changed)}. Drop them, or start a new run without --resume.")
    return {k: given.get(k, (saved or {}).get(k, d)) for k, d in defaults.items()}


def config_from_args(args: argparse.Namespace) -> tuple[AblationConfig, dict]:
    """The run's config and data/launch options: defaults (or, on --resume, the checkpoint's)
    overridden by the switches given on the command line."""
    given = given_switches(args)
    run_given = {k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k) is not None}
    saved = ddp.load_checkpoint(args.resume) if args.resume else None
    if saved is None and args.quick:
        quick = QUICK[LAB]
        given.setdefault("model", "resnet18")
        given.setdefault("width", 0.25)
        given.setdefault("batch_size", 32)
        given.setdefault("lr", QUICK_RECIPE["lr"])
        given.setdefault("pct_start", QUICK_RECIPE["pct_start"])
        given["epochs"] = min(given.get("epochs", quick["epochs"]), quick["epochs"])
        given["image_size"] = min(given.get("image_size", quick["image_size"]), quick["image_size"])
        run_given["max_train"] = min(run_given.get("max_train") or 10**9, quick["max_train"])
        run_given["max_val"] = min(run_given.get("max_val") or 10**9, quick["max_test"])
    defaults = asdict(AblationConfig())
    cfg = _resolve(given, saved["config"] if saved else None, defaults, "recipe settings", args.resume)
    run = _resolve(run_given, {**saved.get("run", {}), "world_size": saved["world_size"]} if saved else None,
                   RUN_DEFAULTS, "data and world size", args.resume)
    if run["world_size"] < 1:
        raise ParameterError(f"--world-size {run['world_size']}: must be >= 1 (the number of DDP processes).")
    return make_config(cfg), run


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit.labs.ablations``: train one config on DDP ranks, save checkpoints and a run record."""
    args = build_parser().parse_args(argv)
    try:
        cfg, run = config_from_args(args)
    except ParameterError as exc:
        raise SystemExit(str(exc)) from None

    data = load_imagenet(run["data"], run["data_dir"], layout=run["layout"], image_size=cfg.image_size,
                         subset=run["subset"], subset_size=run["subset_size"], max_train=run["max_train"],
                         max_val=run["max_val"], standin_classes=run["standin_classes"], seed=cfg.seed)
    ws = run["world_size"]
    print(f"{cfg.name}: {cfg.model} ({cfg.variant}, width {cfg.width}) on {ws} rank(s), "
          f"{len(data['train'])} train / {len(data['val'])} val images, {len(data.classes)} classes, "
          f"peak lr {peak_lr(cfg, ws):.2e}")
    result = run_ablation(cfg, data, world_size=ws, device=args.device, save_dir=args.save_dir, resume=args.resume,
                          stop_after=args.stop_after, batch_progress=True, timeout_s=args.timeout, run_args=run)
    record = RunRecord(lab=LAB, params={**asdict(cfg), **run, "resume": args.resume,
                                        "command": "python -m labkit.labs.ablations"},
                       env=environment(args.device, ws), data=data.describe(), epochs=result["history"],
                       final=result["final"])
    record.add_artifact(result["checkpoint"])
    path = save(record)
    f = result["final"]
    print(f"top-1 {f['top1']:.3f}  top-5 {f['top5']:.3f}  train-val gap {f['gap']:+.3f}  "
          f"{f['seconds']:.1f}s  {f['images_per_s']:.0f} img/s\ncheckpoint: {result['checkpoint']}\nrecord: {path}")
    return 0
