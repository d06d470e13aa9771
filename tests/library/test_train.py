"""The one training path: train_one_epoch / evaluate / fit on a tiny synthetic problem (CPU, seconds)."""
import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Subset, TensorDataset

from labkit import env, train
from labkit.train import class_weights_from_counts, evaluate, fit, scale_lr, train_one_epoch

K, SIZE = 3, 8
CPU = torch.device("cpu")
TRAIN_KEYS = {"loss", "acc", "images", "seconds", "images_per_s", "data_s", "compute_s"}
EPOCH_KEYS = {"epoch", "loss", "acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s", "data_s", "compute_s"}


def make_data(n: int = 240, seed: int = 0, shift: int = 0, weights=None) -> TensorDataset:
    """uint8 [n,1,8,8] noise with a bright horizontal band whose position is the class.

    ``shift`` relabels class c as (c + shift) % K (a validation set that disagrees with training);
    ``weights`` gives per-class repeat counts for an imbalanced set.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    if weights is not None:
        y = torch.cat([torch.full((w,), c) for c, w in enumerate(weights)])
    x = torch.randint(0, 90, (len(y), 1, SIZE, SIZE), generator=g)
    rows = SIZE // K
    for c in range(K):
        x[y == c, :, c * rows:(c + 1) * rows, :] += 120
    return TensorDataset(x.to(torch.uint8), (y + shift) % K)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.ReLU(), nn.Linear(16, K))


def loader(ds, batch_size=32, shuffle=False, seed=0, **kw):
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), **kw)


def test_train_one_epoch_reduces_loss_and_reports_keys():
    ds = make_data()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = evaluate(model, loader(ds), device="cpu")["loss"]
    for _ in range(3):
        stats = train_one_epoch(model, loader(ds, shuffle=True), opt, nn.CrossEntropyLoss(), device=CPU, progress=False)
    after = evaluate(model, loader(ds), device="cpu")
    assert set(stats) == TRAIN_KEYS
    assert stats["images"] == len(ds)
    assert 0 <= stats["data_s"] <= stats["seconds"] and stats["compute_s"] >= 0
    assert math.isclose(stats["images_per_s"], stats["images"] / stats["seconds"])
    assert after["loss"] < 0.5 * before
    assert after["acc"] > 0.9


def test_evaluate_outputs_topk_and_mode_restored():
    ds = make_data(n=90)
    model = make_model()
    model.train()
    out = evaluate(model, loader(ds, batch_size=16), device="cpu", return_outputs=True, topk=(1, 2, 5))
    assert model.training
    assert {"loss", "acc", "images", "seconds", "top2", "top5", "y_true", "y_pred", "probs"} <= set(out)
    assert out["images"] == 90 and out["probs"].shape == (90, K)
    assert (out["y_true"] == ds.tensors[1].numpy()).all()
    assert abs(out["probs"].sum(1) - 1).max() < 1e-5
    assert math.isclose(out["acc"], float((out["y_pred"] == out["y_true"]).mean()))
    assert out["acc"] <= out["top2"] <= out["top5"] == 1.0  # top-5 of 3 classes always hits
    model.eval()
    evaluate(model, loader(ds), device="cpu")
    assert not model.training


def test_evaluate_empty_loader_is_an_error():
    empty = TensorDataset(torch.zeros(0, 1, SIZE, SIZE, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no batches"):
        evaluate(make_model(), loader(empty), device="cpu")


def _one_epoch(batch_transform=None, amp_dtype=None):
    ds = make_data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, loader(ds), opt, nn.CrossEntropyLoss(), device="cpu", progress=False,
                            batch_transform=batch_transform, amp_dtype=amp_dtype)
    return stats, model


def test_soft_targets_match_hard_labels():
    """One-hot probabilities are the same targets as class indices: identical loss, accuracy, weights."""
    hard, m_hard = _one_epoch()
    soft, m_soft = _one_epoch(lambda x, y: (x, nn.functional.one_hot(y, K).float()))
    assert math.isclose(hard["loss"], soft["loss"], rel_tol=1e-5)
    assert hard["acc"] == soft["acc"]
    for a, b in zip(m_hard.parameters(), m_soft.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_mixup_soft_targets_train():
    from torchvision.transforms import v2
    mix = v2.MixUp(num_classes=K, alpha=0.4)
    seen = []

    def batch_transform(x, y):
        x, y = mix(x, y)
        seen.append(y)
        return x, y

    stats, _ = _one_epoch(batch_transform)
    assert seen and all(t.dtype.is_floating_point and t.shape[1] == K for t in seen)
    assert math.isfinite(stats["loss"]) and 0 <= stats["acc"] <= 1


def test_bf16_autocast_on_cpu_runs():
    stats, _ = _one_epoch(amp_dtype=torch.bfloat16)
    assert math.isfinite(stats["loss"])


def test_grad_scaler_path_with_clipping():
    """The fp16 path (GradScaler, unscale before clipping) — exercised with CPU autocast."""
    ds = make_data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    first = train_one_epoch(model, loader(ds), opt, nn.CrossEntropyLoss(), device="cpu", amp_dtype=torch.float16,
                            scaler=scaler, grad_clip=1.0, progress=False)
    second = train_one_epoch(model, loader(ds), opt, nn.CrossEntropyLoss(), device="cpu", amp_dtype=torch.float16,
                             scaler=scaler, grad_clip=1.0, progress=False)
    assert second["loss"] < first["loss"]


def test_ema_is_updated_every_step():
    ds = make_data()
    model = make_model()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    start = [p.detach().clone() for p in ema.module.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = len(loader(ds))
    train_one_epoch(model, loader(ds), opt, nn.CrossEntropyLoss(), device="cpu", ema=ema, progress=False)
    assert int(ema.n_averaged) == batches
    for e, s, m in zip(ema.module.parameters(), start, model.parameters()):
        assert not torch.equal(e, s)  # moved away from the initial weights
        assert not torch.equal(e, m)  # but lags behind the live model
    assert evaluate(ema, loader(ds), device="cpu")["acc"] > 1 / K


def test_fit_with_ema_and_mixup_validates_both():
    from torchvision.transforms import v2
    model = make_model()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    hist = fit(model, loader(make_data(), shuffle=True), loader(make_data(seed=1)), epochs=2, lr=1e-2,
               device="cpu", ema=ema, batch_transform=v2.MixUp(num_classes=K), grad_clip=5.0, progress=False)
    assert all({"ema_val_loss", "ema_val_acc"} <= set(r) for r in hist)
    assert hist[-1]["ema_val_loss"] != hist[-1]["val_loss"]
    assert hist[-1]["ema_val_acc"] > 1 / K


def test_scheduler_steps_per_batch_and_grad_clip():
    ds = make_data(n=96)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_one_epoch(model, loader(ds, batch_size=32), opt, nn.CrossEntropyLoss(), device="cpu",
                    scheduler=sched, grad_clip=1e-3, progress=False)
    assert math.isclose(opt.param_groups[0]["lr"], 0.5 ** 3)


def test_fit_records_and_callback():
    seen = []
    hist = fit(make_model(), loader(make_data(), shuffle=True), loader(make_data(seed=1)), epochs=3, lr=1e-2,
               device="cpu", progress=False, on_epoch=seen.append, lr_schedule="cosine")
    assert [r["epoch"] for r in hist] == [1, 2, 3] and seen == hist
    assert all(EPOCH_KEYS <= set(r) for r in hist)
    assert hist[0]["lr"] == 1e-2 and hist[0]["lr"] > hist[1]["lr"] > hist[2]["lr"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] and hist[-1]["val_acc"] > 0.9


@pytest.mark.parametrize("optimizer,schedule", [("adamw", "onecycle"), ("sgd", "plateau"), ("adam", None)])
def test_fit_optimizers_and_schedules(optimizer, schedule):
    hist = fit(make_model(), loader(make_data(), shuffle=True), loader(make_data(seed=1)), epochs=2, lr=1e-2,
               optimizer=optimizer, lr_schedule=schedule, weight_decay=1e-4, device="cpu", progress=False)
    assert len(hist) == 2 and all(math.isfinite(r["val_loss"]) for r in hist)


def test_fit_early_stopping_restores_best():
    """Validation labels disagree with training labels, so val_loss gets worse as training proceeds."""
    model = make_model()
    val = loader(make_data(seed=1, shift=1))
    hist = fit(model, loader(make_data(), shuffle=True), val, epochs=30, lr=1e-2, device="cpu",
               early_stopping=2, progress=False, amp=False)  # fp32, like the evaluate() below
    last = hist[-1]
    assert last["stopped_early"] is True and len(hist) < 30
    best = min(hist, key=lambda r: r["val_loss"])
    assert last["best_epoch"] == best["epoch"] and len(hist) == best["epoch"] + 2
    restored = evaluate(model, val, device="cpu")["loss"]
    assert math.isclose(restored, best["val_loss"], rel_tol=1e-5)
    assert restored < last["val_loss"]


def test_class_weights_from_counts():
    w = class_weights_from_counts([10, 30, 60])
    assert w.dtype == torch.float32 and math.isclose(w.mean().item(), 1.0, rel_tol=1e-6)
    assert math.isclose((w[0] / w[1]).item(), 3.0, rel_tol=1e-6) and math.isclose((w[1] / w[2]).item(), 2.0, rel_tol=1e-6)
    z = class_weights_from_counts({"a": 5, "b": 0, "c": 5})
    assert z.tolist() == [1.0, 0.0, 1.0]
    for bad in ([3, -1], [0, 0], [[1, 2]]):
        with pytest.raises(ValueError, match="counts"):
            class_weights_from_counts(bad)


def test_fit_class_weights_from_labels(monkeypatch):
    ds = make_data(weights=[100, 30, 10])
    sub = Subset(ds, list(range(0, 140, 2)))  # labels of a Subset are read through its indices
    captured = {}
    real = nn.CrossEntropyLoss

    def spy(*args, **kw):
        captured["weight"] = kw.get("weight")
        return real(*args, **kw)

    monkeypatch.setattr(train.nn, "CrossEntropyLoss", spy)
    fit(make_model(), loader(sub), loader(ds), epochs=1, lr=1e-2, device="cpu", class_weights=True, progress=False)
    counts = torch.bincount(ds.tensors[1][::2], minlength=K)
    assert torch.allclose(captured["weight"], class_weights_from_counts(counts))
    assert captured["weight"][2] > captured["weight"][1] > captured["weight"][0]
    fit(make_model(), loader(ds), None, epochs=1, lr=1e-2, device="cpu", class_weights=[1.0, 2.0, 3.0], progress=False)
    assert captured["weight"].tolist() == [1.0, 2.0, 3.0]


def test_fit_bad_arguments_are_named():
    tr, va = loader(make_data(n=30)), loader(make_data(n=30))
    cases = [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"lr_schedule": "linear"}, "lr_schedule"),
             ({"optimizer": "rmsprop"}, "optimizer"), ({"early_stopping": 0}, "early_stopping"),
             ({"class_weights": [1.0, 2.0]}, "class_weights")]
    for override, name in cases:
        kw = {"epochs": 1, "lr": 1e-2, **override}
        with pytest.raises(ValueError, match=name):
            fit(make_model(), tr, va, device="cpu", progress=False, **kw)
    with pytest.raises(ValueError, match="val_loader"):
        fit(make_model(), tr, None, epochs=1, lr=1e-2, device="cpu", early_stopping=2, progress=False)


def test_scale_lr():
    assert scale_lr(0.1, 4) == 0.1
    assert math.isclose(scale_lr(0.1, 4, "linear"), 0.4)
    assert math.isclose(scale_lr(0.1, 4, "sqrt"), 0.2)
    with pytest.raises(ValueError, match="rule='cubic'"):
        scale_lr(0.1, 4, "cubic")
    with pytest.raises(ValueError, match="world_size"):
        scale_lr(0.1, 0, "linear")


def test_fit_with_ddp_model_and_distributed_sampler(tmp_path):
    """The same fit() runs a DDP-wrapped model over a DistributedSampler (one gloo rank in-process)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ds = make_data()
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        model = DDP(make_model())
        hist = fit(model, DataLoader(ds, batch_size=32, sampler=sampler), loader(make_data(seed=1)),
                   epochs=2, lr=1e-2, device="cpu", class_weights=True, early_stopping=5, progress=False)
        assert sampler.epoch == 2
        assert hist[-1]["val_acc"] > 0.9 and hist[-1]["stopped_early"] is False
    finally:
        dist.destroy_process_group()



