"""The Ray cluster a lab starts (``labkit.distributed.ray_cluster``) is for this machine only: no dashboard on
0.0.0.0, and the node address Ray will bind to is the loopback address. ``ray.init`` is mocked: nothing starts.

Measured on Ray 2.60 (see the reliability report): a plain ``ray.init(address="local")`` on Linux picks the
machine's routable IP as its node address, and passing ``_node_ip_address="127.0.0.1"`` does not change that —
Ray rewrites a loopback address to the routable one (``services.resolve_ip_for_localhost``). So the loopback test
below asks Ray which address it *would* use, not which argument labkit passed."""
from __future__ import annotations

import ipaddress

import pytest

from labkit import distributed

pytestmark = pytest.mark.usefixtures("isolated_course")


@pytest.fixture
def init_calls(monkeypatch):
    """Every ``ray.init`` call's keyword arguments, plus the node address Ray would have chosen at that moment."""
    import ray
    from ray._private import services

    calls = []

    def fake_init(**kwargs):
        given = kwargs.get("_node_ip_address")
        node_ip = services.resolve_ip_for_localhost(given) if given else services.get_node_ip_address()
        calls.append({**kwargs, "__node_ip__": node_ip})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(distributed, "cluster_resources", lambda: {"node_cpus": [2], "gpus": 0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_a_local_cluster_starts_once_without_a_public_dashboard(init_calls):
    with distributed.ray_cluster() as info:
        assert info["address"] == "local"
    [kwargs] = init_calls
    assert kwargs["address"] == "local"
    assert kwargs.get("include_dashboard") is False or kwargs.get("dashboard_host", "127.0.0.1") in ("127.0.0.1", "localhost")
    assert kwargs.get("dashboard_host") != "0.0.0.0"
    assert kwargs.get("ray_client_server_port") is None, "no Ray Client server for a local lab cluster"


def test_the_local_cluster_binds_to_loopback(init_calls):
    with distributed.ray_cluster():
        pass
    [kwargs] = init_calls
    assert ipaddress.ip_address(kwargs["__node_ip__"]).is_loopback, f"node address {kwargs['__node_ip__']}"
