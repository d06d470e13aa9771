"""Checkpoints and caches are unpickled with ``torch.load(weights_only=True)`` everywhere: a file holding an object
that would run code while it is loaded is refused naming the file, and the code never runs."""
from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures("isolated_course")

REPO = Path(__file__).resolve().parents[2]


class RunsCode:
    """Unpickling this runs a shell command that writes ``marker`` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo owned > '{self.marker}'",)


@pytest.fixture
def hostile(tmp_path):
    """``(write(path, wrap), marker)``: ``write`` saves a checkpoint-shaped dict with the code-running object inside."""
    marker = tmp_path / "MARKER_code_ran"

    def write(path: Path, wrap=lambda evil: {"state_dict": {"w": torch.zeros(2)}, "evil": evil}) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(wrap(RunsCode(marker)), path)
        return path
    return write, marker


def test_the_hostile_file_really_runs_code_without_weights_only(hostile, tmp_path):
    """The control: the file is dangerous, so the refusals below mean something."""
    write, marker = hostile
    path = write(tmp_path / "control.pt")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_lightning_load_weights_refuses_code(hostile, tmp_path):
    from labkit.labs.lung_vit.lightning_module import load_weights

    write, marker = hostile
    path = write(tmp_path / "ray" / "checkpoint.ckpt")
    module = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        load_weights(module, path)
    assert "could run code" in str(err.value) and not marker.exists()


def test_lightning_load_weights_still_loads_a_lightning_checkpoint(tmp_path):
    """What Lightning 2.6 writes (checked on a real Trainer checkpoint: no global outside torch's allowlist)."""
    from labkit.labs.lung_vit.lightning_module import load_weights

    module = nn.Linear(3, 2)
    ckpt = {"epoch": 2, "global_step": 10, "pytorch-lightning_version": "2.6.6", "state_dict": module.state_dict(),
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
            "callbacks": {"EpochHistory": {"rows": [{"epoch": 1, "val_loss": 0.5}]}},
            "optimizer_states": [torch.optim.AdamW(module.parameters()).state_dict()],
            "lr_schedulers": [{"last_epoch": 2, "_last_lr": [0.001]}]}
    torch.save(ckpt, tmp_path / "checkpoint.ckpt")
    fresh = nn.Linear(3, 2)
    assert load_weights(fresh, tmp_path / "checkpoint.ckpt") == {"epoch": 2, "global_step": 10,
                                                                 "pytorch-lightning_version": "2.6.6"}
    assert torch.equal(fresh.weight, module.weight)


def test_ray_train_restore_refuses_code(hostile, tmp_path):
    from labkit.distributed import worker

    write, marker = hostile
    path = write(tmp_path / "ckpt" / worker.CHECKPOINT_FILE,
                 lambda evil: {"model": {}, "optimizer": {}, "epoch": 1, "history": [evil]})
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        worker.restore(tmp_path / "ckpt", nn.Linear(2, 1))
    assert "could run code" in str(err.value) and not marker.exists()


def test_ddp_load_checkpoint_refuses_code(hostile, tmp_path):
    from labkit.distributed import ddp

    write, marker = hostile
    path = write(tmp_path / "last.pt")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ddp.load_checkpoint(path)
    assert not marker.exists()


def test_a_poisoned_image_cache_is_ignored_and_rebuilt(hostile, tmp_path):
    import badfiles

    from labkit.data import cache

    write, marker = hostile
    lay = badfiles.alzheimer(tmp_path / "data")
    clean = lay.load()
    files = clean["train"].files
    [path] = list(Path(os.environ["LABKIT_CACHE"]).rglob("alzheimer-train-*.pt"))
    write(path, lambda evil: {"version": cache.CACHE_VERSION, "files": files, "images": evil})
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        again = lay.load()
    assert not marker.exists() and torch.equal(again["train"].images, clean["train"].images)


# ----------------------------------------------------------------------------- the code itself
def _torch_load_calls(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every ``torch.load(...)`` call in ``source`` that lacks ``weights_only=True``."""
    bad = []
    try:    # a notebook cell's magics (``%%writefile script.py``, ``!cmd``) are blanked: the rest is Python
        tree = ast.parse("\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in source.splitlines()))
    except SyntaxError:   # not Python at all: fall back to the text, the rest of each line that calls torch.load
        return [(source[:m.start()].count("\n") + 1, m.group(0)) for m in re.finditer(r"torch\.load\(.*", source)
                if not re.search(r"weights_only\s*=\s*True", m.group(0))]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                bad.append((node.lineno, ast.unparse(node)))
    return bad


def test_every_torch_load_in_labkit_and_labs_uses_weights_only():
    found, unsafe = 0, []
    for path in sorted([*(REPO / "labkit").rglob("*.py"), *(REPO / "labs").glob("*.py")]):
        text = path.read_text(encoding="utf-8")
        found += text.count("torch.load(")
        unsafe += [f"{path.relative_to(REPO)}:{line}: {call}" for line, call in _torch_load_calls(text)]
    for path in sorted((REPO / "labs").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "code":
                source = "".join(cell["source"])
                unsafe += [f"{path.relative_to(REPO)} cell {i}: {call}" for _, call in _torch_load_calls(source)]
    assert found >= 4, "the scan sees labkit's torch.load calls"
    assert not unsafe, "torch.load without weights_only=True:\n" + "\n".join(unsafe)
    assert _torch_load_calls("x = torch.load(p, weights_only=False)\ny = torch.load(p)") != [], "the scan can fail"
