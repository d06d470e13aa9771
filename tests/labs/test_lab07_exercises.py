"""labkit.exercises.lab07: the checkpoint/restore check and the top-k check pass right answers (printing one ✓ line)
and explain wrong ones: the stub and plausible mistakes (no optimizer or schedule state, the epoch off by one,
pickled objects; unsorted or unclipped top-k, NumPy floats)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from checks import one_check_line, stub
from labcells import LABS, assert_hidden_check_earns_its_place

from labkit.exercises import lab07 as exercises


def _save(folder, model, optimizer, scheduler, epoch):
    """A right answer written differently from the lab's: one file per object, the epoch as JSON."""
    folder = Path(folder)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    (folder / "epoch.json").write_text(json.dumps({"done": epoch}))


def _restore(folder, model, optimizer, scheduler):
    folder = Path(folder)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    return json.loads((folder / "epoch.json").read_text())["done"] + 1


def test_resume_right_answer_passes(capsys):
    exercises.check_resume(_save, _restore)
    assert "checkpoint and restore" in one_check_line(capsys)


def test_resume_wrong_answers_fail_with_a_hint():
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_resume(stub, _restore)
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_resume(_save, stub)

    def weights_only(folder, model, optimizer, scheduler):      # the most common slip: the model alone
        model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))
        return json.loads((Path(folder) / "epoch.json").read_text())["done"] + 1
    with pytest.raises(AssertionError, match="moment estimates"):
        exercises.check_resume(_save, weights_only)

    def no_schedule(folder, model, optimizer, scheduler):
        model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))
        optimizer.load_state_dict(torch.load(Path(folder) / "optimizer.pt", weights_only=True))
        return json.loads((Path(folder) / "epoch.json").read_text())["done"] + 1
    with pytest.raises(AssertionError, match="schedule restarted"):
        exercises.check_resume(_save, no_schedule)

    def same_epoch(folder, model, optimizer, scheduler):
        return _restore(folder, model, optimizer, scheduler) - 1
    with pytest.raises(AssertionError, match="would run twice"):
        exercises.check_resume(_save, same_epoch)

    def pickled_objects(folder, model, optimizer, scheduler, epoch):
        torch.save({"model": model, "epoch": epoch}, Path(folder) / "state.pt")
    with pytest.raises(AssertionError, match="weights_only"):
        exercises.check_resume(pickled_objects, _restore)

    def nothing_saved(folder, model, optimizer, scheduler, epoch):
        pass
    with pytest.raises(AssertionError, match="wrote nothing"):
        exercises.check_resume(nothing_saved, _restore)


def _top_k(probs, classes, k):
    """A right answer written differently from the reference: a stable NumPy argsort of −p."""
    p = np.asarray(probs.tolist() if hasattr(probs, "tolist") else probs, dtype=np.float64)
    order = np.argsort(-p, kind="stable")[:k]
    return {"class": classes[int(order[0])],
            "top_k": [{"class": classes[int(i)], "probability": float(p[i])} for i in order]}


def test_right_answer_passes(capsys):
    exercises.check_top_k(_top_k)
    assert "top-k" in one_check_line(capsys)


def test_typical_wrong_answers_fail_with_a_hint():
    def numpy_floats(probs, classes, k):
        out = _top_k(probs, classes, k)
        for e in out["top_k"]:
            e["probability"] = np.float32(e["probability"])
        return out
    with pytest.raises(AssertionError, match="json.dumps"):
        exercises.check_top_k(numpy_floats)

    def ascending(probs, classes, k):
        p = np.asarray(probs.tolist() if hasattr(probs, "tolist") else probs, dtype=np.float64)
        order = np.argsort(p, kind="stable")[:k]
        return {"class": classes[int(order[0])],
                "top_k": [{"class": classes[int(i)], "probability": float(p[i])} for i in order]}
    with pytest.raises(AssertionError, match="descending"):
        exercises.check_top_k(ascending)

    def unstable_ties(probs, classes, k):
        p = np.asarray(probs.tolist() if hasattr(probs, "tolist") else probs, dtype=np.float64)
        order = sorted(range(len(p)), key=lambda i: (-p[i], -i))[:k]
        return {"class": classes[order[0]], "top_k": [{"class": classes[i], "probability": float(p[i])} for i in order]}
    with pytest.raises(AssertionError, match="tie"):
        exercises.check_top_k(unstable_ties)

    def k_not_clipped(probs, classes, k):
        out = _top_k(probs, classes, k)
        out["top_k"] += [out["top_k"][-1]] * (k - len(out["top_k"]))
        return out
    with pytest.raises(AssertionError, match="never more than there are classes"):
        exercises.check_top_k(k_not_clipped)

    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_top_k(stub)


def test_reference_is_json_ready_and_ordered():
    ref = exercises.reference_top_k(torch.tensor([0.1, 0.4, 0.4, 0.1]), ["a", "b", "c", "d"], 3)
    assert json.loads(json.dumps(ref)) == ref
    assert [e["class"] for e in ref["top_k"]] == ["b", "c", "a"] and ref["class"] == "b"


# --------------------------------------------------------------------------- hidden checks (labkit grade)
LAB = next(p for p in LABS if p.name.startswith("07_"))
SOLUTION = {'top_k_answer': ['top_k_answer'], 'resume': ['save_trial', 'restore_trial']}
#: For each question, a plausible wrong answer that its public check lets through.
WRONG = {
    "top_k_answer": """
def top_k_answer(probs, classes, k=3):
    values = probs.tolist() if hasattr(probs, "tolist") else probs      # a list's items are taken as they come
    order = sorted(range(len(values)), key=lambda i: -values[i])[:k]
    return {"class": classes[order[0]], "top_k": [{"class": classes[i], "probability": values[i]} for i in order]}
""",
    "resume": """
def save_trial(folder, model, optimizer, scheduler, epoch):
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "steps": scheduler.last_epoch}, Path(folder) / "state.pt")


def restore_trial(folder, model, optimizer, scheduler):
    state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for _ in range(state["steps"]):                             # fast-forward the schedule instead of restoring it
        scheduler.step()
    return state["epoch"] + 1
""",
}


@pytest.mark.parametrize("question", sorted(SOLUTION))
def test_hidden_checks_pass_the_solution_and_fail_a_wrong_answer_the_public_check_misses(question):
    assert_hidden_check_earns_its_place(LAB, question, SOLUTION[question], WRONG[question])


def test_the_trainable_and_endpoint_use_the_students_functions_or_the_references_while_stubs(capsys):
    assert exercises.resume_for_run(_save, _restore) == (_save, _restore)
    for save, restore in ((stub, stub), (_save, stub), (stub, _restore)):    # half a pair cannot read the other half
        pair = exercises.resume_for_run(save, restore)
        assert pair == (exercises._reference_save, exercises._reference_restore)
    assert "restore_trial is not implemented yet" in capsys.readouterr().out
    exercises.check_resume(*pair)
    one_check_line(capsys)
    mine = lambda probs, classes, k: {}  # noqa: E731
    assert exercises.top_k_answer_for_run(mine) is mine
    assert exercises.top_k_answer_for_run(stub) is exercises.reference_top_k
    assert "top_k_answer (section 4) is not implemented yet" in capsys.readouterr().out
