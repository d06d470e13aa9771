"""Lab 07's serving plumbing: decode and validate a request, build the JSON answer, load-test a
loopback endpoint.

The Ray Serve deployment itself (the class, ``@serve.batch``, the replicas) is written in the
notebook; this module keeps what every endpoint repeats:

- :func:`decode_request` — the HTTP body (JSON ``{"image": "<base64 PNG>"}`` or ``{"images": [...]}``)
  → uint8 tensors ``[1, H, W]``, or a :class:`RequestError` carrying a 4xx status and a message
  that names the problem (empty body, body over the size limit, not JSON, not an image, wrong size).
- :func:`encode_png` / :func:`request_body` — the client side: a uint8 image → base64 PNG → body.
- :func:`load_test` — an open-loop load test against ``127.0.0.1`` only: requests sent on a schedule
  (Poisson or fixed rate) whatever the answers, a time cap whose cut is counted; p50/p95/p99 latency,
  requests per second and the batch sizes the server formed.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from labkit.distributed.local_ray import free_port  # noqa: F401  (re-exported: the port the Serve endpoint binds on 127.0.0.1)

#: Largest request body the endpoint accepts (bytes): a 128 px grayscale PNG is a few kB, a batch of
#: 64 of them well under 1 MB. Bodies over the limit get HTTP 413.
MAX_BODY_BYTES = 2 * 1024 * 1024
#: Most images one request may carry.
MAX_IMAGES = 64
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RequestError(ValueError):
    """A bad request: ``status`` is the HTTP status to answer (4xx), the message says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def answer(self) -> dict[str, Any]:
        """The JSON body of the error answer."""
        return {"error": str(self), "status": self.status}


def encode_png(image: torch.Tensor | np.ndarray) -> str:
    """A uint8 image (``[H, W]``, ``[1, H, W]`` or ``[3, H, W]``) as a base64-encoded PNG string."""
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png: need uint8 pixels, got {arr.dtype}; convert the cached images, not normalised floats.")
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def request_body(images: Sequence[torch.Tensor | np.ndarray]) -> bytes:
    """The JSON body for one image (``{"image": ...}``) or several (``{"images": [...]}``)."""
    encoded = [encode_png(im) for im in images]
    payload = {"image": encoded[0]} if len(encoded) == 1 else {"images": encoded}
    return json.dumps(payload).encode()


def _decode_one(text: Any, index: int, image_size: int) -> torch.Tensor:
    where = f"image {index}"
    if not isinstance(text, str) or not text:
        raise RequestError(400, f"{where}: expected a non-empty base64 string, got {type(text).__name__}.")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: not valid base64; send the PNG file's bytes base64-encoded.") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            gray = im.convert("L")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise RequestError(415, f"{where}: the decoded bytes are not an image PIL can read (send a PNG or JPEG).") from None
    if gray.size != (image_size, image_size):
        raise RequestError(422, f"{where}: is {gray.size[0]}×{gray.size[1]} px; this model takes "
                                f"{image_size}×{image_size} px grayscale images — resize before sending.")
    return torch.from_numpy(np.asarray(gray, dtype=np.uint8).copy()).unsqueeze(0)


def decode_request(body: bytes, image_size: int, max_bytes: int = MAX_BODY_BYTES,
                   max_images: int = MAX_IMAGES) -> list[torch.Tensor]:
    """The images of one request body as uint8 tensors ``[1, image_size, image_size]``.

    Raises :class:`RequestError` with 400 (empty, not JSON, wrong fields, bad base64, too many
    images), 413 (body over ``max_bytes``), 415 (not an image) or 422 (wrong image size).
    """
    if not body:
        raise RequestError(400, 'empty request body; send JSON {"image": "<base64 PNG>"} or {"images": [...]}.')
    if len(body) > max_bytes:
        raise RequestError(413, f"request body is {len(body):,} bytes, over the limit of {max_bytes:,}; "
                                f"send fewer images per request.")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError(400, 'the body is not JSON; send {"image": "<base64 PNG>"} or {"images": [...]}.') from None
    if not isinstance(payload, dict) or ("image" in payload) == ("images" in payload):
        raise RequestError(400, 'the JSON must be an object with exactly one of "image" (one base64 PNG) or '
                                '"images" (a list of them).')
    items = [payload["image"]] if "image" in payload else payload["images"]
    if not isinstance(items, list) or not items:
        raise RequestError(400, '"images" must be a non-empty list of base64 PNG strings.')
    if len(items) > max_images:
        raise RequestError(400, f'"images" holds {len(items)} images; at most {max_images} per request.')
    return [_decode_one(text, i, image_size) for i, text in enumerate(items)]


# --------------------------------------------------------------------------- the load test
def check_loopback(url: str) -> None:
    """Refuse anything but a loopback URL: the lab's load tests never leave this machine."""
    host = urllib.parse.urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"url={url!r}: the load test only targets this machine ({', '.join(LOOPBACK)}); got host {host!r}.")


def post(url: str, body: bytes, timeout_s: float = 30.0) -> tuple[int, dict]:
    """POST ``body`` (JSON) to a loopback ``url``; ``(status, decoded JSON answer)``, also for 4xx/5xx."""
    check_loopback(url)
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        answer = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        answer = {"raw": raw.decode(errors="replace")[:500]}
    return status, answer


