"""labkit: the helper library of a lab course on distributed deep learning for medical imaging.

Its folders are its layers; an upper layer may import a lower one, never the reverse:

- the core, every lab's: ``labkit.env`` (device, seed, precision), ``labkit.params`` (notebook
  parameters, quick mode), ``labkit.errors``, ``labkit.files``, ``labkit.results`` (run records),
  ``labkit.timing``, ``labkit.metrics``, ``labkit.plotting``, ``labkit.train`` (one training loop), and
  beside it ``labkit.data`` (real layouts and synthetic stand-ins), ``labkit.models``, ``labkit.exercises``;
- ``labkit.distributed``: Ray and DDP plumbing that Labs 02-07 share;
- ``labkit.labs``: what one lab alone uses (``labkit.labs.ablations`` for Lab 03, ``labkit.labs.lung_vit``
  for Lab 04, ...);
- ``labkit.course``: the instructor's tools (the ``labkit`` command), imported by no notebook.

Submodules are imported on use, so ``import labkit`` is fast.
"""
from labkit import _moved

__version__ = "0.1.0"

_moved.install()


def __getattr__(name: str):
    """Old module names (``labkit.recovery``) for one course term: see :mod:`labkit._moved`."""
    return _moved.attribute(name)
