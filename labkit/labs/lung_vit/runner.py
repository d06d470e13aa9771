"""Lab 04's plumbing: parameters, data, the ViT, the worker's set-up and config, the MLflow run,
scoring the best checkpoint and the run record.

The lesson — the LightningModule's steps, the Ray Train function and the ``TorchTrainer`` driver
— is written in ``labs/04_lung_vit.ipynb``. The same training as a command for a cluster lives in
:mod:`labkit.labs.lung_vit.command`, and runs as this module::

    python -m labkit.labs.lung_vit --workers 2 --epochs 12 --image-size 128
    ray job submit --working-dir . --runtime-env labs/ray_runtime_env.yaml -- python -m labkit.labs.lung_vit --quick
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch

from labkit import env
from labkit import metrics as lk_metrics
from labkit.data.augment import batch_transform
from labkit.data.lung import data_root, load_lung
from labkit.distributed import RULES as DISTRIBUTED_RULES
from labkit.distributed.worker import count_attempts, quiet_ray_worker_logs
from labkit.env import amp_dtype, environment, pick_device, seed_everything
from labkit.files import atomic_path
from labkit.labs.lung_vit import tracking
from labkit.labs.lung_vit.lightning_module import CHECKPOINT_NAME, ClassifierBase, load_weights, worker_callbacks, worker_result
from labkit.models.vit import ViT
from labkit.params import Config, ParameterError, Rule, check, folder_test
from labkit.results import RunRecord, lab_dir

LAB = "04_lung_vit"
KEEP = 3  # checkpoints kept by Ray: the 3 lowest val_loss (and, while training, the latest)
MAX_FAILURES = 1  # FailureConfig: restart the worker group once after a crash, from the latest checkpoint

#: The lab's knobs and their real-run defaults (the notebook's parameters cell mirrors these).
DEFAULTS: dict[str, Any] = dict(
    workers=2, epochs=12, batch_size=32, lr=5e-4, weight_decay=0.05, image_size=128, depth=6, heads=8, dim=256,
    mlp_dim=1024, dropout=0.1, precision="auto", track=True, data="auto", data_dir=None, device="auto",
    seed=0, quick=False, address=None, fail_at_epoch=None)


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
    "data_dir": Rule(str, optional=True, test=folder_test,
                     help="the lung set's root (train/ val/ test/); None: $DATA_PATH, else data/lung"),
    "precision": Rule(str, choices=("auto", "32", "bf16-mixed", "16-mixed"),
                      help="Lightning precision; 'auto' = bf16-mixed where the GPU or CPU runs bf16 natively, "
                           "16-mixed on other GPUs, else 32"),
    "track": Rule(bool, help="log the run to MLflow"),
}


def check_params(lab: str = LAB, rules: dict[str, Rule] | None = None, show: bool = True, **values: Any) -> Config:
    """:func:`labkit.params.check` with :data:`RULES` and ``labkit.distributed.RULES`` (and ``rules``), plus the
    check that involves two parameters (``dim`` divisible by ``heads``): a :class:`ParameterError` names the culprits."""
    cfg = check(lab, rules={**DISTRIBUTED_RULES, **RULES, **(rules or {})}, show=False, **values)
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
    return ViT(num_classes=num_classes, image_size=cfg["image_size"], dim=cfg["dim"], depth=cfg["depth"],
               heads=cfg["heads"], mlp_dim=cfg["mlp_dim"], dropout=cfg.get("dropout", 0.1))


def module_kwargs(cfg: dict) -> dict:
    """What a :class:`~labkit.labs.lung_vit.lightning_module.ClassifierBase` needs besides model and classes:
    LR, weight decay, warm-up, on-device augmentation, and ``channels_last`` for the precision."""
    return dict(lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.05), warmup_epochs=1 if cfg["epochs"] > 3 else 0,
                transform_train=batch_transform(train=True), transform_eval=batch_transform(train=False),
                channels_last=bool(cfg.get("channels_last", False)))


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """Lightning's ``precision`` for ``precision`` on GPU or CPU workers of this kind of machine.

    ``"auto"`` follows :func:`labkit.env.amp_dtype`: ``"bf16-mixed"`` where bf16 runs natively (recent
    GPUs; CPUs with AVX512-BF16/AMX), ``"16-mixed"`` on other GPUs, else ``"32-true"``. ``"32"`` forces fp32.
    """
    if precision == "auto":
        dtype = amp_dtype("auto", torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu"))
        return {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}.get(dtype, "32-true")
    if precision == "16-mixed" and not use_gpu:
        raise ParameterError("precision='16-mixed' needs GPU workers (fp16 autocast); use 'auto', '32' or "
                             "'bf16-mixed' on CPU.")
    return "32-true" if precision == "32" else precision


def use_channels_last(precision: str, use_gpu: bool) -> bool:
    """``channels_last`` for the stem's convolutions: on GPUs, and on CPUs running bf16
    (:func:`labkit.env.use_channels_last`)."""
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    return env.use_channels_last(torch.device("cuda" if use_gpu else "cpu"), dtype)


def load_data(cfg: dict, progress: bool = False):
    """The lung set for ``cfg`` (the stand-in is written the first time; later loads hit the cache)."""
    return load_lung(data=cfg.get("data") or "auto", data_dir=cfg.get("data_dir"), image_size=cfg["image_size"],
                     max_train=cfg.get("max_train"), max_test=cfg.get("max_test"), seed=cfg.get("seed", 0),
                     progress=progress)


# --------------------------------------------------------------------------- worker side plumbing
def quiet_lightning() -> None:
    """Keep Lightning's banner lines, a deprecation warning and Ray Train V2's per-report INFO dump
    (every metric of every epoch) out of the notebook; warnings and errors still show."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*treespec.*")
    quiet_ray_worker_logs()


