"""labkit.exercises.lab06: the top-k check passes a right answer (printing one ✓ line) and explains a wrong one."""
from __future__ import annotations

import numpy as np
import pytest
from checks import one_check_line, stub
from labcells import LABS, assert_hidden_check_earns_its_place

from labkit.exercises import lab06 as exercises


def _top_k(probs, k, threshold):
    """A right answer, written differently from the reference: a full sort per row."""
    order = np.argsort(probs, axis=1)[:, ::-1][:, :k]
    top = np.take_along_axis(probs, order, 1)
    return {"classes": order, "probs": top, "confident": top[:, 0] >= threshold}


def test_top_k_right_answer_passes(capsys):
    exercises.check_top_k(_top_k, 3, 0.8)
    assert "top-3" in one_check_line(capsys)


def test_top_k_typical_wrong_answers_fail_with_a_hint():
    def ascending(probs, k, threshold):
        out = _top_k(probs, k, threshold)
        return {**out, "classes": out["classes"][:, ::-1], "probs": out["probs"][:, ::-1]}
    with pytest.raises(AssertionError, match="least probable first"):
        exercises.check_top_k(ascending)

    def smallest(probs, k, threshold):
        order = np.argsort(probs, axis=1)[:, :k][:, ::-1]
        return {"classes": order, "probs": np.take_along_axis(probs, order, 1),
                "confident": probs.max(1) >= threshold}
    with pytest.raises(AssertionError, match="k largest"):
        exercises.check_top_k(smallest)

    def strict_threshold(probs, k, threshold):
        return {**_top_k(probs, k, threshold), "confident": probs.max(1) > threshold + 0.05}
    with pytest.raises(AssertionError, match="top-1 >= threshold"):
        exercises.check_top_k(strict_threshold)

    def in_place(probs, k, threshold):
        out = _top_k(probs.copy(), k, threshold)
        probs.sort(axis=1)
        return out
    with pytest.raises(AssertionError, match="in place"):
        exercises.check_top_k(in_place)

    def shuffled_probs(probs, k, threshold):
        out = _top_k(probs, k, threshold)
        return {**out, "probs": np.sort(probs, 1)[:, :k]}
    with pytest.raises(AssertionError, match="probabilities of those classes"):
        exercises.check_top_k(shuffled_probs)

    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_top_k(stub)


def test_reference_is_sorted_and_thresholds_the_top_probability():
    probs = np.array([[0.1, 0.7, 0.2], [0.85, 0.05, 0.1]], dtype=np.float32)
    ref = exercises.reference_top_k(probs, 2, 0.8)
    assert ref["classes"].tolist() == [[1, 2], [0, 2]]
    assert np.allclose(ref["probs"], [[0.7, 0.2], [0.85, 0.1]])
    assert ref["confident"].tolist() == [False, True]


def test_check_probabilities_have_confident_and_unsure_rows_and_no_ties():
    probs = exercises._probabilities()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    top1 = probs.max(1)
    assert (top1 >= 0.8).any() and (top1 < 0.8).any()
    assert all(len(set(row.tolist())) == len(row) for row in probs)


# --------------------------------------------------------------------------- data- or compute-bound
def _verdict(data_ips, compute_ips, world_size):
    """A right answer, written differently from the reference: rates, not seconds per step."""
    demand = compute_ips * world_size
    return {"verdict": ["compute-bound", "data-bound"][int(data_ips < demand)], "demand_ips": demand,
            "workers_fed": data_ips / compute_ips}


def test_bound_verdict_right_answer_passes(capsys):
    exercises.check_bound_verdict(_verdict)
    assert "compute-bound" in one_check_line(capsys)


def test_bound_verdict_stub_and_plausible_wrong_answers_fail():
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_bound_verdict(stub)

    def one_worker(data_ips, compute_ips, world_size):       # the bug: one worker's compute vs the pipeline
        return _verdict(data_ips, compute_ips, 1)
    with pytest.raises(AssertionError, match="multiply by world_size"):
        exercises.check_bound_verdict(one_worker)

    def tie_is_data_bound(data_ips, compute_ips, world_size):
        return {**_verdict(data_ips, compute_ips, world_size),
                "verdict": "data-bound" if data_ips <= compute_ips * world_size else "compute-bound"}
    with pytest.raises(AssertionError, match="a tie"):
        exercises.check_bound_verdict(tie_is_data_bound)

    def fed_by_demand(data_ips, compute_ips, world_size):
        return {**_verdict(data_ips, compute_ips, world_size), "workers_fed": data_ips / (compute_ips * world_size)}
    with pytest.raises(AssertionError, match="could feed"):
        exercises.check_bound_verdict(fed_by_demand)


def test_verdict_cases_tell_one_worker_from_all_workers():
    """Some case changes its verdict when the world size is forgotten, so that mistake cannot pass."""
    flips = [c for c in exercises.VERDICT_CASES
             if exercises.reference_bound_verdict(*c)["verdict"] != exercises.reference_bound_verdict(c[0], c[1], 1)["verdict"]]
    assert flips


# --------------------------------------------------------------------------- hidden checks (labkit grade)
LAB = next(p for p in LABS if p.name.startswith("06_"))
SOLUTION = {'top_k': ['top_k_filter'], 'bound_verdict': ['bound_verdict']}
#: For each question, a plausible wrong answer that its public check lets through.
WRONG = {
    "top_k": """
def top_k_filter(probs, k, threshold):
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, axis=1)
    return {"classes": order, "probs": top, "confident": top[:, 0] > threshold}   # a row at the threshold: not confident
""",
    "bound_verdict": """
def bound_verdict(data_ips, compute_ips, world_size):
    demand = compute_ips * world_size
    return {"verdict": "data-bound" if round(data_ips) < round(demand) else "compute-bound", "demand_ips": demand,
            "workers_fed": data_ips / compute_ips}                # whole images per second only
""",
}


@pytest.mark.parametrize("question", sorted(SOLUTION))
def test_hidden_checks_pass_the_solution_and_fail_a_wrong_answer_the_public_check_misses(question):
    assert_hidden_check_earns_its_place(LAB, question, SOLUTION[question], WRONG[question])


def test_the_run_uses_the_students_functions_or_the_references_while_they_are_stubs(capsys):
    mine_top, mine_verdict = (lambda p, k, t: {}), (lambda d, c, w: {})
    assert exercises.top_k_for_run(mine_top) is mine_top and exercises.bound_verdict_for_run(mine_verdict) is mine_verdict
    assert exercises.top_k_for_run(stub) is exercises.reference_top_k
    assert exercises.bound_verdict_for_run(stub) is exercises.reference_bound_verdict
    out = capsys.readouterr().out
    assert "top_k_filter (section 4) is not implemented yet" in out and "bound_verdict is not implemented yet" in out
