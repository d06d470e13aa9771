"""labkit.distributed.ddp: launching ranks, errors that name the rank, no process left behind, reductions, checkpoints."""
from __future__ import annotations

import os
import signal
import socket
import threading

import psutil
import pytest
import torch

from labkit.distributed import ddp


def _rank_children() -> list[psutil.Process]:
    """Live spawned children of this process (multiprocessing's resource tracker does not count)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def _assert_no_ranks_left() -> None:
    alive = [pid for pid in ddp.last_pids if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"rank processes still running: {alive}"
    assert not ddp.running(), "ddp.running() must agree"
    assert not _rank_children(), f"spawned children still running: {_rank_children()}"


def test_free_port_is_bindable():
    import socket
    port = ddp.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_world_size_is_checked():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="world_size"):
            ddp.launch(ddp.hello, bad)


def test_backend_choice_on_cpu():
    assert ddp.choose_backend("cpu", 2) == ("gloo", "cpu")
    with pytest.raises(ValueError, match="nccl"):
        ddp.choose_backend("cpu", 2, backend="nccl")


def test_reductions_without_process_group():
    stats = {"loss": 2.0, "acc": 0.5, "images": 10, "seconds": 2.0}
    out = ddp.reduce_metrics(stats, ("loss", "acc"))
    assert out == {"loss": 2.0, "acc": 0.5, "images": 10, "seconds": 2.0, "images_per_s": 5.0}


def test_checkpoint_round_trip_weights_only(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "history": [{"epoch": 1, "loss": 1.5}],
             "config": {"a": "b"}}
    path = ddp.save_checkpoint(tmp_path / "ck" / "last.pt", state)
    back = ddp.load_checkpoint(path)
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], state["model"]["w"])
    assert not [p for p in path.parent.iterdir() if p.name != "last.pt"], "temporary files left behind"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ddp.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        ddp.load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.slow
def test_two_ranks_all_reduce_and_events():
    events = []
    out = ddp.launch(ddp.hello, 2, device="cpu", on_event=events.append)
    assert out == {"world_size": 2, "rank_sum": 1.0, "backend": "gloo", "device": "cpu"}
    _assert_no_ranks_left()


@pytest.mark.slow
def test_failing_rank_reaches_caller_and_stops_all():
    # Rank 0 waits in all_reduce for rank 1, which raises: the error must name rank 1, carry its
    # traceback, and rank 0 must not be left hanging.
    with pytest.raises(ddp.DDPError) as info:
        ddp.launch(ddp.hello, 2, (1,), device="cpu", timeout_s=60)
    err = info.value
    assert err.rank == 1
    assert "DDP rank 1 of 2 failed" in str(err) and "failed on purpose" in str(err)
    assert "Traceback" in err.remote_traceback
    _assert_no_ranks_left()
    with socket.socket() as sock:          # the rendezvous port is free again (no rank holds it)
        # SO_REUSEADDR, as a new rendezvous server sets it: a port left in TIME_WAIT by the closed connections
        # is free (this kernel refuses a plain bind then); one that a live rank still listens on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", ddp.last_port[0]))


@pytest.mark.slow
def test_missing_peer_times_out_instead_of_hanging():
    # Rank 0 sleeps far longer than the timeout: rank 1's all_reduce must fail, not wait forever.
    with pytest.raises(ddp.DDPError) as info:
        ddp.launch(ddp.hello, 2, (None, 0, 120.0), device="cpu", timeout_s=3)
    assert info.value.rank == 1
    assert "timed out" in str(info.value).lower()
    _assert_no_ranks_left()


@pytest.mark.slow
def test_keyboard_interrupt_leaves_no_process():
    # Python's own SIGINT handler for the test (■ in a notebook, Ctrl-C in a shell): in the full suite an earlier
    # test's library (Ray, the kernel machinery) can leave another handler installed, and the signal was swallowed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            ddp.launch(ddp.hello, 2, (None, 0, 120.0), device="cpu")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    _assert_no_ranks_left()


def _killed_rank(rank: int, world_size: int, device) -> None:
    """Rank 1 dies from a signal (as the kernel's OOM killer would do); rank 0 waits in all_reduce."""
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(1)
    torch.distributed.all_reduce(t)


@pytest.mark.slow
def test_rank_killed_by_a_signal_is_named():
    with pytest.raises(ddp.DDPError) as info:
        ddp.launch(_killed_rank, 2, device="cpu", timeout_s=60)
    assert info.value.rank == 1 and "SIGKILL" in str(info.value)
    _assert_no_ranks_left()


def test_broadcast_buffers_is_a_no_op_without_a_process_group():
    """Outside DDP nothing to align (the 2-rank check of the buffers is in tests/labs/test_lab03.py)."""
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(2.0)
    assert ddp.broadcast_buffers(bn) == 0 and torch.all(bn.running_mean == 2.0)


@pytest.mark.slow
def test_torchrun_streams_lines_while_the_job_runs_and_names_a_failure(tmp_path):
    """The job prints "ready", then waits for a file that only the caller's line handler writes on seeing it:
    held-back output would leave the job waiting (it gives up and fails); streamed output lets it finish."""
    flag = tmp_path / "seen"
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys, time, pathlib\n"
        "flag = pathlib.Path(sys.argv[1])\n"
        "if os.environ['RANK'] == '0':\n"
        "    print('ready', flush=True)\n"
        "    deadline = time.time() + 120\n"
        "    while not flag.exists() and time.time() < deadline:\n"
        "        time.sleep(0.1)\n"
        "    print('done' if flag.exists() else 'never seen', flush=True)\n"
        "    sys.exit(0 if flag.exists() else 3)\n")
    seen = []

    def on_line(line: str) -> None:
        seen.append(line)
        if line == "ready":
            flag.write_text("yes")

    last = ddp.torchrun(script, [str(flag)], 1, device="cpu", on_line=on_line)
    assert "ready" in seen and "done" in seen and "done" in last
    script.write_text("import sys\nprint('about to fail', flush=True)\nsys.exit('the job broke on purpose')\n")
    with pytest.raises(RuntimeError, match="exit code") as info:
        ddp.torchrun(script, [], 1, device="cpu", on_line=None)
    assert "about to fail" in str(info.value) and "job.py" in str(info.value)
