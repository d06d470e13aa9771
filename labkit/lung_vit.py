"""Lab 04: a conv-stem ViT on the 9 lung classes — a Lightning module trained on Ray Train, the
3 best checkpoints kept, the best one scored on the test set, the run tracked in MLflow.

The same training runs from the notebook and as a command that ``ray job submit`` can send to a
cluster (seed 004's way)::

    python -m labkit.lung_vit --workers 2 --epochs 12 --image-size 128
    ray job submit --working-dir . --runtime-env labs/ray_runtime_env.yaml -- python -m labkit.lung_vit --quick

Driver (:func:`train`): data once, the MLflow run, Ray via :func:`labkit.distributed.ray_cluster`,
a ``TorchTrainer``, then ``Result.get_best_checkpoint("val_loss", "min")`` scored on the test set.
Workers (:func:`train_func`): a Lightning ``Trainer`` with ``RayDDPStrategy``, ``RayLightningEnvironment``
and ``RayTrainReportCallback`` (checkpoint + metrics every epoch), prepared by ``prepare_trainer``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from labkit import distributed
from labkit.data.lung import data_root
from labkit.params import Config, ParameterError, Rule, check
from labkit.ray_train import quiet_ray_worker_logs
from labkit.results import RunRecord, lab_dir

LAB = "04_lung_vit"
KEEP = 3  # checkpoints kept by Ray: the 3 lowest val_loss

#: The lab's knobs and their real-run defaults (the notebook's parameters cell mirrors these).
DEFAULTS: dict[str, Any] = dict(
    workers=2, epochs=12, batch_size=32, lr=5e-4, weight_decay=0.05, image_size=128, depth=6, heads=8, dim=256,
    mlp_dim=1024, dropout=0.1, precision="auto", track=True, data="auto", data_dir=None, device="auto",
    seed=0, quick=False, address=None)


def _div4(value: int) -> str | None:
    return None if value % 4 == 0 else "is not divisible by 4 (the conv stem downsamples 4× per side)"


#: Rules for the lab's own parameters, passed to :func:`labkit.params.check` as ``rules=``.
RULES: dict[str, Rule] = {
    "depth": Rule(int, 1, 48, help="transformer blocks"),
    "heads": Rule(int, 1, 64, help="attention heads per block; dim must be divisible by heads"),
    "dim": Rule(int, 8, 4096, help="token width (embedding dimension)"),
    "mlp_dim": Rule(int, 8, 16384, help="hidden width of each block's MLP"),
    "dropout": Rule(float, 0, 0.9, help="dropout in the MLPs and after the position embedding"),
    "weight_decay": Rule(float, 0, 1, help="AdamW weight decay"),
    "image_size": Rule(int, 16, 1024, test=_div4, help="images are resized to image_size × image_size"),
    "data_dir": Rule(str, optional=True, help="the lung set's root (train/ val/ test/); None: $DATA_PATH, else data/lung"),
}


def check_params(lab: str = LAB, rules: dict[str, Rule] | None = None, show: bool = True, **values: Any) -> Config:
    """:func:`labkit.params.check` with :data:`RULES` (and ``rules``), plus the check that involves two
    parameters (``dim`` divisible by ``heads``): a :class:`ParameterError` names the culprits."""
    cfg = check(lab, rules={**RULES, **(rules or {})}, show=False, **values)
    if "dim" in cfg and "heads" in cfg and cfg.dim % cfg.heads:
        ok = [h for h in range(1, min(cfg.dim, 64) + 1) if cfg.dim % h == 0][-4:]
        raise ParameterError(f"{lab}: parameter 'dim' = {cfg.dim} is not divisible by 'heads' = {cfg.heads} (each "
                             f"head gets dim/heads features); use heads in {ok}, or a dim that is a multiple of "
                             f"{cfg.heads}.")
    if show:
        cfg.show()
    return cfg


def build_model(cfg: dict, num_classes: int = 9):
    """The lab's ViT for ``cfg`` (image_size, depth, heads, dim, mlp_dim, dropout)."""
    from labkit.models.vit import ViT

    return ViT(num_classes=num_classes, image_size=cfg["image_size"], dim=cfg["dim"], depth=cfg["depth"],
               heads=cfg["heads"], mlp_dim=cfg["mlp_dim"], dropout=cfg.get("dropout", 0.1))


