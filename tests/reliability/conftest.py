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


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small Alzheimer stand-in (400 / 100 images) for the tests that run Lab 02 to break it: seconds per
    epoch, and enough batches per epoch to strike in the middle of one."""
    from labkit.data.synth_mri import write_alzheimer_standin

    return write_alzheimer_standin(tmp_path_factory.mktemp("data") / "alzheimer", n_train=400, n_test=100,
                                   progress=False)
