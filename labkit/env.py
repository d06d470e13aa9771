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
#: MIME type of the invisible note of where a notebook ran (:func:`machine`), which ``labkit.params.check``
#: displays and the course's regrade reads back.
ENV_MIME = "application/vnd.labkit.env+json"


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


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively — AVX512-BF16 or AMX (Cooper Lake, Sapphire Rapids and newer,
    AMD Zen 4+) — where bf16 autocast is faster than fp32. Elsewhere bf16 is emulated and slower, so ``"auto"``
    stays in fp32. (oneDNN's own ``_is_mkldnn_bf16_supported()`` is true on *any* AVX-512 CPU — Skylake,
    Cascade Lake, Ice Lake, the usual cloud and Colab CPUs — which only emulate bf16: not the test to use.)"""
    for flag in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, flag, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def cuda_has_native_bf16() -> bool:
    """True on GPUs that run bf16 natively (Ampere and newer: A100, H100, RTX 30xx+); a T4 or
    V100 only emulates it, and there fp16 with a gradient scaler is the fast choice."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation
        return torch.cuda.get_device_capability()[0] >= 8


def amp_dtype(amp: str | bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or ``None`` for full precision (fp32).

    ``"auto"`` (or ``True``) means, on a GPU, bf16 where it runs natively, else fp16 (then pair it
    with :func:`grad_scaler`); on a CPU, bf16 where the CPU runs it natively (AVX512-BF16/AMX),
    else fp32; on Apple MPS fp32. ``"bf16"``/``"fp16"`` force a dtype; ``False`` forces fp32.
    """
    if amp in (False, None, "off", "none", "fp32", "32"):
        return None
    if amp not in ("auto", True, "bf16", "fp16"):
        raise ValueError(f"amp={amp!r} is not allowed; use 'auto', 'bf16', 'fp16' or False.")
    if device.type == "cuda":
        if amp in ("auto", True):
            return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if amp in ("auto", True):
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if amp == "bf16":
        return torch.bfloat16
    raise ValueError(f"amp={amp!r}: fp16 autocast needs a CUDA device (this run uses {device}); use 'auto', 'bf16' or False.")


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` when training in fp16 (small gradients would underflow without one), else ``None``."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def use_channels_last(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether to store images and conv weights ``channels_last`` (NHWC): always on a GPU (tensor
    cores want it), and on a CPU when running bf16 (oneDNN's fast bf16 convolutions are NHWC)."""
    return device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16)


def precision_name(dtype: torch.dtype | None) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: what the run record and the labs print."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


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


def machine(device: torch.device) -> dict:
    """Where a notebook runs, in a few words: device and its name, torch/CUDA versions, precision."""
    info = environment(device)
    return {"device": info["device"], "device_name": info["device_name"], "torch": info["torch"],
            "cuda": info.get("cuda"), "python": info["python"], "cpu_count": info["cpu_count"],
            "precision": precision_name(amp_dtype("auto", device))}


def describe_machine(info: dict | None) -> str:
    """One line for a report: ``cpu (AMD EPYC, 2 cores), torch 2.14.1, fp32``."""
    if not info:
        return "unknown (no machine note in the notebook)"
    where = info.get("device", "?")
    name = info.get("device_name")
    cores = f", {info['cpu_count']} cores" if str(where).startswith("cpu") and info.get("cpu_count") else ""
    cuda = f", CUDA {info['cuda']}" if info.get("cuda") else ""
    return f"{where} ({name}{cores}), torch {info.get('torch')}{cuda}, {info.get('precision', '?')}"


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


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as a run record keeps it: relative to the course folder when inside it, ``~/…`` when in
    the home folder, else absolute — so shared results carry no user names or home folders."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    for base, prefix in ((project_root(), ""), (Path(os.path.abspath(Path.home())), "~/")):
        if p == base or p.is_relative_to(base):
            rel = p.relative_to(base).as_posix()
            return prefix + rel if rel != "." else (prefix.rstrip("/") or ".")
    return p.as_posix()
