"""Exercise checks for Lab 07 (tune, compress, serve): the resumable trial's checkpoint and restore, and
the endpoint's top-k answer."""
from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from labkit.exercises import answer_or_reference, call_student, ok

CLASSES = ["MildDemented", "ModerateDemented", "NonDemented", "VeryMildDemented"]

# --------------------------------------------------------------------------- checkpoint and restore
#: The check's little training run: epochs in all, the epoch after which it is "interrupted", batches per epoch.
EPOCHS, STOP_AFTER, BATCHES = 4, 2, 5


def _toy(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A small model with BatchNorm buffers, AdamW (moments) and a one-cycle schedule (a position)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.03, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.03, total_steps=EPOCHS * BATCHES)
    return model, optimizer, scheduler


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCHES * 16, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()


def _epoch(model, optimizer, scheduler, epoch: int) -> None:
    """One epoch as the lab's trainable runs it: data order and dropout drawn from seeds fixed per epoch."""
    x, y = _data()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + epoch))
    torch.manual_seed(1000 + epoch)
    model.train()
    for idx in order.view(BATCHES, -1):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def _moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for s in optimizer.state_dict()["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]


def check_resume(save: Callable[..., Any], restore: Callable[..., Any]) -> None:
    """Check ``save(folder, model, optimizer, scheduler, epoch)`` and ``restore(folder, model, optimizer,
    scheduler) -> first epoch to train``.

    The reference is a run that is never interrupted: a small model (with BatchNorm) trained
    ``EPOCHS`` epochs with AdamW and a one-cycle schedule. The check trains ``STOP_AFTER`` epochs,
    calls ``save``, copies the folder elsewhere and deletes the original (a new process on another
    machine sees only the files), builds a *fresh* model, optimizer and scheduler (other initial
    weights), calls ``restore`` and trains from the epoch it returns. Resuming is right when the
    result equals the uninterrupted run's weights, buffers and learning rate.
    """
    ref_model, ref_opt, ref_sched = _toy(seed=0)
    for epoch in range(1, EPOCHS + 1):
        _epoch(ref_model, ref_opt, ref_sched, epoch)

    model, optimizer, scheduler = _toy(seed=0)
    for epoch in range(1, STOP_AFTER + 1):
        _epoch(model, optimizer, scheduler, epoch)
    saved_model, saved_sched = copy.deepcopy(model.state_dict()), scheduler.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        first_folder, moved = Path(tmp) / "checkpoint", Path(tmp) / "elsewhere"
        first_folder.mkdir()
        call_student(save, first_folder, model, optimizer, scheduler, STOP_AFTER, what="your save_trial")
        files = [p for p in first_folder.rglob("*") if p.is_file()]
        if not files:
            raise AssertionError("save_trial wrote nothing into the folder it was given; Tune keeps only that "
                                 "folder (tune.Checkpoint.from_directory), so save the state there.")
        for path in filter(zipfile.is_zipfile, files):          # torch.save's files must load without running code
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001  (what weights_only refuses: pickled objects)
                raise AssertionError(f"{path.name} cannot be read with torch.load(..., weights_only=True): it holds "
                                         f"pickled objects. Save state_dict()s, numbers and tensors, not the model or "
                                         f"optimizer objects.") from None
        shutil.copytree(first_folder, moved)
        shutil.rmtree(first_folder)
        del model, optimizer, scheduler                         # the resumed trial starts from the files alone
        model, optimizer, scheduler = _toy(seed=1)              # other initial weights than the saved ones
        first = call_student(restore, moved, model, optimizer, scheduler, what="your restore_trial")
        if not _same(model.state_dict(), saved_model):
            raise AssertionError("after restore_trial the model's weights or BatchNorm buffers differ from the saved "
                                 "ones; save model.state_dict() and load it with model.load_state_dict(...).")
        if not _moments(optimizer):
            raise AssertionError("after restore_trial AdamW has no moment estimates: a resumed Adam restarts with zero "
                                 "moments and takes other steps than the uninterrupted run. Save optimizer.state_dict() "
                                 "and load it with optimizer.load_state_dict(...).")
        if scheduler.state_dict().get("last_epoch") != saved_sched.get("last_epoch"):
            raise AssertionError(f"after restore_trial the learning-rate schedule is at step "
                                 f"{scheduler.state_dict().get('last_epoch')}, the saved one was at step "
                                 f"{saved_sched.get('last_epoch')}: the schedule restarted. Save scheduler.state_dict() "
                                 f"and load it with scheduler.load_state_dict(...).")
        if not isinstance(first, int) or isinstance(first, bool) or first != STOP_AFTER + 1:
            hint = (" — that is the epoch already trained: it would run twice" if first == STOP_AFTER else "")
            raise AssertionError(f"restore_trial returned {first!r} after a checkpoint saved at the end of epoch "
                                 f"{STOP_AFTER}; return the first epoch still to train, {STOP_AFTER + 1}{hint}.")
    for epoch in range(first, EPOCHS + 1):
        _epoch(model, optimizer, scheduler, epoch)
    if not _same(model.state_dict(), ref_model.state_dict()) or not math.isclose(
            scheduler.get_last_lr()[0], ref_sched.get_last_lr()[0], rel_tol=1e-9, abs_tol=1e-12):
        raise AssertionError("the resumed run ends with other weights or another learning rate than the run that "
                             "never stopped; save and restore everything that changes while training (model, "
                             "optimizer and scheduler state, the epoch).")
    ok("checkpoint and restore: a resumed trial ends exactly where the uninterrupted one does")


# --------------------------------------------------------------------------- the endpoint's answer
def reference_top_k(probs: Sequence[float], classes: Sequence[str], k: int) -> dict[str, Any]:
    """The answer built with plain Python: indices sorted by (−probability, index), the first
    ``min(k, len(classes))`` kept, probabilities as Python floats."""
    values = [float(p) for p in (probs.tolist() if hasattr(probs, "tolist") else probs)]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:min(k, len(values))]
    return {"class": classes[order[0]], "top_k": [{"class": classes[i], "probability": values[i]} for i in order]}