def build_module(cfg: dict, classes, model=None):
    """A :class:`~labkit.lightning_module.LitClassifier` around ``model`` (default: :func:`build_model`)
    with labkit's on-device augmentation for training and plain normalisation for evaluation."""
    from labkit.data.augment import batch_transform
    from labkit.lightning_module import LitClassifier

    model = model if model is not None else build_model(cfg, len(classes))
    return LitClassifier(model, classes, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.05),
                         transform_train=batch_transform(train=True), transform_eval=batch_transform(train=False),
                         warmup_epochs=1 if cfg["epochs"] > 3 else 0)


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """Lightning's precision: ``"auto"`` → ``"bf16-mixed"`` on a GPU that supports bf16, else
    ``"32-true"`` (CPU autocast is slower than fp32 for this model)."""
    if precision == "auto":
        return "bf16-mixed" if use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    if precision == "16-mixed" and not use_gpu:
        raise ParameterError("precision='16-mixed' needs GPU workers (fp16 autocast); use 'auto', '32' or "
                             "'bf16-mixed' on CPU.")
    return "32-true" if precision == "32" else precision


def load_data(cfg: dict, progress: bool = False):
    """The lung set for ``cfg`` (the stand-in is written the first time; later loads hit the cache)."""
    from labkit.data.lung import load_lung

    return load_lung(data=cfg.get("data") or "auto", data_dir=cfg.get("data_dir"), image_size=cfg["image_size"],
                     max_train=cfg.get("max_train"), max_test=cfg.get("max_test"), seed=cfg.get("seed", 0),
                     progress=progress)


