"""The conv-stem ViT of Lab 04: shapes, size, stem downsampling, position-embedding interpolation,
[CLS] attention maps and the errors for bad depth / heads / dim / image_size."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labkit.models.summary import count_parameters
from labkit.models.vit import ViT, conv_stem, sequence_stats

SMALL = dict(dim=32, depth=2, heads=4, mlp_dim=64, stem_channels=16)


@pytest.mark.parametrize("size", [16, 32, 48, 64])
def test_output_shape_for_several_image_sizes(size):
    torch.manual_seed(0)
    model = ViT(num_classes=9, image_size=size, **SMALL).eval()
    x = torch.randn(3, 3, size, size)
    out = model(x)
    assert out.shape == (3, 9)
    assert torch.isfinite(out).all()
    assert model.tokens(x)[0].shape == (3, 1 + (size // 4) ** 2, 32)


def test_default_model_has_about_five_million_parameters():
    n = count_parameters(ViT())
    assert 4_500_000 <= n <= 5_800_000, n
    # the transformer blocks, not the stem, hold most of them (as in the seed's design)
    blocks = sum(p.numel() for p in ViT().blocks.parameters())
    assert blocks / n > 0.8


def test_stem_downsamples_four_times_per_side():
    stem = conv_stem(3, 24).eval()
    for h, w in [(32, 32), (64, 48), (128, 96)]:
        assert stem(torch.zeros(1, 3, h, w)).shape == (1, 24, h // 4, w // 4)
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 1, 1, 2, 2]
    assert all(c.kernel_size == (3, 3) for c in convs)


def test_position_embedding_is_interpolated_for_other_sizes():
    torch.manual_seed(0)
    model = ViT(num_classes=4, image_size=32, **SMALL).eval()
    assert model.position_embedding(8, 8) is model.pos_embed
    pe = model.position_embedding(12, 16)
    assert pe.shape == (1, 1 + 12 * 16, 32)
    assert torch.equal(pe[:, 0], model.pos_embed[:, 0])             # [CLS] position unchanged
    assert model(torch.randn(2, 3, 48, 64)).shape == (2, 4)


def test_attention_matches_explicit_softmax():
    """The fused SDPA path and the explicit weights used for the maps describe the same attention."""
    torch.manual_seed(0)
    model = ViT(num_classes=4, image_size=16, **SMALL).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 32)
    q, k, v = attn._qkv(x)
    fused = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attn.weights(x) @ v, fused, atol=1e-5)


def test_cls_attention_maps():
    torch.manual_seed(0)
    model = ViT(num_classes=4, image_size=32, **SMALL).eval()
    maps = model.cls_attention(torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 4, 8, 8)
    assert (maps >= 0).all() and (maps.sum((-2, -1)) <= 1 + 1e-5).all()


def test_pre_layernorm_block_keeps_the_residual_path():
    """With the sub-layers' output projections zeroed, a pre-LN block is exactly the identity."""
    model = ViT(num_classes=4, image_size=16, **SMALL)
    block = model.blocks[0]
    for lin in (block.attn.proj, block.mlp[3]):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    x = torch.randn(2, 5, 32)
    assert torch.equal(block.eval()(x), x)


@pytest.mark.parametrize("kwargs, names", [
    (dict(dim=100, heads=8), ("dim=100", "heads=8")),
    (dict(depth=0), ("depth=0",)),
    (dict(heads=-2), ("heads=-2",)),
    (dict(dim=2.5), ("dim=2.5",)),
    (dict(mlp_dim=0), ("mlp_dim=0",)),
    (dict(image_size=30), ("image_size=30", "divisible by 4")),
])
def test_bad_settings_name_the_parameter(kwargs, names):
    with pytest.raises(ValueError) as err:
        ViT(**kwargs)
    for name in names:
        assert name in str(err.value)


def test_input_not_divisible_by_four_is_rejected():
    model = ViT(num_classes=4, image_size=16, **SMALL)
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(1, 3, 18, 18))
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.randn(1, 1, 16, 16))


def test_sequence_stats():
    s = sequence_stats(128)
    assert s["tokens"] == 32 * 32 and s["pixels"] == 128 * 128
    assert s["sequence_ratio"] == 16 and s["attention_ratio"] == 256


def test_no_weight_decay_by_parameter_kind():
    """Biases, normalisation weights, the position embedding and the [CLS] token get no weight decay;
    chosen by kind, so `to_tokens.weight` (an ordinary weight whose name holds "token") decays."""
    from labkit.labs.lung_vit.lightning_module import decay_groups, no_decay_names

    model = ViT(num_classes=4, image_size=16, dim=32, depth=1, heads=4, mlp_dim=64, stem_channels=16)
    assert no_decay_names(model) == sorted([
        "cls_token", "pos_embed",
        *[f"stem.{i}.{k}" for i in range(5) for k in ("1.weight", "1.bias")],      # BatchNorm scale and shift
        "to_tokens.bias",
        "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias",
        "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.0.bias", "blocks.0.mlp.3.bias",
        "norm.weight", "norm.bias", "head.bias"])
    decay, no_decay = decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    assert any(p is named["to_tokens.weight"] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
    # every weight that decays is a matrix or a conv kernel
    assert all(p.ndim >= 2 for p in decay["params"])
