"""The search is resumable: a Tune run that was cut short is picked up by ``Tuner.restore``; trials that
had finished are kept and not re-run, the others continue from their last checkpoint and finish.

The cut: while a file ``interrupt`` exists, trials with ``x > FINISHED`` die after their first checkpoint
(as a killed kernel or worker would leave them: unfinished, with a checkpoint). The trainable is tiny (no
model: a few reports with checkpoints), so the test measures Tune's bookkeeping, not training. Each call
of the trainable appends the step it starts from to a file named after its config.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
from ray import cloudpickle

pytestmark = pytest.mark.slow
# Ray workers cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
STEPS = 3
TRIALS = 6
FINISHED = 3


def _trainable(config):
    from ray import tune
    first = 1
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            first = json.loads((Path(folder) / "step.json").read_text())["step"] + 1
    log = Path(config["log"])
    with open(log / f"trial{config['x']}.starts", "a") as f:
        f.write(f"{first}\n")
    for step in range(first, STEPS + 1):
        if step == 2 and config["x"] > FINISHED and (log / "interrupt").exists():
            raise RuntimeError("interrupted")
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "step.json").write_text(json.dumps({"step": step}))
            tune.report({"score": config["x"] * step, "step": step},
                        checkpoint=tune.Checkpoint.from_directory(folder))


def test_restore_keeps_finished_trials_and_finishes_the_rest(tmp_path):
    from ray import tune

    from labkit.distributed import ray_cluster

    log = tmp_path / "starts"
    log.mkdir()
    space = {"x": tune.grid_search(list(range(1, TRIALS + 1))), "log": str(log)}
    path = tmp_path / "tune" / "sweep"
    trainable = tune.with_resources(_trainable, {"cpu": 1})
    (log / "interrupt").touch()
    with ray_cluster(None):
        first = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(metric="score", mode="max"),
                           run_config=tune.RunConfig(storage_path=str(path.parent), name=path.name, verbose=0)).fit()
        done_first = {r.config["x"] for r in first if r.error is None and r.metrics and r.metrics.get("step") == STEPS}
        assert done_first == set(range(1, FINISHED + 1)) and first.num_errors == TRIALS - FINISHED
        (log / "interrupt").unlink()
        assert tune.Tuner.can_restore(str(path))
        again = tune.Tuner.restore(str(path), trainable, resume_errored=True, param_space=space).fit()
    assert len(again) == TRIALS and again.num_errors == 0
    assert all(r.metrics["step"] == STEPS for r in again), "every trial finished after the restore"
    starts = {int(p.stem[5:]): p.read_text().split() for p in log.glob("*.starts")}
    for x in range(1, TRIALS + 1):
        if x in done_first:
            assert starts[x] == ["1"], f"trial x={x} had finished before the interruption and ran again: {starts[x]}"
        else:
            assert starts[x] == ["1", "2"], f"trial x={x} should resume from its checkpoint (step 2): {starts[x]}"
    best = again.get_best_result()
    assert best.config["x"] == TRIALS and best.metrics["score"] == TRIALS * STEPS
