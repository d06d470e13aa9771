"""labkit.labs.federated and labkit.models.breast: client splits, the client, a failing client, bytes, the CSV."""
from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch

from labkit.exercises.lab05 import reference_fedavg
from labkit.labs import federated
from labkit.models.breast import BreastCancerCNN


def test_breast_cnn_shapes_and_bn_buffers():
    model = BreastCancerCNN(32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2,)
    keys = model.state_dict().keys()
    assert sum(k.endswith("num_batches_tracked") for k in keys) == 3
    with pytest.raises(ValueError, match="image_size"):
        BreastCancerCNN(8)
    with pytest.raises(ValueError, match="expected"):
        model(torch.zeros(1, 3, 30, 30))


def test_weighted_average_is_exact_on_hand_made_states():
    a = {"w": torch.tensor([1.0, 2.0]), "bn.running_var": torch.tensor([1.0]), "bn.num_batches_tracked": torch.tensor(10)}
    b = {"w": torch.tensor([3.0, 6.0]), "bn.running_var": torch.tensor([4.0]), "bn.num_batches_tracked": torch.tensor(2)}
    out = reference_fedavg([a, b], [1, 3])
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["bn.running_var"], torch.tensor([3.25]))
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and out["bn.num_batches_tracked"].item() == 4  # 16/4
    assert a["w"].tolist() == [1.0, 2.0]   # inputs untouched


@pytest.mark.parametrize("how", federated.SPLITS)
def test_every_split_keeps_each_sample_exactly_once(how):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    patients = [f"p{k}" for k in rng.integers(0, 12, 300)]
    shards = federated.split_clients(labels, 3, how, alpha=0.5, patients=patients, seed=1)
    assert len(shards) == 3 and all(len(s) for s in shards)
    assert sorted(np.concatenate(shards).tolist()) == list(range(300))
    if how == "hospital":
        owners = [{patients[i] for i in s} for s in shards]
        assert not (owners[0] & owners[1]) and not (owners[0] & owners[2]) and not (owners[1] & owners[2])
    again = federated.split_clients(labels, 3, how, alpha=0.5, patients=patients, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(shards, again))


def test_dirichlet_small_alpha_skews_labels_and_bad_requests_fail():
    labels = np.repeat([0, 1], 500)
    skewed = federated.split_clients(labels, 4, "dirichlet", alpha=0.1, seed=0)
    rates = [labels[s].mean() for s in skewed]
    assert max(rates) - min(rates) > 0.3
    with pytest.raises(ValueError, match="patient ids"):
        federated.split_clients(labels, 2, "hospital")
    with pytest.raises(ValueError, match="split="):
        federated.split_clients(labels, 2, "random")
    with pytest.raises(ValueError, match="at least 3 training patients"):
        federated.split_clients(labels[:4], 3, "hospital", patients=["a", "a", "b", "b"])


def _client(fail_at_round=None):
    client = federated.FedClient(1, 16, amp=False, batch_size=8, fail_at_round=fail_at_round, threads=None)
    gen = torch.Generator().manual_seed(0)
    client.load_shard(torch.randint(0, 255, (20, 3, 16, 16), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 2, (20,), generator=gen))
    return client


def test_client_trains_and_returns_parameters_and_buffers():
    client = _client()
    start = BreastCancerCNN(16).state_dict()
    out = client.fit(start, 1, 1, 1e-3)
    assert out["num_samples"] == 20 and out["cid"] == 1 and np.isfinite(out["loss"])
    assert set(out["state"]) == set(start)
    assert out["state"]["features.3.num_batches_tracked"].item() == 3      # ceil(20 / 8) steps
    assert not torch.equal(out["state"]["features.0.weight"], start["features.0.weight"])


def test_failing_client_is_left_out_and_the_round_completes():
    ok_client, bad_client = _client(), _client(fail_at_round=2)
    start = BreastCancerCNN(16).state_dict()

    def call(client, round_):
        return lambda: client.fit(start, round_, 1, 1e-3)

    with pytest.warns(UserWarning, match=r"client 1 failed .*simulated failure in round 2"):
        updates, failed = federated.collect_updates([call(ok_client, 2), call(bad_client, 2)],
                                                    ["client 0", "client 1"], get=lambda f: f())
    assert failed == ["client 1"] and len(updates) == 1
    averaged = reference_fedavg([u["state"] for u in updates], [u["num_samples"] for u in updates])
    assert set(averaged) == set(start)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # the next round, the same client works again
        updates, failed = federated.collect_updates([call(bad_client, 3)], ["client 1"], get=lambda f: f())
    assert not failed and len(updates) == 1


def test_bytes_fedavg_vs_ddp():
    state = {"w": torch.zeros(10, 10), "n": torch.tensor(3)}
    assert federated.state_bytes(state) == 400 + 8
    assert federated.ddp_allreduce_bytes(1000, 1, 50) == 0
    assert federated.ddp_allreduce_bytes(1000, 4, 10) == 10 * 4 * 2 * 3 / 4 * 1000


def test_append_csv_adds_rows_atomically_and_checks_columns(tmp_path):
    path = tmp_path / "m" / "metrics.csv"
    federated.append_csv(path, {"round": 1, "val_loss": 0.5})
    federated.append_csv(path, {"round": 2, "val_loss": 0.25})
    rows = list(csv.DictReader(path.open()))
    assert [r["round"] for r in rows] == ["1", "2"] and rows[1]["val_loss"] == "0.25"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]   # no temporary left
    with pytest.raises(ValueError, match="metrics.csv has columns"):
        federated.append_csv(path, {"round": 3})


