"""Lab 07's plumbing: int8 compression measurements (:mod:`.compress`) and the Ray Serve endpoint's helpers
(:mod:`.serving`); :data:`RULES` holds the rules of the lab's own parameters (the Tune sweep, the endpoint,
int8)."""
from __future__ import annotations

from labkit.params import Rule

#: Rules of Lab 07's own parameters, passed to :func:`labkit.params.check` as ``rules=``.
RULES: dict[str, Rule] = {
    "num_samples": Rule(int, 1, 10_000, help="Ray Tune trials (hyperparameter configurations) to sample"),
    "max_epochs": Rule(int, 1, 10_000, help="epochs a Tune trial may train at most (ASHA stops weak ones earlier)"),
    "grace_period": Rule(int, 1, 10_000, help="epochs every Tune trial trains before ASHA may stop it"),
    "replicas": Rule(int, 1, 256, help="Ray Serve replicas of the model deployment"),
    "max_batch_size": Rule(int, 1, 4096, help="most requests @serve.batch combines into one forward pass"),
    "batch_wait_timeout_s": Rule(float, 0, 10, help="seconds @serve.batch waits to fill a batch"),
    "load_requests": Rule(int, 1, 1_000_000, help="requests per configuration in the bounded load test"),
    "quantize": Rule(bool, help="quantize the best model to int8 (torchao) and compare it with fp32"),

}
