"""labkit.exercises.lab07: the top-k check passes a right answer (printing one ✓ line) and explains wrong ones."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checks import one_check_line, stub

from labkit.exercises import lab07 as exercises


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
