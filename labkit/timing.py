"""Timing helpers: a d2l-style :class:`Timer` and throughput arithmetic."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so a timer measures it (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Record several running times.

    >>> t = Timer(); t.start(); _ = sum(range(1000)); t.stop() >= 0
    True
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._tik: float | None = None

    def start(self) -> None:
        """Start the timer."""
        self._tik = time.perf_counter()

    def stop(self) -> float:
        """Stop the timer, record the elapsed time and return it."""
        if self._tik is None:
            raise RuntimeError("Timer.stop() called before Timer.start()")
        self.times.append(time.perf_counter() - self._tik)
        self._tik = None
        return self.times[-1]

    def avg(self) -> float:
        """Average of the recorded times (0 when none)."""
        return sum(self.times) / len(self.times) if self.times else 0.0

    def sum(self) -> float:
        """Sum of the recorded times."""
        return sum(self.times)

    def cumsum(self) -> list[float]:
        """Running totals of the recorded times."""
        out, total = [], 0.0
        for t in self.times:
            total += t
            out.append(total)
        return out

    @contextmanager
    def __call__(self) -> Iterator["Timer"]:
        """``with timer(): ...`` times the block."""
        self.start()
        try:
            yield self
        finally:
            self.stop()


@contextmanager
def timed(device: torch.device | str | None = None) -> Iterator[dict]:
    """``with timed() as t: ...`` then ``t["seconds"]``; synchronises the GPU around the block."""
    out: dict = {}
    sync(device)
    tik = time.perf_counter()
    try:
        yield out
    finally:
        sync(device)
        out["seconds"] = time.perf_counter() - tik


def throughput(items: int, seconds: float) -> float:
    """Items per second (0 when no time passed)."""
    return items / seconds if seconds > 0 else 0.0


def format_seconds(seconds: float) -> str:
    """``75.2`` → ``'1m 15s'``; ``3.21`` → ``'3.2s'``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"
