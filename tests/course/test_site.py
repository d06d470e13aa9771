"""labkit site: the course website built from the course run, scanned, and opened in headless Chromium.

The site is built ONCE per test module (from the session's ``course`` run; or, for development, from the
results folder in ``$LABKIT_SITE_RESULTS`` without re-executing anything), then every test reads the files.
Set ``$LABKIT_SITE_SHOTS`` to a folder to keep the browser test's screenshots.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

from labkit.course.grading.questions import is_hidden
from labkit.course.site import build_site
from labkit.course.site.notebooks import is_fresh, student_page
from labkit.course.student import BEGIN, END

pytest.importorskip("sphinx", reason="the site needs the course tools: pip install -e '.[dev]'")
bs4 = pytest.importorskip("bs4")

REPO = Path(__file__).resolve().parents[2]
LABS = sorted((REPO / "labs").glob("[0-9][0-9]_*.ipynb"))
TEXT_SUFFIXES = {".html", ".js", ".txt", ".ipynb", ".json", ".css", ".inv", ".md"}
SHORTEST = 16          # a solution line shorter than this (``return x``) is not distinctive


@pytest.fixture(scope="module")
def site(request, tmp_path_factory):
    """``{"root": built site, "results": results folder, "paths": absolute paths that must not leak}``."""
    given = os.environ.get("LABKIT_SITE_RESULTS")
    if given:
        results, rerun, leaks = Path(given), False, [str(Path(given).resolve())]
    else:
        course = request.getfixturevalue("course")
        results, rerun = course["results"], True
        leaks = [str(course["tmp"]), str(Path(course["results"]).resolve()), course["ray_dir"]]
    out = tmp_path_factory.mktemp("site") / "html"
    tik = time.perf_counter()
    index = build_site(results, out, labs_dir=REPO / "labs", rerun=rerun)
    print(f"site built in {time.perf_counter() - tik:.1f}s (contended)")
    leaks += [str(REPO), str(out), str(Path.home()) + "/", tempfile.gettempdir() + "/"]
    return {"root": index.parent, "results": Path(results), "paths": leaks}


def _text_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]


def _readable(path: Path) -> str:
    """What a reader sees of a file: an HTML page's text (highlighted code is split into spans), else the text."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".html":
        return bs4.BeautifulSoup(raw, "html.parser").get_text()
    return html.unescape(raw)


def _distinctive(lines: list[str], public: str) -> set[str]:
    return {ln.strip() for ln in lines
            if len(ln.strip()) >= SHORTEST and not ln.strip().startswith("#") and ln.strip() not in public}


def _student_text() -> str:
    """Every line the student copies show anyway: such a line is not a secret."""
    return "\n".join(c.source for p in sorted((REPO / "student").glob("*.ipynb"))
                     for c in nbformat.read(p, as_version=4).cells)


