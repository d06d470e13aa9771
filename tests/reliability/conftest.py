"""Reliability suite set-up. ``isolated_course``: the test gets its own course folder, cache folder and results
folder (modules opt in with ``pytestmark = pytest.mark.usefixtures("isolated_course")``)."""
from __future__ import annotations

import pytest


@pytest.fixture
def isolated_course(tmp_path, monkeypatch):
    """labkit's course folder, decode cache and results live in this test's temporary folder."""
    home = tmp_path / "course"
    home.mkdir()
    monkeypatch.setenv("LABKIT_HOME", str(home))
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LABKIT_RESULTS", str(home / "results"))
    monkeypatch.delenv("DATA_PATH", raising=False)
    return home
