"""``sparsefusion generate``: output folder, prompts files, bad input before any model work."""

from __future__ import annotations

import json
import re

import pytest
from generate_archs import tiny_generator_model, tiny_tokenizer
from PIL import Image
from test_generate_run import _write_run

from sparsefusion.cli.main import main
from sparsefusion.generate import GenerationRequest, Generator


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    tok = tiny_tokenizer()
    model, _ = tiny_generator_model(tok, "mot")
    Image.new("RGB", (20, 20), "red").save(tmp / "red.png")
    return _write_run(tmp, tok, model)


def test_generate_writes_the_output_folder(run, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--prompt", "The red", "--mode", "text_to_image", "--num", "2", "--cfg", "2.0"]
    code = main(["generate", str(run), *args, "--out", str(out)])
    assert code == 0
    assert "open" in capsys.readouterr().out
    assert (out / "sample_000_image_0.png").is_file() and (out / "sample_001_image_0.png").is_file()
    tokens = json.loads((out / "tokens.json").read_text())
    assert [t["mode"] for t in tokens] == ["text_to_image"] * 2
    page = (out / "index.html").read_text()
    assert page.count("<section>") == 2 and 'src="sample_001_image_0.png"' in page


def test_prompts_file_one_request_per_line(run, tmp_path):
    lines = [
        [{"text": "The red"}],
        {"segments": [{"text": "A green"}], "mode": "text_to_image", "seed": 3},
        [{"text": "Look:"}, {"image": "red.png"}],
    ]
    path = run.parent / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    args = [
        "generate",
        str(run),
        "--prompts",
        str(path),
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    tokens = json.loads((out / "tokens.json").read_text())
    assert [t["mode"] for t in tokens] == ["text", "text_to_image", "image_to_text"]
    assert (out / "sample_002_input_image_0.png").is_file()  # the captioned image is shown


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "prompts.jsonl:2.*invalid JSON"),
        ('[{"image": "missing.png"}]', "prompts.jsonl:2.*cannot read"),
        ('{"segments": [{"text": "x"}], "colour": 1}', "prompts.jsonl:2.*unknown option"),
        ('{"segments": [{"text": "x"}], "mode": "text_to_speech"}', "prompts.jsonl:2.*speech"),
        ('{"segments": [{"text": "x"}], "top_p": 0}', "prompts.jsonl:2.*top_p"),
    ],
)
def test_bad_prompts_line_names_the_line(run, tmp_path, capsys, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('[{"text": "fine"}]\n' + line + "\n")
    assert main(["generate", str(run), "--prompts", str(path), "--out", str(tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in"),
        (["--image", "nowhere.png"], "--image: nowhere.png does not exist"),
        (["--prompt", "x", "--mode", "poem"], "--mode must be one of"),
        (["--prompt", "x", "--cfg", "2"], "cfg_scale applies to modes"),
        (["--prompt", "x", "--stop-id", "99999"], "stop_ids [99999] are outside"),
    ],
)
def test_bad_options(run, tmp_path, capsys, flags, message):
    assert main(["generate", str(run), *flags, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_every_request_is_checked_before_any_model_work(run):
    gen = Generator.from_run(run)

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    gen.model.forward = no_model
    too_long = "the red circle " * 200
    bad = [
        (GenerationRequest(prompt=too_long), "exceeds the model's max length 256"),
        (GenerationRequest(mode="image_to_text", image="gone.png"), "gone.png.*does not exist"),
        (GenerationRequest(mode="image_to_text"), "needs an image"),
        (GenerationRequest(mode="text_to_image", max_new_tokens=3), "max_new_tokens must be >= 6"),
        (GenerationRequest(prompt="x", repetition_penalty=0), "repetition_penalty"),
        (GenerationRequest(prompt="x", num_samples=0), "num_samples"),
        (GenerationRequest(prompt="x", stop_ids=(10**6,)), "stop_ids"),
    ]
    for req, message in bad:
        with pytest.raises(ValueError, match=message):
            gen.generate([GenerationRequest(prompt="fine"), req])
    (run.parent / "broken.png").write_text("not an image")
    with pytest.raises(ValueError, match="broken.png.*cannot decode"):
        gen.generate([GenerationRequest(mode="image_to_text", image=run.parent / "broken.png")])


def test_demo_takes_prompts_from_the_runs_val_documents(run, tmp_path):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "generate",
                str(run),
                "--demo",
                "--num",
                "2",
                "--max-new-tokens",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    modes = [t["mode"] for t in json.loads((out / "tokens.json").read_text())]
    assert modes == ["image_to_text"] * 2 + ["text_to_image"] * 2 + ["text"] * 2
    assert Image.open(out / "grid.png").size[0] == 6 * 112
    assert (out / "sample_000_input_image_0.png").is_file()
    assert (out / "sample_002_image_0.png").is_file()


def test_checkpoint_option(run, tmp_path, capsys):
    args = ["generate", str(run), "--prompt", "x", "--max-new-tokens", "2", "--out", str(tmp_path)]
    assert main([*args, "--checkpoint", "10"]) == 0
    assert main([*args, "--checkpoint", "5"]) == 1
    assert "does not exist; the run has ['step_00000010']" in capsys.readouterr().err


@pytest.mark.parametrize("image_loss, sampler", [("ddpm", "euler"), ("flow", "ddim")])
def test_a_sampler_that_cannot_fit_is_refused_before_the_model_loads(
    tmp_path, capsys, image_loss, sampler
):
    """A Transfusion run folder with only its config: the error comes from the config alone."""
    from sparsefusion.runs.folder import write_config
    from sparsefusion.runs.presets import resolve_config

    cfg = resolve_config("tf-mot-debug", [f"objective.image_loss={image_loss}"])
    (tmp_path / "run").mkdir()
    write_config(tmp_path / "run", cfg)
    flags = ["--prompt", "x", "--mode", "text_to_image", "--sampler", sampler]
    assert main(["generate", str(tmp_path / "run"), *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--sampler: sampler '{sampler}' does not fit objective.image_loss={image_loss}" in err
    assert "checkpoint" not in err  # nothing was loaded
