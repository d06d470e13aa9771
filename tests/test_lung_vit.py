"""Lab 04 around the model: parameters, precision, the Lightning module, MLflow tracking (on and
off), checkpoint selection, the `ray job submit` path and the quick notebook."""
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

from labkit import lung_vit, tracking
from labkit.data.synth_lung import write_lung_standin
from labkit.params import ParameterError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(depth=2, heads=4, dim=32, mlp_dim=64)


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("bad, names", [(dict(dim=100, heads=8), ("'dim'", "'heads'")),
                                        (dict(depth=0), ("'depth'",)), (dict(heads="8"), ("'heads'",)),
                                        (dict(mlp_dim=-1), ("'mlp_dim'",)), (dict(image_size=30), ("'image_size'",))])
def test_bad_model_parameters_are_named(bad, names):
    values = {**lung_vit.DEFAULTS, **bad}
    with pytest.raises(ParameterError) as err:
        lung_vit.check_params(show=False, **values)
    for name in names:
        assert name in str(err.value)


def test_quick_mode_and_extra_rules():
    cfg = lung_vit.check_params(show=False, **{**lung_vit.DEFAULTS, "quick": True})
    assert (cfg.epochs, cfg.image_size, cfg.max_train, cfg.max_test) == (3, 32, 540, 180)
    with pytest.raises(ParameterError, match="no rule"):
        lung_vit.check_params(show=False, extra=1)
    from labkit.params import Rule
    assert lung_vit.check_params(rules={"extra": Rule(int)}, show=False, extra=1).extra == 1


def test_precision_choice():
    assert lung_vit.resolve_precision("auto", use_gpu=False) == "32-true"
    assert lung_vit.resolve_precision("32", use_gpu=False) == "32-true"
    assert lung_vit.resolve_precision("bf16-mixed", use_gpu=False) == "bf16-mixed"
    with pytest.raises(ParameterError, match="16-mixed"):
        lung_vit.resolve_precision("16-mixed", use_gpu=False)


def test_checkpoint_config_keeps_three_lowest_val_loss():
    cc = lung_vit.checkpoint_config()
    assert (cc.num_to_keep, cc.checkpoint_score_attribute, cc.checkpoint_score_order) == (3, "val_loss", "min")


def test_command_line_arguments():
    args = lung_vit.parse_args(["--workers", "1", "--no-track", "--data-dir", "/x", "--max-train", "9"])
    assert args["workers"] == 1 and args["track"] is False and args["data_dir"] == "/x" and args["max_train"] == 9
    assert lung_vit.parse_args([])["data_dir"] is None  # $DATA_PATH, else data/lung


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


def test_lightning_module_and_mlflow_epoch_logger(results_tmp, tmp_path, monkeypatch):
    """Single process: training/validation/test steps, per-class metrics, and rank 0 logging every epoch."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from labkit.lightning_module import LitClassifier, MlflowEpochLogger
    from labkit.models.vit import ViT

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lung_vit.quiet_lightning()
    torch.manual_seed(0)
    classes = ["a", "b", "c"]
    x = torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8)
    y = torch.arange(24) % 3
    x[y == 1] //= 4  # class "b" is dark: something to learn
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module = LitClassifier(ViT(num_classes=3, image_size=16, in_channels=1, **SMALL), classes, lr=1e-3)
    uri, run_id = tracking.create_run("04_lung_vit", "lightning")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path / "pl", callbacks=[MlflowEpochLogger(uri, run_id, {"depth": 2},
                                                                                         {"device": "cpu"})])
    trainer.fit(module, loader, loader)
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_acc", "val_f1_macro", "val_precision/a", "val_recall/c", "lr"} <= set(metrics)
    trainer.test(module, loader, verbose=False)
    out = module.test_outputs
    assert out["y_true"].tolist() == y.tolist() and out["probs"].shape == (24, 3)
    logged = tracking.read_run(uri, run_id)
    assert logged["params"] == {"depth": "2"} and "device.json" in logged["artifacts"]
    assert [step for step, _ in logged["history"]["val_loss"]] == [1, 2]
    assert {"val_precision/b", "val_recall/b", "val_f1/b"} <= set(logged["metrics"])
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "lightning_logs").exists()


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
    command = [sys.executable, "-m", "labkit.lung_vit", "--workers", "2", "--epochs", "5", "--image-size", "16",
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
                              "--", *command], env=env, capture_output=True, text=True, timeout=480, cwd=ROOT)
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
    assert sorted(kept) == sorted(lowest)                                    # the 3 lowest val_loss, whatever epoch
    assert rec["final"]["best_epoch"] == lowest[0]
    run_dir = Path(rec["final"]["best_checkpoint"]).parent
    assert len([p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]) == 3

    # the test metrics in the record are those of the best checkpoint: score it again here
    from ray.train import Checkpoint

    cfg = {**lung_vit.DEFAULTS, **rec["params"], "progress": False}
    data = lung_vit.load_data(cfg)
    _, test, _ = lung_vit.score_checkpoint(Checkpoint.from_directory(rec["final"]["best_checkpoint"]), cfg, data)
    assert test["test_loss"] == pytest.approx(rec["final"]["test_loss"], rel=1e-4)


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


@pytest.mark.slow
def test_quick_notebook_runs_and_tracks(course):
    """The lab in quick mode through papermill (the ``course`` fixture's run): record, plots and an MLflow
    run with the parameters, per-epoch metrics and the best checkpoint, all inside results/."""
    from labkit.course import format_runs

    run = next(r for r in course["runs"] if r.lab == "04_lung_vit")
    assert run.ok, format_runs([run])
    results_dir = course["results"]
    lab = results_dir / "04_lung_vit"
    rec = json.loads(next(lab.glob("*.json")).read_text())
    assert rec["params"]["quick"] is True and len(rec["epochs"]) == 3 and rec["final"]["kept_checkpoints"] == 3
    for name in ("samples", "training_curves", "confusion_matrix", "cls_attention", "vit_vs_cnn"):
        assert (lab / f"{name}.png").is_file() and f"04_lung_vit/{name}.png" in rec["artifacts"]
    uri = f"sqlite:///{lab / 'mlflow.db'}"
    logged = tracking.read_run(uri, rec["final"]["mlflow_run_id"])
    assert logged["params"]["depth"] == str(rec["params"]["depth"]) and logged["params"]["workers"] == "2"
    assert [step for step, _ in logged["history"]["val_loss"]] == [1, 2, 3]
    assert "best_checkpoint/best_model.pt" in logged["artifacts"]
    assert logged["artifact_uri"].startswith(lab.resolve().as_uri())
    # the lab ran in the course folder: MLflow's defaults (./mlruns, ./mlflow.db) must not have appeared there
    assert [p for p in ("mlruns", "mlflow.db") if (ROOT / p).exists()] == course["strays_before"]
