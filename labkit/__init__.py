"""labkit: the helper library of a lab course on distributed deep learning for medical imaging.

Small, named helpers a student can find: ``labkit.env`` (device, seed), ``labkit.params``
(notebook parameters, quick mode), ``labkit.data`` (real layouts and synthetic stand-ins),
``labkit.models``, ``labkit.train`` (one training loop), ``labkit.timing``, ``labkit.results``
(run records) and ``labkit.plotting``. Submodules are imported on use, so ``import labkit`` is fast.
"""
__version__ = "0.1.0"
