"""Lab 04 around the model: parameters, precision, the Lightning module (the notebook's and the
command's), validation that counts each image once, MLflow tracking (on and off), checkpoint
selection and the `ray job submit` path (the quick notebook: test_lab04.py)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from labkit import params
from labkit.data.synth_lung import write_lung_standin
from labkit.labs.lung_vit import command, runner, tracking
from labkit.params import ParameterError

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(depth=2, heads=4, dim=32, mlp_dim=64)


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("bad, names", [(dict(dim=100, heads=8), ("'dim'", "'heads'")),
                                        (dict(depth=0), ("'depth'",)), (dict(heads="8"), ("'heads'",)),
                                        (dict(mlp_dim=-1), ("'mlp_dim'",)), (dict(image_size=30), ("'image_size'",))])
def test_bad_model_parameters_are_named(bad, names):
    values = {**runner.DEFAULTS, **bad}
    with pytest.raises(ParameterError) as err:
        runner.check_params(show=False, **values)
    for name in names:
        assert name in str(err.value)


def test_quick_mode_and_extra_rules():
    cfg = runner.check_params(show=False, **{**runner.DEFAULTS, "quick": True})
    quick = params.QUICK["04_lung_vit"]
    assert (cfg.epochs, cfg.image_size, cfg.max_train, cfg.max_test) == (
        quick["epochs"], quick["image_size"], quick["max_train"], quick["max_test"])
    with pytest.raises(ParameterError, match="no rule"):
        runner.check_params(show=False, extra=1)
    from labkit.params import Rule
    assert runner.check_params(rules={"extra": Rule(int)}, show=False, extra=1).extra == 1


@pytest.mark.parametrize("cpu_bf16, want", [(True, "bf16-mixed"), (False, "32-true")])
def test_precision_choice_on_cpu(monkeypatch, cpu_bf16, want):
    from labkit import env

    monkeypatch.setattr(env, "cpu_has_native_bf16", lambda: cpu_bf16)
    assert runner.resolve_precision("auto", use_gpu=False) == want
    assert runner.use_channels_last(want, use_gpu=False) is cpu_bf16
    assert runner.resolve_precision("32", use_gpu=False) == "32-true"        # forcing fp32 is respected
    assert runner.resolve_precision("bf16-mixed", use_gpu=False) == "bf16-mixed"
    with pytest.raises(ParameterError, match="16-mixed"):
        runner.resolve_precision("16-mixed", use_gpu=False)


@pytest.mark.parametrize("gpu_bf16, want", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_precision_choice_on_gpus(monkeypatch, gpu_bf16, want):
    """A100/H100-like GPUs: bf16; T4/V100-like (bf16 only emulated): fp16 (Lightning adds the scaler)."""
    from labkit import env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(env, "cuda_has_native_bf16", lambda: gpu_bf16)
    assert runner.resolve_precision("auto", use_gpu=True) == want
    assert runner.use_channels_last(want, use_gpu=True)


def test_eval_shard_sampler_counts_each_image_once():
    from torch.utils.data import DistributedSampler

    from labkit.labs.lung_vit.lightning_module import EvalShardSampler

    for n, world in ((181, 4), (10, 3), (2, 4), (180, 2)):
        shards = [list(EvalShardSampler(range(n), world, r)) for r in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(n))
        assert [len(EvalShardSampler(range(n), world, r)) for r in range(world)] == [len(x) for x in shards]
    padded = sum(len(DistributedSampler(range(181), 4, r, shuffle=False)) for r in range(4))
    assert padded == 184    # what the default would have scored: 3 images twice


def test_command_line_arguments():
    args = command.parse_args(["--workers", "1", "--no-track", "--data-dir", "/x", "--max-train", "9",
                                        "--fail-at-epoch", "2"])
    assert args["workers"] == 1 and args["track"] is False and args["data_dir"] == "/x" and args["max_train"] == 9
    assert args["fail_at_epoch"] == 2
    default = command.parse_args([])
    assert default["data_dir"] is None and default["fail_at_epoch"] is None  # $DATA_PATH, else data/lung; no crash


# --------------------------------------------------------------------------- tracking
def test_tracking_store_stays_in_results(results_tmp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, run_id = tracking.create_run("04_lung_vit", "t1")
    assert uri == f"sqlite:///{(results_tmp / '04_lung_vit' / 'mlflow.db').resolve()}"
    tracking.log_params(uri, run_id, {"depth": 2, "dim": 32})
    tracking.log_params(uri, run_id, {"depth": 2})  # the same value again is fine
    for epoch in (1, 2, 3):
        tracking.log_metrics(uri, run_id, {"val_loss": 1 / epoch, "val_recall/lung-covid": 0.5}, step=epoch)
    artifact = tmp_path / "model.pt"
    artifact.write_bytes(b"weights")
    tracking.log_artifact(uri, run_id, artifact, "best_checkpoint")
    tracking.end_run(uri, run_id)
    got = tracking.read_run(uri, run_id)
    assert got["params"] == {"depth": "2", "dim": "32"} and got["status"] == "FINISHED"
    assert got["history"]["val_loss"] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert got["artifacts"] == ["best_checkpoint/model.pt"]
    assert got["artifact_uri"].startswith((results_tmp / "04_lung_vit" / "mlartifacts").resolve().as_uri())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "results"]  # no ./mlruns, no ./mlflow.db


def test_remote_tracking_uri_is_used_but_never_described(results_tmp, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.org:8000")
    uri = tracking.tracking_uri("04_lung_vit")
    assert uri == "https://alice:s3cret@mlflow.example.org:8000" and not tracking.is_local(uri)
    text = tracking.describe_uri(uri) + tracking.ui_command(uri)
    assert not any(s in text for s in ("alice", "s3cret", "mlflow.example.org"))


def _tiny_data():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8)
    y = torch.arange(20) % 3
    x[y == 1] //= 4  # class "b" is dark: something to learn
    return x, y, DataLoader(TensorDataset(x, y), batch_size=8)   # batches of 8, 8, 4: uneven


def _trainer(tmp_path, **kw):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path / "pl", **kw)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_module_and_mlflow_epoch_logger(results_tmp, tmp_path, monkeypatch, precision):
    """Single process: the command's LitViT trains (also in bf16 on the CPU, channels_last), logs per-class
    metrics, counts every validation image once in val_loss, and rank 0 logs every epoch to MLflow."""
    from labkit.labs.lung_vit.lightning_module import MlflowEpochLogger
    from labkit.models.vit import ViT

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner.quiet_lightning()
    x, y, loader = _tiny_data()
    bf16 = precision.startswith("bf16")
    module = command.LitViT(ViT(num_classes=3, image_size=16, in_channels=1, **SMALL), ["a", "b", "c"], lr=1e-3,
                             channels_last=bf16)
    before = [p.detach().clone() for p in module.parameters()]
    uri, run_id = tracking.create_run("04_lung_vit", "lightning")
    trainer = _trainer(tmp_path, max_epochs=2, precision=precision,
                       callbacks=[MlflowEpochLogger(uri, run_id, {"depth": 2}, {"device": "cpu"})])
    trainer.fit(module, loader, loader)
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_acc", "val_f1_macro", "val_precision/a", "val_recall/c", "lr"} <= set(metrics)
    assert torch.isfinite(metrics["train_loss"]) and torch.isfinite(metrics["val_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))   # the weights moved
    # val_loss is the mean over the 20 images, not the mean of the three batch means (8, 8, 4 images)
    module.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = module(module.prepare(x, train=False)).float()
    assert float(metrics["val_loss"]) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-4)
    trainer.test(module, loader, verbose=False)
    out = module.test_outputs
    assert out["y_true"].tolist() == y.tolist() and out["probs"].shape == (20, 3)
    logged = tracking.read_run(uri, run_id)
    assert logged["params"] == {"depth": "2"} and "device.json" in logged["artifacts"]
    assert [step for step, _ in logged["history"]["val_loss"]] == [1, 2]
    assert {"val_precision/b", "val_recall/b", "val_f1/b"} <= set(logged["metrics"])
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "lightning_logs").exists()


def _notebook_class(name: str):
    """Execute the lab's cell that defines ``class <name>`` (labs/04_lung_vit.py) and return the class."""
    import torch.nn.functional as F

    from labkit.labs.lung_vit.lightning_module import ClassifierBase, cosine_warmup, decay_groups

    text = (ROOT / "labs" / "04_lung_vit.py").read_text()
    start = text.index(f"class {name}(")
    end = text.index("# %%", start)
    namespace = {"torch": torch, "F": F, "ClassifierBase": ClassifierBase, "decay_groups": decay_groups,
                 "cosine_warmup": cosine_warmup}
    exec(compile(text[start:end], "labs/04_lung_vit.py", "exec"), namespace)
    return namespace[name]


