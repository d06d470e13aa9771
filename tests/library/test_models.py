"""AlzheimerCNN shapes, its image_size check, and parameter counting / summary."""
import pytest
import torch

from labkit.models.cnn import AlzheimerCNN
from labkit.models.summary import count_parameters, model_summary


def _conv_bn(c_in: int, c_out: int) -> int:
    return (c_in * c_out * 3 * 3 + c_out) + 2 * c_out  # conv weight + bias, BN weight + bias


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def expected_parameters(image_size: int, num_classes: int = 4, in_channels: int = 3) -> int:
    """The architecture of seed 000, counted by hand from the layer shapes."""
    chans = [in_channels, 32, 64, 128, 256]
    convs = sum(_conv_bn(a, b) for a, b in zip(chans, chans[1:]))
    flat = 256 * (image_size // 16) ** 2
    return convs + _linear(flat, 512) + _linear(512, 128) + _linear(128, num_classes)


@pytest.mark.parametrize("size", [64, 128])
def test_output_shape(size):
    model = AlzheimerCNN(num_classes=4, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 4)
    assert torch.isfinite(out).all()


def test_grayscale_and_other_class_count():
    model = AlzheimerCNN(num_classes=7, image_size=32, in_channels=1).eval()
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 7)
    assert count_parameters(model) == expected_parameters(32, 7, 1)


@pytest.mark.parametrize("size", [100, 8, 0])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match="image_size"):
        AlzheimerCNN(image_size=size)


def test_wrong_input_size_is_named():
    model = AlzheimerCNN(image_size=64)
    with pytest.raises(ValueError, match="image_size=64"):
        model(torch.randn(1, 3, 128, 128))


@pytest.mark.parametrize("size", [64, 128])
def test_parameter_count_matches_formula(size):
    model = AlzheimerCNN(image_size=size)
    assert count_parameters(model) == expected_parameters(size)
    assert count_parameters(model, trainable_only=True) == expected_parameters(size)


def test_parameter_count_at_128_is_not_the_readme_number():
    n = expected_parameters(128)
    assert 8.5e6 < n < 9.0e6  # the source README's "~16.7 M" does not fit this architecture
    assert "8.8" in AlzheimerCNN.__doc__


def test_trainable_only_skips_frozen():
    model = AlzheimerCNN(image_size=64)
    for p in model.features.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.features.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen


def test_model_summary_shapes_and_params():
    model = AlzheimerCNN(image_size=64)
    model.train()
    df = model_summary(model, (3, 64, 64))
    assert model.training  # mode restored
    assert list(df.columns) == ["layer", "type", "output_shape", "params"]
    assert df["params"].sum() == count_parameters(model) == df.attrs["total_params"]
    convs = df[df["type"] == "Conv2d"]
    assert list(convs["output_shape"]) == ["[1, 32, 64, 64]", "[1, 64, 32, 32]", "[1, 128, 16, 16]", "[1, 256, 8, 8]"]
    assert df.iloc[-1]["output_shape"] == "[1, 4]"
    assert df.iloc[-1]["layer"] == "classifier.7"
    with pytest.raises(ValueError, match="input_size"):
        model_summary(model, (64, 64))
