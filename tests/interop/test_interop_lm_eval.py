"""The lm-evaluation-harness model on two local tasks (multiple choice and generate_until)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from sparsefusion.interop.forward import text_logits

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON files only

MC = [
    {"question": "the quick brown", "choices": [" fox", " dog", " square"], "answer": 0},
    {"question": "a picture of a red", "choices": [" square", " circle"], "answer": 0},
    {"question": "hello", "choices": [" world", " tokens", " images"], "answer": 1},
]
GEN = [{"prompt": "the quick brown fox", "answer": " jumps"}, {"prompt": "hello", "answer": " w"}]


def _tasks(folder):
    for name, rows in (("mc", MC), ("gen", GEN)):
        (folder / f"{name}.json").write_text("\n".join(json.dumps(r) for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "sf_mc.yaml").write_text(
        "task: sf_mc\n" + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.json'}\n"
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        + "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        + "metric_list:\n  - metric: acc\n"
    )  # fmt: skip
    (folder / "sf_gen.yaml").write_text(
        "task: sf_gen\n" + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.json'}\n"
        + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        + "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        + "metric_list:\n  - metric: exact_match\n"
    )  # fmt: skip


def _reference_ll(lm, context: str, continuation: str) -> float:
    """The model's own scoring, one unpadded row: sum of log p over the continuation ids."""
    ctx, cont = lm._pair(context, continuation)
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(text_logits(lm.model, ids[:, :-1]).float(), dim=-1)[0]
    return sum(logp[len(ctx) - 1 + k, c].item() for k, c in enumerate(cont))


def test_simple_evaluate_on_local_tasks_matches_own_scoring(mot_run, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from sparsefusion.interop.lm_eval_model import SparsefusionLM

    _tasks(tmp_path)
    lm = SparsefusionLM.create_from_arg_string(f"run={mot_run},batch_size=4")
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["sf_mc", "sf_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )  # fmt: skip
    assert 0.0 <= results["results"]["sf_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["sf_gen"]["exact_match,none"] <= 1.0
    samples = results["samples"]["sf_mc"]
    assert len(samples) == len(MC)
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ll, _ = resp[0]
            assert ll == pytest.approx(_reference_ll(lm, context, continuation), abs=1e-4)
    gen = results["samples"]["sf_gen"]
    assert all(isinstance(s["resps"][0][0], str) for s in gen)


def test_rolling_loglikelihood_is_the_sum_over_the_string(mot_run):
    from lm_eval.api.instance import Instance

    from sparsefusion.interop.lm_eval_model import SparsefusionLM

    lm = SparsefusionLM(run=str(mot_run), batch_size=2)
    text = "hello world, hello tokens"
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    (rolling,) = lm.loglikelihood_rolling([req])
    assert rolling == pytest.approx(_reference_ll(lm, "", text), abs=1e-4)