def test_notebook_module_and_command_module_train_alike(tmp_path):
    """The notebook's LitViT (the lesson) and labkit's copy for `python -m labkit.labs.lung_vit` end two epochs
    from the same seed with the same weights, so the two cannot drift apart."""
    from labkit.models.vit import ViT

    runner.quiet_lightning()
    *_, loader = _tiny_data()
    weights = []
    for cls in (_notebook_class("LitViT"), command.LitViT):
        torch.manual_seed(0)
        module = cls(ViT(num_classes=3, image_size=16, in_channels=1, **SMALL), ["a", "b", "c"], lr=1e-3,
                     weight_decay=0.05, warmup_epochs=1)
        torch.manual_seed(1)
        _trainer(tmp_path, max_epochs=2).fit(module, loader, loader)
        weights.append([p.detach() for p in module.parameters()])
    assert all(torch.allclose(a, b) for a, b in zip(*weights))


class _SaveLikeRay:
    """Saves a full Lightning checkpoint at every train-epoch end, where RayTrainReportCallback does."""

    def __new__(cls, folder: Path, crash_at: int | None = None):
        import lightning.pytorch as pl

        class Save(pl.Callback):
            def on_train_epoch_start(self, trainer, module):
                if crash_at is not None and trainer.current_epoch + 1 == crash_at:
                    raise RuntimeError("crash")

            def on_train_epoch_end(self, trainer, module):
                trainer.save_checkpoint(folder / f"epoch{trainer.current_epoch + 1}.ckpt", weights_only=False)

        return Save()


