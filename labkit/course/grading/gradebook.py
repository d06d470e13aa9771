"""A graded class on paper: ``grades.csv``, ``feedback/<student>.md`` and ``summary.png``.

``grades.csv`` has otter-grader's ``final_grades.csv`` shape — one row per student, one column per question, a
first row with each question's maximum — plus labkit's columns: ``runs`` (ran to the end), ``reproduces``
(trained results within the tolerance), ``total``, ``max``, ``percent`` and ``status``. The feedback names hidden
checks only by question, never their code.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from labkit.course.grading.questions import Rubric
from labkit.env import describe_machine
from labkit.files import atomic_path, write_text


def score(result: dict[str, Any], rubric: Rubric) -> dict[str, float]:
    """Points per column for one graded submission (a question passes only when all its checks passed)."""
    points = {q.name: q.points if result.get("questions", {}).get(q.name, {}).get("passed") else 0.0
              for q in rubric.questions}
    points["runs"] = rubric.runs if result.get("ran_to_end") else 0.0
    points["reproduces"] = rubric.reproduces if result.get("reproduces") else 0.0
    return points


def grade_rows(results: Sequence[dict[str, Any]], rubric: Rubric) -> list[dict[str, Any]]:
    """The gradebook's rows: the max-points row first, then one per student."""
    columns = rubric.columns()
    top = {"student": "max points", **rubric.max_row(), "total": rubric.max_points, "max": rubric.max_points,
           "percent": 100.0, "status": ""}
    rows = [top]
    for result in results:
        points = score(result, rubric)
        total = sum(points[c] for c in columns)
        rows.append({"student": result["student"], **points, "total": total, "max": rubric.max_points,
                     "percent": round(100 * total / rubric.max_points, 1) if rubric.max_points else 0.0,
                     "status": result.get("status", "?")})
    return rows


def write_csv(path: Path, results: Sequence[dict[str, Any]], rubric: Rubric) -> Path:
    """``grades.csv`` (atomic)."""
    rows = grade_rows(results, rubric)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["student", *rubric.columns(), "total", "max", "percent", "status"])
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def feedback(result: dict[str, Any], rubric: Rubric) -> str:
    """One student's feedback in Markdown: each question ✔/✘ with the public check's message (hidden checks by
    name only), the run, the trained results submitted vs re-run, and where it ran and was re-run."""
    points = score(result, rubric)
    total = sum(points.values())
    lines = [f"# {rubric.lab}: feedback for {result['student']}", "",
             f"**{total:g} / {rubric.max_points:g} points** ({result.get('status', '?')})", "",
             "| question | points | result |", "|---|--:|---|"]
    for q in rubric.questions:
        got = result.get("questions", {}).get(q.name, {})
        mark = "✔" if got.get("passed") else "✘"
        message = " ".join(str(got.get("message") or ("passed" if got.get("passed") else "not graded")).split())
        lines.append(f"| {q.name} | {points[q.name]:g} / {q.points:g} | {mark} {message.replace('|', '/')} |")
    ran = "ran to the end" if result.get("ran_to_end") else (result.get("reason") or "did not run to the end")
    lines.append(f"| runs to the end | {points['runs']:g} / {rubric.runs:g} | {'✔' if result.get('ran_to_end') else '✘'} "
                 f"{ran.replace('|', '/')} |")
    lines.append(f"| trained results reproduce | {points['reproduces']:g} / {rubric.reproduces:g} | "
                 f"{'✔' if result.get('reproduces') else '✘'} {str(result.get('reproduce_reason', '')).replace('|', '/')} |")
    lines += ["", f"- Your notebook ran on: {describe_machine(result.get('submitted_on'))}",
              f"- Re-run on: {describe_machine(result.get('rerun_on'))} (machine `{result.get('graded_on', '?')}`, "
              f"{result.get('wall_seconds', '?')} s, network: {result.get('network', '?')})"]
    hidden = [q.name for q in rubric.questions if q.hidden]
    if hidden:
        lines.append(f"- Questions with checks kept back for grading: {', '.join(hidden)} (a ✘ there means one of them "
                     "failed; the public check in your notebook shows the common mistakes).")
    return "\n".join(lines) + "\n"


def plot_class(path: Path, results: Sequence[dict[str, Any]], rubric: Rubric) -> Path:
    """``summary.png``: the pass rate of each question and the histogram of grades (percent)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = grade_rows(results, rubric)[1:]
    columns = rubric.columns()
    maxima = rubric.max_row()
    rates = [sum(1 for r in rows if r[c] >= maxima[c] > 0) / max(1, len(rows)) for c in columns]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.4, 1])
    left.barh(columns[::-1], rates[::-1], color="#4c72b0")
    left.set(xlim=(0, 1), xlabel="share of students with full points", title=f"{rubric.lab}: pass rate per question")
    right.hist([r["percent"] for r in rows], bins=[0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100.001], color="#55a868",
               edgecolor="white")
    right.set(xlabel="grade (percent)", ylabel="students", title=f"grades of {len(rows)} submission(s)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def write_gradebook(out: Path, results: Sequence[dict[str, Any]], rubric: Rubric) -> dict[str, Path]:
    """Write ``grades.csv``, ``feedback/<student>.md`` and ``summary.png`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"grades": write_csv(out / "grades.csv", results, rubric),
             "summary": plot_class(out / "summary.png", results, rubric)}
    for result in results:
        write_text(out / "feedback" / f"{result['student']}.md", feedback(result, rubric))
    paths["feedback"] = out / "feedback"
    return paths
