"""``sparsefusion serve``: options, errors, the missing-extra message and a real start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from serve_helpers import free_port

from sparsefusion.cli.main import build_parser, main
from sparsefusion.cli.serve_cmd import limits_from_args
from sparsefusion.serve import require_server


def test_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "runs/a", "runs/b"])
    assert (args.host, args.port, args.run_dirs) == ("127.0.0.1", 8000, ["runs/a", "runs/b"])


def test_bad_run_folders_and_options_fail_with_exit_2(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert main(["serve", str(tmp_path), "--queue-size", "-1"]) == 2
    assert "--queue-size" in capsys.readouterr().err


def test_missing_server_packages_name_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"uvicorn: pip install 'sparsefusion\[serve\]'"):
        require_server()


def test_cli_serves_runs(tiny_runs):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "sparsefusion",
        "serve",
        str(tiny_runs["mot"]),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline, body = time.monotonic() + 60, None
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/runs", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert [r["name"] for r in body["runs"]] == ["mot"]
        rebound = urllib.request.Request(
            f"http://127.0.0.1:{port}/runs", headers={"Host": "evil.test"}
        )
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(rebound, timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)


def test_input_limits_come_from_the_command_line():
    args = build_parser().parse_args(
        ["serve", "run", "--max-image-pixels", "1000", "--max-body-kb", "2", "--max-json-depth",
         "5", "--max-samples", "3"]
    )  # fmt: skip
    limits = limits_from_args(args)
    assert (limits.max_image_pixels, limits.max_body_bytes) == (1000, 2048)
    assert (limits.max_json_depth, limits.max_samples) == (5, 3)
    bad = build_parser().parse_args(["serve", "run", "--max-body-kb", "0"])
    with pytest.raises(ValueError, match="--max-body-kb"):
        limits_from_args(bad)
