"""Shared test set-up: results and caches go to temporary folders, never into the course's results/."""
from __future__ import annotations

import os
import tempfile

import pytest

# Headless plotting, quiet Ray, no accidental quick mode leaking from a developer's shell.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("LABKIT_QUICK", None)
# Decoded-image caches of "real" test datasets go to a throwaway folder, not the course's data/.cache.
os.environ.setdefault("LABKIT_CACHE", tempfile.mkdtemp(prefix="labkit-cache-"))


@pytest.fixture
def results_tmp(tmp_path, monkeypatch):
    """Point labkit's results folder at a fresh temporary directory."""
    path = tmp_path / "results"
    monkeypatch.setenv("LABKIT_RESULTS", str(path))
    return path
