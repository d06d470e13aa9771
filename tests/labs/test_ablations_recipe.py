"""labkit.labs.ablations.recipe: MixUp/CutMix label mixing, EMA with warm-up, progressive resizing, augmentation
(channels_last too)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from labkit.labs.ablations import recipe
from labkit.train import scale_lr


def _batch(b=15, k=5, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    y = torch.arange(b) % k  # neighbours always differ, so every mix involves two classes
    return x, y


def test_mixup_soft_labels_mix_two_classes_like_the_images():
    torch.manual_seed(0)
    x, y = _batch()
    xm, ym = recipe.mixup_cutmix(5, mixup_alpha=0.2, cutmix_alpha=0)(x, y)
    assert ym.shape == (15, 5)
    assert torch.allclose(ym.sum(1), torch.ones(15))
    partner = y.roll(1)  # torchvision pairs image i with image i-1
    for i in range(15):
        support = set(torch.nonzero(ym[i] > 1e-6).flatten().tolist())
        assert support <= {int(y[i]), int(partner[i])}
        lam = float(ym[i, y[i]])
        # the image is mixed in the same proportion as the label
        assert torch.allclose(xm[i], lam * x[i] + (1 - lam) * x[i - 1], atol=1e-5)


def test_cutmix_pastes_a_box_whose_area_is_the_label_weight():
    torch.manual_seed(1)
    x, y = _batch(size=16)
    xm, ym = recipe.mixup_cutmix(5, mixup_alpha=0, cutmix_alpha=1.0)(x, y)
    assert torch.allclose(ym.sum(1), torch.ones(15))
    own = (xm == x).all(1)           # pixels still from image i
    other = (xm == x.roll(1, 0)).all(1)
    assert (own | other).all(), "CutMix pixels must come from the image or its partner"
    lam = ym[torch.arange(15), y]
    assert torch.allclose(own.float().mean((1, 2)), lam, atol=1e-6)
    assert (lam < 1).any(), "with alpha 1 some images must get a patch"


def test_mixup_cutmix_off_and_bad_alpha():
    assert recipe.mixup_cutmix(10, 0, 0) is None
    with pytest.raises(ValueError, match="cutmix_alpha"):
        recipe.mixup_cutmix(10, 0.2, -1)


def test_ema_warmup_moves_towards_the_model_and_respects_decay():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = recipe.make_ema(model, decay=0.999)
    ema.update_parameters(model)  # first update copies the weights
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update_parameters(model)  # second update: n = 1, warm-up decay min(0.999, 2/11)
    d = recipe.ema_decay_at(1, 0.999)
    assert d == pytest.approx(2 / 11)
    assert torch.allclose(ema.module[0].weight, d * w0 + (1 - d) * (w0 + 1))
    # use_buffers=True: BatchNorm statistics are averaged too
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), (1 - d) * 2.0))
    # without warm-up the seed's behaviour: a step of only 1 - decay
    cold = recipe.make_ema(model, decay=0.999, warmup=False)
    cold.update_parameters(model)
    before = cold.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    cold.update_parameters(model)
    assert torch.allclose(cold.module[0].weight, before + 0.001, atol=1e-6)
    # long runs: the configured decay wins
    assert recipe.ema_decay_at(10**6, 0.999) == 0.999
    assert recipe.ema_decay_at(0, 0.999, warmup=False) == 0.999


def test_ema_state_round_trips_with_its_step_count():
    model = nn.Linear(2, 2)
    ema = recipe.make_ema(model, 0.9)
    for _ in range(3):
        ema.update_parameters(model)
    other = recipe.make_ema(nn.Linear(2, 2), 0.9)
    other.load_state_dict(ema.state_dict())
    assert int(other.n_averaged) == 3


def test_progressive_schedule_matches_the_seed_on_90_epochs():
    plan = recipe.progressive_schedule(90)
    assert plan[:30] == [(64, 256)] * 30
    assert plan[30:50] == [(128, 128)] * 20
    assert plan[50:] == [(224, 64)] * 40


@pytest.mark.parametrize("epochs", [1, 2, 3, 5, 10])
def test_progressive_schedule_short_runs_end_at_full_size(epochs):
    plan = recipe.progressive_schedule(epochs, sizes=(16, 40, 64), batch_sizes=(64, 32, 16))
    assert len(plan) == epochs and plan[-1] == (64, 16)
    sizes = [s for s, _ in plan]
    assert sizes == sorted(sizes)


def test_progressive_sizes_scale_the_seed_ratios():
    assert recipe.progressive_sizes(224) == (64, 128, 224)
    assert recipe.progressive_sizes(64) == (16, 40, 64)
    assert recipe.progressive_sizes(32) == (16, 16, 32)
    with pytest.raises(ValueError, match="epochs"):
        recipe.progressive_schedule(0)


def test_lr_scaling_rule():
    assert scale_lr(3e-4, 4, "linear") == pytest.approx(1.2e-3)
    assert scale_lr(3e-4, 4, "sqrt") == pytest.approx(6e-4)
    assert scale_lr(3e-4, 4, "none") == pytest.approx(3e-4)


def test_rgb_transform_shapes_and_no_crop_the_seed_never_used():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    ev = recipe.RGBTransform(24, train=False)
    assert ev(x).shape == (6, 3, 24, 24)
    assert torch.equal(ev(x), ev(x)), "evaluation is deterministic"
    # with every augmentation switched off, training = evaluation: no random-resized crop sneaks in
    plain = recipe.RGBTransform(16, train=True, flip=False)
    assert torch.allclose(plain(x), recipe.RGBTransform(16, train=False)(x))
    out = recipe.RGBTransform(16, train=True)(x)            # flip only: each image is itself or its mirror
    ref = recipe.RGBTransform(16, train=False)(x)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    assert all(torch.allclose(o, r) or torch.allclose(o, r.flip(-1)) for o, r in zip(out, ref))
    with pytest.raises(ValueError, match="3, H, W"):
        ev(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_seed_augmentations_are_switches_drawn_per_image():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(64, -1, -1, -1).contiguous()
    ref = recipe.RGBTransform(32, train=False)(x)
    for switch in ("affine", "color_jitter", "erasing"):
        tf = recipe.RGBTransform(32, train=True, flip=False, **{switch: True})
        out = tf(x)
        changed = ~torch.isclose(out, ref, atol=1e-4).flatten(1).all(1)
        # the seed's probabilities (0.5 / 0.3 / 0.5): some images changed, some not, and not all alike
        assert 0.1 < changed.float().mean() < 0.9, (switch, changed.float().mean())
        assert not torch.allclose(out[changed][0], out[changed][-1]), f"{switch}: one draw per image"
    erased = recipe.RGBTransform(32, train=True, flip=False, erasing=True)(x)
    zero = (erased == 0).all(1)                              # mean colour = 0 after normalisation
    hit = zero.flatten(1).sum(1)
    assert set(hit[hit > 0].tolist()) == {64}, "CoarseDropout: one 8x8 square (a quarter of the side)"
    cfg = recipe.make_config(flip=False, affine=False, color_jitter=False, erasing=True)
    tf = recipe.train_transform(cfg, 32)
    assert (tf.flip, tf.affine, tf.color_jitter, tf.erasing) == (False, False, False, True)
    defaults = recipe.AblationConfig()
    assert defaults.affine and defaults.color_jitter and defaults.erasing and defaults.flip


def test_peak_lr_is_the_seeds_at_global_batch_256():
    # 2 ranks x 128 = 256: exactly the seed's 3e-4, whatever the rule
    for rule in ("none", "linear", "sqrt"):
        assert recipe.peak_lr(recipe.make_config(lr=3e-4, batch_size=128, lr_scaling=rule), 2) == pytest.approx(3e-4)
    cfg = recipe.make_config(lr=3e-4, batch_size=256, lr_scaling="linear")
    assert recipe.peak_lr(cfg, 4) == pytest.approx(1.2e-3)       # global 1024 = 4 x 256
    cfg = recipe.make_config(lr=3e-4, batch_size=256, lr_scaling="sqrt")
    assert recipe.peak_lr(cfg, 4) == pytest.approx(6e-4)
    assert recipe.schedule(recipe.make_config(epochs=90, image_size=224, batch_size=256)) == \
        recipe.progressive_schedule(90), "the seed's 64/128/224 phases with batches 256/128/64"


def test_rgb_transform_channels_last_keeps_the_values():
    x = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    plain = recipe.RGBTransform(16, train=False)(x)
    nhwc = recipe.RGBTransform(16, train=False, channels_last=True)(x)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, nhwc)
    torch.manual_seed(0)
    train = recipe.RGBTransform(16, train=True, channels_last=True)(x)
    assert train.shape == (4, 3, 16, 16) and train.is_contiguous(memory_format=torch.channels_last)


def test_switches_round_trip_through_the_script_s_command_line():
    """The sweep hands each config to the notebook's script as arguments: parsing them gives the config back."""
    import argparse

    for cfg in (recipe.make_config(), recipe.make_config(name="x#2", amp=False, progressive=False, halve_batch=False,
                                                         progressive_sizes=[16, 40, 64], mixup=0.0, ema_decay=0.999,
                                                         lr_schedule="cosine", lr=3e-3, seed=7)):
        parser = argparse.ArgumentParser()
        recipe.add_switches(parser)
        assert recipe.config_from_args(parser.parse_args(recipe.switch_args(cfg))) == cfg