def test_resuming_from_an_epoch_end_checkpoint_continues_the_run(tmp_path):
    """What a restarted Ray worker does (`trainer.fit(ckpt_path=...)` with the latest checkpoint): the resumed
    run trains only the missing epochs, keeps the finished epochs' history (EpochHistory's state travels in the
    checkpoint) and ends with the weights and LR of an uninterrupted run."""
    from labkit.labs.lung_vit.lightning_module import EpochHistory
    from labkit.models.vit import ViT

    runner.quiet_lightning()
    *_, loader = _tiny_data()

    def run(folder, crash_at=None, ckpt_path=None):
        torch.manual_seed(0)
        module = command.LitViT(ViT(num_classes=3, image_size=16, in_channels=1, dropout=0.0, **SMALL),
                                         ["a", "b", "c"], lr=3e-3, warmup_epochs=1)
        history = EpochHistory(4, 20, show=False, attempt=1 if ckpt_path is None else 2)
        trainer = _trainer(tmp_path, max_epochs=4, callbacks=[history, _SaveLikeRay(folder, crash_at)])
        try:
            trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
        except RuntimeError:
            pass
        return module, history.rows, trainer

    straight, rows, _ = run(tmp_path / "a")
    (tmp_path / "b").mkdir(), (tmp_path / "a").mkdir(exist_ok=True)
    run(tmp_path / "b", crash_at=3)                                     # dies at the start of epoch 3
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["epoch1.ckpt", "epoch2.ckpt"]
    resumed, resumed_rows, trainer = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "epoch2.ckpt"))
    assert [r["epoch"] for r in resumed_rows] == [1, 2, 3, 4] and [r["attempt"] for r in resumed_rows] == [1, 1, 2, 2]
    assert [r["lr"] for r in resumed_rows] == pytest.approx([r["lr"] for r in rows])
    assert [r["val_loss"] for r in resumed_rows] == pytest.approx([r["val_loss"] for r in rows], rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(straight.parameters(), resumed.parameters()))


# --------------------------------------------------------------------------- slow: Ray job + notebook
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def small_lung(tmp_path_factory) -> Path:
    return write_lung_standin(tmp_path_factory.mktemp("lungvit") / "lung", 12, 6, 6, seed=0, progress=False)


