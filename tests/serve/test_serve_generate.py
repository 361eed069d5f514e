"""The real engine behind the API on a tiny trained run: the output equals what
``sparsefusion generate`` writes for the same prompt and seed."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import STEPS

from sparsefusion.serve.app import create_app
from sparsefusion.serve.engine import GeneratorBackend
from sparsefusion.serve.runs import RunCatalog

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def real_client(tiny_runs) -> TestClient:
    catalog = RunCatalog([tiny_runs["mot"], tiny_runs["dense"]])
    return TestClient(create_app(catalog, GeneratorBackend("cpu")))


def _image(segment: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(segment["image"].split(",", 1)[1])))


def _cli(run: Path, out: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "sparsefusion", "generate", str(run), "--out", str(out)]
    cmd += ["--device", "cpu", *args]  # the same device as the server under test
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_modes_of_a_text_image_run(real_client):
    body = real_client.get("/runs/mot/modes").json()
    assert body["checkpoint"] == STEPS
    assert {"text", "text_to_image", "image_to_text"} <= set(body["modes"])
    assert "text_to_speech" not in body["modes"]
    r = real_client.post("/generate", json={"run": "mot", "mode": "text_to_speech"})
    assert r.status_code == 422 and r.json()["field"] == "mode"


def test_text_to_image_equals_the_cli(real_client, tiny_runs, tmp_path):
    r = real_client.post(
        "/generate",
        json={
            "run": "mot",
            "mode": "text_to_image",
            "prompt": PROMPT,
            "seed": 3,
            "cfg_scale": 2,
            "num_samples": 2,
        },
    )
    assert r.status_code == 200, r.text
    samples = r.json()["samples"]
    _cli(
        tiny_runs["mot"],
        tmp_path,
        "--prompt",
        PROMPT,
        "--mode",
        "text_to_image",
        "--seed",
        "3",
        "--cfg",
        "2",
        "--num",
        "2",
    )
    written = json.loads((tmp_path / "tokens.json").read_text())
    assert [w["token_ids"] for w in written] == [s["token_ids"] for s in samples]
    assert samples[0]["token_ids"] != samples[1]["token_ids"]  # two streams, not one twice
    for k, sample in enumerate(samples):
        (image,) = [s for s in sample["segments"] if s["modality"] == "image"]
        cli_png = Image.open(tmp_path / f"sample_{k:03d}_image_0.png").convert("RGB")
        assert np.array_equal(np.asarray(_image(image)), np.asarray(cli_png))
        text = "".join(s.get("text", "") for s in sample["segments"] if s["modality"] == "text")
        assert text == (tmp_path / f"sample_{k:03d}.txt").read_text()


def test_same_seed_same_output_and_seeds_differ(real_client):
    def ids(seed: int) -> list[int]:
        body = {
            "run": "dense",
            "mode": "text",
            "prompt": "a red",
            "seed": seed,
            "max_new_tokens": 16,
            "temperature": 1.0,
        }
        return real_client.post("/generate", json=body).json()["samples"][0]["token_ids"]

    assert ids(5) == ids(5)
    assert ids(5) != ids(6) or ids(5) != ids(7)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"mode": "text_to_image", "max_new_tokens": 10}, "max_new_tokens"),  # < BOI + codes + EOI
        ({"mode": "text", "cfg_scale": 2}, "cfg_scale"),  # guidance is for image/speech spans
    ],
)
def test_engine_refusals_name_the_field(real_client, fields, field):
    r = real_client.post("/generate", json={"run": "mot", "prompt": "a red", **fields})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_image_to_text_with_an_upload(real_client):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, format="PNG")
    r = real_client.post(
        "/generate",
        data={"run": "mot", "mode": "image_to_text", "max_new_tokens": "8", "seed": "1"},
        files={"image": ("red.png", buf.getvalue(), "image/png")},
    )
    assert r.status_code == 200, r.text
    (sample,) = r.json()["samples"]
    assert 1 <= sample["new_tokens"] <= 8
    assert all(s["modality"] == "text" for s in sample["segments"])  # no room for an image span