# --------------------------------------------------------------------------- worker side
def quiet_lightning() -> None:
    """Keep Lightning's banner lines, a deprecation warning and Ray Train V2's per-report INFO dump
    (every metric of every epoch) out of the notebook; warnings and errors still show."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*treespec.*")
    quiet_ray_worker_logs()


def _callbacks(config: dict, rank: int, n_train: int) -> tuple[list, Any]:
    import sys

    import lightning.pytorch as pl
    from ray.train.lightning import RayTrainReportCallback

    class EpochHistory(pl.Callback):
        """Rank 0 keeps every epoch's metrics (Ray's Result keeps only those of kept checkpoints)
        and prints one progress line per epoch (Ray streams it to the notebook)."""

        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.tick = time.perf_counter()

        def on_validation_epoch_start(self, trainer, module) -> None:
            self.train_s = time.perf_counter() - self.tick

        def on_train_epoch_end(self, trainer, module) -> None:
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            seconds = time.perf_counter() - self.tick
            row = {"epoch": trainer.current_epoch + 1, "loss": m.pop("train_loss", None),
                   "acc": m.pop("train_acc", None), "val_loss": m.pop("val_loss", None),
                   "val_acc": m.pop("val_acc", None), **m, "seconds": seconds,
                   "images_per_s": n_train / max(getattr(self, "train_s", seconds), 1e-9)}
            self.rows.append(row)
            if rank == 0 and config.get("progress", True):
                # sys.stdout, not print: Ray Train V2 also routes print() into its logger (twice on screen)
                sys.stdout.write(f"epoch {row['epoch']}/{config['epochs']}: loss {row['loss']:.3f} acc "
                                 f"{row['acc']:.3f} | val_loss {row['val_loss']:.3f} val_acc {row['val_acc']:.3f} | "
                                 f"{seconds:.1f}s ({row['images_per_s']:.0f} img/s)\n")
                sys.stdout.flush()

    history = EpochHistory()
    callbacks = [history]
    if config.get("mlflow_run_id"):
        from labkit.env import environment
        from labkit.lightning_module import MlflowEpochLogger

        uri = config.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        callbacks.append(MlflowEpochLogger(uri, config["mlflow_run_id"], params=config["params"],
                                           device_info=environment("auto") if rank == 0 else None))
    callbacks.append(RayTrainReportCallback())  # after the others: it saves the checkpoint and reports
    return callbacks, history


def train_func(config: dict) -> list[dict] | None:
    """What every Ray Train worker runs: Lightning ``fit`` with Ray's strategy, environment and
    report callback. Returns the per-epoch history on rank 0 (``Result.return_value``)."""
    import lightning.pytorch as pl
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from labkit.env import seed_everything

    quiet_lightning()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    use_gpu = bool(config["use_gpu"])
    if not use_gpu and config.get("threads"):
        torch.set_num_threads(config["threads"])
    seed_everything(config["seed"])                      # identical initial weights on every worker
    data = load_data(config)                             # reads the cache the driver prepared
    module = build_module(config, data.classes)
    callbacks, history = _callbacks(config, rank, len(data["train"]))
    trainer = pl.Trainer(
        max_epochs=config["epochs"], accelerator="gpu" if use_gpu else "cpu", devices="auto",
        strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
        callbacks=callbacks, precision=resolve_precision(config["precision"], use_gpu),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tempfile.mkdtemp(prefix="labkit-lightning-"))
    trainer = prepare_trainer(trainer)
    # Lightning swaps the shuffling sampler for a DistributedSampler: each worker sees 1/world_size.
    trainer.fit(module, data.loader("train", config["batch_size"], seed=config["seed"]),
                data.loader("val", config["batch_size"]))
    return history.rows if rank == 0 else None


# --------------------------------------------------------------------------- driver side
@dataclass
class LungRun:
    """What :func:`train` returns."""

    run_name: str
    history: pd.DataFrame                  # every epoch (from rank 0)
    kept: pd.DataFrame                     # the checkpoints Ray kept: path, epoch, val_loss
    best_path: Path                        # folder of the best checkpoint (lowest val_loss)
    best: dict                             # epoch, val_loss of the best checkpoint
    test: dict                             # test metrics of the best checkpoint
    outputs: dict                          # y_true, y_pred, probs on the test set
    module: Any                            # LitClassifier with the best weights (on the CPU)
    plan: Any                              # labkit.distributed.ScalingPlan
    precision: str
    fit_seconds: float
    run_dir: Path
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    cluster: dict = field(default_factory=dict)
    result: Any = None                     # ray.train.Result


def checkpoint_config():
    """Keep the :data:`KEEP` checkpoints with the lowest ``val_loss`` (Ray deletes the others)."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(num_to_keep=KEEP, checkpoint_score_attribute="val_loss", checkpoint_score_order="min")


def _worker_config(cfg: dict, plan, uri: str | None, mlflow_run_id: str | None) -> dict:
    from labkit import tracking

    keys = ("epochs", "batch_size", "lr", "weight_decay", "image_size", "depth", "heads", "dim", "mlp_dim",
            "dropout", "precision", "data", "max_train", "max_test", "seed")
    config = {k: cfg.get(k, DEFAULTS.get(k)) for k in keys}
    config.update(data_dir=str(data_root(cfg.get("data_dir")).resolve()), use_gpu=plan.use_gpu,
                  threads=plan.cpus_per_worker, progress=cfg.get("progress", True), mlflow_run_id=mlflow_run_id,
                  tracking_uri=uri if uri and tracking.is_local(uri) else None,   # a server's URI stays in the env
                  params={**{k: cfg.get(k) for k in (*keys, "workers")}, "backend": plan.backend})
    return config