def test_evaluate_binary_reports_every_metric():
    model = BreastCancerCNN(16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (30, 3, 16, 16), dtype=torch.uint8, generator=gen)
    y = torch.tensor([0, 1] * 15)
    m = federated.evaluate_binary(model, x, y)
    assert set(federated.METRICS) <= set(m) and all(np.isfinite(m[k]) for k in federated.METRICS)
    one_class = federated.evaluate_binary(model, x, torch.zeros(30, dtype=torch.int64))
    assert np.isnan(one_class["roc_auc"])


# --------------------------------------------------------------------------- hospitals, FedBN, stragglers
def test_hospitals_are_unequal_whole_patients_and_follow_named_sites():
    rng = np.random.default_rng(0)
    patients = [f"p{k}" for k in rng.integers(0, 30, 900)]
    owner, names = federated.assign_hospitals(patients, 3, seed=0)
    sizes = np.bincount(owner, minlength=3)
    assert len(names) == 3 and sizes[0] >= 2 * sizes[2] and sizes[0] >= sizes[1] >= sizes[2]
    by_patient = {}
    for p, k in zip(patients, owner):
        assert by_patient.setdefault(p, k) == k            # a patient lives in one hospital
    sites = ["east" if p < "p1" else "west" if p < "p2" else "north" for p in patients]
    owner, names = federated.assign_hospitals(patients, 3, sites=sites)
    counts = {n: sites.count(n) for n in set(sites)}
    assert names == sorted(counts, key=lambda n: -counts[n])           # hospital 0 is the largest site
    assert all(names[k] == s for k, s in zip(owner, sites))
    labels = rng.integers(0, 2, 900)
    shards = federated.split_clients(labels, 3, "hospital", hospitals=owner)
    assert [len(s) for s in shards] == [counts[n] for n in names]
    with pytest.raises(ValueError, match="hold no training patches"):
        federated.split_clients(labels, 4, "hospital", hospitals=owner)


def test_group_metrics_per_hospital():
    y_true, y_pred = np.array([0, 1, 0, 1, 0, 0]), np.array([0, 1, 1, 1, 0, 0])
    out = federated.group_metrics(y_true, y_pred, np.array([0, 0, 0, 0, 1, 1]), ["A", "B"])
    assert out["A_n"] == 4 and out["A_acc"] == 0.75 and out["A_balanced_acc"] == 0.75
    assert out["B_acc"] == 1.0 and np.isnan(out["B_balanced_acc"])       # one class only: undefined


def test_fedbn_client_keeps_its_own_batchnorm():
    client = _client()
    model = BreastCancerCNN(16)
    bn = federated.bn_keys(model)
    assert len(bn) == 15 and all(k.startswith("features.") for k in bn)    # 3 layers x 5 entries
    first = client.fit(model.state_dict(), 1, 1, 1e-3)["state"]
    without_bn = {k: v for k, v in model.state_dict().items() if k not in bn}
    second = client.fit(without_bn, 2, 1, 1e-3)["state"]
    # the client's BatchNorm carried on from its own round 1 (it was not reset to the sent model's)
    assert second["features.3.num_batches_tracked"].item() == 2 * first["features.3.num_batches_tracked"].item()
    with pytest.raises(KeyError, match="lacks"):
        client.fit({**without_bn, "extra.weight": torch.zeros(1)}, 3, 1, 1e-3)


def test_one_optimizer_carries_its_moments_across_calls():
    model = BreastCancerCNN(16)
    x, y = torch.randint(0, 255, (16, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 2, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        federated.train_epochs(model, x, y, epochs=1, lr=1e-3, batch_size=8, optimizer=opt)
    assert int(opt.state[model.features[0].weight]["step"]) == 4            # 2 calls x 2 steps, one Adam


@pytest.mark.slow
def test_ray_wait_with_a_timeout_drops_a_hung_client():
    """The server's ``ray.wait(..., timeout=)`` returns without the hung client; its answer is left out."""
    ray = pytest.importorskip("ray")
    from labkit.distributed import ray_cluster

    with ray_cluster(None):
        actors = federated.remote_clients(2, 16, amp=False, batch_size=8, fail_client=1, fail_at_round=1,
                                          fail_mode="hang")
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 255, (16, 3, 16, 16), dtype=torch.uint8, generator=gen)
        ray.get([a.load_shard.remote(x, torch.randint(0, 2, (16,), generator=gen)) for a in actors])
        ref = ray.put(BreastCancerCNN(16).state_dict())
        futures = [a.fit.remote(ref, 1, 1, 1e-3) for a in actors]
        ready, late = ray.wait(futures, num_returns=2, timeout=30)
        assert ready == [futures[0]] and late == [futures[1]]             # the server goes on without it
        updates, failed = federated.collect_updates(ready, ["client 0"])
        assert len(updates) == 1 and not failed


def test_hospital_split_without_patient_ids_fails_at_the_parameter_cell(tmp_path, monkeypatch):
    """split='hospital' on the seed's 0/ 1/ layout (no patients) stops at the check cell, before any training."""
    from labcells import LABS, run_check_cell
    from PIL import Image

    from labkit.params import ParameterError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for c in (0, 1):
        (tmp_path / "seed" / str(c)).mkdir(parents=True)
        Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "seed" / str(c) / "a.png")
    lab = next(p for p in LABS if p.stem == "05_federated")
    with pytest.raises(ParameterError, match="'split' = 'hospital' needs patient ids"):
        run_check_cell(lab, split="hospital", data="real", data_dir=str(tmp_path / "seed"))
    assert run_check_cell(lab, split="iid", data="real", data_dir=str(tmp_path / "seed"))["cfg"].split == "iid"