def solution_lines() -> set[str]:
    """The distinctive code lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` in labs/*.py."""
    inside, found = False, []
    for path in sorted((REPO / "labs").glob("*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if BEGIN.match(line):
                inside = True
            elif END.match(line):
                inside = False
            elif inside:
                found.append(line)
    return _distinctive(found, _student_text())


def hidden_lines() -> set[str]:
    """The distinctive lines of every hidden-check cell of the labs."""
    found = [ln for p in LABS for c in nbformat.read(p, as_version=4).cells if is_hidden(c)
             for ln in c.source.splitlines()]
    return _distinctive(found, _student_text())


def test_every_lab_has_a_page_with_a_figure(site):
    assert LABS, "no labs found"
    for lab in LABS:
        page = site["root"] / "labs" / f"{lab.stem}.html"
        assert page.is_file(), f"no page for {lab.name}"
        soup = bs4.BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        images = [img for img in soup.find_all("img") if "_images/" in img.get("src", "")]
        assert images, f"{page.name} shows no figure from the course run"
        colab = [a["href"] for a in soup.find_all("a", href=True) if "colab.research.google.com" in a["href"]]
        assert colab and all(h.endswith(f"/student/{lab.name}") for h in colab), f"{page.name}: Colab link {colab}"


def test_landing_and_results_pages_show_every_lab(site):
    index = (site["root"] / "index.html").read_text(encoding="utf-8")
    results = bs4.BeautifulSoup((site["root"] / "results.html").read_text(encoding="utf-8"), "html.parser")
    headings = [h.get_text() for h in results.find_all("h2")]
    for lab in LABS:
        assert f"labs/{lab.stem}.html" in index, f"the landing page does not link {lab.stem}"
        assert any(f"Lab {lab.name[:2]}" in h for h in headings), f"the results page has no section for {lab.stem}"
    assert "student copy" in index, "the landing page does not say what a lab page shows"
    assert results.find("table") is not None, "the results page lacks the summary table"
    assert (site["root"] / "search.html").is_file() and (site["root"] / "searchindex.js").is_file()
    assert "baseline" in (site["root"] / "searchindex.js").read_text(encoding="utf-8").lower()


def test_no_solution_code_or_hidden_check_anywhere(site):
    secrets = solution_lines() | hidden_lines()
    assert secrets, "found no solution lines to look for: did the solution markers change?"
    for path in _text_files(site["root"]):
        text = _readable(path)
        leaked = sorted(s for s in secrets if s in text)
        assert not leaked, f"{path.relative_to(site['root'])} shows solution/hidden-check code: {leaked[:3]}"


def test_no_absolute_path_of_the_build_machine(site):
    for path in _text_files(site["root"]):
        text = path.read_text(encoding="utf-8", errors="replace")
        leaked = [p for p in site["paths"] if p and p in text]
        assert not leaked, f"{path.relative_to(site['root'])} contains {leaked}"


def _references(soup) -> list[tuple[str, str]]:
    refs = [("a", a["href"]) for a in soup.find_all("a", href=True)]
    refs += [(tag.name, tag["src"]) for tag in soup.find_all(["img", "script", "iframe", "source", "video",
                                                               "audio", "embed"], src=True)]
    refs += [("link", link["href"]) for link in soup.find_all("link", href=True)]
    return refs


def test_internal_links_resolve_and_nothing_loads_from_the_web(site):
    root = site["root"]
    for page in root.rglob("*.html"):
        soup = bs4.BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        for tag, ref in _references(soup):
            parts = urlsplit(ref)
            if parts.scheme in ("http", "https"):
                assert tag == "a", f"{page.relative_to(root)} loads {ref} from the web ({tag})"
                continue
            if parts.scheme in ("mailto", "data", "javascript") or not parts.path:
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.exists(), f"{page.relative_to(root)}: {tag} -> {ref} does not resolve"
        for style in soup.find_all("style"):
            assert not re.search(r"url\(\s*['\"]?https?:|@import", style.get_text()), f"{page.name} inline style loads"
    for css in root.rglob("*.css"):
        text = css.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"url\(\s*['\"]?https?:|@import\s+(url\()?['\"]?https?:", text), f"{css} loads from the web"


def test_executed_copy_is_reused_only_when_its_lab_is_unchanged(tmp_path):
    lab = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_markdown_cell("hi")])
    ran = nbformat.from_dict(lab)
    ran.cells.insert(0, nbformat.v4.new_code_cell("# Parameters\nquick = True", metadata={"tags": ["injected-parameters"]}))
    ran.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nbformat.write(lab, tmp_path / "lab.ipynb")
    nbformat.write(ran, tmp_path / "ran.ipynb")
    assert is_fresh(tmp_path / "ran.ipynb", tmp_path / "lab.ipynb")
    assert not is_fresh(tmp_path / "missing.ipynb", tmp_path / "lab.ipynb")
    lab.cells[0].source = "x = 2"
    nbformat.write(lab, tmp_path / "lab.ipynb")
    assert not is_fresh(tmp_path / "ran.ipynb", tmp_path / "lab.ipynb")


def test_student_page_keeps_outputs_only_where_the_student_does_not_edit():
    code, md = nbformat.v4.new_code_cell, nbformat.v4.new_markdown_cell
    out = lambda text: [nbformat.v4.new_output("stream", text=text)]  # noqa: E731
    nb = nbformat.v4.new_notebook(cells=[
        md("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://x/labs/l.ipynb)"),
        code("data = load('/secret/course/data')", outputs=out("loaded /secret/course/data/a.png\n")),
        code("def f():\n    # BEGIN SOLUTION\n    return 42 * magic\n    # END SOLUTION", outputs=out("ok\n")),
        code("check_f(f)", outputs=out("✔ f\n"), metadata={"labkit": {"question": "f"}}),
        code("assert f() == 42", outputs=out(""), metadata={"tags": ["hidden-check"], "labkit": {"hidden": "f"}}),
        code("bar()", outputs=[nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "100%|##| 5/5"})]),
    ])
    page, counts = student_page(nb, "l.ipynb", [("/secret/course", ".")])
    sources = [c.source for c in page.cells]
    assert counts == {"hidden": 1, "stubbed": 1, "cleared": 2}
    assert not any("42 * magic" in s or "assert f()" in s for s in sources)
    assert "/student/l.ipynb" in page.cells[0].source
    assert page.cells[1].outputs[0].text == "loaded ./data/a.png\n"
    assert page.cells[2].outputs == [] and page.cells[3].outputs == []
    assert page.cells[4].outputs == [], "a widget's output (loaded from a CDN, stuck at its first state) is left out"
    assert len(nb.cells) == 6 and nb.cells[2].outputs, "the executed notebook itself must not change"


def test_a_stale_executed_copy_shows_the_lab_as_it_is_now():
    """An executed copy from before an exercise existed has the answer as plain code: the page takes the
    lab's cells, and outputs only from identical cells."""
    code = nbformat.v4.new_code_cell
    ran = nbformat.v4.new_notebook(cells=[code("a = 1", outputs=[nbformat.v4.new_output("stream", text="1\n")]),
                                          code("answer = secret_formula(a)")])
    lab = nbformat.v4.new_notebook(cells=[code("a = 1"), code("# BEGIN SOLUTION\nanswer = secret_formula(a)\n"
                                                              "# END SOLUTION"), code("print(answer)")])
    page, counts = student_page(ran, "l.ipynb", lab=lab)
    assert [c.source for c in page.cells][1:] == ['raise NotImplementedError("Exercise: complete this cell")',
                                                  "print(answer)"]
    assert page.cells[0].outputs[0].text == "1\n" and page.cells[2].outputs == [] and counts["stubbed"] == 1


