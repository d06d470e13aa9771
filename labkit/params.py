"""Validate a notebook's parameters and apply quick mode.

papermill injects ``-p NAME VALUE`` as Python literals, so ``-p workers two`` arrives as the string
``"two"``. :func:`check` catches that at the top of the notebook with a message that names the
parameter, the bad value and what is allowed, instead of an error deep inside torch.

Quick mode (``quick=True`` or the environment variable ``LABKIT_QUICK=1``) shrinks data size,
image size and epochs so a lab finishes in about a minute on two CPU cores.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from labkit import _moved
from labkit.env import DEVICE_CHOICES, ENV_MIME, machine, pick_device, resolve_path
from labkit.errors import ParameterError

__all__ = ["RULES", "QUICK", "Config", "ParameterError", "Rule", "check", "folder_test", "quick_requested"]


@dataclass(frozen=True)
class Rule:
    """What one parameter may hold.

    ``kind`` is the accepted type (``int`` also accepts nothing but ints; ``float`` accepts ints);
    ``low``/``high`` bound numbers (inclusive unless ``open_low``); ``choices`` lists the allowed
    values; ``optional`` allows ``None``; ``test`` returns an error text or ``None``.
    """

    kind: type | tuple[type, ...] = object
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple | None = None
    optional: bool = False
    test: Callable[[Any], str | None] | None = None
    help: str = ""

    def allowed(self) -> str:
        """A short description of the allowed values, for error messages."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            names = {int: "an integer", float: "a number", bool: "True or False", str: "a string",
                     list: "a list", dict: "a dict"}
            text = " or ".join(names.get(k, k.__name__) for k in kinds)
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.open_low else '['}{self.low}, {self.high}]"
            elif self.low is not None:
                text += f" {'>' if self.open_low else '>='} {self.low}"
            elif self.high is not None:
                text += f" <= {self.high}"
        if self.optional:
            text += " (or None)"
        return text + (f" — {self.help}" if self.help else "")

    def error(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or ``None`` when it is."""
        if value is None:
            return None if self.optional else "is required"
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if float in kinds and int not in kinds:
            kinds = (*kinds, int)
        # bool is an int subclass: True is not a valid epoch count.
        if isinstance(value, bool) and bool not in kinds and object not in kinds:
            return "is a bool"
        if object not in kinds and not isinstance(value, kinds):
            return f"has type {type(value).__name__}"
        if self.choices is not None and value not in self.choices:
            return "is not an allowed value"
        if self.low is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < self.low or (self.open_low and value == self.low):
                return "is too small"
        if self.high is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if value > self.high:
                return "is too large"
        return self.test(value) if self.test else None


def _device_test(value: str) -> str | None:
    name = value.lower()
    if name in DEVICE_CHOICES or (name.startswith("cuda:") and name[5:].isdigit()):
        return None
    return "is not a device name"


def folder_test(value: str) -> str | None:
    """A ``Rule`` test for dataset folders: a path that is a file is refused (``None`` passes)."""
    return "is a file, not a folder (give the dataset's folder)" if resolve_path(value).is_file() else None


#: Rules for the parameter names every lab shares. Each lab passes its own as ``rules=``, kept beside what they
#: configure: ``labkit.distributed.RULES`` (workers, a Ray address, resume), a lab package's ``RULES``
#: (``labkit.labs.lung_vit.runner``, ``labkit.labs.tune_serve``, ``labkit.labs.ablations.sweep.LAB_RULES``), or
#: ``LAB_RULES`` in the notebook (Labs 05 and 06).
RULES: dict[str, Rule] = {
    "epochs": Rule(int, 1, 10_000, help="passes over the training data"),
    "batch_size": Rule(int, 1, 65_536, help="images per step (per worker in distributed labs)"),
    "lr": Rule(float, 0, 10, open_low=True, help="learning rate"),
    "image_size": Rule(int, 16, 1024, help="images are resized to image_size × image_size"),
    "device": Rule(str, test=_device_test, help="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    "data": Rule(str, choices=("auto", "real", "synthetic"),
                 help="'auto' uses the real data when present, else writes a synthetic stand-in"),
    "data_dir": Rule(str, test=folder_test, help="dataset folder, relative to the course folder"),
    "quick": Rule(bool, help="shrink data, image size and epochs to finish in about a minute"),
    "seed": Rule(int, 0, 2**32 - 1),
    "class_weights": Rule(bool, help="weight the loss by inverse class frequency"),
    "amp": Rule((bool, str), choices=("auto", "bf16", "fp16", True, False),
                help="mixed precision; 'auto' = bf16 where the GPU or CPU runs it natively, fp16 on other GPUs, else fp32"),
}

#: What quick mode does to each lab: numbers are caps (min with the given value), others replace.
QUICK: dict[str, dict[str, Any]] = {
    "01_baseline": {"epochs": 4, "image_size": 64, "max_train": 1200, "max_test": 400},
    "02_ray": {"epochs": 4, "image_size": 64, "max_train": 1200, "max_test": 400},
    "03_imagenet_ddp_ablations": {"epochs": 6, "image_size": 16, "max_train": 1000, "max_test": 300},
    "04_lung_vit": {"epochs": 8, "image_size": 32, "max_train": 540, "max_test": 180, "batch_size": 8,
                    "depth": 2, "heads": 4, "dim": 64, "mlp_dim": 128},
    "05_federated": {"rounds": 3, "local_epochs": 1, "image_size": 32, "batch_size": 16, "max_patches": 1200},
    "06_streaming_data": {"epochs": 2, "image_size": 48, "max_train": 1600, "max_test": 300, "lr_schedule": "cosine"},
    "07_tune_serve": {"num_samples": 4, "max_epochs": 4, "grace_period": 1, "image_size": 48, "max_train": 1000,
                      "max_test": 300, "replicas": 2, "load_requests": 60},
}
_QUICK_DEFAULT = {"epochs": 2, "image_size": 64, "max_train": 800, "max_test": 300}


def quick_requested(quick: bool = False) -> bool:
    """True when ``quick`` is set or the environment says ``LABKIT_QUICK=1``."""
    return bool(quick) or os.environ.get("LABKIT_QUICK", "").strip().lower() in ("1", "true", "yes", "on")


class Config(dict):
    """Validated parameters with attribute access (``cfg.epochs``); a plain dict underneath, so it
    pickles into Ray workers and serialises into the run record."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r}; have {sorted(self)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def show(self) -> None:
        """Print the configuration, one line each (a checked output in the labs)."""
        width = max(len(k) for k in self)
        for key in sorted(self):
            print(f"{key:<{width}}  {self[key]!r}")


def check(lab: str, rules: dict[str, Rule] | None = None, show: bool = True, **values: Any) -> Config:
    """Validate a lab's parameters and apply quick mode; returns a :class:`Config`.

    >>> cfg = check("01_baseline", epochs=5, batch_size=32, quick=False, show=False)
    >>> cfg.epochs
    5

    Raises :class:`ParameterError` naming the first bad parameter, its value and what is allowed.
    Quick mode adds ``max_train``/``max_test`` (images per split) and caps epochs and image size.
    """
    table = {**RULES, **(rules or {})}
    problems = []
    for name, value in values.items():
        rule = table.get(name) or _moved.rule(lab, name)
        if rule is None:
            raise ParameterError(f"{lab}: no rule for parameter {name!r}; pass rules={{{name!r}: Rule(...)}}.")
        why = rule.error(value)
        if why:
            problems.append(f"parameter {name!r} = {value!r} {why}; allowed: {rule.allowed()}.")
    if problems:
        raise ParameterError(f"{lab}: " + "\n".join(problems) + "\n(with papermill: -p NAME VALUE, e.g. -p epochs 5)")

    cfg = Config(values)
    cfg["lab"] = lab
    cfg.setdefault("max_train", None)
    cfg.setdefault("max_test", None)
    if quick_requested(values.get("quick", False)):
        cfg["quick"] = True
        for key, small in QUICK.get(lab, _QUICK_DEFAULT).items():
            current = cfg.get(key)
            if isinstance(small, (int, float)) and isinstance(current, (int, float)) and not isinstance(current, bool):
                cfg[key] = min(current, small)
            else:
                cfg[key] = small
    if show:
        cfg.show()
        _note_machine(cfg.get("device", "auto"))
    return cfg


def _note_machine(device: Any) -> None:
    """In a notebook, leave an invisible, machine-readable note of where it ran (device, versions):
    ``labkit regrade`` reports it beside the machine that re-runs the notebook."""
    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython
    from IPython.display import display

    if get_ipython() is None:
        return
    try:
        dev = pick_device(device)
    except ValueError:
        return
    display({ENV_MIME: machine(dev), "text/plain": ""}, raw=True)
