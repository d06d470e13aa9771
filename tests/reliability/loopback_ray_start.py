"""``ray start`` for a node of a multi-node cluster that listens on 127.0.0.1 only (used by loopback_cluster.py).

On Linux, Ray's Python side rewrites ``--node-ip-address=127.0.0.1`` to the machine's routable address (where
every port then listens), and only its single-machine mode keeps 127.0.0.1 — a mode that refuses to add a
second node. Here the node's processes get the single-machine setting (they bind and report 127.0.0.1), while
this ``ray start`` process keeps the multi-node switch on and its address lookups on loopback.

    python loopback_ray_start.py --head --port=P ...         # the same arguments as `ray start`
"""
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # inherited by the raylet, GCS, agents and workers

from ray._private import ray_constants, services  # noqa: E402

ray_constants.ENABLE_RAY_CLUSTER = True                  # allow `--address=…` (a second node) in this process
services.get_node_ip_address = lambda address=None: "127.0.0.1"
services.resolve_ip_for_localhost = lambda host: host

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["ray", "start", *sys.argv[1:]]
    main()
