"""A Ray Serve endpoint built like Lab 07's (labkit.labs.tune_serve.serving for decoding and validation, @serve.batch),
on 127.0.0.1 with a tiny model: a real test image gets the model's own answer as JSON; bad requests get a
4xx with a message and the endpoint keeps serving; it shuts down cleanly. Plus labkit.labs.tune_serve.serving's pure parts."""
from __future__ import annotations

import asyncio
import json
import math
import sys
import urllib.request

import numpy as np
import pytest
import torch
from ray import cloudpickle

from labkit.data import batch_transform
from labkit.data.alzheimer import load_alzheimer
from labkit.exercises.lab07 import reference_top_k
from labkit.labs.tune_serve import serving
from labkit.models.cnn import AlzheimerCNN

SIZE = 32
pytestmark = pytest.mark.slow
# Ray workers cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _model() -> AlzheimerCNN:
    torch.manual_seed(0)
    return AlzheimerCNN(num_classes=4, image_size=SIZE).eval()


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """Ray + Serve on 127.0.0.1 (a free port), one application with two replicas; shut down afterwards."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from labkit.distributed import ray_cluster

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class Tiny:
        def __init__(self, state, classes, max_bytes):
            torch.set_num_threads(1)
            self.model = AlzheimerCNN(num_classes=len(classes), image_size=SIZE)
            self.model.load_state_dict(state)
            self.model.eval()
            self.normalise, self.classes, self.max_bytes = batch_transform(train=False), classes, max_bytes

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def predict(self, images):
            with torch.inference_mode():
                probs = self.model(self.normalise(torch.stack(images))).float().softmax(1).tolist()
            return [(p, len(images)) for p in probs]

        async def __call__(self, request: Request):
            try:
                images = serving.decode_request(await request.body(), SIZE, self.max_bytes)
            except serving.RequestError as err:
                return JSONResponse(err.answer(), status_code=err.status)
            answers = await asyncio.gather(*(self.predict(im) for im in images))
            return {"predictions": [reference_top_k(p, self.classes, 3) for p, _ in answers],
                    "batch_sizes": [b for _, b in answers]}

    ds = load_alzheimer(data="auto", image_size=SIZE, max_train=8, max_test=12, seed=0, progress=False)
    port = serving.free_port()
    with ray_cluster(None) as cluster:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(Tiny.options(num_replicas=2).bind(_model().state_dict(), list(ds.classes), 64 * 1024),
                      name="tiny", route_prefix="/classify")
            yield {"url": f"http://127.0.0.1:{port}/classify", "port": port, "ds": ds, "cluster": cluster}
        finally:
            serve.shutdown()
    # clean shutdown: nothing listens on the port any more
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/classify", timeout=3)


def _expected(image: torch.Tensor, classes) -> dict:
    with torch.inference_mode():
        probs = _model()(batch_transform(train=False)(image[None])).softmax(1)[0]
    return reference_top_k(probs, classes, 3)


def test_real_image_gets_the_models_answer(endpoint):
    ds = endpoint["ds"]
    images = ds["test"].images
    status, answer = serving.post(endpoint["url"], serving.request_body([images[0]]))
    assert status == 200, answer
    want = _expected(images[0], ds.classes)
    got = answer["predictions"][0]
    assert got["class"] == want["class"]
    assert [e["class"] for e in got["top_k"]] == [e["class"] for e in want["top_k"]]
    assert np.allclose([e["probability"] for e in got["top_k"]], [e["probability"] for e in want["top_k"]], atol=1e-4)
    # several images in one request: one prediction each, in order
    status, answer = serving.post(endpoint["url"], serving.request_body(list(images[:5])))
    assert status == 200 and [p["class"] for p in answer["predictions"]] == [
        _expected(im, ds.classes)["class"] for im in images[:5]]
    assert max(answer["batch_sizes"]) > 1, "the five images of one request went through @serve.batch together"


@pytest.mark.parametrize("what, body, status, words", [
    ("empty body", b"", 400, "empty"),
    ("not JSON", b"\x89PNG not json", 400, "not JSON"),
    ("wrong field", json.dumps({"picture": "x"}).encode(), 400, '"image"'),
    ("bad base64", json.dumps({"image": "***"}).encode(), 400, "base64"),
    ("not an image", json.dumps({"image": "aGVsbG8gd29ybGQ="}).encode(), 415, "not an image"),
    ("wrong size", serving.request_body([torch.zeros(1, SIZE * 2, SIZE, dtype=torch.uint8)]), 422, f"{SIZE}×{SIZE}"),
    ("huge body", b"{" + b" " * (64 * 1024) + b"}", 413, "over the limit"),
])
def test_bad_requests_get_4xx_with_a_message_and_serving_goes_on(endpoint, what, body, status, words):
    got, answer = serving.post(endpoint["url"], body)
    assert got == status, (what, got, answer)
    assert words in answer["error"], answer
    ok, answer = serving.post(endpoint["url"], serving.request_body([endpoint["ds"]["test"].images[1]]))
    assert ok == 200 and answer["predictions"][0]["class"] in endpoint["ds"].classes


def test_load_test_counts_percentiles_and_batch_sizes(endpoint):
    bodies = [serving.request_body([im]) for im in endpoint["ds"]["test"].images[:4]]
    res = serving.load_test(endpoint["url"], bodies, requests=12, rate_per_s=40, seed=1, time_limit_s=60)
    assert res.requests == 12 and res.ok == 12 and res.errors == 0 and res.cut == 0
    assert 0 < res.p50_ms <= res.p95_ms <= res.p99_ms and res.requests_per_s > 0 and res.offered_per_s == 40
    assert len(res.batch_sizes) == 12 and all(1 <= b <= 8 for b in res.batch_sizes), res.batch_sizes
    assert 1 <= res.mean_batch_per_pass <= res.mean_batch_size <= res.max_batch_formed <= 8
    assert "batch_sizes" not in res.row(x=1) and res.row(x=1)["x"] == 1
    bad = serving.load_test(endpoint["url"], [b""], requests=3, rate_per_s=math.inf, time_limit_s=60)
    assert bad.ok == 0 and bad.errors == 3 and np.isnan(bad.p50_ms) and np.isnan(bad.mean_batch_size)


def test_time_cap_cuts_and_says_so(endpoint):
    """Six requests at 2/s are due at 0, 0.5, … 2.5 s; with a 1 s cap those due after it are never sent."""
    body = [serving.request_body([endpoint["ds"]["test"].images[0]])]
    res = serving.load_test(endpoint["url"], body, requests=6, rate_per_s=2, arrivals="fixed", time_limit_s=1.0)
    assert res.cut >= 3 and res.ok + res.errors + res.cut == 6 and res.ok >= 1, res


# --------------------------------------------------------------------------- pure parts, no server
def test_schedule_is_open_loop_and_checked():
    fixed = serving.schedule(5, 10, "fixed")
    assert np.allclose(fixed, [0, 0.1, 0.2, 0.3, 0.4])
    poisson = serving.schedule(4000, 50, "poisson", seed=3)
    gaps = np.diff(poisson)
    assert poisson[0] == 0 and (gaps >= 0).all() and abs(gaps.mean() - 1 / 50) < 0.002
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1, "exponential gaps: spread equal to the mean"
    assert np.array_equal(poisson, serving.schedule(4000, 50, "poisson", seed=3))
    assert not serving.schedule(3, math.inf).any()
    with pytest.raises(ValueError, match="rate_per_s"):
        serving.schedule(3, 0)
    with pytest.raises(ValueError, match="arrivals"):
        serving.schedule(3, 1, "bursty")


def test_decode_round_trip_and_limits():
    img = torch.randint(0, 256, (1, SIZE, SIZE), dtype=torch.uint8)
    out = serving.decode_request(serving.request_body([img, img]), SIZE)
    assert len(out) == 2 and torch.equal(out[0], img)
    with pytest.raises(serving.RequestError) as err:
        serving.decode_request(serving.request_body([img] * 3), SIZE, max_images=2)
    assert err.value.status == 400 and "at most 2" in str(err.value)
    with pytest.raises(serving.RequestError) as err:
        serving.decode_request(b"x" * 11, SIZE, max_bytes=10)
    assert err.value.status == 413 and "11 bytes" in str(err.value)


def test_load_test_refuses_other_hosts():
    with pytest.raises(ValueError, match="only targets this machine"):
        serving.load_test("http://example.org/classify", [b"{}"], requests=1, rate_per_s=1)
