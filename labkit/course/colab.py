"""The labs' set-up cell and "Open in Colab" badges, from one template.

Every lab's first code cell is :data:`SETUP_CELL`, marked by :data:`MARKER` on its first line.
Off Colab it does nothing (``make setup`` installed labkit). On Colab it clones the course,
installs labkit without touching Colab's own ``torch``/``torchvision``/``ipykernel``/``jupyter*``
(pip constraints pinned to the installed versions), points labkit at the clone and, when
``results_on_drive = True``, keeps ``results/`` on Google Drive so a later session finds earlier
labs' run records. Each command runs through ``subprocess.run``; a failure stops the notebook with
the command, the tail of its stderr and what to do.

``labkit labs sync`` writes the template into every lab (and the badge, derived from
:data:`REPO_URL`); ``labkit labs check`` names a lab whose cell or badge differs. The repository URL
is written here only.
"""
from __future__ import annotations

import re

import nbformat

#: The course repository: the set-up cell clones it, the badges open notebooks from it.
REPO_URL = "https://github.com/labkit-course/labkit"
BRANCH = "main"
#: The first line of every lab's set-up cell; ``labkit labs sync`` finds the cell by it.
MARKER = "# labkit set-up cell"
#: Where the set-up cell puts the course on Colab, and where results go on Drive.
COLAB_HOME = "/content/labkit"
DRIVE_RESULTS = "/content/drive/MyDrive/labkit/results"

SETUP_CELL = f'''\
{MARKER}: on Colab it fetches the course and installs labkit; elsewhere it does nothing (`make setup` did it).
# Keep results/ across Colab sessions (Lab 02 compares with Lab 01's record): set results_on_drive = True.
results_on_drive = False
import sys
if "google.colab" in sys.modules:
    import importlib.metadata, importlib.util, os, re, subprocess, tempfile
    def sh(*cmd, hint):  # run a command; on failure stop here with its error and what to do
        done = subprocess.run(list(cmd), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{{' '.join(cmd)}}` failed (exit {{done.returncode}}):\\n{{done.stderr[-2000:]}}\\n{{hint}}")
    if not os.path.isdir("{COLAB_HOME}"):
        sh("git", "clone", "--depth", "1", "{REPO_URL}", "{COLAB_HOME}",
            hint="Check that the runtime has internet (Runtime > Change runtime type) and that the URL is right.")
    if importlib.util.find_spec("labkit") is None:  # keep Colab's torch, torchvision, ipykernel, jupyter*
        keep = [f"{{d.metadata['Name']}}=={{d.version}}" for d in importlib.metadata.distributions()
                if re.fullmatch(r"torch|torchvision|ipykernel|jupyter.*", (d.metadata["Name"] or "").lower())]
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
            pins.write("\\n".join(keep) + "\\n")
        sh(sys.executable, "-m", "pip", "install", "-q", "{COLAB_HOME}", "-c", pins.name,
            hint="pip could not install labkit beside Colab's packages; read the error above, then rerun this cell.")
    os.environ["LABKIT_HOME"] = "{COLAB_HOME}"  # data/ and results/ live in the clone
    if results_on_drive:
        from google.colab import drive
        drive.mount("/content/drive")
        os.environ["LABKIT_RESULTS"] = "{DRIVE_RESULTS}"
'''

_BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
_BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
_LEGACY_START = re.compile(r'\Aimport sys\nif "google\.colab" in sys\.modules:.*\n')


def colab_url(notebook: str, folder: str = "labs") -> str:
    """The address that opens ``folder/notebook`` of :data:`REPO_URL` in Colab."""
    repo = REPO_URL.removeprefix("https://github.com/").removesuffix(".git")
    return f"https://colab.research.google.com/github/{repo}/blob/{BRANCH}/{folder}/{notebook}"


def badge(notebook: str, folder: str = "labs") -> str:
    """The markdown "Open in Colab" badge for ``folder/notebook``."""
    return _BADGE.format(url=colab_url(notebook, folder))


def _setup_index(nb: nbformat.NotebookNode) -> int | None:
    return next((i for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and c.source.lstrip().startswith(MARKER)), None)


def _split_legacy(nb: nbformat.NotebookNode) -> bool:
    """Turn an older lab's first code cell (``import sys`` + an ``if "google.colab"`` block, then the
    imports) into a set-up cell followed by an imports cell. True when it did."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if not _LEGACY_START.match(cell.source):
            return False
        lines = cell.source.split("\n")
        rest = 2
        while rest < len(lines) and (lines[rest].startswith((" ", "\t")) or not lines[rest].strip()):
            rest += 1
        cell.source = SETUP_CELL.rstrip("\n")
        imports = "\n".join(lines[rest:]).strip("\n")
        if "sys." in imports and not re.search(r"^import sys\b", imports, re.M):
            imports = "import sys\n" + imports
        if imports:
            nb.cells.insert(i + 1, nbformat.v4.new_code_cell(imports))
        return True
    return False


def problems(nb: nbformat.NotebookNode, notebook: str, folder: str = "labs") -> list[str]:
    """What differs from the template in ``nb``: its set-up cell, its badge (empty when both agree)."""
    found = []
    index = _setup_index(nb)
    if index is None:
        found.append(f"no set-up cell (a code cell starting with {MARKER!r})")
    elif nb.cells[index].source.strip("\n") != SETUP_CELL.strip("\n"):
        found.append("its set-up cell differs from labkit/course/colab.py's SETUP_CELL")
    wanted = badge(notebook, folder)
    badges = [m.group(0) for c in nb.cells if c.cell_type == "markdown" for m in _BADGE_RE.finditer(c.source)]
    if not badges:
        found.append("no Open-in-Colab badge")
    elif any(b != wanted for b in badges):
        found.append(f"its Colab badge does not open {folder}/{notebook}")
    return found


def apply(nb: nbformat.NotebookNode, notebook: str, folder: str = "labs") -> bool:
    """Rewrite ``nb``'s set-up cell and badge(s) from the template, in place; True when anything changed."""
    changed = _split_legacy(nb) if _setup_index(nb) is None else False
    index = _setup_index(nb)
    if index is not None and nb.cells[index].source.strip("\n") != SETUP_CELL.strip("\n"):
        nb.cells[index].source = SETUP_CELL.rstrip("\n")
        changed = True
    return set_badges(nb, notebook, folder) or changed


def set_badges(nb: nbformat.NotebookNode, notebook: str, folder: str = "labs") -> bool:
    """Point every Open-in-Colab badge of ``nb`` at ``folder/notebook``, in place; True when one changed."""
    wanted, changed = badge(notebook, folder), False
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            new = _BADGE_RE.sub(lambda m: wanted, cell.source)
            if new != cell.source:
                cell.source, changed = new, True
    return changed
