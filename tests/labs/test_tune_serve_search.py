"""labkit.labs.tune_serve.search: look-alike groups keep the slices of one "brain" on one side of a split (a random
split does not), the sweep key changes with the search space, the data and the device (and only then), and the
best epoch is where the score peaked."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from ray import tune
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from labkit.labs.tune_serve import search

BRAINS, SLICES = 40, 6


def _brains(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images [N, 1, 32, 32]: each "brain" a smooth random pattern, its slices that pattern with small changes
    (noise, brightness, a one-pixel shift); labels: four classes, one per brain."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(BRAINS, 1, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    slices = []
    for s in range(SLICES):
        shifted = torch.roll(base, shifts=(s % 2, s // 3), dims=(2, 3))
        noisy = shifted * (0.9 + 0.2 * torch.rand(BRAINS, 1, 1, 1, generator=g)) + 0.03 * torch.randn(shifted.shape, generator=g)
        slices.append(noisy)
    images = (torch.stack(slices, 1).flatten(0, 1).clamp(0, 1) * 255).to(torch.uint8)
    brain = np.repeat(np.arange(BRAINS), SLICES)
    return images, brain, brain % 4


def _leaky_brains(brain: np.ndarray, fit: np.ndarray, val: np.ndarray) -> int:
    return len(set(brain[fit]) & set(brain[val]))


def test_lookalike_groups_keep_a_brain_on_one_side():
    images, brain, labels = _brains()
    groups = search.lookalike_groups(images, per_group=SLICES, seed=0)
    assert groups.shape == (len(images),) and len(set(groups)) == BRAINS
    fit, val = next(StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0).split(images, labels, groups))
    assert not set(groups[fit]) & set(groups[val])
    grouped_leaks = _leaky_brains(brain, fit, val)
    fit_r, val_r = train_test_split(np.arange(len(images)), test_size=0.2, stratify=labels, random_state=0)
    random_leaks = _leaky_brains(brain, fit_r, val_r)
    assert random_leaks >= BRAINS // 2, "a random split by slice puts most brains on both sides"
    assert grouped_leaks <= BRAINS // 20, (grouped_leaks, random_leaks)


def test_lookalike_groups_checks_its_input():
    with pytest.raises(ValueError, match="N >= 2"):
        search.lookalike_groups(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="per_group"):
        search.lookalike_groups(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), per_group=0)


def _space(lr_high: float = 3e-3, device: str = "cpu") -> dict:
    return {"lr": tune.loguniform(1e-4, lr_high), "batch_size": tune.choice([16, 32, 64]),
            "steps": tune.qrandint(1, 10, 2), "grid": tune.grid_search([1, 2]), "device": device, "classes": ["a", "b"]}


def test_sweep_key_follows_space_data_and_device():
    x, y = torch.arange(12, dtype=torch.uint8).view(3, 1, 2, 2), torch.tensor([0, 1, 0])
    key = {"space": search.describe_space(_space()), "data": search.fingerprint(x, y)}
    same = {"space": search.describe_space(_space()), "data": search.fingerprint(x.clone(), y.clone())}
    assert search.sweep_name(key) == search.sweep_name(same), "the same search built again has the same key"
    json.dumps(key)
    edited = {**key, "space": search.describe_space(_space(lr_high=1e-2))}
    other_device = {**key, "space": search.describe_space(_space(device="cuda"))}
    x2 = x.clone()
    x2[0, 0, 0, 0] += 1
    other_data = {**key, "data": search.fingerprint(x2, y)}
    names = {search.sweep_name(k) for k in (key, edited, other_device, other_data)}
    assert len(names) == 4, "an edited range, another device or one changed pixel gives a new sweep"
    assert all(n.startswith("sweep-") and len(n) == 14 for n in names)
    lr = search.describe_space(_space())["lr"]
    assert lr["type"] == "Float" and lr["lower"] == 1e-4 and lr["upper"] == 3e-3 and "LogUniform" in lr["sampler"]["type"]
    with pytest.raises(TypeError, match="dict"):
        search.describe_space([1, 2])


def test_best_epoch_is_where_the_score_peaked():
    hist = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_balanced_acc": [0.3, 0.5, 0.5, 0.4]})
    assert search.best_epoch(hist, "val_balanced_acc") == (2, 0.5)
    assert search.best_epoch(hist, "val_balanced_acc", mode="min") == (1, 0.3)
    with pytest.raises(ValueError, match="columns"):
        search.best_epoch(hist, "balanced_acc")
