"""Lab 02's worker function reads as its lesson (fast: the lab's source is read, nothing runs): Lab 01's loop,
the Ray lines and fault tolerance in view, labkit's instrumentation behind one hook; the exercise's LR rule and
the ``seed`` reach the workers."""
from __future__ import annotations

from pathlib import Path

from labcells import code_lines, function_source

LAB = Path(__file__).resolve().parents[2] / "labs" / "02_ray.py"
#: Ray's "get started with PyTorch" worker is ~40 lines; this one adds fault tolerance and precision.
MAX_WORKER_LINES = 45


def test_the_worker_function_stays_the_size_of_a_tutorial():
    lines = code_lines(LAB, "train_loop_per_worker")
    assert len(lines) <= MAX_WORKER_LINES, (
        f"train_loop_per_worker has {len(lines)} lines of code (at most {MAX_WORKER_LINES}): move instrumentation "
        "into labkit.distributed.worker.WorkerHook, keep the lesson in the notebook")


def test_the_taught_lines_are_in_view_and_the_instrumentation_behind_one_hook():
    source = function_source(LAB, "train_loop_per_worker")
    for taught in ("ray.train.get_context()", "ray.train.torch.get_device()", "ray.train.torch.prepare_model(",
                   "sampler.set_epoch(epoch)", "ray.train.get_checkpoint()", "ray.train.Checkpoint.from_directory(",
                   "ray.train.report(", "train_epoch(", "optimizer = torch.optim.Adam("):
        assert taught in source, taught
    assert source.count("worker.WorkerHook(") == 1
    for plumbing in ("record_attempt", "worker_nodes", "AllReduceTimer", "crash_halfway", "ProgressFile",
                     "quiet_ray_worker_logs", "set_num_threads"):
        assert plumbing not in source, f"{plumbing} belongs behind the hook"


def test_the_workers_use_the_exercise_answer_and_shuffle_from_seed():
    source = function_source(LAB, "train_loop_per_worker")
    assert "scale_lr(config[\"lr\"], world_size, config[\"lr_scaling\"])" in source
    assert "train.scale_lr" not in source                          # not labkit's rule: the student's
    assert "prepare_data_loader(" not in source                    # Ray's would shuffle from seed 0
    assert "DistributedSampler(" in source and "seed=config[\"seed\"]" in source
    text = LAB.read_text()
    assert "scale_lr = exercises.lr_rule_for_run(my_scale_lr)" in text
    assert text.index("scale_lr = exercises.lr_rule_for_run") < text.index("def train_loop_per_worker(")


def test_the_bootstrapped_balanced_accuracy_is_scikit_learns():
    """Lab 02 bootstraps ``metrics.balanced_accuracy`` (fast) in place of scikit-learn's: the same number."""
    import warnings

    import numpy as np
    from sklearn.metrics import balanced_accuracy_score

    from labkit import metrics

    rng = np.random.default_rng(0)
    for n, k in ((400, 4), (37, 3), (50, 5)):
        y, p = rng.integers(0, k, n), rng.integers(0, k + 1, n)          # a predicted class no image has
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert abs(metrics.balanced_accuracy(y, p) - balanced_accuracy_score(y, p)) < 1e-12
