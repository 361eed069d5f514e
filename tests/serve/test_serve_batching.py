"""Concurrent requests to one model decode together: the same samples as alone, a bounded
queue (503 beyond it), requests that arrive during a batch join the next one, and a request
whose client went away leaves the queue (or, mid-batch, ends its rows)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from fastapi.testclient import TestClient
from serve_helpers import FakeBackend
from test_serve_queue import _wait

from sparsefusion.serve.app import create_app
from sparsefusion.serve.engine import GeneratorBackend
from sparsefusion.serve.models import ModelSlot
from sparsefusion.serve.params import Limits
from sparsefusion.serve.runs import RunCatalog


def _post_all(client: TestClient, bodies: list[dict]) -> list:
    out: list = [None] * len(bodies)

    def post(i: int) -> None:
        out[i] = client.post("/generate", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_waiting_requests_join_one_batch_and_the_queue_is_bounded(tiny_runs):
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    app = create_app(RunCatalog([tiny_runs["mot"]]), backend, Limits(queue_size=1, max_batch=4))
    client = TestClient(app)
    _, slot = app.state.pool.slot(app.state.catalog.get("mot"), None)
    first: list = []
    t = threading.Thread(target=lambda: first.append(_post_all(client, [{"run": "mot"}])))
    t.start()
    _wait(lambda: slot.admitted == 1 and slot.waiting == 0, "the first batch running")
    rest: list = []
    bodies = [{"run": "mot", "prompt": f"p{i}", "seed": i} for i in range(4)]
    t2 = threading.Thread(target=lambda: rest.extend(_post_all(client, bodies)))
    t2.start()
    _wait(lambda: slot.waiting == 4, "four requests waiting")  # 4 + 1 running = capacity 5
    full = client.post("/generate", json={"run": "mot"})
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    gate.set()
    t.join(30)
    t2.join(30)
    assert [r.status_code for r in rest] == [200] * 4
    assert [r.json()["samples"][0]["segments"][0]["text"] for r in rest] == [
        f"p{i} #0" for i in range(4)
    ]
    assert slot.batch_sizes == [1, 4]  # the four that arrived during a batch ran as one
    assert slot.admitted == 0


def test_concurrent_requests_get_what_each_gets_alone(tiny_runs):
    bodies = [
        {"run": "mot", "prompt": "The red", "seed": 1, "max_new_tokens": 12},
        {"run": "mot", "prompt": "A", "seed": 2, "max_new_tokens": 8, "temperature": 0.7},
        {"run": "mot", "prompt": "Two", "seed": 3, "max_new_tokens": 10, "top_k": 5},
        {"run": "mot", "mode": "text_to_image", "prompt": "blue", "seed": 4, "num_samples": 2},
        {"run": "mot", "prompt": "One", "seed": 5, "max_new_tokens": 9, "top_p": 0.8},
        {"run": "mot", "prompt": "The", "seed": 6, "max_new_tokens": 6, "temperature": 0},
    ]
    catalog = RunCatalog([tiny_runs["mot"]])

    def ids(responses) -> list[list[list[int]]]:
        assert [r.status_code for r in responses] == [200] * len(responses)
        return [[s["token_ids"] for s in r.json()["samples"]] for r in responses]

    batched = create_app(catalog, GeneratorBackend("cpu", "static"), Limits(max_batch=8))
    client = TestClient(batched)
    together = ids(_post_all(client, bodies))
    _, slot = batched.state.pool.slot(catalog.get("mot"), None)
    assert max(slot.batch_sizes) > 1  # some requests really shared a batch
    alone_app = create_app(catalog, GeneratorBackend("cpu", "eager"), Limits(max_batch=1))
    alone = ids([TestClient(alone_app).post("/generate", json=b) for b in bodies])
    assert together == alone


def test_a_request_that_leaves_the_queue_frees_its_place():
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    slot = ModelSlot(lambda: backend.load(SimpleNamespace(name="r"), 1), 1, max_batch=1)

    def params(seed: int):
        return SimpleNamespace(
            run="r", mode="text", prompt="x", seed=seed, num_samples=1, image=None
        )

    async def scenario() -> None:
        running = asyncio.ensure_future(slot.generate(params(0)))
        while not backend.models:
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(slot.generate(params(1)))
        while slot.waiting != 1:
            await asyncio.sleep(0.01)
        waiting.cancel()  # the client went away before its batch
        await asyncio.sleep(0.05)
        assert slot.waiting == 0 and slot.admitted == 1
        gate.set()
        samples, _, _ = await running
        assert len(samples) == 1

    asyncio.run(scenario())
    assert slot.batch_sizes == [1]  # the cancelled request never ran


def test_a_cancelled_request_ends_its_rows_and_spares_the_others(tiny_runs):
    from sparsefusion.generate import GenerationRequest, Generator

    gen = Generator.from_run(tiny_runs["mot"], step="static")
    reqs = [
        GenerationRequest(prompt="The red", seed=1, max_new_tokens=30),
        GenerationRequest(prompt="A", seed=2, max_new_tokens=30),
    ]
    gone, stays = threading.Event(), threading.Event()
    gone.set()
    out = gen.generate(reqs, [gone, stays])
    assert out[0].new_tokens == 0 and out[0].segments == []
    assert out[1].token_ids == gen.generate([reqs[1]])[0].token_ids
