"""Model size and a layer-by-layer summary (a small, dependency-free ``torchsummary``)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _shape(out) -> str:
    if isinstance(out, torch.Tensor):
        return str(list(out.shape))
    if isinstance(out, (tuple, list)):
        return ", ".join(_shape(o) for o in out)
    return type(out).__name__


def model_summary(model: nn.Module, input_size: Sequence[int]) -> pd.DataFrame:
    """One row per leaf layer, in call order: ``layer`` (qualified name), ``type``,
    ``output_shape`` (with batch size 1) and ``params`` (its own parameters).

    ``input_size`` is ``(C, H, W)`` (a batch of one is added) or a full ``(B, C, H, W)``. The model
    runs one forward pass in eval mode on its own device (its train/eval mode is restored);
    ``df.attrs["total_params"]`` and ``df.attrs["trainable_params"]`` hold the whole model's counts
    (also parameters held outside leaf layers, e.g. a ViT's position embedding).
    """
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        size = (1, *size)
    if len(size) != 4 or min(size) < 1:
        raise ValueError(f"model_summary: input_size={tuple(input_size)} must be (C, H, W) or (B, C, H, W).")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32

    rows: list[dict] = []
    hooks = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue  # not a leaf

        def hook(mod, inputs, output, name=name):
            rows.append({"layer": name or type(mod).__name__, "type": type(mod).__name__,
                         "output_shape": _shape(output),
                         "params": sum(p.numel() for p in mod.parameters(recurse=False))})
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(size, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    df = pd.DataFrame(rows, columns=["layer", "type", "output_shape", "params"])
    df.attrs["total_params"] = count_parameters(model)
    df.attrs["trainable_params"] = count_parameters(model, trainable_only=True)
    return df
