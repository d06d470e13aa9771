"""Lab 02's Ray layer: sizing (pure), checkpoints and resume, fail-fast errors, clean shutdown.

Most tests start no Ray cluster. The training function is the one written in the notebook
(``labs/02_ray.py``, read from its cells); it runs for real in Ray Train's *local mode*
(``ScalingConfig(num_workers=0)``: same process, no cluster). Only the shutdown test starts Ray.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest
import torch

from labkit import distributed
from labkit.distributed import worker
from labkit.params import ParameterError, check
from labkit.train import scale_lr, shard_indices

LAB = Path(__file__).resolve().parents[2] / "labs" / "02_ray.py"


def notebook_namespace(*names: str) -> dict:
    """The lab's imports plus the notebook cells that define ``names`` (functions), executed in a
    fresh namespace: the code the student sees is the code under test. (The Colab install lines
    are skipped: in the .py source they are comments.)"""
    cells = [c for c in LAB.read_text().split("\n# %%") if not c.lstrip().startswith("[markdown]")]
    setup = next(c for c in cells if "from labkit import" in c)
    setup = "\n".join(line for line in setup.splitlines()[1:]
                      if not line.startswith(("if \"google.colab\"", "    #")))
    ns: dict = {"__name__": "lab02_cells"}
    exec(compile(setup, str(LAB), "exec"), ns)
    for name in names:
        cell = next((c for c in cells if f"\ndef {name}(" in c), None)
        assert cell is not None, f"labs/02_ray.py has no cell defining {name}()"
        exec(compile(cell.split("\n", 1)[1], str(LAB), "exec"), ns)
    return ns

@pytest.fixture
def ray_tmp(monkeypatch):
    """A private Ray folder (short: Ray's socket paths must stay under ~100 characters), so that the
    daemons of this test's cluster can be told from those of any other Ray on the machine."""
    folder = tempfile.mkdtemp(prefix="lkt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- sizing (pure)
def test_cpu_only_machine_uses_gloo_and_splits_the_cores():
    two = distributed.plan_scaling(2, "auto", node_cpus=[2], gpus=0)
    one = distributed.plan_scaling(1, "auto", node_cpus=[2], gpus=0)
    assert (two.use_gpu, two.backend, two.cpus_per_worker, two.notice) == (False, "gloo", 1, "")
    assert one.cpus_per_worker == 2 and one.resources() == {"CPU": 2}


def test_one_gpu_per_worker_uses_nccl():
    plan = distributed.plan_scaling(2, "auto", node_cpus=[8], gpus=2)
    assert (plan.use_gpu, plan.backend) == (True, "nccl")
    assert plan.resources() == {"CPU": 4, "GPU": 1}


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_two_workers_on_one_gpu_share_it_over_gloo_and_say_so(device):
    """Colab's one GPU with workers=2: both workers on the GPU, half of it each, gloo (NCCL would fail)."""
    plan = distributed.plan_scaling(2, device, node_cpus=[8], gpus=1)
    assert (plan.use_gpu, plan.backend, plan.gpu_share) == (True, "gloo", 0.5)
    assert plan.resources() == {"CPU": 4, "GPU": 0.5}
    assert "share" in plan.notice and "Duplicate GPU" in plan.notice and "workers <= 1" in plan.notice
    assert "0.5 of a GPU" in plan.describe()


def test_shared_gpu_fractions_never_ask_for_more_than_there_is():
    for workers, gpus in [(3, 1), (3, 2), (5, 2), (7, 3)]:
        plan = distributed.plan_scaling(workers, "auto", node_cpus=[16], gpus=gpus)
        assert plan.backend == "gloo" and 0 < plan.gpu_share < 1
        per_gpu = -(-workers // gpus)                  # workers packed onto one GPU at most
        assert per_gpu * plan.gpu_share <= 1, (workers, gpus, plan.gpu_share)
        assert workers * plan.gpu_share <= gpus


def test_a_gpu_each_keeps_nccl_and_no_notice():
    plan = distributed.plan_scaling(1, "auto", node_cpus=[8], gpus=1)
    assert (plan.use_gpu, plan.backend, plan.gpu_share, plan.notice) == (True, "nccl", 1.0, "")


def test_explicit_cuda_without_a_gpu_refuses_and_says_why():
    with pytest.raises(ParameterError, match="no GPU"):
        distributed.plan_scaling(1, "cuda", node_cpus=[8], gpus=0)


def test_cpu_device_never_uses_gpus():
    plan = distributed.plan_scaling(2, "cpu", node_cpus=[8], gpus=4)
    assert not plan.use_gpu and plan.backend == "gloo"


@pytest.mark.parametrize("workers", [0, -1, True, 2.0])
def test_workers_must_be_a_positive_int(workers):
    with pytest.raises(ParameterError, match="workers"):
        distributed.plan_scaling(workers, node_cpus=[2], gpus=0)


def test_workers_zero_is_rejected_by_the_lab_parameters():
    with pytest.raises(ParameterError, match="'workers' = 0"):
        check("02_ray", workers=0, show=False)


def test_more_workers_than_cores_fails_with_what_to_do():
    with pytest.raises(ParameterError) as err:
        distributed.plan_scaling(64, node_cpus=[2], gpus=0)
    text = str(err.value)
    assert "workers=64" in text and "2 CPU" in text and "workers <= 2" in text


def test_cores_per_worker_packs_workers_onto_nodes():
    assert distributed.cpus_per_worker([4, 2], 2) == 2
    assert distributed.cpus_per_worker([4, 2], 3) == 2
    assert distributed.cpus_per_worker([4, 2], 4) == 1
    assert distributed.cpus_per_worker([4, 2], 7) == 0
    assert distributed.cpus_per_worker([], 1) == 0


# --------------------------------------------------------------------------- fail fast, leave nothing behind
@pytest.fixture
def lab_cfg(tmp_path):
    return check("02_ray", workers=2, epochs=2, batch_size=16, lr=1e-3, lr_scaling="none", image_size=32,
                 device="cpu", data="synthetic", data_dir=str(tmp_path / "data"), quick=False, seed=0,
                 address=None, fail_at_epoch=None, show=False)


def test_too_many_workers_fail_before_ray_starts(lab_cfg, ray_tmp):
    import ray

    with pytest.raises(ParameterError, match="workers=64"):   # the lab's plan cell, before any ray_cluster
        distributed.plan_scaling(64, lab_cfg["device"], **distributed.machine_resources())
    assert not ray.is_initialized()
    assert distributed.ray_daemon_pids(ray_tmp) == set()


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_unreachable_address_fails_fast_with_a_clear_message(address, ray_tmp):
    import ray

    with pytest.raises(ConnectionError, match="no Ray cluster answers at 127.0.0.1:1"):
        with distributed.ray_cluster(address):
            pass
    assert not ray.is_initialized()
    assert distributed.ray_daemon_pids(ray_tmp) == set()


def test_ray_address_environment_variable_is_used(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert distributed.resolve_address(None) == "127.0.0.1:1"
    assert distributed.resolve_address("head:6379") == "head:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert distributed.resolve_address(None) is None and distributed.resolve_address("local") is None


def test_dashboard_url_is_not_a_cluster_address():
    with pytest.raises(ParameterError, match="ray://HOST:10001"):
        distributed.check_address("http://head:8265")


@pytest.mark.slow
def test_ray_is_shut_down_when_the_block_fails(ray_tmp):
    import ray

    with pytest.raises(RuntimeError, match="training broke"):
        with distributed.ray_cluster() as cluster:
            assert ray.is_initialized() and cluster["cpus"] >= 1
            assert distributed.ray_daemon_pids(ray_tmp), "a local cluster should run its own raylet"
            raise RuntimeError("training broke")
    assert not ray.is_initialized()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in distributed.ray_daemon_pids(ray_tmp)], timeout=20)
    assert not alive, f"Ray daemons still running after shutdown: {alive}"


# --------------------------------------------------------------------------- worker-side pieces
def test_evaluation_shards_cover_every_index_once():
    shards = [shard_indices(11, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert shards[1] == [1, 4, 7, 10]
    with pytest.raises(ValueError, match="rank=3"):
        shard_indices(11, 3, 3)


def test_notebook_epoch_statistics_pass_through_on_one_process():
    reduce = notebook_namespace("all_reduce_epoch")["all_reduce_epoch"]
    sums = {"loss_sum": 10.0, "correct": 5, "images": 10, "seconds": 2.0, "data_s": 0.5}
    val = {"loss": 0.8, "acc": 0.6, "images": 5, "seconds": 0.3}
    row = reduce(sums, val, None, torch.device("cpu"))
    assert row["loss"] == pytest.approx(1.0) and row["acc"] == pytest.approx(0.5)
    assert row["val_acc"] == pytest.approx(0.6) and row["val_images"] == 5
    assert row["images"] == 10 and row["images_per_s"] == pytest.approx(5.0) and row["sync_s"] is None
    assert row["compute_s"] == pytest.approx(1.5)


def test_notebook_loop_uses_the_precision_it_is_given():
    """fp32 and bf16 (this CPU's "auto" where it runs bf16 natively) both train: finite loss, weights move."""
    train_epoch = notebook_namespace("train_epoch")["train_epoch"]
    for dtype, channels_last in ((None, False), (torch.bfloat16, True)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        before = model[0].weight.detach().clone()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        batches = [(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))] * 2
        out = train_epoch(model, batches, opt, torch.nn.CrossEntropyLoss(), device=torch.device("cpu"),
                          augment=lambda x: x.float() / 255, dtype=dtype, scaler=None, channels_last=channels_last)
        assert out["images"] == 8 and torch.isfinite(torch.tensor(out["loss_sum"]))
        assert not torch.equal(before, model[0].weight)


def test_fp16_gets_a_grad_scaler_and_the_loop_uses_it(monkeypatch):
    """On a T4/V100-like GPU "auto" means fp16, and the worker builds a GradScaler for it."""
    from labkit import env

    monkeypatch.setattr(env, "cuda_has_native_bf16", lambda: False)
    cuda = torch.device("cuda")
    assert env.amp_dtype("auto", cuda) == torch.float16
    assert env.grad_scaler(torch.float16, torch.device("cpu")) is not None
    monkeypatch.setattr(env, "cuda_has_native_bf16", lambda: True)
    assert env.amp_dtype("auto", cuda) == torch.bfloat16 and env.grad_scaler(torch.bfloat16, cuda) is None

    class CountingScaler:
        calls = []

        def scale(self, loss):
            self.calls.append("scale")
            return loss

        def step(self, opt):
            self.calls.append("step")
            opt.step()

        def update(self):
            self.calls.append("update")

    train_epoch = notebook_namespace("train_epoch")["train_epoch"]
    model = torch.nn.Linear(3, 2)
    scaler = CountingScaler()
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                device=torch.device("cpu"), augment=lambda x: x, dtype=None, scaler=scaler, channels_last=False)
    assert scaler.calls == ["scale", "step", "update"]
    src = LAB.read_text()
    assert "scaler = env.grad_scaler(dtype, device)" in src and "scaler=scaler" in src


def tiny_model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_restores_weights_optimizer_epoch_and_history(tmp_path):
    from ray.train import Checkpoint

    model, opt = tiny_model_and_optimizer(0)
    history = [{"epoch": 1, "loss": 1.2}, {"epoch": 2, "loss": 0.9}]
    worker.save_checkpoint(tmp_path, model, opt, epoch=2, history=history)
    fresh, fresh_opt = tiny_model_and_optimizer(1)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    done, restored = worker.restore(Checkpoint.from_directory(str(tmp_path)), fresh, fresh_opt)
    assert (done, restored) == (2, history)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert worker.restore(None, fresh) == (0, [])
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        worker.restore(tmp_path / "nothing", fresh)


def test_checkpoint_keeps_the_grad_scalers_state(tmp_path):
    """fp16's GradScaler: its loss scale (and growth tracker) go into the checkpoint and come back."""
    model, opt = tiny_model_and_optimizer(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=7)
    scaler.scale(torch.ones(()))                                   # its first step creates the scale ...
    scaler.update(new_scale=256.0)                                 # ... which backed off after overflows
    worker.save_checkpoint(tmp_path, model, opt, epoch=1, history=[], scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")                            # a restarted worker's scaler: 2**16
    assert fresh.get_scale() != 256.0
    worker.restore(tmp_path, model, opt, scaler=fresh)
    assert fresh.get_scale() == 256.0 and fresh.state_dict() == scaler.state_dict()
    worker.save_checkpoint(tmp_path / "fp32", model, opt, epoch=1, history=[])   # bf16/fp32: no scaler, no state
    assert worker.load_checkpoint(tmp_path / "fp32")["scaler"] is None


def test_resume_with_another_worker_count_trains_at_the_newly_scaled_lr(tmp_path):
    """Saved by 2 workers at the linearly scaled LR 2e-3; resumed by 1 worker, whose optimizer was built at 1e-3:
    ``optimizer.load_state_dict`` brings Adam's state back *and* the old LR, the hook puts the new one back, and
    the history says so."""
    model, opt = tiny_model_and_optimizer(0)
    for group in opt.param_groups:
        group["lr"] = 2e-3
    worker.save_checkpoint(tmp_path / "ckpt", model, opt, epoch=1, history=[{"epoch": 1, "world_size": 2}])

    fresh, fresh_opt = tiny_model_and_optimizer(1)
    new_lr = scale_lr(1e-3, 1, "linear")
    for group in fresh_opt.param_groups:
        group["lr"] = new_lr
    config = {"run_dir": str(tmp_path / "run"), "epochs": 3, "lr_scaling": "linear", "progress": False}
    hook = worker.WorkerHook(config, rank=0, world_size=1, device=torch.device("cpu"))
    done, history = hook.resume(tmp_path / "ckpt", fresh, fresh_opt)
    assert done == 1 and [r["epoch"] for r in history] == [1]
    assert [g["lr"] for g in fresh_opt.param_groups] == [new_lr] * len(fresh_opt.param_groups)   # read back
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]  # Adam's state came back
    assert list(hook.epochs(done)) == [2, 3]
    row = hook.row(2, {"loss": 1.0}, fresh_opt)
    assert row["lr"] == new_lr and row["world_size"] == 1
    assert "lr 0.001 for 1 worker(s), newly scaled" in row["resume"] and "0.002 with 2 worker(s)" in row["resume"]
    assert "resume" not in hook.row(3, {"loss": 0.9}, fresh_opt)  # said once, on the first epoch after resuming
    # without the hook's lr, load_state_dict would have brought the old LR back
    plain, plain_opt = tiny_model_and_optimizer(1)
    worker.restore(tmp_path / "ckpt", plain, plain_opt)
    assert plain_opt.param_groups[0]["lr"] == 2e-3


def _average_bn(rank: int, world_size: int, device) -> dict:
    """A rank of the test below: BatchNorm statistics rank + 1 (mean) and 2 (rank + 1) (variance), averaged."""
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(rank + 1.0)
    bn.running_var.fill_(2.0 * (rank + 1))
    bn.num_batches_tracked.fill_(10 + rank)
    worker.average_buffers(bn)
    return {"mean": bn.running_mean.tolist(), "var": bn.running_var.tolist(), "n": int(bn.num_batches_tracked)}


@pytest.mark.slow
def test_batchnorm_statistics_are_averaged_over_the_ranks():
    """Lab 02 turns DDP's per-step broadcast of rank 0's buffers off and averages every rank's after an epoch."""
    from labkit.distributed import ddp

    assert ddp.launch(_average_bn, 2, device="cpu") == {"mean": [1.5, 1.5], "var": [3.0, 3.0], "n": 10}
    bn = torch.nn.BatchNorm1d(2)
    worker.average_buffers(bn)                                     # one process: nothing to average
    assert bn.running_mean.tolist() == [0.0, 0.0]


def test_the_global_batch_must_split_evenly_over_the_workers():
    worker.check_global_batch(32, 2)
    worker.check_global_batch(32, [1, 2, 4])
    with pytest.raises(ParameterError, match=r"'batch_size' = 32 .* workers=3.*-p batch_size 33"):
        worker.check_global_batch(32, [1, 3])


def test_the_crash_happens_once_halfway_through_the_epoch_on_the_last_rank(tmp_path, monkeypatch):
    class Crashed(Exception):
        pass

    def fake_exit(code):
        raise Crashed(code)

    monkeypatch.setattr(worker.os, "_exit", fake_exit)
    loader = list(range(10))
    assert list(worker.crash_halfway(loader, 2, 2, rank=0, world_size=2, run_dir=tmp_path)) == loader
    assert list(worker.crash_halfway(loader, 2, 1, rank=1, world_size=2, run_dir=tmp_path)) == loader
    assert list(worker.crash_halfway(loader, None, 2, rank=1, world_size=2, run_dir=tmp_path)) == loader
    seen = []
    with pytest.raises(Crashed):
        for batch in worker.crash_halfway(loader, 2, 2, rank=1, world_size=2, run_dir=tmp_path):
            seen.append(batch)
    assert seen == [0, 1, 2, 3, 4] and (tmp_path / worker.CRASH_MARKER).exists()
    # the restarted worker trains on
    assert list(worker.crash_halfway(loader, 2, 2, rank=1, world_size=2, run_dir=tmp_path)) == loader


def test_attempts_are_counted_across_restarts(tmp_path):
    assert worker.count_attempts(tmp_path / "run") == 0
    assert [worker.record_attempt(tmp_path / "run") for _ in range(3)] == [1, 2, 3]
    assert worker.count_attempts(tmp_path / "run") == 3


def run_local_mode(config: dict, scale_lr=None):
    """The notebook's training function under Ray Train's local mode (one process, no cluster), with the LR rule
    the notebook gives it (its exercise answer, or ``scale_lr``)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ns = notebook_namespace("my_scale_lr", "train_epoch", "all_reduce_epoch", "train_loop_per_worker")
    ns["scale_lr"] = scale_lr or ns["exercises"].lr_rule_for_run(ns["my_scale_lr"])   # the notebook's own cell
    fn = ns["train_loop_per_worker"]
    trainer = TorchTrainer(fn, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=0), run_config=RunConfig(name="local-test"))
    return trainer.fit().return_value


def test_training_function_resumes_after_the_last_checkpointed_epoch(lab_cfg, tmp_path):
    from labkit.data.synth_mri import write_alzheimer_standin
    from labkit.models.cnn import AlzheimerCNN

    write_alzheimer_standin(lab_cfg["data_dir"], n_train=48, n_test=24, size=(40, 40), progress=False)
    distributed.prepare_data(lab_cfg)
    plan = distributed.plan_scaling(1, "cpu", node_cpus=[1], gpus=0)
    config = distributed.worker_config(lab_cfg, plan, tmp_path / "run", progress=False)

    # A checkpoint "from before the crash": epoch 1 finished with 2 workers at the linearly scaled LR.
    torch.manual_seed(0)
    model = AlzheimerCNN(num_classes=4, image_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=2 * config["lr"])
    earlier = {"epoch": 1, "loss": 9.99, "attempt": 1, "world_size": 2}
    worker.save_checkpoint(tmp_path / "ckpt", model, optimizer, epoch=1, history=[earlier])

    # resumed with 1 worker: the optimizer's state comes back, the LR is the one scaled for 1 worker
    history = run_local_mode({**config, "epochs": 2, "lr_scaling": "linear", "resume_from": str(tmp_path / "ckpt")})
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0] == earlier                    # the finished epoch is kept, not retrained
    assert history[1]["loss"] != earlier["loss"] and 0.0 <= history[1]["val_acc"] <= 1.0
    assert history[1]["images"] == 48 and history[1]["val_images"] == 24
    assert history[1]["lr"] == pytest.approx(scale_lr(1e-3, 1, "linear"))
    assert "newly scaled" in history[1]["resume"] and "with 2 worker(s)" in history[1]["resume"]

    # the workers train at the LR of the notebook's rule (exercise 3), right or wrong
    fresh = run_local_mode({**config, "epochs": 1}, scale_lr=lambda lr, world_size, rule: 7e-4)
    assert fresh[0]["lr"] == pytest.approx(7e-4) and "resume" not in fresh[0]
    assert [row["epoch"] for row in fresh] == [1] and fresh[0]["attempt"] == 2
    assert fresh[0]["nodes"] == ["local"]
    import ray
    assert not ray.is_initialized(), "the training function started a Ray cluster under Ray Train's local mode"


def test_driver_progress_bars_follow_the_progress_file(tmp_path):
    writer = worker.ProgressFile(tmp_path, epochs=3, done=1, every_s=0.0)
    bars = worker.ProgressBars(tmp_path, epochs=3)
    bars.refresh()
    assert bars.epoch_bar.n == 1                                  # resumed after epoch 1
    for _ in writer.batches(range(4), epoch=2, total=4):
        pass
    bars.refresh()
    assert (bars.batch_bar.n, bars.batch_bar.total) == (4, 4) and "epoch 2/3" in bars.batch_bar.desc
    writer.epoch_done({"epoch": 2, "epoch_s": 1.0, "loss": 1.0, "acc": 0.5, "val_acc": 0.5}, str)
    with bars:                                                    # the thread starts and stops cleanly
        pass
    assert bars.epoch_bar.n == 2


def test_worker_functions_using_torch_and_dot_classes_pickle():
    """A notebook worker that uses ``torch`` and ``ds.classes`` once failed in ``trainer.fit()`` with
    "cannot pickle '_Classes' object"; importing labkit.distributed makes it picklable."""
    import types

    import ray.cloudpickle as cloudpickle

    import labkit.distributed  # noqa: F401  (registers the reducer)

    notebook = types.ModuleType("__main__")                      # functions from __main__ pickle by value
    exec("import torch\nclass DS:\n    classes = ['a', 'b']\nds = DS()\n"
         "def worker():\n    return torch.zeros(len(ds.classes))\n", notebook.__dict__)
    notebook.worker.__module__ = "__main__"
    restored = cloudpickle.loads(cloudpickle.dumps(notebook.worker))
    assert restored().shape == (2,)


def test_a_local_cluster_gets_a_lean_environment_that_a_user_setting_overrides(monkeypatch):
    """Ray's processes inherit the driver's environment at ``ray.init``: labkit turns off Train V2 parts a
    single-machine run does not use (a user's own value wins) and keeps a slow optional import out of them."""
    import subprocess
    import sys

    from labkit.distributed import local_ray

    monkeypatch.setenv("RAY_TRAIN_METRICS_ENABLED", "1")                 # the user's choice
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    local_ray.lean_env()
    local_ray.lean_env()                                                   # idempotent
    assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "1" and os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    paths = os.environ["PYTHONPATH"].split(os.pathsep)
    assert len([p for p in paths if p.endswith("labkit-ray-stubs")]) == 1
    probe = ("import jsonschema\ntry:\n    import rfc3987_syntax\nexcept ImportError as e:\n    print('declined:', e)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ, timeout=120)
    assert out.returncode == 0 and "declined: labkit keeps rfc3987_syntax out" in out.stdout, out.stderr
