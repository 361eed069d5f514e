"""One generation at a time per model, a bounded queue (full: 503), models loaded once."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from serve_helpers import STEPS, FakeBackend

from sparsefusion.serve.app import create_app
from sparsefusion.serve.params import Limits
from sparsefusion.serve.runs import RunCatalog


def _wait(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture()
def gated(tiny_runs):
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    catalog = RunCatalog([tiny_runs["mot"], tiny_runs["dense"]])
    app = create_app(catalog, backend, Limits(queue_size=2, max_batch=1))
    yield app, backend, gate, catalog
    gate.set()


def _post_in_thread(client: TestClient, run: str, results: list) -> threading.Thread:
    def post() -> None:
        results.append(client.post("/generate", json={"run": run, "prompt": "hi"}).status_code)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_full_queue_answers_503_and_models_run_one_job_at_a_time(gated):
    app, backend, gate, catalog = gated
    client = TestClient(app)
    _, slot = app.state.pool.slot(catalog.get("mot"), None)
    results: list[int] = []
    threads = [_post_in_thread(client, "mot", results) for _ in range(3)]  # 1 running + 2 queued
    _wait(lambda: slot.admitted == 3, "three admitted requests")
    full = client.post("/generate", json={"run": "mot"})
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert "busy" in full.json()["error"]
    # Another model has its own slot: it starts while mot is still busy.
    threads.append(_post_in_thread(client, "dense", results))
    _wait(lambda: ("dense", STEPS) in backend.models, "the dense model")
    _wait(lambda: backend.models[("dense", STEPS)].running[0] == 1, "dense generating")
    assert backend.models[("mot", STEPS)].running[0] == 1  # only one mot job runs
    gate.set()
    for t in threads:
        t.join(30)
    assert results == [200] * 4
    assert backend.models[("mot", STEPS)].running[1] == 1  # never two at once
    assert sorted(backend.loads) == [("dense", STEPS), ("mot", STEPS)]  # loaded once each
    assert slot.admitted == 0
    assert client.post("/generate", json={"run": "mot"}).status_code == 200  # queue drained


def test_queue_size_zero_admits_one(tiny_runs):
    gate = threading.Event()
    app = create_app(
        RunCatalog([tiny_runs["mot"]]), FakeBackend(gate=gate), Limits(queue_size=0, max_batch=1)
    )
    client = TestClient(app)
    results: list[int] = []
    thread = _post_in_thread(client, "mot", results)
    _, slot = app.state.pool.slot(app.state.catalog.get("mot"), None)
    _wait(lambda: slot.admitted == 1, "one admitted request")
    assert client.post("/generate", json={"run": "mot"}).status_code == 503
    gate.set()
    thread.join(30)
    assert results == [200]
