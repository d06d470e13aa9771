"""Lab 01: the quick run (executed once for the whole suite by the ``course`` fixture) writes its record and
plots. Bad parameters: ``tests/reliability/test_bad_parameters.py``, for every lab."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from labkit import results

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "labs" / "01_baseline.ipynb"
pytestmark = pytest.mark.slow
#: Quick mode must learn (issue 29): accuracy at least the majority-class rate (what always answering the most
#: common class scores) + ACC_MARGIN, balanced accuracy at least chance (1/K, what any constant answer scores)
#: + BALANCED_MARGIN.
ACC_MARGIN = 0.15
BALANCED_MARGIN = 0.20


def test_quick_run_writes_record_and_plots(course):
    record = results.latest("01_baseline", course["results"])
    assert record is not None, "Lab 01 wrote no run record"
    assert record.params["quick"] is True and record.data["synthetic"] is True
    assert len(record.epochs) == record.params["epochs"] >= 1
    for key in ("loss", "acc", "val_loss", "val_acc", "seconds", "images_per_s"):
        assert key in record.epochs[0]
    # the stand-in is learnable but not trivial: the trained CNN beats always answering the majority
    # class, and it is not perfect
    assert record.final["majority_rate"] + ACC_MARGIN <= record.final["test_acc"] < 1.0, record.final
    # balanced accuracy is 1/K for any constant answer: the model must beat that by a stated margin
    assert record.final["chance"] == 0.25
    assert record.final["balanced_acc"] >= record.final["chance"] + BALANCED_MARGIN, record.final
    # the test predictions, image by image, for Lab 02's paired comparison; they give the recorded scores
    pred = record.final["test_predictions"]
    assert len(pred["files"]) == len(set(pred["files"])) == len(pred["y_true"]) == len(pred["y_pred"]) \
        == sum(record.data["counts"]["test"].values())
    from labkit import metrics
    again = metrics.summarize(pred["y_true"], pred["y_pred"], num_classes=4)
    assert again["acc"] == record.final["acc"] and again["balanced_acc"] == record.final["balanced_acc"]
    assert 0.0 <= record.final["macro_f1"] <= 1.0
    assert record.final["precision"] in ("fp32", "bf16", "fp16")
    assert record.env["precision"] == record.final["precision"]
    for artifact in record.artifacts:
        path = course["results"] / artifact
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", artifact


# --- the notebook's own training loop, run outside the notebook (seconds, no papermill) ----------------------

def _notebook_loop(dev, amp_dtype, channels_last):
    """The cell of labs/01_baseline.py that defines ``train_epoch``/``evaluate``, executed with the globals
    the notebook gives it."""
    import time

    from torch import nn
    from tqdm.auto import tqdm

    from labkit.course.labsource import read_text
    from labkit.data.augment import batch_transform

    nb = read_text(REPO / "labs" / "01_baseline.py")
    [source] = [c.source for c in nb.cells if c.cell_type == "code" and "def train_epoch(" in c.source]
    namespace = {"torch": torch, "nn": nn, "time": time, "tqdm": tqdm, "dev": dev, "amp_dtype": amp_dtype,
                 "channels_last": channels_last, "augment": batch_transform(train=True),
                 "normalise": batch_transform(train=False)}
    exec(compile(source, "01_baseline:train_epoch", "exec"), namespace)
    return namespace


class _Spy(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                           x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
        return self.model(x)


@pytest.mark.parametrize("amp", ["bf16", False])
def test_notebook_loop_precision_on_cpu(amp):
    """bf16: autocast + channels_last batches, finite loss, weights change; amp=False: fp32, no autocast."""
    from labkit import env
    from labkit.models.cnn import AlzheimerCNN

    dev = torch.device("cpu")
    dtype = env.amp_dtype(amp, dev)
    cl = env.use_channels_last(dev, dtype)
    assert (dtype, cl) == ((torch.bfloat16, True) if amp else (None, False))
    loop = _notebook_loop(dev, dtype, cl)
    torch.manual_seed(0)
    model = AlzheimerCNN(num_classes=4, image_size=32)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    spy = _Spy(model)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8, generator=g), torch.arange(8) % 4)]
    stats = loop["train_epoch"](spy, batches, torch.optim.Adam(spy.parameters(), 1e-3), torch.nn.CrossEntropyLoss(),
                                env.grad_scaler(dtype, dev), progress=False)
    assert torch.isfinite(torch.tensor(stats["loss"])) and 0 <= stats["acc"] <= 1
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    val = loop["evaluate"](spy, batches, torch.nn.CrossEntropyLoss())
    assert val["y_pred"].shape == (8,) and torch.isfinite(torch.tensor(val["loss"]))
    want = (True, torch.bfloat16, True) if amp else (False, None, False)
    assert [(a, d if a else None, c) for a, d, c in spy.calls] == [want, want]
