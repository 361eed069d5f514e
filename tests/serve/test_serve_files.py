"""Files are served only from inside the run folders (``../``, absolute paths, symlinks)."""

from __future__ import annotations

import http.client

import pytest
from fastapi.testclient import TestClient
from serve_helpers import FakeBackend, LiveServer

from sparsefusion.serve.app import create_app
from sparsefusion.serve.paths import UnsafePath, safe_file
from sparsefusion.serve.runs import RunCatalog

SECRET = "top secret, outside every run folder"


@pytest.fixture()
def served(run_copy):
    (run_copy.parent / "secret.txt").write_text(SECRET)
    (run_copy / "leak.txt").symlink_to(run_copy.parent / "secret.txt")
    (run_copy / "notes.txt").write_text("inside")
    return run_copy, create_app(RunCatalog([run_copy]), FakeBackend())


def test_safe_file_refuses_everything_outside_the_folder(served):
    run, _ = served
    assert safe_file(run, "notes.txt") == (run / "notes.txt").resolve()
    assert safe_file(run, "checkpoints/../notes.txt").name == "notes.txt"
    for bad in (
        "../secret.txt",
        "a/../../secret.txt",
        "/etc/passwd",
        "leak.txt",
        "checkpoints",
        "checkpoints/step_00000006/model.safetensors",
        "missing.txt",
        "",
    ):
        with pytest.raises(UnsafePath):
            safe_file(run, bad)


@pytest.mark.parametrize(
    "url",
    [
        "/runs/mot_copy/files/..%2Fsecret.txt",
        "/runs/mot_copy/files/%2E%2E%2Fsecret.txt",
        "/runs/mot_copy/files/checkpoints%2F..%2F..%2Fsecret.txt",
        "/runs/mot_copy/files/%2Fetc%2Fpasswd",
        "/runs/mot_copy/files/leak.txt",
        "/runs/mot_copy/files/checkpoints/step_00000006/model.safetensors",
    ],
)
def test_api_never_serves_outside_the_run(served, url):
    _, app = served
    r = TestClient(app).get(url)
    assert r.status_code == 404, url
    assert r.json()["field"] == "path"
    assert SECRET not in r.text


def test_api_serves_inside_the_run(served):
    _, app = served
    client = TestClient(app)
    assert client.get("/runs/mot_copy/files/notes.txt").text == "inside"
    r = client.get("/runs/mot_copy/files/checkpoints/step_00000006/state.json")
    assert r.status_code == 200 and r.json()["step"] == 6


def test_literal_dot_dot_through_the_real_server(served):
    """http.client sends the path as written (no client-side normalisation)."""
    _, app = served
    with LiveServer(app) as server:
        for path in (
            "/runs/mot_copy/files/../../secret.txt",
            "/runs/mot_copy/files/../secret.txt",
            "/runs/mot_copy/../secret.txt",
            "/static/../../secret.txt",
        ):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
            conn.close()
            assert response.status == 404, (path, response.status)
            assert SECRET not in body
