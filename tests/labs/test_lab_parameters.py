"""Every lab's parameters against their rules, read from the notebooks themselves: each parameter of a lab's
``parameters`` cell has its rule passed where the lab checks them (none found only through the old
``labkit.params.RULES`` fallback), each lab validates once, and Lab 04's command-line defaults are its
notebook's (no drifting copy). Bad values: ``tests/reliability/test_bad_parameters.py``."""
from __future__ import annotations

import re
import warnings

import pytest
from labcells import LABS, lab_cells, run_check_cell

from labkit.labs.lung_vit import runner

CHECKS = re.compile(r"\b(params\.check|runner\.check_params)\(")


@pytest.mark.parametrize("lab", LABS, ids=[p.stem[:2] for p in LABS])
def test_the_defaults_pass_the_lab_s_own_rules(lab, results_tmp, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with warnings.catch_warnings():
        # a rule found only through labkit._moved's fallback (or any old import path) fails here
        warnings.filterwarnings("error", message=".* moved to ", category=DeprecationWarning)
        namespace = run_check_cell(lab)
    cfg, defaults = namespace["cfg"], lab_cells(lab)[2]
    assert set(defaults) <= set(cfg), f"{lab.name}: parameters the check never saw: {sorted(set(defaults) - set(cfg))}"


@pytest.mark.parametrize("lab", LABS, ids=[p.stem[:2] for p in LABS])
def test_each_lab_validates_its_parameters_once(lab):
    calls = CHECKS.findall(lab.read_text())
    assert len(calls) == 1, f"{lab.name} checks its parameters {len(calls)} times: {calls}"
    cluster_checks = lab.read_text().count("distributed.check_cluster(")
    has_cluster_knob = {"workers", "address"} & set(lab_cells(lab)[2])
    assert cluster_checks == (1 if has_cluster_knob else 0), f"{lab.name}: check_cluster called {cluster_checks} times"


def test_lab04_command_defaults_are_its_notebook_s():
    notebook = lab_cells(next(p for p in LABS if p.stem == "04_lung_vit"))[2]
    differ = {k: (v, notebook.get(k, "missing")) for k, v in runner.DEFAULTS.items() if notebook.get(k, "missing") != v}
    assert not differ, f"runner.DEFAULTS (command) vs Lab 04's parameters cell: {differ}"


@pytest.mark.parametrize("lab", LABS, ids=[p.stem[:2] for p in LABS])
def test_papermill_lists_every_parameter(lab):
    """What `papermill LAB --help-notebook` shows: every parameter (a comment papermill cannot parse hides one)."""
    import papermill

    listed = papermill.inspect_notebook(str(lab.with_suffix(".ipynb")))
    assert set(listed) == set(lab_cells(lab)[2]), f"{lab.name}: papermill misses {set(lab_cells(lab)[2]) - set(listed)}"