def train(cfg: dict, *, data=None, results_dir: str | os.PathLike | None = None, run_name: str | None = None,
          quiet: bool = True) -> LungRun:
    """Train the lab's ViT on ``cfg.workers`` Ray workers and test its best checkpoint.

    A bad ``workers``/``device``/``precision`` fails before Ray starts; Ray is shut down at the
    end whatever happens; with ``cfg.track`` the MLflow run is marked FAILED when training fails.
    """
    from labkit import tracking
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = {**DEFAULTS, **cfg}
    address = distributed.resolve_address(cfg.get("address"))
    plan = distributed.plan_scaling(cfg["workers"], cfg["device"], **distributed.machine_resources()) \
        if address is None else None
    if plan is not None:
        resolve_precision(cfg["precision"], plan.use_gpu)
    data = data if data is not None else load_data(cfg, progress=True)
    run_name = run_name or distributed.default_run_name()
    run_dir = (lab_dir(LAB, results_dir) / "ray").resolve() / run_name
    uri = mlflow_run_id = None
    if cfg.get("track"):
        uri, mlflow_run_id = tracking.create_run(LAB, run_name, results_dir=results_dir,
                                                 tags={"model": "vit-conv-stem", "synthetic": str(data.synthetic)})
    try:
        with distributed.ray_cluster(address, quiet=quiet) as cluster:
            if plan is None:
                plan = distributed.plan_scaling(cfg["workers"], cfg["device"], **distributed.cluster_resources(),
                                                where=f"the cluster at {address}")
            if plan.notice:
                print(plan.notice)
            trainer = TorchTrainer(
                train_func, train_loop_config=_worker_config(cfg, plan, uri, mlflow_run_id),
                torch_config=TorchConfig(backend=plan.backend, timeout_s=300),
                scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                             resources_per_worker=plan.resources()),
                run_config=RunConfig(
                    name=run_name, storage_path=str(run_dir.parent), checkpoint_config=checkpoint_config(),
                    logging_config=LoggingConfig(log_level=distributed.TRAIN_LOG_LEVEL)))
            tick = time.perf_counter()
            result = trainer.fit()
            fit_seconds = time.perf_counter() - tick
        run = _finish(cfg, data, result, plan, run_name, run_dir, fit_seconds, uri, mlflow_run_id, cluster)
    except BaseException:
        if mlflow_run_id:
            tracking.end_run(uri, mlflow_run_id, "FAILED")
        raise
    return run


def _finish(cfg, data, result, plan, run_name, run_dir, fit_seconds, uri, mlflow_run_id, cluster) -> LungRun:
    """Reload the best checkpoint, score the test set, log the outcome to MLflow."""
    from labkit import tracking

    history = pd.DataFrame(result.return_value or [])
    best = result.get_best_checkpoint(metric="val_loss", mode="min")
    kept = pd.DataFrame([{"path": c.path, "epoch": int(m["epoch"]) + 1, "val_loss": m["val_loss"]}
                         for c, m in result.best_checkpoints]).sort_values("val_loss").reset_index(drop=True)
    best_info = kept.iloc[0].to_dict()
    precision = resolve_precision(cfg["precision"], torch.cuda.is_available() and plan.use_gpu)
    module, test, outputs = score_checkpoint(best, cfg, data, precision)
    run = LungRun(run_name=run_name, history=history, kept=kept, best_path=Path(best.path),
                  best={"epoch": best_info["epoch"], "val_loss": best_info["val_loss"]}, test=test,
                  outputs=outputs, module=module, plan=plan, precision=precision, fit_seconds=fit_seconds,
                  run_dir=run_dir, tracking_uri=uri, mlflow_run_id=mlflow_run_id, cluster=cluster, result=result)
    if mlflow_run_id:
        tracking.log_metrics(uri, mlflow_run_id, {**test, "best_epoch": run.best["epoch"],
                                                  "best_val_loss": run.best["val_loss"], "fit_seconds": fit_seconds})
        with tempfile.TemporaryDirectory() as tmp:
            path = save_best(run, Path(tmp) / "best_model.pt", cfg, data.classes)
            tracking.log_artifact(uri, mlflow_run_id, path, "best_checkpoint")
        tracking.end_run(uri, mlflow_run_id)
    return run


def score_checkpoint(checkpoint, cfg: dict, data, precision: str = "32-true"):
    """Load a Ray checkpoint (``checkpoint.ckpt`` written by ``RayTrainReportCallback``) into a fresh
    module and test it on this machine; returns ``(module, metrics, outputs)``."""
    import lightning.pytorch as pl

    from labkit.env import pick_device
    from labkit.lightning_module import load_weights

    quiet_lightning()
    device = pick_device(cfg.get("device", "auto"))
    module = build_module(cfg, data.classes)
    with checkpoint.as_directory() as folder:
        load_weights(module, Path(folder) / "checkpoint.ckpt")
    on_gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        tester = pl.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=cfg.get("progress", True), default_root_dir=tmp,
                            precision=precision if on_gpu else "32-true")
        metrics = tester.test(module, dataloaders=data.loader("test", cfg["batch_size"]), verbose=False)[0]
    return module.cpu(), {k: float(v) for k, v in metrics.items()}, module.test_outputs


