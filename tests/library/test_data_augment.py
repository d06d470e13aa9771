"""BatchAugment: shapes, range, flips and rotations that really happen, eval determinism."""
from __future__ import annotations

import pytest
import torch

from labkit.data.augment import BatchAugment, batch_transform, rotation_index_maps


def images(b: int = 16, c: int = 1, h: int = 21, w: int = 21, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


def test_output_shape_dtype_range():
    x = images(8, 1, 20, 24)
    for train in (True, False):
        y = batch_transform(train, seed=0)(x)
        assert y.shape == (8, 3, 20, 24) and y.dtype == torch.float32 and y.device == x.device
        assert y.min() >= -1.0 and y.max() <= 1.0
        assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])   # grayscale repeated
    threads = torch.get_num_threads()
    assert BatchAugment(True, out_channels=1)(x).shape == (8, 1, 20, 24)
    assert torch.get_num_threads() == threads                 # the CPU thread limit is undone
    assert BatchAugment(False)(images(2, 3)).shape == (2, 3, 21, 21)


def test_eval_only_converts_and_normalises():
    x = images()
    aug = BatchAugment(False)
    y = aug(x)
    assert torch.allclose(y[:, :1], x.float() / 127.5 - 1.0, atol=1e-6)
    assert torch.equal(y, aug(x))
    train_mode_off = BatchAugment(True, seed=0).eval()
    assert torch.equal(train_mode_off(x), y)
    custom = BatchAugment(False, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))(x)
    assert torch.allclose(custom[:, 2], (x[:, 0].float() / 255 - 0.3) / 0.25, atol=1e-5)


def test_flip_only_mirrors_some_samples():
    x = images(64)
    y = BatchAugment(True, degrees=0, out_channels=1, mean=0.0, std=1.0, seed=1)(x)
    plain, mirrored = x.float() / 255, x.flip(-1).float() / 255
    same = torch.isclose(y, plain).flatten(1).all(1)
    flipped = torch.isclose(y, mirrored).flatten(1).all(1)
    assert (same | flipped).all()
    assert 10 < flipped.sum() < 54


def test_rotation_changes_images_within_the_angle_range():
    x = images(32, h=65, w=65)
    aug = BatchAugment(True, flip=False, degrees=10, out_channels=1, mean=0.0, std=1.0, seed=2)
    y = aug.flip_rotate(x)
    changed = (y != x).flatten(1).any(1)
    assert changed.sum() >= 26                        # 21 angles: 0° is drawn about 1 in 21 times
    assert torch.equal(y[:, :, 32, 32], x[:, :, 32, 32])   # the centre stays put
    maps = rotation_index_maps(65, 65, aug.angles, (False,))
    flat = torch.cat([x.flatten(1), torch.zeros(32, 1, dtype=x.dtype)], 1)
    candidates = torch.stack([flat[:, m] for m in maps], 1)   # [B, angles, H*W]
    assert (candidates == y.flatten(1)[:, None]).all(2).any(1).all()


def test_index_maps_match_exact_transforms():
    x = images(1, 1, 5, 7)[0, 0]
    flat = torch.cat([x.flatten(), x.new_zeros(1)])
    ident, mirror = rotation_index_maps(5, 7, [0.0], (False, True))
    assert torch.equal(flat[ident].view(5, 7), x) and torch.equal(flat[mirror].view(5, 7), x.flip(-1))
    sq = images(1, 1, 6, 6)[0, 0]
    (quarter,) = rotation_index_maps(6, 6, [90.0], (False,))
    assert torch.equal(torch.cat([sq.flatten(), sq.new_zeros(1)])[quarter].view(6, 6), torch.rot90(sq))
    (small,) = rotation_index_maps(9, 9, [10.0], (False,))
    assert (small == 81).any()                         # corners come from outside: filled with 0


def test_seed_makes_it_repeatable():
    x = images(32)
    a = BatchAugment(True, seed=5)(x)
    assert torch.equal(a, BatchAugment(True, seed=5)(x))
    assert not torch.equal(a, BatchAugment(True, seed=6)(x))
    aug = BatchAugment(True, seed=5)
    assert not torch.equal(aug(x), aug(x))             # a new draw per batch


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="uint8"):
        BatchAugment(True)(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="out_channels"):
        BatchAugment(False, out_channels=2)
    with pytest.raises(ValueError, match="degrees"):
        BatchAugment(True, degrees=-3)
    with pytest.raises(ValueError, match="3 channels"):
        BatchAugment(False, out_channels=1)(images(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_gpu():
    x = images(16).cuda()
    aug = BatchAugment(True, seed=0)
    y = aug(x)
    assert y.device == x.device and y.shape == (16, 3, 21, 21)
    assert torch.equal(y.cpu(), BatchAugment(True, seed=0)(x.cpu()))