@pytest.mark.slow
def test_ray_job_submit_keeps_the_three_best_checkpoints(small_lung, tmp_path):
    """`ray start --head` on loopback, `ray job submit` the training command (tracking off), wait for
    SUCCEEDED, read its record: 3 checkpoints kept = the 3 lowest val_loss, test scored with the best."""
    pytest.importorskip("aiohttp_cors", reason="`ray job submit` needs ray[default] (the job server)")
    ray_bin = Path(sys.executable).parent / "ray"
    gcs, dash, *agent_ports = _free_ports(6)
    temp = Path(tempfile.mkdtemp(prefix="lkray", dir="/tmp"))  # short: Ray's socket paths are length-limited
    results_dir = tmp_path / "results"
    # token auth (Ray's default for new clusters): the CLI then sends ~/.ray/auth_token to the job server
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    job = [sys.executable, "-m", "labkit.labs.lung_vit", "--workers", "2", "--epochs", "5", "--image-size", "16",
               "--depth", "1", "--heads", "2", "--dim", "32", "--mlp-dim", "64", "--lr", "0.03", "--batch-size", "16",
               "--no-track", "--data-dir", str(small_lung), "--results-dir", str(results_dir), "--no-progress"]
    submission = f"lab04-test-{os.getpid()}"
    try:
        # every port given: no clash with another Ray on this machine, and the raylet need not wait for the
        # agents to report the ports they picked (which times out on a busy machine)
        head = [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                *[arg for flag, port in zip(("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--runtime-env-agent-port", "--metrics-export-port"), agent_ports)
                  for arg in (flag, str(port))], "--num-cpus", "2", "--temp-dir", str(temp)]
        for attempt in (1, 2):  # on a busy machine the raylet can time out starting: clean up, try once more
            start = subprocess.run(head, env=env, capture_output=True, text=True, timeout=240)
            if start.returncode == 0:
                break
            _stop_processes(str(temp))
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-3000:]
        address = f"http://127.0.0.1:{dash}"
        job = subprocess.run([str(ray_bin), "job", "submit", "--address", address, "--submission-id", submission,
                              "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "labs/ray_runtime_env.yaml"),
                              "--", *job], env=env, capture_output=True, text=True, timeout=480, cwd=ROOT)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        status = subprocess.run([str(ray_bin), "job", "status", "--address", address, submission], env=env,
                                capture_output=True, text=True, timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
    finally:  # not `ray stop`: that would stop every Ray cluster on this machine
        _stop_processes(str(temp), str(results_dir))
        shutil.rmtree(temp, ignore_errors=True)

    records = list((results_dir / "04_lung_vit").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["params"]["track"] is False and rec["final"]["mlflow"] is None
    assert not (results_dir / "04_lung_vit" / "mlflow.db").exists()           # tracking off: no store
    epochs = {row["epoch"]: row["val_loss"] for row in rec["epochs"]}
    assert sorted(epochs) == [1, 2, 3, 4, 5]
    kept = {row["epoch"]: row["val_loss"] for row in rec["final"]["kept"]}
    lowest = sorted(epochs, key=epochs.get)[:3]
    assert sorted(kept) == sorted(set(lowest) | {5})          # the 3 lowest val_loss, plus the latest (Ray keeps it)
    assert rec["final"]["best_epoch"] == lowest[0]
    run_dir = Path(rec["final"]["best_checkpoint"]).parent
    assert len([p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]) == len(kept)

    # the test metrics in the record are those of the best checkpoint: score it again here
    from ray.train import Checkpoint

    cfg = {**runner.DEFAULTS, **rec["params"], "progress": False}
    data = runner.load_data(cfg)
    _, test, _ = runner.score_checkpoint(Checkpoint.from_directory(rec["final"]["best_checkpoint"]), cfg, data)
    assert test["test_balanced_acc"] == pytest.approx(rec["final"]["balanced_acc"])
    assert test["test_loss"] == pytest.approx(rec["final"]["test_loss"], rel=1e-4)


def _notebook_train_func():
    """The lab's LitViT and train_func cells, executed into one namespace (not importable by name, so Ray
    pickles them by value, as it does from the notebook)."""
    import torch.nn.functional as F

    from labkit.labs.lung_vit.lightning_module import ClassifierBase, cosine_warmup, decay_groups

    text = (ROOT / "labs" / "04_lung_vit.py").read_text()
    namespace = {"__name__": "lab04_notebook_cells", "torch": torch, "F": F, "tempfile": tempfile,
                 "ClassifierBase": ClassifierBase, "decay_groups": decay_groups, "cosine_warmup": cosine_warmup}
    for name in ("class LitViT(", "def train_func("):
        start = text.index(name)
        exec(compile(text[start:text.index("# %%", start)], "labs/04_lung_vit.py", "exec"), namespace)
    return namespace["train_func"]


@pytest.mark.slow
def test_a_crashed_worker_resumes_and_loses_no_epoch(small_lung, tmp_path, monkeypatch):
    """The notebook's train_func under FailureConfig: one of 2 workers dies halfway through epoch 2; Ray restarts
    the group once, get_checkpoint() hands Lightning the checkpoint of epoch 1, and the record has every epoch
    (1 on the first attempt, 2-4 on the second), with the top-3 checkpoints (plus the latest) chosen over all of them."""
    from labkit.distributed import worker

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="lkr", dir="/tmp"))
    cfg = runner.check_params(show=False, **{
        **runner.DEFAULTS, "workers": 2, "epochs": 4, "image_size": 16, "depth": 1, "heads": 2, "dim": 32,
        "mlp_dim": 64, "lr": 0.03, "batch_size": 16, "precision": "32", "track": False, "data_dir": str(small_lung),
        "fail_at_epoch": 2})
    cfg["progress"] = False
    data = runner.load_data(cfg)
    run = command.train(cfg, data=data, results_dir=tmp_path / "results", run_name="crash",
                                 worker=_notebook_train_func())
    rec = runner.record(run, cfg, data)
    assert (run.run_dir / worker.CRASH_MARKER).is_file() and rec.final["restarts"] == 1
    assert [(row["epoch"], row["attempt"]) for row in rec.epochs] == [(1, 1), (2, 2), (3, 2), (4, 2)]
    epochs = {row["epoch"]: row["val_loss"] for row in rec.epochs}
    kept = {row["epoch"]: row["val_loss"] for row in rec.final["kept"]}
    lowest = sorted(epochs, key=epochs.get)[:3]
    assert sorted(kept) == sorted(set(lowest) | {4})
    assert all(kept[e] == pytest.approx(epochs[e]) for e in kept)   # Ray's metrics = the history's, epoch by epoch
    assert rec.final["best_epoch"] == lowest[0]
    folders = [p for p in run.run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert len(folders) == len(kept)


def _stop_processes(*marks: str) -> None:
    """Stop the head started above and its job: the processes whose command line names its temp dir
    or the job's results dir (other Ray clusters on this machine are left alone)."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(m in part for part in proc.info["cmdline"] or [] for m in marks):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in mine:
        proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        proc.kill()


@pytest.mark.parametrize("fails", [False, True])
def test_command_train_puts_back_the_interrupt_handler(monkeypatch, tmp_path, fails):
    """Ray Train V2's fit() installs its own SIGINT handler and leaves it behind; command.train puts back the one
    it found (recovery.notebook_interrupts), whether fit() returns or fails — else a later Ctrl-C would go to the
    handler of a run long gone."""
    import contextlib
    import signal

    import ray.train.torch

    class FitLikeRayTrain:                          # stands in for TorchTrainer: no Ray needed
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            signal.signal(signal.SIGINT, lambda *args: None)       # what Ray Train V2's fit() does
            if fails:
                raise RuntimeError("training failed")
            return "result"

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FitLikeRayTrain)
    monkeypatch.setattr(command.distributed, "ray_cluster", lambda *args, **kwargs: contextlib.nullcontext({}))
    monkeypatch.setattr(command.runner, "collect", lambda result, *args, **kwargs: result)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = signal.getsignal(signal.SIGINT)
    cfg = {"workers": 1, "precision": "32", "track": False, "device": "cpu"}
    with pytest.raises(RuntimeError, match="training failed") if fails else contextlib.nullcontext():
        assert command.train(cfg, data=object(), results_dir=tmp_path, run_name="sigint") == "result"
    assert signal.getsignal(signal.SIGINT) is before
