"""Bounded sample counts (issue 28 item 7): ``--num``, a prompts line's ``num_samples`` and the
total of one call are checked before any run is loaded or any batch allocated."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sparsefusion.cli.main import main as cli_main
from sparsefusion.generate.prompts import read_prompts
from sparsefusion.generate.request import MAX_NUM_SAMPLES, GenerationRequest

GEN = SimpleNamespace(
    modes=["text"], why_not=lambda m: "", min_new_tokens=lambda m: 1, vocab_width=64
)


def _prompts(tmp_path, *lines) -> list[GenerationRequest]:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return read_prompts(path, GenerationRequest(), 32)


@pytest.mark.parametrize("value", [1_000_000, MAX_NUM_SAMPLES + 1, True, 0, 2.0])
def test_prompts_line_num_samples_is_bounded_and_named(tmp_path, value):
    (req,) = _prompts(tmp_path, {"segments": [{"text": "hi"}], "num_samples": value})
    match = r"prompts.jsonl:1: num_samples must be an int in \[1, 64\]"
    with pytest.raises(ValueError, match=match):
        req.encode(GEN)


def test_a_prompts_line_cannot_raise_the_bound(tmp_path):
    with pytest.raises(ValueError, match="prompts.jsonl:1: unknown option.*max_num_samples"):
        _prompts(tmp_path, {"segments": [{"text": "hi"}], "max_num_samples": 10**6})


def test_the_bound_is_a_setting():
    req = GenerationRequest(prompt="hi", num_samples=100, max_num_samples=128)
    assert not [p for p in req._field_problems(GEN) if "num_samples" in p]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--num", "1000000"], "--num 1000000 exceeds --max-samples=64"),
        (["--num", "100", "--max-samples", "200", "--max-total-samples", "50"],
         "exceeds --max-total-samples=50"),
        (["--max-samples", "0"], "--max-samples and --max-total-samples must be >= 1"),
    ],
)  # fmt: skip
def test_cli_num_is_bounded_before_the_run_is_loaded(tmp_path, capsys, argv, match):
    out = ["--out", str(tmp_path / "out")]
    code = cli_main(["generate", str(tmp_path / "no-run"), "--prompt", "x", *out, *argv])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err


def test_prompt_with_a_surrogate_is_refused_by_field():
    req = GenerationRequest(prompt="bad \udc80 argv bytes", where="--prompt")
    with pytest.raises(ValueError, match=r"--prompt: prompt: text holds a lone surrogate U\+DC80"):
        req.encode(GEN)


def test_a_24_digit_seed_on_a_prompts_line_names_line_and_key(tmp_path):
    (req,) = _prompts(tmp_path, {"segments": [{"text": "hi"}], "seed": 10**24})
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: seed must be an int in \[0, "):
        req.encode(GEN)
