"""Shared test set-up: results and caches go to temporary folders, never into the course's results/."""
from __future__ import annotations

import os

import pytest

# Headless plotting, quiet Ray, no accidental quick mode leaking from a developer's shell.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("LABKIT_QUICK", None)


@pytest.fixture
def results_tmp(tmp_path, monkeypatch):
    """Point labkit's results folder at a fresh temporary directory."""
    path = tmp_path / "results"
    monkeypatch.setenv("LABKIT_RESULTS", str(path))
    return path
