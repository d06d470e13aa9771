"""labkit.models.resnet: shapes of every variant, what each switch adds to the module tree, and
torchvision parity of the plain network."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from labkit.models.resnet import BlurPool, resnet
from labkit.models.summary import count_parameters


def _types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("variant", ["basic", "preact", "convhead"])
@pytest.mark.parametrize("depth,size,small_input", [(18, 32, True), (18, 64, True), (18, 64, False),
                                                     (50, 32, True), (50, 64, False)])
def test_output_shape_every_variant(depth, variant, size, small_input):
    torch.manual_seed(0)
    model = resnet(depth, num_classes=7, variant=variant, drop_path_rate=0.1, use_blurpool=True, width=0.125,
                   small_input=small_input)
    x = torch.randn(2, 3, size, size)
    model.train()
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()  # gradients flow through every branch (blur, drop path, head)
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_resnet50_matches_torchvision_parameter_count():
    ours = resnet(50, num_classes=1000, width=1.0, small_input=False)
    assert count_parameters(ours) == count_parameters(torchvision.models.resnet50(weights=None))
    assert count_parameters(resnet(18, 1000, small_input=False)) == count_parameters(torchvision.models.resnet18())


def test_drop_path_adds_stochastic_depth_with_rising_rate():
    plain = resnet(18, 10, width=0.125)
    assert StochasticDepth not in _types(plain)
    model = resnet(18, 10, drop_path_rate=0.2, width=0.125)
    rates = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(rates) == 7  # 8 blocks, the first at rate 0 has none
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.2)
    assert count_parameters(model) == count_parameters(plain)


def test_drop_path_drops_whole_branches_in_training_only():
    torch.manual_seed(0)
    model = resnet(18, 10, drop_path_rate=0.9, width=0.125)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # deterministic in eval
    model.train()
    for m in model.modules():  # freeze BN statistics so only drop path is random; un-zero the last BNs
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            nn.init.ones_(m.weight)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))


def test_blurpool_replaces_strided_convs():
    plain = resnet(50, 10, width=0.125, small_input=False)
    blur = resnet(50, 10, use_blurpool=True, width=0.125, small_input=False)
    assert BlurPool not in _types(plain)
    n_blur = sum(isinstance(m, BlurPool) for m in blur.modules())
    assert n_blur == 1 + 3 * 2  # stem max-pool, and branch + shortcut of the first block of layers 2-4
    strided = [m for m in blur.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert [m.kernel_size for m in strided] == [(7, 7)]  # only the stem conv still strides
    assert count_parameters(blur) == count_parameters(plain)  # the filter is a fixed buffer


def test_blurpool_is_a_normalised_low_pass_filter():
    pool = BlurPool(2, stride=2)
    flat = torch.full((1, 2, 8, 8), 3.0)
    assert torch.allclose(pool(flat), torch.full((1, 2, 4, 4), 3.0))  # keeps constants
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]).remainder(2).float()[None, None].repeat(1, 2, 1, 1)
    plain = checker[..., ::2, ::2]  # naive subsampling aliases the checkerboard to a constant 0
    assert plain.abs().max() == 0 and pool(checker).std() < 0.2 and pool(checker).mean() == pytest.approx(0.5, abs=0.1)


def test_convhead_has_no_linear_and_preact_has_no_relu_after_addition():
    head = resnet(18, 10, variant="convhead", width=0.125)
    assert nn.Linear not in _types(head)
    assert isinstance(head.head[0], nn.Conv2d) and head.head[0].out_channels == 10
    basic = resnet(18, 10, width=0.125)
    assert isinstance(basic.head[-1], nn.Linear)
    # pre-activation: a block's output is shortcut + branch, so it can be negative (no ReLU after the sum)
    pre = resnet(18, 10, variant="preact", width=0.125)
    outs = []
    pre.layer1[0].register_forward_hook(lambda m, i, o: outs.append(o))
    basic.layer1[0].register_forward_hook(lambda m, i, o: outs.append(o))
    x = torch.randn(2, 3, 32, 32)
    pre(x), basic(x)
    assert outs[0].min() < 0 and outs[1].min() >= 0


def test_zero_init_last_bn_in_basic_only():
    basic = resnet(50, 10, width=0.125)
    assert all(b.bn3.weight.abs().sum() == 0 for layer in (basic.layer1, basic.layer4) for b in layer)
    pre = resnet(50, 10, variant="preact", width=0.125)
    assert all(b.bn3.weight.abs().sum() > 0 for b in pre.layer1)


def test_width_scales_channels_with_a_floor():
    assert resnet(18, 10, width=0.5).layer4[0].conv2.out_channels == 256
    assert resnet(18, 10, width=0.01).stem[0].out_channels == 8
    assert count_parameters(resnet(18, 10, width=0.25)) < count_parameters(resnet(18, 10, width=0.5))


def test_describe_and_bad_arguments():
    d = resnet(18, 10, variant="convhead", width=0.25).describe()
    assert d["name"] == "resnet18" and d["variant"] == "convhead" and d["parameters"] > 0
    for kw, word in [({"depth": 20}, "depth"), ({"variant": "wide"}, "variant"),
                     ({"drop_path_rate": 1.5}, "drop_path_rate"), ({"width": 0}, "width"),
                     ({"num_classes": 0}, "num_classes")]:
        with pytest.raises(ValueError, match=word):
            resnet(**{"depth": 18, **kw})
