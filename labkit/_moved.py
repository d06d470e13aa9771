"""Old import paths and parameter rules that moved in the 2026-12 layout, kept working for one course term.

labkit's modules moved into folders that show its layers (``labkit.distributed``, ``labkit.labs``,
``labkit.course``). Notebooks already submitted import the old paths (``from labkit import recovery,
ray_train``, ``labkit.lightning_module``) and run ``python -m labkit.imagenet``; an instructor's regrade
must still run them. This module maps each old path to its new one: importing an old path gives the new
module itself (the same object, so patches and ``isinstance`` agree) and warns with a
:class:`DeprecationWarning` that names the new path. Likewise a lab's parameter rules that left
``labkit.params.RULES`` are found for a notebook that does not pass them yet.

It names the new modules as strings and imports them only when an old path is used, so the core never
imports an upper layer. Remove it after the spring 2027 term.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

#: old module path -> new module path
MODULES: dict[str, str] = {
    "labkit.imagenet": "labkit.labs.ablations.sweep",
    "labkit.imagenet_command": "labkit.labs.ablations.command",
    "labkit.recipe": "labkit.labs.ablations.recipe",
    "labkit.lung_vit": "labkit.labs.lung_vit.runner",
    "labkit.lung_vit_command": "labkit.labs.lung_vit.command",
    "labkit.lightning_module": "labkit.labs.lung_vit.lightning_module",
    "labkit.tracking": "labkit.labs.lung_vit.tracking",
    "labkit.federated": "labkit.labs.federated",
    "labkit.streaming": "labkit.labs.streaming",
    "labkit.serving": "labkit.labs.tune_serve.serving",
    "labkit.compress": "labkit.labs.tune_serve.compress",
    "labkit.local_ray": "labkit.distributed.local_ray",
    "labkit.ray_train": "labkit.distributed.worker",
    "labkit.recovery": "labkit.distributed.recovery",
    "labkit.ddp": "labkit.distributed.ddp",
    "labkit.cli": "labkit.course.cli",
    "labkit.regrade": "labkit.course.regrade",
    "labkit.student": "labkit.course.student",
    "labkit.summary": "labkit.course.summary",
    "labkit.labsource": "labkit.course.labsource",
    "labkit.colab": "labkit.course.colab",
    "labkit.nbval_tolerance": "labkit.course.nbval_tolerance",
}
#: ``python -m OLD`` -> ``python -m NEW`` (a package's ``__main__``)
COMMANDS: dict[str, str] = {
    "labkit.imagenet": "labkit.labs.ablations",
    "labkit.imagenet_command": "labkit.labs.ablations",
    "labkit.lung_vit": "labkit.labs.lung_vit",
    "labkit.lung_vit_command": "labkit.labs.lung_vit",
}
#: lab -> where the rules of the parameters it no longer finds in ``labkit.params.RULES`` live now
RULES: dict[str, tuple[str, ...]] = {
    "02_ray": ("labkit.distributed:RULES",),
    "03_imagenet_ddp_ablations": ("labkit.labs.ablations.sweep:LAB_RULES",),
    "04_lung_vit": ("labkit.distributed:RULES", "labkit.labs.lung_vit.runner:RULES"),
    "05_federated": ("labkit.distributed:RULES",),
    "06_streaming_data": ("labkit.distributed:RULES",),
    "07_tune_serve": ("labkit.distributed:RULES", "labkit.labs.tune_serve:RULES"),
}


def _caller_stacklevel() -> int:
    """The stack level of the first frame outside the import machinery and this module: the line that
    imported the old path, so that the warning is shown there (and in a notebook, where ``__main__`` is)."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        internal = "importlib" in name and "_bootstrap" in name   # warnings.warn skips these without counting
        if not internal and name != __file__ and frame.f_globals.get("__name__") not in ("labkit", "importlib"):
            return level
        frame, level = frame.f_back, level + (0 if internal else 1)
    return level


def warn(old: str, new: str, what: str = "import") -> None:
    """The one DeprecationWarning of this module: ``old`` moved to ``new``."""
    warnings.warn(f"{what} {old} moved to {new}: use the new path ({old} works until the spring 2027 term ends)",
                  DeprecationWarning, stacklevel=_caller_stacklevel())


class _AliasLoader(importlib.abc.Loader):
    """Loads an old path as the new module object; run with ``python -m`` it runs the new command."""

    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MODULES[self.old]
        warn(self.old, new)
        module = importlib.import_module(new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the new module is imported); give it back its own spec, which the import replaced."""
        module.__spec__ = self.spec

    def get_code(self, fullname: str):
        """What ``python -m OLD`` runs: the new command, after the warning."""
        new = COMMANDS.get(fullname, MODULES[fullname])
        source = (f"import runpy, warnings\n"
                  f"warnings.warn('python -m {fullname} moved to python -m {new}', DeprecationWarning)\n"
                  f"runpy.run_module({new!r}, run_name='__main__', alter_sys=True)\n")
        return compile(source, f"<{fullname}: moved to {new}>", "exec")

    def is_package(self, fullname: str) -> bool:
        return False


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds only the old paths listed in :data:`MODULES`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname in MODULES:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname))
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``import labkit`` does this)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


def attribute(name: str) -> ModuleType:
    """``labkit.<old name>`` as an attribute (``import labkit; labkit.recovery``): the new module."""
    if f"labkit.{name}" not in MODULES:
        raise AttributeError(f"module 'labkit' has no attribute {name!r}")
    return importlib.import_module(f"labkit.{name}")


def rule(lab: str, name: str):
    """The rule of a parameter that ``labkit.params.RULES`` no longer holds for ``lab``, from where it lives
    now (with a warning to pass it as ``rules=``), or ``None``."""
    for place in RULES.get(lab, ()):
        module, _, attr = place.partition(":")
        table = getattr(importlib.import_module(module), attr)
        if name in table:
            warn(f"the rule of parameter {name!r}", f"{module}.{attr}", what="for " + lab + ",")
            return table[name]
    return None