def worker_setup(config: dict) -> tuple[int, int]:
    """A worker's first lines: quiet logs, its share of CPU threads, the common seed (identical
    initial weights on every worker). Returns ``(rank, world_size)``."""
    import ray.train

    quiet_lightning()
    if not config["use_gpu"] and config.get("threads"):
        torch.set_num_threads(config["threads"])
    seed_everything(config["seed"])
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _forward(name: str):
    """A Lightning hook of :class:`WorkerHook` that calls the same hook of each of its parts."""
    def hook(self, *args, **kwargs) -> None:
        for part in self.parts:
            getattr(part, name)(*args, **kwargs)
    hook.__name__ = name
    return hook


class WorkerHook(pl.Callback):
    """labkit's instrumentation of a Lab 04 worker behind one name, so ``train_func`` reads as its lesson.

    Made once, first thing in the worker: quiet logs, this worker's share of CPU threads and the common seed
    (:func:`worker_setup`). Handed to the ``Trainer`` as its first callback, it runs the parts of
    :func:`~labkit.labs.lung_vit.lightning_module.worker_callbacks`: the epoch history with a progress line
    per epoch (its rows travel inside every checkpoint), the ``fail_at_epoch`` crash demo and, with tracking,
    MLflow logging on rank 0. :meth:`result` is what rank 0 returns to the driver."""

    def __init__(self, config: dict) -> None:
        self.rank, self.world_size = worker_setup(config)
        self.parts, self.history = worker_callbacks(config, self.rank)

    on_fit_start = _forward("on_fit_start")
    on_train_epoch_start = _forward("on_train_epoch_start")
    on_train_batch_start = _forward("on_train_batch_start")
    on_train_batch_end = _forward("on_train_batch_end")
    on_validation_epoch_start = _forward("on_validation_epoch_start")
    on_train_epoch_end = _forward("on_train_epoch_end")

    def state_dict(self) -> dict:
        return self.history.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.history.load_state_dict(state_dict)

    def result(self, trainer: pl.Trainer) -> dict | None:
        """Rank 0's return value (``Result.return_value``): every epoch and the precision used; ``None`` elsewhere."""
        return worker_result(trainer, self.history, self.rank)


