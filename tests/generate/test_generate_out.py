"""Output paths and the ``--image`` file are checked before any model work (issue 28)."""

from __future__ import annotations

import pytest
from generate_archs import tiny_generator_model, tiny_tokenizer
from PIL import Image
from test_generate_run import _write_run

from sparsefusion.cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tok = tiny_tokenizer()
    model, _ = tiny_generator_model(tok, "mot")
    return _write_run(tmp_path_factory.mktemp("gen_out"), tok, model)


@pytest.mark.parametrize("where", ["out", "out/sub"])
def test_generate_out_on_an_existing_file_is_refused_first(run, tmp_path, capsys, where):
    (tmp_path / "out").write_text("not a folder")
    args = ["generate", str(run), "--prompt", "The red", "--max-new-tokens", "4"]
    assert main([*args, "--out", str(tmp_path / where)]) == 2  # was a traceback after sampling
    err = capsys.readouterr().err
    assert "--out" in err and "an existing file, not a folder" in err


def test_bench_generate_out_on_a_folder_is_refused_first(tmp_path, capsys):
    assert main(["bench-generate", "--new-tokens", "1", "--out", str(tmp_path)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err


def test_eval_outputs_blocked_by_files_are_refused_first(tmp_path, capsys):
    (tmp_path / "eval").write_text("not a folder")
    assert main(["eval", str(tmp_path)]) == 2
    assert "eval output folder" in capsys.readouterr().err


def test_generate_image_is_decoded_with_the_data_limits_first(run, tmp_path, capsys):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "x.ico")  # ICO: not an accepted format
    args = ["generate", str(run), "--image", str(tmp_path / "x.ico"), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "cannot decode image" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
