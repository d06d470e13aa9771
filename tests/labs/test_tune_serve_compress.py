"""labkit.labs.tune_serve.compress and the lab's int8 path: a trained AlzheimerCNN quantized with torchao (linear layers,
dynamic int8 activations) predicts what the fp32 model predicts on most test images, and its file is smaller."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from labkit import train
from labkit.data import batch_transform
from labkit.data.alzheimer import load_alzheimer
from labkit.labs.tune_serve import compress
from labkit.models.cnn import AlzheimerCNN

#: int8 must predict the fp32 model's class on at least this share of the test images. Dynamic int8 on
#: the linear layers only moves logits by ~1e-3 here (measured: 100 % agreement on the quick stand-in
#: test split), so 0.9 leaves room for near-ties while still failing for a broken quantization.
AGREEMENT = 0.90


@pytest.fixture(scope="module")
def trained():
    """A small AlzheimerCNN (32 px) trained for two epochs on the stand-in, and its test split."""
    torch.manual_seed(0)
    ds = load_alzheimer(data="auto", image_size=32, max_train=300, max_test=160, seed=0, progress=False)
    model = AlzheimerCNN(num_classes=4, image_size=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    augment = batch_transform(train=True)
    for epoch in range(2):
        train.train_one_epoch(model, ds.loader("train", 32, seed=epoch), opt, nn.CrossEntropyLoss(), device="cpu",
                              transform=augment, progress=False)
    return model.eval(), ds["test"].images, ds["test"].labels


def test_int8_agrees_with_fp32_and_is_smaller(trained, tmp_path):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    model, x, _ = trained
    q = copy.deepcopy(model)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    assert type(q.classifier[1].weight) is not torch.nn.Parameter or not q.classifier[1].weight.is_floating_point()
    assert q.features[0][0].weight.dtype == torch.float32, "the convolutions stay fp32"
    normalise = batch_transform(train=False)
    p32, prob32 = compress.predict(model, x, normalise)
    p8, prob8 = compress.predict(q, x, normalise)
    assert prob32.shape == (len(x), 4) and abs(prob32.sum(1) - 1).max() < 1e-4
    assert compress.agreement(p32, p8) >= AGREEMENT
    fp32_mb = compress.size_on_disk(model.state_dict(), tmp_path / "fp32.pt")
    int8_mb = compress.size_on_disk(q.state_dict(), tmp_path / "int8.pt")
    # the linear layers hold most bytes; int8 stores them in a quarter of the space
    linear = compress.layer_kinds(model)["Linear"] / sum(compress.layer_kinds(model).values())
    assert int8_mb < fp32_mb * (1 - 0.5 * linear), (fp32_mb, int8_mb, linear)
    assert not list(tmp_path.glob(".*.tmp")), "size_on_disk leaves no temporary files"


def test_exported_model_matches_eager(trained, tmp_path):
    model, x, _ = trained
    normalise = batch_transform(train=False)
    ep = torch.export.export(model, (normalise(x[:2]),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    mb = compress.size_on_disk(ep, tmp_path / "m.pt2", save=torch.export.save)
    assert mb > 0
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    p_eager, _ = compress.predict(model, x, normalise)
    p_export, _ = compress.predict(loaded, x, normalise)
    assert compress.agreement(p_eager, p_export) == 1.0


def test_latency_and_agreement_validate_their_input(trained):
    model, x, _ = trained
    batch = batch_transform(train=False)(x[:4])
    assert compress.latency_ms(model, batch, repeats=2, warmup=1) > 0
    with pytest.raises(ValueError, match="batch"):
        compress.latency_ms(model, batch[0], repeats=1)
    with pytest.raises(ValueError, match="same length"):
        compress.agreement([0, 1], [0])
    assert compress.agreement([0, 1, 2, 3], [0, 1, 0, 3]) == 0.75