# --------------------------------------------------------------------------- driver side
@dataclass
class LungRun:
    """What :func:`collect` returns."""

    run_name: str
    history: pd.DataFrame                  # every epoch (from rank 0)
    kept: pd.DataFrame                     # the checkpoints Ray kept: path, epoch, val_loss
    best_path: Path                        # folder of the best checkpoint (lowest val_loss)
    best: dict                             # epoch, val_loss of the best checkpoint
    test: dict                             # test metrics of the best checkpoint (summarize() included)
    outputs: dict                          # y_true, y_pred, probs on the test set
    module: Any                            # the module with the best weights (on the CPU)
    plan: Any                              # labkit.distributed.ScalingPlan
    precision: str                         # what the workers trained in ("bf16-mixed", "32-true", ...)
    channels_last: bool
    fit_seconds: float
    run_dir: Path
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    cluster: dict = field(default_factory=dict)
    result: Any = None                     # ray.train.Result


def worker_config(cfg: dict, plan, uri: str | None = None, mlflow_run_id: str | None = None,
                  run_dir: str | os.PathLike | None = None) -> dict:
    """The ``train_loop_config`` every worker receives: the lab's parameters with absolute paths, the
    cores per worker, the resolved precision and ``channels_last``, where to log in MLflow, and the
    run's folder (``run_dir``: the attempt log and the ``fail_at_epoch`` marker live there)."""
    keys = ("epochs", "batch_size", "lr", "weight_decay", "image_size", "depth", "heads", "dim", "mlp_dim",
            "dropout", "data", "max_train", "max_test", "seed", "fail_at_epoch")
    precision = resolve_precision(cfg.get("precision", "auto"), plan.use_gpu)
    config = {k: cfg.get(k, DEFAULTS.get(k)) for k in keys}
    config.update(data_dir=str(data_root(cfg.get("data_dir")).resolve()), use_gpu=plan.use_gpu,
                  precision=precision, channels_last=use_channels_last(precision, plan.use_gpu),
                  threads=plan.cpus_per_worker, run_dir=str(run_dir) if run_dir else None, progress=cfg.get("progress", True),
                  mlflow_run_id=mlflow_run_id,
                  tracking_uri=uri if uri and tracking.is_local(uri) else None,   # a server's URI stays in the env
                  params={**{k: cfg.get(k) for k in (*keys, "workers")}, "backend": plan.backend,
                          "precision": precision})
    return config


def start_tracking(cfg: dict, data, run_name: str, results_dir=None) -> tuple[str | None, str | None]:
    """With ``cfg.track``, create the run's MLflow run (``(uri, run_id)``); else ``(None, None)``."""
    if not cfg.get("track"):
        return None, None

    return tracking.create_run(LAB, run_name, results_dir=results_dir,
                               tags={"model": "vit-conv-stem", "synthetic": str(data.synthetic)})


def run_dir_for(run_name: str, results_dir=None) -> Path:
    """Where Ray stores the run's checkpoints: ``results/04_lung_vit/ray/<run_name>``."""
    return (lab_dir(LAB, results_dir) / "ray").resolve() / run_name


def collect(result, cfg: dict, data, plan, *, run_name: str, run_dir: Path, fit_seconds: float,
            uri: str | None = None, mlflow_run_id: str | None = None, cluster: dict | None = None) -> LungRun:
    """After ``trainer.fit()``: the history, the kept checkpoints, the best one scored on the test set
    (accuracy, balanced accuracy, macro-F1 beside the majority rate), MLflow's run completed."""
    value = result.return_value or {}
    history = pd.DataFrame(value.get("history", []))
    best = result.get_best_checkpoint(metric="val_loss", mode="min")
    kept = pd.DataFrame([{"path": c.path, "epoch": int(m["epoch"]) + 1, "val_loss": m["val_loss"]}
                         for c, m in result.best_checkpoints]).sort_values("val_loss").reset_index(drop=True)
    best_info = kept.iloc[0].to_dict()
    module, test, outputs = score_checkpoint(best, cfg, data)
    run = LungRun(run_name=run_name, history=history, kept=kept, best_path=Path(best.path),
                  best={"epoch": int(best_info["epoch"]), "val_loss": float(best_info["val_loss"])}, test=test,
                  outputs=outputs, module=module, plan=plan, precision=value.get("precision", "?"),
                  channels_last=bool(value.get("channels_last")), fit_seconds=fit_seconds, run_dir=run_dir,
                  tracking_uri=uri, mlflow_run_id=mlflow_run_id, cluster=cluster or {}, result=result)
    if mlflow_run_id:
        tracking.log_metrics(uri, mlflow_run_id, {**test, "best_epoch": run.best["epoch"],
                                                  "best_val_loss": run.best["val_loss"], "fit_seconds": fit_seconds})
        with tempfile.TemporaryDirectory() as tmp:
            path = save_best(run, Path(tmp) / "best_model.pt", cfg, data.classes)
            tracking.log_artifact(uri, mlflow_run_id, path, "best_checkpoint")
        tracking.end_run(uri, mlflow_run_id)
    return run