def _cases() -> list[tuple[Any, list[str], int, str]]:
    """(probs, classes, k, what) — a list, a NumPy float32 array, a torch tensor, a tie, k too large."""
    return [
        ([0.1, 0.2, 0.6, 0.1], CLASSES, 2, "a list"),
        (np.array([0.05, 0.15, 0.3, 0.5], dtype=np.float32), CLASSES, 3, "a NumPy float32 array"),
        (torch.tensor([0.7, 0.1, 0.1, 0.1]), CLASSES, 4, "a torch tensor"),
        ([0.3, 0.3, 0.2, 0.2], CLASSES, 3, "a tie (0.3, 0.3): the lower class index comes first"),
        ([0.25, 0.5, 0.25], ["a", "b", "c"], 5, "k larger than the number of classes"),
    ]


def check_top_k(fn: Callable[[Any, Sequence[str], int], dict]) -> None:
    """Check ``fn(probs, classes, k)``: the endpoint's JSON answer for one image.

    ``probs`` holds one probability per class (a list, NumPy array or torch tensor). The answer is
    a dict ``{"class": <most likely class name>, "top_k": [{"class": name, "probability": p}, ...]}``
    with the ``min(k, number of classes)`` most likely classes, most likely first (ties: the lower
    class index first), probabilities as plain Python floats, so that ``json.dumps`` accepts it.
    """
    for probs, classes, k, what in _cases():
        got = call_student(fn, probs, classes, k, what="your top-k answer builder")
        want = reference_top_k(probs, classes, k)
        try:
            json.dumps(got)
        except TypeError as exc:
            raise AssertionError(f"for {what}: json.dumps cannot encode your answer ({exc}); convert NumPy/torch "
                                 f"numbers with float(...) (or .tolist()) before building the dict.") from None
        if not isinstance(got, dict) or set(got) != {"class", "top_k"}:
            raise AssertionError(f'for {what}: return a dict with exactly the keys "class" and "top_k"; got '
                                 f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        entries = got["top_k"]
        if not isinstance(entries, list) or len(entries) != len(want["top_k"]):
            n = len(entries) if isinstance(entries, list) else type(entries).__name__
            hint = " (never more than there are classes)" if k > len(classes) else ""
            raise AssertionError(f'for {what}: "top_k" should list {len(want["top_k"])} entries{hint}; got {n}.')
        names = [e.get("class") if isinstance(e, dict) else None for e in entries]
        if names != [e["class"] for e in want["top_k"]]:
            lowest = reference_top_k([-float(p) for p in np.asarray(probs)], classes, k)["top_k"]
            ascending = names == [e["class"] for e in lowest]
            hint = "most likely first: sort in descending order" if ascending else (
                "sort by probability, highest first; on a tie keep the lower class index first "
                "(a stable sort of the indices)")
            raise AssertionError(f"for {what} (probs {np.round(np.asarray(probs, dtype=float), 3).tolist()}, k={k}): "
                                 f"classes {names}, expected {[e['class'] for e in want['top_k']]}: {hint}.")
        for e, w in zip(entries, want["top_k"]):
            p = e.get("probability")
            if not isinstance(p, float) or not math.isclose(p, w["probability"], rel_tol=1e-6, abs_tol=1e-7):
                raise AssertionError(f"for {what}: {e['class']!r} has probability {p!r}, expected "
                                     f"{w['probability']:.6f} as a Python float.")
        if got["class"] != want["class"]:
            raise AssertionError(f'for {what}: "class" is {got["class"]!r}, expected the most likely class '
                                 f"{want['class']!r}.")
    ok("top-k answer: most likely first, ties by class index, k clipped, JSON-ready floats")


def top_k_answer_for_run(fn: Callable[[Any, Sequence[str], int], dict]) -> Callable[[Any, Sequence[str], int], dict]:
    """What Lab 07's deployment answers with: the student's ``fn(probs, classes, k)``, or :func:`reference_top_k`
    while the exercise is the untouched stub (with a notice), so a student copy runs to the end."""
    return answer_or_reference(fn, reference_top_k, ([0.6, 0.4], ["a", "b"], 1), what="top_k_answer (section 4)")


def _reference_save(folder, model: nn.Module, optimizer, scheduler, epoch: int) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch}, Path(folder) / "trial.pt")


def _reference_restore(folder, model: nn.Module, optimizer, scheduler) -> int:
    state = torch.load(Path(folder) / "trial.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1


def resume_for_run(save: Callable[..., Any], restore: Callable[..., Any]) -> tuple[Callable, Callable]:
    """The ``(save_trial, restore_trial)`` Lab 07's trainable uses: the student's pair, or — while either is the
    untouched stub — the reference pair (with a notice; one of each would not read the other's files)."""
    with tempfile.TemporaryDirectory() as tmp:
        if answer_or_reference(save, _reference_save, (Path(tmp), *_toy(seed=0), 1), what="save_trial") is not save:
            return _reference_save, _reference_restore
        if answer_or_reference(restore, _reference_restore, (Path(tmp), *_toy(seed=1)),
                               what="restore_trial") is not restore:
            print("  (and the reference save_trial with it: the two must read each other's files)")
            return _reference_save, _reference_restore
    return save, restore


__all__ = ["check_resume", "check_top_k", "reference_top_k", "resume_for_run", "top_k_answer_for_run"]
