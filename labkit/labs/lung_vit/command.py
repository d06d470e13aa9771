"""Lab 04's training as a command, for long runs on a cluster (seed 004's way)::

    python -m labkit.labs.lung_vit --workers 2 --epochs 12 --image-size 128
    ray job submit --working-dir . --runtime-env labs/ray_runtime_env.yaml -- python -m labkit.labs.lung_vit --quick

The lesson — the LightningModule's steps, the Ray Train function and the ``TorchTrainer`` driver —
is written in ``labs/04_lung_vit.ipynb``. This module carries a compact copy of those three pieces
(:class:`LitViT`, :func:`train_func`, :func:`train`) on the same plumbing (:mod:`labkit.labs.lung_vit.runner`,
:class:`labkit.labs.lung_vit.lightning_module.ClassifierBase`); the tests check that both copies train alike.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from labkit import distributed, results
from labkit.distributed import recovery
from labkit.labs.lung_vit import lightning_module, runner, tracking
from labkit.labs.lung_vit.lightning_module import ClassifierBase, cosine_warmup, decay_groups


class LitViT(ClassifierBase):
    """The notebook's module (the notebook teaches these steps)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(self.prepare(x, train=True))
        loss = F.cross_entropy(logits.float(), y)
        self.train_acc.update(logits.detach().float(), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(self.prepare(x, train=False)).float()
        self.val_loss.update(F.cross_entropy(logits, y, reduction="none"))
        self.val_metrics.update(logits, y)
        self.log("val_loss", self.val_loss, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(decay_groups(self.model, self.weight_decay), lr=self.lr)
        sched = cosine_warmup(opt, self.trainer.max_epochs, self.warmup_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def train_func(config: dict) -> dict | None:
    """What every Ray Train worker of the command runs (the notebook's ``train_func``, same steps):
    after a restart it resumes from ``ray.train.get_checkpoint()``."""
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer
    from torch.utils.data import DistributedSampler

    labkit_hook = runner.WorkerHook(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = runner.load_data(config)
    module = LitViT(runner.build_model(config, len(data.classes)), data.classes, **runner.module_kwargs(config))
    trainer = pl.Trainer(
        max_epochs=config["epochs"], accelerator="gpu" if config["use_gpu"] else "cpu", devices="auto",
        strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()], precision=config["precision"],
        callbacks=[labkit_hook, RayTrainReportCallback()], use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tempfile.mkdtemp(prefix="labkit-lightning-"))
    trainer = prepare_trainer(trainer)
    train_sampler = DistributedSampler(range(len(data["train"])), world, rank, shuffle=True, seed=config["seed"])
    val_sampler = lightning_module.EvalShardSampler(range(len(data["val"])), world, rank)
    with lightning_module.checkpoint_file(ray.train.get_checkpoint()) as ckpt_path:
        trainer.fit(module, data.loader("train", config["batch_size"], sampler=train_sampler),
                    data.loader("val", config["batch_size"], sampler=val_sampler), ckpt_path=ckpt_path)
    return labkit_hook.result(trainer)


def train(cfg: dict, *, data=None, results_dir: str | os.PathLike | None = None, run_name: str | None = None,
          quiet: bool = True, worker=None) -> runner.LungRun:
    """The command's driver (the notebook writes its own): Ray, a ``TorchTrainer`` keeping the
    :data:`~labkit.labs.lung_vit.runner.KEEP` best checkpoints by ``val_loss`` and restarting crashed workers
    (``FailureConfig``), then :func:`labkit.labs.lung_vit.runner.collect`. ``worker`` replaces :func:`train_func`
    (the tests pass the notebook's). The MLflow run is marked FAILED when training fails; Ray is
    shut down whatever happens."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = {**runner.DEFAULTS, **cfg}
    address = distributed.resolve_address(cfg.get("address"))
    plan = distributed.plan_scaling(cfg["workers"], cfg["device"], **distributed.machine_resources()) \
        if address is None else None
    if plan is not None:
        runner.resolve_precision(cfg["precision"], plan.use_gpu)
    data = data if data is not None else runner.load_data(cfg, progress=True)
    run_name = run_name or distributed.default_run_name()
    run_dir = runner.run_dir_for(run_name, results_dir)
    uri, mlflow_run_id = runner.start_tracking(cfg, data, run_name, results_dir)
    try:
        with distributed.ray_cluster(address, quiet=quiet) as cluster:
            if plan is None:
                plan = distributed.plan_scaling(cfg["workers"], cfg["device"], **distributed.cluster_resources(),
                                                where=f"the cluster at {address}")
            if plan.notice:
                print(plan.notice)
            trainer = TorchTrainer(
                worker or train_func, train_loop_config=runner.worker_config(cfg, plan, uri, mlflow_run_id, run_dir),
                torch_config=TorchConfig(backend=plan.backend, timeout_s=300),
                scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                             resources_per_worker=plan.resources()),
                run_config=RunConfig(
                    name=run_name, storage_path=str(run_dir.parent),
                    failure_config=FailureConfig(max_failures=runner.MAX_FAILURES),
                    checkpoint_config=CheckpointConfig(num_to_keep=runner.KEEP, checkpoint_score_attribute="val_loss",
                                                       checkpoint_score_order="min"),
                    logging_config=LoggingConfig(log_level=distributed.TRAIN_LOG_LEVEL)))
            tick = time.perf_counter()
            with recovery.notebook_interrupts():    # Ctrl-C stops the run; Ray's SIGINT handler does not outlive it
                result = trainer.fit()
            fit_seconds = time.perf_counter() - tick
        return runner.collect(result, cfg, data, plan, run_name=run_name, run_dir=run_dir, fit_seconds=fit_seconds,
                                uri=uri, mlflow_run_id=mlflow_run_id, cluster=cluster)
    except BaseException:
        if mlflow_run_id:
            tracking.end_run(uri, mlflow_run_id, "FAILED")
        raise


def parse_args(argv: list[str] | None = None) -> dict:
    """The command's options: one per parameter of :data:`labkit.labs.lung_vit.runner.DEFAULTS`, plus data caps,
    the results folder and ``--no-progress``."""
    p = argparse.ArgumentParser(prog="python -m labkit.labs.lung_vit", description=__doc__.split("\n\n")[0])
    optional = {"address": (str, "a running Ray cluster (default: $RAY_ADDRESS or local)"),
                "data_dir": (str, "dataset root (default: $DATA_PATH, else data/lung)"),
                "fail_at_epoch": (int, "kill one worker once at this epoch (fault-tolerance demo)")}
    for name, value in runner.DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif value is None:
            kind, text = optional.get(name, (str, None))
            p.add_argument(flag, type=kind, default=None, help=text)
        else:
            p.add_argument(flag, type=type(value), default=value)
    p.add_argument("--max-train", type=int, default=None, help="cap on training images (stratified)")
    p.add_argument("--max-test", type=int, default=None, help="cap on validation and test images each")
    p.add_argument("--results-dir", default=None, help="results folder (default: $LABKIT_RESULTS or results/)")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch lines")
    return vars(p.parse_args(argv))


def main(argv: list[str] | None = None) -> Path:
    """Run the lab from the command line; prints the test metrics and the record's path."""
    args = parse_args(argv)
    results_dir, progress = args.pop("results_dir"), not args.pop("no_progress")
    caps = {k: args.pop(k) for k in ("max_train", "max_test")}
    cfg = runner.check_params(show=True, **args)
    cfg.update({k: v if cfg.get(k) is None else min(v or cfg[k], cfg[k]) for k, v in caps.items()})
    cfg["progress"] = progress
    data = runner.load_data(cfg, progress=progress)
    run = train(cfg, data=data, results_dir=results_dir)
    rec = runner.record(run, cfg, data)
    path = results.save(rec, results_dir)
    print(f"test_acc {run.test.get('test_acc', float('nan')):.3f}  best epoch {run.best['epoch']} "
          f"(val_loss {run.best['val_loss']:.3f})  kept {len(run.kept)} checkpoints")
    print(f"record: {path}")
    return path

