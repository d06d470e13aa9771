"""Ray Serve request batching: requests/s with and without ``@serve.batch``, as a ratio measured in one run.

    .venv/bin/python benchmarks/serve.py                  # ~1-2 min on 2 CPU cores
    .venv/bin/python benchmarks/serve.py --requests 400 --image-size 128 --replicas 2

One Ray cluster, Serve on 127.0.0.1 (a free port), Lab 01's ``AlzheimerCNN`` (untrained: speed does not
depend on the weights) in a deployment like Lab 07's. The same deployment class runs twice: with
``@serve.batch`` grouping up to ``--max-batch-size`` requests, and with the batch limit set to 1 (each
request its own forward pass). Each side is warmed up, then ``labkit.labs.tune_serve.serving.load_test`` sends the same
number of one-image requests from ``--clients`` threads; the two sides alternate ``--rounds`` times and the
medians are compared, so a slow drift of a shared machine hits both.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics

import torch

from labkit.data import batch_transform
from labkit.distributed import ray_cluster
from labkit.labs.tune_serve import serving
from labkit.models.cnn import AlzheimerCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    size = args.image_size

    @serve.deployment
    class Classifier:
        def __init__(self, max_batch_size: int, wait_s: float):
            torch.set_num_threads(1)
            torch.manual_seed(0)
            self.model = AlzheimerCNN(num_classes=4, image_size=size).eval()
            self.normalise = batch_transform(train=False)
            self.predict.set_max_batch_size(max_batch_size)
            self.predict.set_batch_wait_timeout_s(wait_s)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def predict(self, images):
            with torch.inference_mode():
                return self.model(self.normalise(torch.stack(images))).softmax(1).tolist()

        async def __call__(self, request: Request):
            try:
                images = serving.decode_request(await request.body(), size)
            except serving.RequestError as err:
                return JSONResponse(err.answer(), status_code=err.status)
            return {"probs": await asyncio.gather(*(self.predict(im) for im in images))}

    bodies = [serving.request_body([torch.randint(0, 256, (1, size, size), dtype=torch.uint8)]) for _ in range(16)]
    port = serving.free_port()
    url = f"http://127.0.0.1:{port}/classify"
    rates: dict[str, list[float]] = {"batched": [], "unbatched": []}
    with ray_cluster(None) as cluster:
        cpus = cluster["cpus"]
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        try:
            for _ in range(args.rounds):
                for name, limit in (("batched", args.max_batch_size), ("unbatched", 1)):
                    app = Classifier.options(num_replicas=args.replicas,   # a batch can only fill up to max_ongoing_requests
                                             max_ongoing_requests=max(8, 2 * args.max_batch_size),
                                             ray_actor_options={"num_cpus": min(1.0, cpus / args.replicas)})
                    serve.run(app.bind(limit, args.batch_wait_timeout_s if limit > 1 else 0.0),
                              name="bench", route_prefix="/classify",
                              logging_config={"log_level": "WARNING", "enable_access_log": False})
                    serving.load_test(url, bodies, requests=16, concurrency=4, time_limit_s=30)    # warm-up
                    res = serving.load_test(url, bodies, requests=args.requests, concurrency=args.clients,
                                            time_limit_s=120)
                    if res.errors:
                        raise RuntimeError(f"{name}: {res.errors} of {res.requests} requests failed")
                    rates[name].append(res.requests_per_s)
                    print(f"{name:>9}: {res.requests_per_s:7.1f} req/s   p50 {res.p50_ms:6.1f} ms   "
                          f"p99 {res.p99_ms:6.1f} ms")
        finally:
            serve.shutdown()
    batched, unbatched = statistics.median(rates["batched"]), statistics.median(rates["unbatched"])
    print(f"\n{args.replicas} replica(s), {args.clients} clients, {size} px, max_batch_size {args.max_batch_size}: "
          f"@serve.batch {batched:.1f} vs {unbatched:.1f} req/s without → {batched / unbatched:.2f}× "
          f"(medians of {args.rounds} alternating rounds, {args.requests} requests each)")


if __name__ == "__main__":
    main()