@dataclass
class LoadResult:
    """What one open-loop load test measured (latencies in milliseconds, from each request's *scheduled* send
    time). ``requests`` were planned; ``cut`` of them were never sent because the time cap had passed, so
    ``ok + errors + cut == requests``. ``mean_batch_size`` is the batch size the answered requests rode in
    (a request's view, from the answers' ``batch_size``); ``mean_batch_per_pass`` the mean size of the
    forward passes (each batch counted once: answered requests / Σ 1/size). NaN when the answers carry none."""

    requests: int
    ok: int
    errors: int
    cut: int
    seconds: float
    offered_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests_per_s: float
    max_send_lag_ms: float
    mean_batch_size: float
    mean_batch_per_pass: float
    max_batch_formed: int
    batch_sizes: list[int] = field(default_factory=list, repr=False)

    def row(self, **labels: Any) -> dict[str, Any]:
        """A table row: ``labels`` first, then the measurements (the per-request batch sizes left out)."""
        return {**labels, **{k: v for k, v in self.__dict__.items() if k != "batch_sizes"}}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100, linear interpolation) of ``values``; NaN when empty."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def schedule(requests: int, rate_per_s: float, arrivals: str = "poisson", seed: int = 0) -> np.ndarray:
    """Send times (seconds from the start) of ``requests`` requests offered at ``rate_per_s`` on average:
    ``"poisson"`` (independent arrivals: exponential gaps, as many users acting alone), ``"fixed"`` (one every
    ``1 / rate_per_s`` s) or, with ``rate_per_s=inf``, all at once (a burst)."""
    if requests < 1 or not rate_per_s > 0:
        raise ValueError(f"schedule: need requests >= 1 (got {requests}) and rate_per_s > 0 (got {rate_per_s}).")
    if arrivals not in ("poisson", "fixed"):
        raise ValueError(f"schedule: arrivals={arrivals!r}; use 'poisson' or 'fixed'.")
    if math.isinf(rate_per_s):
        return np.zeros(requests)
    if arrivals == "fixed":
        return np.arange(requests) / rate_per_s
    gaps = np.random.default_rng(seed).exponential(1 / rate_per_s, requests)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def load_test(url: str, bodies: Sequence[bytes], requests: int, rate_per_s: float, arrivals: str = "poisson",
              seed: int = 0, max_in_flight: int = 64, time_limit_s: float = 60.0, timeout_s: float = 30.0) -> LoadResult:
    """An **open-loop** load test of a loopback ``url``: ``requests`` POSTs (cycling through ``bodies``) sent on
    a schedule fixed in advance (:func:`schedule`), whatever the server answers.

    A closed loop (N clients, each waiting for its answer before sending again) slows down with the server
    and so hides how slow it is (*coordinated omission*). Here the send times do not depend on the answers;
    up to ``max_in_flight`` requests are open at once, and a request that must wait for a free sender still
    has its latency counted from its scheduled time. Requests whose turn comes after ``time_limit_s`` are not
    sent and are counted as ``cut``; those sent are waited for (at most ``timeout_s`` each). Answers carrying
    ``"batch_sizes"`` (the batch each image rode in) give the formed batch sizes.
    """
    check_loopback(url)
    if not bodies or max_in_flight < 1:
        raise ValueError(f"load_test: need at least one body and max_in_flight >= 1 (got {max_in_flight}).")
    times = schedule(requests, rate_per_s, arrivals, seed)
    lock = threading.Lock()
    latencies: list[float] = []
    sizes: list[int] = []
    lags: list[float] = []
    counts = {"errors": 0, "cut": 0}
    start = time.perf_counter() + 0.05
    deadline = start + time_limit_s

    def send(i: int) -> None:
        due = start + times[i]
        now = time.perf_counter()
        if now > deadline:
            with lock:
                counts["cut"] += 1
            return
        try:
            status, answer = post(url, bodies[i % len(bodies)], timeout_s)
        except OSError:
            status, answer = 0, {}
        took = (time.perf_counter() - due) * 1000
        with lock:
            lags.append(max(0.0, now - due) * 1000)
            if status == 200:
                latencies.append(took)
                sizes.extend(int(b) for b in answer.get("batch_sizes", []) if isinstance(b, int))
            else:
                counts["errors"] += 1

    with ThreadPoolExecutor(max_in_flight) as pool:
        futures = []
        for i, t in enumerate(times):
            wait = start + t - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            futures.append(pool.submit(send, i))
        for future in futures:
            future.result()
    seconds = time.perf_counter() - start
    per_pass = len(sizes) / sum(1 / b for b in sizes) if sizes else float("nan")
    return LoadResult(requests=requests, ok=len(latencies), errors=counts["errors"], cut=counts["cut"],
                      seconds=seconds, offered_per_s=float(rate_per_s),
                      p50_ms=percentile(latencies, 50), p95_ms=percentile(latencies, 95),
                      p99_ms=percentile(latencies, 99), requests_per_s=len(latencies) / seconds if seconds else 0.0,
                      max_send_lag_ms=max(lags, default=0.0),
                      mean_batch_size=float(np.mean(sizes)) if sizes else float("nan"), mean_batch_per_pass=per_pass,
                      max_batch_formed=max(sizes, default=0), batch_sizes=sizes)


__all__ = ["MAX_BODY_BYTES", "MAX_IMAGES", "RequestError", "encode_png", "request_body", "decode_request",
           "check_loopback", "post", "LoadResult", "schedule", "load_test", "percentile", "free_port"]
