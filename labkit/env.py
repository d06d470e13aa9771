"""Where the code runs: device choice, seeding, Colab detection, project paths, run environment.

Every lab starts with these helpers, so they are small and have no heavy imports at module load.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def in_colab() -> bool:
    """True when running inside Google Colab."""
    return "google.colab" in sys.modules


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve ``device`` to a ``torch.device``.

    ``"auto"`` picks CUDA, then Apple MPS, then the CPU. An explicit choice that is not available
    raises a ``ValueError`` that says what is.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine; use device='auto' or 'cpu'.")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ValueError(f"device={device!r}: Apple MPS is not available here; use device='auto' or 'cpu'.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device={device!r} is not a device; use one of {DEVICE_CHOICES} or 'cuda:N'.")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(amp: str | bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or ``None`` for full precision.

    ``"auto"`` means bf16 on a GPU that supports it, fp16 on other GPUs, and off on CPU/MPS (CPU
    autocast is slower than fp32 for these small convnets). ``"bf16"``/``"fp16"`` force a dtype.
    """
    if amp in (False, None, "off", "none", "fp32"):
        return None
    if device.type != "cuda":
        if amp in ("auto", True):
            return None
        if amp == "bf16":
            return torch.bfloat16
        raise ValueError(f"amp={amp!r}: fp16 autocast needs a CUDA device (this run uses {device}); use 'auto' or 'bf16'.")
    if amp in ("auto", True):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"amp={amp!r} is not allowed; use 'auto', 'bf16', 'fp16' or False.")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str = "auto", world_size: int = 1) -> dict:
    """A summary of the run environment for the run record: versions, device, CPU count."""
    dev = pick_device(device)
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "ray": _version("ray"),
        "cpu_count": os.cpu_count(),
        "device": str(dev),
        "device_name": platform.processor() or platform.machine(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "world_size": world_size,
        "colab": in_colab(),
    }
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def project_root() -> Path:
    """The course folder: ``$LABKIT_HOME``, else the nearest parent of the working directory that
    holds ``labs/`` and ``labkit/``, else the working directory (Colab).

    Notebooks run with ``labs/`` as their working directory in Jupyter but with the repository
    root under papermill; resolving paths here makes ``data/…`` and ``results/…`` mean the same
    folder in both.
    """
    home = os.environ.get("LABKIT_HOME")
    if home:
        return Path(home).expanduser().resolve()
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "labs").is_dir() and (folder / "labkit").is_dir():
            return folder
    return cwd


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` as given when absolute, otherwise relative to :func:`project_root`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p
