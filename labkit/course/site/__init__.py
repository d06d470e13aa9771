"""``labkit site``: the course website, a static site built offline from a course run.

    labkit site                                   # results/ -> results/site/index.html
    labkit site --results /path/results --out /tmp/site

Sphinx with myst-nb renders each lab's executed copy as its student version
(:mod:`labkit.course.site.notebooks`), plus a landing page and a results page
(:mod:`labkit.course.site.pages`). The theme (Furo) ships its CSS and JavaScript with the site, search is
Sphinx's own (an index file read by the page's script), math is MathML written at build time
(:mod:`labkit.course.site.mathml`): the site loads nothing from the network and works from
``python -m http.server`` and from ``file://``.

A lab whose executed copy is missing or was run from other cells than the lab has now is re-executed
first (``labkit run NN --quick``); the others are reused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import nbformat

from labkit.course import colab
from labkit.course.site.notebooks import course_folder, is_fresh, path_replacements, scrub, student_page
from labkit.course.site.pages import LabInfo, lab_info, landing_page, results_page
from labkit.env import project_root, resolve_path
from labkit.results import results_root

#: A file in every built site: only a folder holding it is replaced by a new build.
MARKER = ".labkit-site"

CONF = '''\
project = "labkit"
html_title = "labkit course"
html_show_copyright = False
html_show_search_summary = False   # the summaries are fetched, which file:// forbids (CORS)
extensions = ["myst_nb", "labkit.course.site.mathml"]
html_theme = "furo"
html_math_renderer = "mathml"
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
html_copy_source = False
html_show_sourcelink = False
exclude_patterns = ["_build", ".doctrees"]
html_static_path = ["_static"]
html_css_files = ["labkit-site.css"]
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header", "misc.highlighting_failure"]
'''

#: Wide tables (the summary has 12 columns) scroll sideways instead of wrapping every cell; the second
#: column (on the landing page: what a lab teaches) still wraps.
CSS = """\
article table.docutils th, article table.docutils td { padding: 0.2rem 0.5rem; }
article table.docutils td:not(:nth-child(2)) { white-space: nowrap; }
article figure img { border: 1px solid var(--color-background-border); }
"""


def _plain_badges(nb: nbformat.NotebookNode, notebook: str) -> None:
    """The Colab badge image is served by Colab (a network load); the page shows a plain link instead."""
    link = f"**[Open this lab in Colab]({colab.colab_url(notebook, 'student')})** (the student copy)"
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = colab._BADGE_RE.sub(lambda m: link, cell.source)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise FileExistsError(f"--out {out}: exists and is not a site labkit built (no {MARKER} in it); "
                              "give an empty or new folder, so that nothing else is replaced.")


def _replace(out: Path, built: Path) -> None:
    _check_out(out)
    if out.exists():
        shutil.rmtree(out)
    os.replace(built, out)


def build_site(results_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
               labs_dir: str | os.PathLike = "labs", rerun: bool = True,
               echo: Callable[[str], None] = print) -> Path:
    """Build the site from the course run in ``results_dir`` into ``out`` (default ``<results>/site``)
    and return the path of its ``index.html``.

    ``rerun`` re-executes (quick mode) each lab whose executed copy is missing or stale first; without it
    those labs are shown as they are (and marked on the landing page)."""
    from sphinx.cmd.build import build_main

    from labkit.course.run import available_labs

    results = results_root(results_dir)
    out = Path(out).expanduser().resolve() if out else results / "site"
    _check_out(out)
    labs = available_labs(labs_dir)
    if not labs:
        raise FileNotFoundError(f"no lab notebooks (*.ipynb) in {resolve_path(labs_dir)}.")
    executed = results / "executed"
    stale = [lab for lab in labs if not is_fresh(executed / lab.name, lab)]
    if stale and rerun:
        from labkit.course.run import run_labs
        from labkit.course.summary import write_summary

        echo(f"re-executing {len(stale)} lab(s) whose executed copy is missing or stale: "
             + ", ".join(p.stem for p in stale))
        run_labs([str(p) for p in stale], quick=True, results_dir=results, echo=echo)
        write_summary(results)
        stale = [lab for lab in labs if not is_fresh(executed / lab.name, lab)]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".site-", dir=out.parent))
    try:
        src, html = work / "src", work / "html"
        (src / "labs").mkdir(parents=True)
        runs = [nbformat.read(executed / lab.name, as_version=4) for lab in labs if (executed / lab.name).is_file()]
        replacements = path_replacements(results, [project_root(), *filter(None, map(course_folder, runs))])
        infos: list[LabInfo] = []
        for lab in labs:
            copy = executed / lab.name
            source = nbformat.read(lab, as_version=4)
            ran = nbformat.read(copy, as_version=4) if copy.is_file() else source
            page, _ = student_page(ran, lab.name, replacements, lab=source)
            _plain_badges(page, lab.name)
            nbformat.write(page, src / "labs" / lab.name)
            infos.append(lab_info(lab, copy if copy.is_file() else None, results, stale=lab in stale and copy.is_file()))
        images: dict[Path, str] = {}
        for info in infos:
            for png in info.figures:
                target = src / "_static" / "results" / info.results.name / png.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, target)
                images[png] = f"_static/results/{info.results.name}/{png.name}"
        has_png = (results / "summary.png").is_file()
        if has_png:
            (src / "_static" / "results").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(results / "summary.png", src / "_static" / "results" / "summary.png")
        (src / "index.md").write_text(landing_page(infos), encoding="utf-8")
        page = results_page(infos, results / "SUMMARY.md", has_png, images)
        (src / "results.md").write_text(scrub(page, replacements), encoding="utf-8")
        (src / "conf.py").write_text(CONF, encoding="utf-8")
        (src / "_static").mkdir(exist_ok=True)
        (src / "_static" / "labkit-site.css").write_text(CSS, encoding="utf-8")
        status = build_main(["-b", "html", "-q", "-d", str(work / "doctrees"), str(src), str(html)])
        if status != 0:
            raise RuntimeError(f"sphinx-build failed (exit {status}); its messages are above.")
        (html / ".buildinfo").unlink(missing_ok=True)
        (html / MARKER).write_text("built by `labkit site`; a new build replaces this folder\n", encoding="utf-8")
        _replace(out, html)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out / "index.html"