def test_progressive_keeps_the_batch_unless_halve_batch():
    fixed = recipe.make_config(epochs=10, image_size=64, batch_size=32, halve_batch=False)
    assert {bs for _, bs in recipe.schedule(fixed)} == {32}
    assert {s for s, _ in recipe.schedule(fixed)} == {16, 40, 64}
    halved = recipe.make_config(epochs=10, image_size=64, batch_size=32)
    assert [bs for _, bs in recipe.schedule(halved)][-1] == 8


@pytest.mark.parametrize("name", recipe.LR_SCHEDULES)
def test_lr_schedules_peak_where_they_should(name):
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([w], lr=1.0)
    sched = recipe.lr_scheduler(opt, recipe.make_config(lr_schedule=name, pct_start=0.3), 0.01, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.01, rel=1e-3)
    peak_at = lrs.index(max(lrs))
    assert (peak_at > 3) if name == "onecycle" else (peak_at == 0)
    assert (lrs[-1] < 0.001) if name != "constant" else (lrs[-1] == pytest.approx(0.01))


def test_fit_error_names_images_ranks_batch_and_the_fix():
    cfg = recipe.make_config(name="r", batch_size=128, progressive=False, epochs=1)
    text = recipe.fit_error(300, 4, cfg)
    assert "300 training images" in text and "4 ranks" in text and "batch of 128" in text
    assert "batch_size to <= 75" in text and "world_size <= 2" in text
    assert recipe.fit_error(512, 4, cfg) is None