def save_best(run: LungRun, path: str | os.PathLike, cfg: dict, classes) -> Path:
    """A slim copy of the best checkpoint (model weights + what rebuilds the model), written atomically."""
    from labkit.files import atomic_path

    config = {k: cfg[k] for k in ("image_size", "depth", "heads", "dim", "mlp_dim", "dropout")}
    with atomic_path(path) as tmp:
        torch.save({"model": run.module.model.state_dict(), "model_config": config, "classes": list(classes),
                    **run.best}, tmp)
    return Path(path)


def record(run: LungRun, cfg: dict, data) -> RunRecord:
    """A :class:`~labkit.results.RunRecord` of ``run`` (params without the cluster address)."""
    from labkit import tracking
    from labkit.env import environment

    params = {k: v for k, v in cfg.items() if k not in ("address", "progress")}
    params["address"] = "set" if cfg.get("address") or os.environ.get("RAY_ADDRESS") else None
    env = {**environment(cfg.get("device", "auto"), run.plan.workers), "backend": run.plan.backend,
           "use_gpu": run.plan.use_gpu, "precision": run.precision}
    final = {**run.test, "best_epoch": run.best["epoch"], "best_val_loss": run.best["val_loss"],
             "fit_seconds": run.fit_seconds, "kept_checkpoints": len(run.kept), "best_checkpoint": str(run.best_path),
             "kept": run.kept[["epoch", "val_loss"]].to_dict("records"),
             "seconds_per_epoch": float(run.history["seconds"].mean()) if len(run.history) else None,
             "mlflow": tracking.describe_uri(run.tracking_uri) if run.tracking_uri else None,
             "mlflow_run_id": run.mlflow_run_id}
    rec = RunRecord(lab=LAB, params=params, env=env, data=data.describe(), epochs=run.history.to_dict("records"),
                    final=final)
    rec.add_artifact(run.run_dir)
    return rec


# --------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m labkit.lung_vit", description=__doc__.split("\n\n")[0])
    for name, value in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif value is None:
            p.add_argument(flag, default=None, help={"address": "a running Ray cluster (default: $RAY_ADDRESS or "
                           "local)", "data_dir": "dataset root (default: $DATA_PATH, else data/lung)"}.get(name))
        else:
            p.add_argument(flag, type=type(value), default=value)
    p.add_argument("--max-train", type=int, default=None, help="cap on training images (stratified)")
    p.add_argument("--max-test", type=int, default=None, help="cap on validation and test images each")
    p.add_argument("--results-dir", default=None, help="results folder (default: $LABKIT_RESULTS or results/)")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch lines")
    return vars(p.parse_args(argv))


def main(argv: list[str] | None = None) -> Path:
    """Run the lab from the command line; prints the test metrics and the record's path."""
    from labkit import results

    args = parse_args(argv)
    results_dir, progress = args.pop("results_dir"), not args.pop("no_progress")
    caps = {k: args.pop(k) for k in ("max_train", "max_test")}
    cfg = check_params(show=True, **args)
    cfg.update({k: v if cfg.get(k) is None else min(v or cfg[k], cfg[k]) for k, v in caps.items()})
    cfg["progress"] = progress
    data = load_data(cfg, progress=progress)
    run = train(cfg, data=data, results_dir=results_dir)
    rec = record(run, cfg, data)
    path = results.save(rec, results_dir)
    print(f"test_acc {run.test.get('test_acc', float('nan')):.3f}  best epoch {run.best['epoch']} "
          f"(val_loss {run.best['val_loss']:.3f})  kept {len(run.kept)} checkpoints")
    print(f"record: {path}")
    return path


if __name__ == "__main__":  # run the module imported as labkit.lung_vit: Ray then pickles train_func by name
    from labkit import lung_vit

    lung_vit.main()