def test_math_is_written_as_mathml_at_build_time():
    from labkit.course.site.mathml import _mathml

    inline, block = _mathml(r"\eta_k = \eta \cdot k", "inline"), _mathml(r"\frac{1}{K}", "block")
    assert inline.startswith("<math") and "<msub>" in inline and 'display="block"' in block and "<mfrac>" in block
    assert "math-source" in _mathml(r"\frac{", "inline") or _mathml(r"\frac{", "inline").startswith("<math")


def test_site_refuses_to_replace_a_folder_it_did_not_build(tmp_path, capsys):
    from labkit.course import cli

    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert cli.main(["site", "--results", str(tmp_path / "results"), "--out", str(out), "--no-rerun"]) == 2
    assert str(out) in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"


# --- headless Chromium ------------------------------------------------------------------------------------

def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class _Browser:
    """Chromium in headless mode, driven over the DevTools protocol (loopback only)."""

    def __init__(self, binary: str, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                      f"--user-data-dir={profile}", "--window-size=1280,1600", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline, url = time.monotonic() + 60, None
        while url is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            url = match.group(1) if match else None
        if url is None:
            self.proc.kill()
            pytest.fail(f"{binary} did not open its DevTools port within 60 s")
        self.ws = connect(url, max_size=None, open_timeout=30)
        self.next_id, self.events = 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def open(self, url: str) -> list[str]:
        """Load ``url``, wait for it, and return the console errors and exceptions it raised."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events) and time.monotonic() < deadline:
            self.events.append(json.loads(self.ws.recv(timeout=60)))
        time.sleep(1.0)
        self.call("Runtime.evaluate", session=True, expression="1")      # collect what arrived meanwhile
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("exception", {}).get("description", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
        return errors

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)["result"]["value"]

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def test_landing_and_lab_page_render_in_headless_chromium(site, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH: install Debian's browser (apt-get install -y chromium) to run this test")
    pytest.importorskip("websockets", reason="the browser test drives Chromium with the websockets package")
    shots = Path(os.environ.get("LABKIT_SITE_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    lab = LABS[0].stem
    browser = _Browser(binary, tmp_path / "profile")
    try:
        for page, shot in (("index.html", "landing.png"), (f"labs/{lab}.html", f"lab{lab[:2]}.png")):
            errors = browser.open((site["root"] / page).as_uri())
            assert not errors, f"{page}: console errors in Chromium: {errors[:5]}"
            text = browser.evaluate("document.querySelector('article') ? document.querySelector('article').innerText : ''")
            title = bs4.BeautifulSoup((site["root"] / page).read_text(encoding="utf-8"), "html.parser").h1.get_text()
            assert len(text) > 500 and title.strip("¶# \n") in text, f"{page}: the article shows little text: {text[:200]!r}"
            broken = browser.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                                      ".map(i => i.src)")
            assert not broken, f"{page}: images that did not load: {broken[:5]}"
            if page.startswith("labs/"):
                assert browser.evaluate("document.querySelectorAll('article img').length") >= 1, f"{page}: no figure"
                # the screenshot shows the first plot with the text above it
                browser.evaluate("document.querySelector('article img').scrollIntoView({block: 'center'}); true")
                time.sleep(0.5)
            browser.screenshot(shots / shot)
            assert (shots / shot).stat().st_size > 10_000
        errors = browser.open((site["root"] / "search.html").as_uri() + "?q=baseline")
        assert not errors, f"search.html: console errors: {errors[:5]}"
        found = 0
        for _ in range(20):                      # Sphinx's search runs after the index script has loaded
            found = browser.evaluate("document.querySelectorAll('#search-results li').length")
            if found:
                break
            time.sleep(0.5)
        assert found, "searching the site for 'baseline' found nothing (from file://)"
    finally:
        browser.close()


def test_a_shortened_path_keeps_the_stand_in_box_straight():
    from labkit.course.site.notebooks import scrub
    from labkit.data.cache import notice_box

    box = notice_box(["SYNTHETIC DATA", "  /build/machine/course/data/alzheimer/Alzheimer_s Dataset", "end"])
    shown = scrub(f"before\n{box}\nafter", [("/build/machine/course", ".")]).split("\n")
    assert shown[0] == "before" and shown[-1] == "after"
    assert "  ./data/alzheimer/Alzheimer_s Dataset" in shown[3]
    assert len({len(line) for line in shown[1:-1]}) == 1, shown       # every line of the box as wide as its bars
    assert scrub("a !! b !!", []) == "a !! b !!"                      # text that is not a box is left alone