# --- precision on the CPU: bf16 autocast + channels_last where it pays, amp=False forces fp32 -------------

def make_conv_model(seed: int = 0) -> nn.Module:
    """A small conv net whose weights and activations have a memory layout to check."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, K))


def make_rgb_data(n: int = 96, seed: int = 0) -> TensorDataset:
    """``make_data``'s images repeated to 3 channels (channels_last is only visible with C > 1)."""
    ds = make_data(n=n, seed=seed)
    return TensorDataset(ds.tensors[0].expand(-1, 3, -1, -1).contiguous(), ds.tensors[1])


class Spy(nn.Module):
    """Wraps a model and records, per forward call, the autocast state and the input's memory layout."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append({"autocast": torch.is_autocast_enabled("cpu"), "dtype": torch.get_autocast_dtype("cpu"),
                           "channels_last": x.is_contiguous(memory_format=torch.channels_last)
                           and not x.is_contiguous()})
        return self.model(x)


def test_bf16_cpu_step_has_finite_loss_and_changes_weights():
    model = make_conv_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, loader(make_rgb_data(n=32)), opt, nn.CrossEntropyLoss(), device=CPU,
                            amp_dtype=torch.bfloat16, progress=False)
    assert stats["images"] == 32 and math.isfinite(stats["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("native", [True, False])
def test_amp_false_forces_fp32_without_autocast(monkeypatch, native):
    monkeypatch.setattr(env, "cpu_has_native_bf16", lambda: native)
    spy = Spy(make_conv_model())
    fit(spy, loader(make_rgb_data()), loader(make_rgb_data(seed=1)), epochs=1, lr=1e-2, device="cpu",
        amp=False, progress=False)
    assert spy.calls and not any(c["autocast"] or c["channels_last"] for c in spy.calls)
    assert all(p.is_contiguous() for p in spy.parameters())


def test_auto_on_cpu_with_native_bf16_uses_bf16_and_channels_last(monkeypatch):
    monkeypatch.setattr(env, "cpu_has_native_bf16", lambda: True)
    spy = Spy(make_conv_model())
    hist = fit(spy, loader(make_rgb_data()), loader(make_rgb_data(seed=1)), epochs=1, lr=1e-2, device="cpu",
               amp="auto", progress=False)
    assert spy.calls and all(c["autocast"] and c["dtype"] == torch.bfloat16 and c["channels_last"] for c in spy.calls)
    conv = spy.model[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert math.isfinite(hist[0]["loss"]) and math.isfinite(hist[0]["val_loss"])


def test_auto_on_cpu_without_native_bf16_stays_fp32(monkeypatch):
    monkeypatch.setattr(env, "cpu_has_native_bf16", lambda: False)
    spy = Spy(make_conv_model())
    fit(spy, loader(make_rgb_data()), None, epochs=1, lr=1e-2, device="cpu", amp="auto", progress=False)
    assert spy.calls and not any(c["autocast"] or c["channels_last"] for c in spy.calls)


def test_channels_last_batches_on_cpu_only_with_bf16():
    """train_one_epoch / evaluate put image batches in channels_last on a CPU exactly when running bf16."""
    for dtype, want in ((torch.bfloat16, True), (None, False)):
        spy = Spy(make_conv_model())
        opt = torch.optim.SGD(spy.parameters(), lr=0.1)
        train_one_epoch(spy, loader(make_rgb_data(n=32)), opt, nn.CrossEntropyLoss(), device=CPU, amp_dtype=dtype,
                        progress=False)
        evaluate(spy, loader(make_rgb_data(n=32)), device=CPU, amp_dtype=dtype)
        assert len(spy.calls) == 2 and all(c["channels_last"] is want for c in spy.calls), (dtype, spy.calls)
