"""The JSON API with the framework's test client: runs, run detail, plots, files, errors."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import STEPS, FakeBackend

from sparsefusion.serve.app import create_app
from sparsefusion.serve.params import Limits
from sparsefusion.serve.runs import RunCatalog


def _png(size=(5, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return buf.getvalue()


def _decode_data_url(url: str) -> bytes:
    head, data = url.split(",", 1)
    assert head.endswith(";base64")
    return base64.b64decode(data)


@pytest.fixture()
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture()
def client(tiny_runs, backend) -> TestClient:
    catalog = RunCatalog([tiny_runs["mot"], tiny_runs["dense"]])
    limits = Limits(max_prompt_chars=50, max_upload_bytes=20_000, max_samples=4)
    return TestClient(create_app(catalog, backend, limits))


def test_runs_lists_both_with_checkpoints_and_final_losses(client):
    runs = {r["name"]: r for r in client.get("/runs").json()["runs"]}
    assert sorted(runs) == ["dense", "mot"]
    assert runs["mot"]["checkpoints"] == [3, STEPS]
    assert runs["mot"]["arch"] == "mot" and runs["dense"]["arch"] == "dense"
    assert runs["mot"]["last_step"] == STEPS
    assert {"loss", "loss/text", "loss/image"} <= set(runs["mot"]["final_val"])


def test_run_detail_has_config_curves_and_compare_report(client, tiny_runs):
    run = client.get("/runs/mot").json()
    assert run["config"]["model"]["arch"] == "mot"
    assert run["curves"]["train"]["loss/image"]["step"] == list(range(1, STEPS + 1))
    assert run["curves"]["val"]["loss/text"]["step"] == [3, STEPS]
    assert run["eval"] == [] and run["samples"] == []
    (report,) = run["reports"]  # compare/ beside the runs names mot as a compared run
    assert Path(report["folder"]) == (tiny_runs["mot"].parent / "compare").resolve()
    assert any(u.endswith("loss_vs_flops_train.png") for u in report["plots"])
    for url in report["plots"]:
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size[0] > 100
    assert client.get("/runs/mot/compare/0/compare.json").status_code == 404
    assert client.get("/runs/mot/compare/7/loss_vs_flops_train.png").status_code == 404


def test_loss_plot_is_a_png_with_one_panel_per_loss_key(client):
    r = client.get("/runs/mot/plots/loss.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    width, height = Image.open(io.BytesIO(r.content)).size
    assert (width, height) == (3 * 360, 320)  # overall, image, text: 3.6 in x 100 dpi each


def test_metrics_endpoint_and_unknown_run(client):
    curves = client.get("/runs/dense/metrics").json()["curves"]
    assert len(curves["val"]["loss"]["value"]) == 2
    for url in ("/runs/nope", "/runs/nope/metrics", "/runs/nope/plots/loss.png", "/run/nope"):
        r = client.get(url)
        assert r.status_code == 404 and r.json()["field"] == "run", url


def test_eval_rows_and_samples_are_shown(tiny_runs, run_copy, backend):
    rows = [
        {"step": 3, "size": "small", "fid_sf": 40.5, "skipped": {"cider": "no captions"}},
        {"step": 6, "size": "small", "fid_sf": 30.25, "cider": 0.2, "skipped": {}},
    ]
    (run_copy / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = run_copy / "eval" / "step_00000006_small"  # where sparsefusion eval writes them
    folder.mkdir(parents=True)
    (folder / "text_to_image.png").write_bytes(_png((7, 3)))
    (folder / "summary.md").write_text("# eval at step 6\n")
    (folder / "weights.bin").write_bytes(b"x")
    client = TestClient(create_app(RunCatalog([run_copy]), backend))
    run = client.get("/runs/mot_copy").json()
    assert run["eval"] == rows
    paths = [s["path"] for s in run["samples"]]
    assert paths == [f"eval/step_00000006_small/{n}" for n in ("summary.md", "text_to_image.png")]
    image = client.get(run["samples"][1]["url"])
    assert Image.open(io.BytesIO(image.content)).size == (7, 3)
    assert client.get(run["samples"][0]["url"]).text == "# eval at step 6\n"


def test_pages_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate-form"' in page.text
    assert 'id="loss-plot"' in client.get("/run/mot").text
    for name in ("playground.js", "run.js", "common.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200, name
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: nothing from elsewhere


def test_generate_returns_segments_timing_and_tokens_per_s(client, backend):
    r = client.post(
        "/generate",
        json={
            "run": "mot",
            "prompt": "a red circle",
            "mode": "text_to_image",
            "seed": 7,
            "num_samples": 2,
            "temperature": 0.5,
            "top_p": 0.9,
            "cfg_scale": 3,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["checkpoint"] == STEPS and body["mode"] == "text_to_image"
    assert len(body["samples"]) == 2 and body["new_tokens"] == 6
    text, image = body["samples"][1]["segments"]
    assert text == {"modality": "text", "text": "a red circle #1"}
    png = Image.open(io.BytesIO(_decode_data_url(image["image"])))
    assert png.size == (8, 6) == (image["width"], image["height"])
    assert png.getpixel((0, 0)) == (7, 0, 1)  # the seed reached the model
    assert body["seconds"] > 0 and body["tokens_per_s"] > 0
    assert backend.loads == [("mot", STEPS)]


def test_generate_multipart_with_image_upload(client):
    r = client.post(
        "/generate",
        data={"run": "dense", "checkpoint": "3", "mode": "image_to_text", "prompt": ""},
        files={"image": ("red.png", _png(), "image/png")},
    )
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"] == 3
    assert r.json()["samples"][0]["segments"][-1]["text"] == "saw (5, 4)"


def test_generate_speech_is_a_wav(tiny_runs):
    backend = FakeBackend(modes=["text_to_speech"])
    client = TestClient(create_app(RunCatalog([tiny_runs["mot"]]), backend))
    body = client.post("/generate", json={"run": "mot", "mode": "text_to_speech"}).json()
    speech = body["samples"][0]["segments"][1]
    assert speech["modality"] == "speech" and speech["seconds"] == pytest.approx(0.1)
    assert _decode_data_url(speech["audio"])[:4] == b"RIFF"


@pytest.mark.parametrize(
    ("fields", "status", "field"),
    [
        ({"run": "nope"}, 404, "run"),
        ({}, 422, "run"),
        ({"run": "mot", "checkpoint": "4"}, 404, "checkpoint"),
        ({"run": "mot", "checkpoint": "last"}, 422, "checkpoint"),
        ({"run": "mot", "mode": "video"}, 422, "mode"),
        ({"run": "mot", "mode": "text_to_speech"}, 422, "mode"),  # valid, but not this run's
        ({"run": "mot", "prompt": "x" * 51}, 422, "prompt"),
        ({"run": "mot", "temperature": 5.5}, 422, "temperature"),
        ({"run": "mot", "temperature": "warm"}, 422, "temperature"),
        ({"run": "mot", "top_p": 0}, 422, "top_p"),
        ({"run": "mot", "cfg_scale": 0}, 422, "cfg_scale"),
        ({"run": "mot", "seed": -1}, 422, "seed"),
        ({"run": "mot", "seed": 1.5}, 422, "seed"),
        ({"run": "mot", "num_samples": 5}, 422, "num_samples"),
        ({"run": "mot", "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"run": "mot", "tempreature": 1}, 422, "tempreature"),
        ({"run": "mot", "mode": "image_to_text"}, 422, "image"),
        ({"run": "mot", "image": "aGk="}, 415, "image"),
    ],
)
def test_bad_requests_name_the_field(client, fields, status, field):
    r = client.post("/generate", json=fields)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    assert field in r.json()["error"]


def test_non_image_and_oversized_uploads(client):
    form = {"run": "mot", "mode": "image_to_text"}
    r = client.post(
        "/generate", data=form, files={"image": ("a.png", b"not an image", "image/png")}
    )
    assert r.status_code == 415 and r.json()["field"] == "image"
    big = b"\x89PNG" + bytes(30_000)
    r = client.post("/generate", data=form, files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413 and r.json()["field"] == "image"
    huge = b"\x89PNG" + bytes(200_000)  # refused from its Content-Length, before parsing
    r = client.post("/generate", data=form, files={"image": ("huge.png", huge, "image/png")})
    assert r.status_code == 413 and "upload limit" in r.json()["error"]
    r = client.post("/generate", content=b"run=mot", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["field"] == "body"


def test_modes_endpoint_loads_the_model_once(client, backend):
    first = client.get("/runs/mot/modes").json()
    assert first == {"run": "mot", "checkpoint": STEPS, "modes": backend.modes}
    client.get("/runs/mot/modes?checkpoint=6")
    client.post("/generate", json={"run": "mot"})
    assert backend.loads == [("mot", STEPS)]
    assert client.get("/runs/mot/modes?checkpoint=3").json()["checkpoint"] == 3
    assert backend.loads == [("mot", STEPS), ("mot", 3)]
    assert client.get("/models").json()["loaded"] == [
        {"run": "mot", "checkpoint": STEPS},
        {"run": "mot", "checkpoint": 3},
    ]
    assert client.get("/runs/mot/modes?checkpoint=5").status_code == 404


class _Broken(FakeBackend):
    def load(self, run, step):
        raise RuntimeError("weights do not match the config")


def test_a_failing_model_answers_500_json(tiny_runs):
    client = TestClient(
        create_app(RunCatalog([tiny_runs["mot"]]), _Broken()), raise_server_exceptions=False
    )
    r = client.post("/generate", json={"run": "mot"})
    assert r.status_code == 500
    assert r.json()["error"] == "RuntimeError: weights do not match the config"
    assert client.get("/runs/mot/modes?checkpoint=x").status_code == 422
