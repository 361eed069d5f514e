"""Property-based tests of serve's input boundary (hypothesis, seeded, bounded example counts).

The property each time: a request answers 200 with samples, or a 4xx whose JSON names the field
and says what is wrong; never a 500, a traceback or a hang. ``SPARSEFUSION_FUZZ_EXAMPLES`` sets
the examples per property (``benchmarks/fuzz_serve.py --examples N`` runs longer),
``SPARSEFUSION_FUZZ_REPORT`` names a JSON file the status counts are written to.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serve_helpers import FakeBackend

from sparsefusion.serve.app import create_app
from sparsefusion.serve.params import Limits
from sparsefusion.serve.runs import RunCatalog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from hostile import bomb_png  # noqa: E402
from hostile_images import ico_holding  # noqa: E402

EXAMPLES = os.environ.get("SPARSEFUSION_FUZZ_EXAMPLES")
BOMBS = [bomb_png(7000), ico_holding(bomb_png(3000))]  # 49 M pixels; an ICO frame of 9 M
STATUSES: dict[str, Counter] = {}
FIELDS = ("run", "checkpoint", "prompt", "mode", "temperature", "top_p", "top_k", "seed",
          "repetition_penalty", "cfg_scale", "num_samples", "max_new_tokens", "image")  # fmt: skip
LIMITS = Limits(max_upload_bytes=64 * 1024, max_body_bytes=64 * 1024, max_json_depth=16)
MAX_SECONDS = 10.0  # a request slower than this counts as a hang


def _settings(examples: int):
    return settings(
        max_examples=int(EXAMPLES) if EXAMPLES else examples,
        deadline=None,  # timing is asserted per request (MAX_SECONDS), not per example
        derandomize=True,  # seeded: the same examples every run
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


@pytest.fixture(scope="module")
def client(tiny_runs) -> TestClient:
    app = create_app(RunCatalog([tiny_runs["mot"]]), FakeBackend(), LIMITS)
    return TestClient(app, raise_server_exceptions=False)


def _check(r, kind: str, started: float) -> None:
    assert time.perf_counter() - started < MAX_SECONDS, f"{kind}: request took too long"
    STATUSES.setdefault(kind, Counter())[r.status_code] += 1
    assert r.status_code == 200 or 400 <= r.status_code < 500 and r.status_code != 409, (
        r.status_code,
        r.text[:500],
    )
    body = r.json()
    if r.status_code == 200:
        assert isinstance(body["samples"], list) and body["samples"]
    else:
        assert isinstance(body["error"], str) and body["error"], body
        known = body["field"] in (*FIELDS, "body")
        assert known or "unknown field" in body["error"], body
        assert "Traceback" not in body["error"]


def teardown_module() -> None:
    report = os.environ.get("SPARSEFUSION_FUZZ_REPORT")
    if report:
        counts = {k: {str(s): n for s, n in sorted(v.items())} for k, v in STATUSES.items()}
        with open(report, "w") as f:
            json.dump(counts, f, indent=1)


any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates included
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(any_text, c, max_size=4),
    max_leaves=20,
)
field_dicts = st.dictionaries(st.sampled_from(FIELDS) | any_text, json_values, max_size=8)
plausible = st.fixed_dictionaries(
    {"run": st.sampled_from(["mot", "nope", ""])},
    optional={
        "mode": st.sampled_from(["text", "text_to_image", "image_to_text", "x"]),
        "prompt": any_text,
        "num_samples": st.integers(-2, 10),
        "temperature": st.floats(allow_nan=True, allow_infinity=True),
        "checkpoint": st.sampled_from([None, "latest", 3, 6, 5, "x", -1]),
        "max_new_tokens": st.integers(-1, 5000) | any_text,
    },
)


def _nested(depth: int, leaf: str) -> str:
    return '{"run": "mot", "prompt": ' + "[" * depth + leaf + "]" * depth + "}"


raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(_nested, st.integers(0, 3000), st.sampled_from(['"x"', "1", "{}", ""])),
    st.builds(lambda n: json.dumps({"run": "mot", "prompt": "x" * n}), st.integers(0, 200_000)),
    st.builds(lambda n: '{"run": "mot", "prompt": "' + "\\ud800" * n + '"}', st.integers(1, 50)),
)


@_settings(150)
@given(body=st.one_of(json_values, field_dicts, plausible))
def test_any_json_body_is_answered_or_refused_by_field(client, body):
    started = time.perf_counter()
    content = json.dumps(body).encode()
    r = client.post("/generate", content=content, headers={"content-type": "application/json"})
    _check(r, "json", started)


@_settings(60)
@given(content=raw_bodies)
def test_raw_deep_and_huge_bodies_are_refused_before_parsing(client, content):
    started = time.perf_counter()
    data = content if isinstance(content, bytes) else content.encode()
    r = client.post("/generate", content=data, headers={"content-type": "application/json"})
    _check(r, "raw", started)


MODES_FORMATS = [("RGB", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("L", "JPEG"), ("RGB", "WEBP"),
                 ("I;16", "PNG"), ("I;16", "TIFF"), ("F", "TIFF"), ("CMYK", "TIFF"), ("1", "BMP"),
                 ("LA", "PNG"), ("RGB", "ICO"), ("RGB", "TGA"), ("RGB", "PPM")]  # fmt: skip


@st.composite
def uploads(draw) -> bytes:
    mode, fmt = draw(st.sampled_from(MODES_FORMATS))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode if mode not in ("I;16", "F") else "L")
    if mode in ("I;16", "F"):
        image = Image.fromarray(
            np.asarray(image).astype(np.uint16 if mode == "I;16" else np.float32) * 3
        )
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    how = draw(st.sampled_from(["whole", "truncate", "flip", "garbage"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif how == "garbage":
        data += draw(st.binary(max_size=200))
    return bytes(data)


@_settings(150)
@given(
    data=st.binary(max_size=2000) | uploads() | st.sampled_from(BOMBS),
    mode=st.sampled_from(["image_to_text", "text"]),
)
def test_any_upload_is_answered_or_refused_by_field(client, data, mode):
    started = time.perf_counter()
    form = {"run": "mot", "mode": mode, "max_new_tokens": "4"}
    r = client.post("/generate", data=form, files={"image": ("u.png", data, "image/png")})
    _check(r, "upload", started)


@pytest.fixture(scope="module")
def damaged_run(tiny_runs, tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz_run") / "mot"
    shutil.copytree(tiny_runs["mot"], run)
    return run, (run / "metrics.jsonl").read_bytes()


@_settings(40)
@given(cut=st.integers(0, 10_000), tail=st.binary(max_size=100))
def test_damaged_metrics_never_break_the_listing(damaged_run, cut, tail):
    run, original = damaged_run
    (run / "metrics.jsonl").write_bytes(original[: len(original) - cut] + tail)
    client = TestClient(create_app(RunCatalog([run]), FakeBackend()), raise_server_exceptions=False)
    started = time.perf_counter()
    for path in ("/runs", "/runs/mot", "/runs/mot/metrics"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:500])
    assert time.perf_counter() - started < MAX_SECONDS
    STATUSES.setdefault("metrics", Counter())[200] += 1
