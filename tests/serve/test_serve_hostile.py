"""Hostile requests and damaged runs: uploads decoded by the datasets' decoder with its limits,
bodies bounded before parsing, one damaged file never breaking the server (issue 28, items 3-4)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import STEPS, FakeBackend, FakeModel

from sparsefusion.serve.app import create_app
from sparsefusion.serve.engine import GeneratorBackend
from sparsefusion.serve.runs import RunCatalog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from hostile import bomb_png  # noqa: E402
from hostile_images import float_tiff, grey16, ico_holding  # noqa: E402


class SeeingModel(FakeModel):
    """Keeps the last image it was given."""

    seen: Image.Image | None = None

    def generate(self, params):
        SeeingModel.seen = params.image
        return super().generate(params)


class SeeingBackend(FakeBackend):
    def load(self, run, step):
        self.loads.append((run.name, step))
        return SeeingModel(self.modes)


@pytest.fixture()
def client(tiny_runs) -> TestClient:
    return TestClient(create_app(RunCatalog([tiny_runs["mot"]]), SeeingBackend()))


def _upload(client: TestClient, data: bytes, name: str = "x.png"):
    form = {"run": "mot", "mode": "image_to_text"}
    return client.post("/generate", data=form, files={"image": (name, data, "image/png")})


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_upload_is_scaled_like_the_data_path(client, fmt):
    r = _upload(client, grey16(fmt), f"g.{fmt.lower()}")
    assert r.status_code == 200, r.text
    assert SeeingModel.seen.getpixel((1, 1)) == (128, 128, 128)  # was (255, 255, 255)
    assert SeeingModel.seen.getpixel((6, 6)) == (255, 255, 255)


def test_float_tiff_upload_is_not_black(client):
    assert _upload(client, float_tiff(), "f.tiff").status_code == 200
    assert SeeingModel.seen.getpixel((1, 1)) == (128, 128, 128)


def test_pixel_bomb_upload_is_refused_from_its_header(client):
    bomb = bomb_png(7000)  # 49 M pixels > the datasets' 40 M default, a 40 KB file
    t0 = time.perf_counter()
    r = _upload(client, bomb)
    assert r.status_code == 413, r.text
    assert r.json()["field"] == "image" and "7000x7000 pixels" in r.json()["error"]
    assert time.perf_counter() - t0 < 2.0


def test_ico_upload_is_refused_before_decoding(client):
    r = _upload(client, ico_holding(bomb_png(3000)), "x.ico")
    assert r.status_code == 415 and "not one of PNG" in r.json()["error"]


def test_json_body_is_bounded_before_parsing(client):
    big = json.dumps({"run": "mot", "prompt": "x" * 1_000_000})
    r = client.post("/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body", r.text

    def chunks():  # no Content-Length: refused while it streams in
        yield b'{"run": "mot", "prompt": "'
        for _ in range(100):
            yield b"x" * 10_000
        yield b'"}'

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body", r.text


def test_deeply_nested_body_is_a_422_not_a_500(client):
    deep = "[" * 50_000 + "]" * 50_000
    body = '{"run": "mot", "prompt": ' + deep + "}"
    r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body", r.text
    assert "nested" in r.json()["error"]


def test_wrong_types_and_lone_surrogates_name_the_field(client):
    for fields, field in (
        ({"run": "mot", "top_k": {"a": 1}}, "top_k"),
        ({"run": "mot", "temperature": [1]}, "temperature"),
        ({"run": "mot", "checkpoint": [3]}, "checkpoint"),
        ({"run": "mot", "seed": 1e400}, "seed"),
    ):
        r = client.post(
            "/generate",
            content=json.dumps(fields).replace("Infinity", "1e400"),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    r = client.post(
        "/generate",
        content=b'{"run": "mot", "prompt": "bad \\ud800 x"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["field"] == "prompt", r.text


def test_half_written_metrics_row_is_skipped_and_counted(run_copy):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2, "loss/te')  # a crash mid-write
    client = TestClient(create_app(RunCatalog([run_copy]), FakeBackend()))
    r = client.get("/runs")
    assert r.status_code == 200, r.text
    (run,) = r.json()["runs"]
    assert run["last_step"] == STEPS and run["skipped_metrics_rows"] == 1
    assert client.get("/runs/mot_copy").status_code == 200
    assert client.get("/runs/mot_copy/plots/loss.png").status_code == 200


def test_nan_losses_and_a_damaged_config_do_not_break_the_listing(run_copy):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": NaN}\n[1, 2]\n{"step": "x", "loss": 1}\n')
    client = TestClient(create_app(RunCatalog([run_copy]), FakeBackend()))
    run = client.get("/runs").json()["runs"][0]
    assert run["final_train"] == {"loss": None} and run["skipped_metrics_rows"] == 1
    (run_copy / "config.yaml").write_text("model: [unclosed\n")
    assert client.get("/runs").json()["runs"][0]["arch"] is None


def _truncate_newest(run: Path) -> Path:
    weights = run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return weights


def test_truncated_newest_checkpoint_falls_back_like_generate(run_copy):
    _truncate_newest(run_copy)
    client = TestClient(create_app(RunCatalog([run_copy]), GeneratorBackend("cpu")))
    body = {"run": "mot_copy", "prompt": "a red", "max_new_tokens": 2}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"] == 3
    assert client.get("/runs/mot_copy/modes").json()["checkpoint"] == 3


def test_naming_the_damaged_checkpoint_is_a_clear_409(run_copy):
    _truncate_newest(run_copy)
    client = TestClient(
        create_app(RunCatalog([run_copy]), FakeBackend()), raise_server_exceptions=False
    )
    r = client.post("/generate", json={"run": "mot_copy", "checkpoint": STEPS})
    assert r.status_code == 409, r.text
    assert r.json()["field"] == "checkpoint" and "truncated" in r.json()["error"]
    r = client.get(f"/runs/mot_copy/modes?checkpoint={STEPS}")
    assert r.status_code == 409 and "step_00000006" in r.json()["error"]


def test_symlinked_compare_plot_is_not_served(run_copy, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(secret)
    report = run_copy.parent / "compare_evil"
    report.mkdir()
    (report / "compare.json").write_text(json.dumps({"baseline": {"path": str(run_copy)}}))
    Image.new("RGB", (2, 2)).save(report / "loss.png")
    (report / "leak.png").symlink_to(secret)
    client = TestClient(create_app(RunCatalog([run_copy]), FakeBackend()))
    (found,) = client.get("/runs/mot_copy").json()["reports"]
    assert [p.rsplit("/", 1)[1] for p in found["plots"]] == ["loss.png"]
    assert client.get(f"/runs/mot_copy/compare/{found['id']}/leak.png").status_code == 404
    shutil.rmtree(report)


def test_api_docs_work_offline(client):
    page = client.get("/api/docs")
    assert page.status_code == 200 and "/generate" in page.text
    assert "http" not in page.text.replace(str(client.base_url), "")  # nothing from a CDN
    assert "/generate" in client.get("/api/openapi.json").json()["paths"]


def test_a_checkpoint_damaged_while_serving_is_noticed(run_copy):
    client = TestClient(create_app(RunCatalog([run_copy]), FakeBackend()))
    assert client.get("/runs/mot_copy/modes").json()["checkpoint"] == STEPS
    _truncate_newest(run_copy)
    assert client.get("/runs/mot_copy/modes").json()["checkpoint"] == 3