def score_checkpoint(checkpoint, cfg: dict, data):
    """Load a Ray checkpoint (``checkpoint.ckpt`` written by ``RayTrainReportCallback``) into a fresh
    module and test it on this machine, in fp32; returns ``(module, metrics, outputs)``. ``metrics``
    holds Lightning's ``test_*`` values and :func:`labkit.metrics.summarize` of the predictions."""
    quiet_lightning()
    device = pick_device(cfg.get("device", "auto"))
    module = ClassifierBase(build_model(cfg, len(data.classes)), data.classes,
                            **{**module_kwargs(cfg), "channels_last": False})
    with checkpoint.as_directory() as folder:
        load_weights(module, Path(folder) / CHECKPOINT_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        tester = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                            default_root_dir=tmp, precision="32-true")
        values = tester.test(module, dataloaders=data.loader("test", cfg["batch_size"]), verbose=False)[0]
    out = module.test_outputs
    summary = lk_metrics.summarize(out["y_true"], out["y_pred"], len(data.classes),
                                   train_labels=data["train"].labels)
    test = {k: float(v) for k, v in values.items()}
    test.update({f"test_{k}": v for k, v in summary.items()})
    return module.cpu(), test, out


def save_best(run: LungRun, path: str | os.PathLike, cfg: dict, classes) -> Path:
    """A slim copy of the best checkpoint (model weights + what rebuilds the model), written atomically."""
    config = {k: cfg[k] for k in ("image_size", "depth", "heads", "dim", "mlp_dim", "dropout")}
    with atomic_path(path) as tmp:
        torch.save({"model": run.module.model.state_dict(), "model_config": config, "classes": list(classes),
                    **run.best}, tmp)
    return Path(path)


def record(run: LungRun, cfg: dict, data) -> RunRecord:
    """A :class:`~labkit.results.RunRecord` of ``run`` (params without the cluster address); ``final``
    carries acc, balanced_acc, macro_f1, majority_rate and chance of the best checkpoint on the test set."""
    params = {k: v for k, v in cfg.items() if k not in ("address", "progress")}
    params["address"] = "set" if cfg.get("address") or os.environ.get("RAY_ADDRESS") else None
    env = {**environment(cfg.get("device", "auto"), run.plan.workers), "backend": run.plan.backend,
           "use_gpu": run.plan.use_gpu, "precision": run.precision, "channels_last": run.channels_last}
    headline = {k: run.test[f"test_{k}"] for k in ("acc", "balanced_acc", "macro_f1", "majority_rate", "chance")
                if f"test_{k}" in run.test}
    final = {**headline, **run.test, "best_epoch": run.best["epoch"], "best_val_loss": run.best["val_loss"],
             "fit_seconds": run.fit_seconds, "restarts": max(0, count_attempts(run.run_dir) - 1),
             "kept_checkpoints": len(run.kept), "best_checkpoint": str(run.best_path),
             "kept": run.kept[["epoch", "val_loss"]].to_dict("records"),
             "seconds_per_epoch": float(run.history["seconds"].mean()) if len(run.history) else None,
             "mlflow": tracking.describe_uri(run.tracking_uri) if run.tracking_uri else None,
             "mlflow_run_id": run.mlflow_run_id}
    rec = RunRecord(lab=LAB, params=params, env=env, data=data.describe(), epochs=run.history.to_dict("records"),
                    final=final)
    rec.add_artifact(run.run_dir)
    return rec

