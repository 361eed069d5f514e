"""`sparsefusion sweep`: recipe strictness, and an end-to-end sweep of two tiny CPU runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sparsefusion.cli.main import main
from sparsefusion.compare.sweep import load_sweep
from sparsefusion.config import ConfigError
from sparsefusion.runs.presets import resolve_config

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


def test_sweep_end_to_end_skips_finished_and_reports_unknown(tmp_path, tokenizer_cache, capsys):
    out = tmp_path / "sweep"
    recipe = _recipe(
        tmp_path,
        out=str(out),
        baseline="dense-debug",
        overrides=[
            f"tokenizer.cache_dir={tokenizer_cache}",
            "train.steps=6",
            "run.log_every=1",
            "run.eval_every=3",
            "run.progress=log",
        ],
        runs=["dense-debug", "no-such-preset", {"name": "mot", "config": "mot-debug"}],
        compare={"smoothing": 0.0},
    )
    assert main(["sweep", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "no-such-preset" in printed and "unknown preset" in printed
    report = (out / "compare" / "compare.md").read_text()
    assert "| mot |" in report and "unresolved" in report
    data = json.loads((out / "compare" / "compare.json").read_text())
    assert data["baseline"]["name"] == "dense-debug"
    assert [r["name"] for r in data["runs"]] == ["mot"]
    assert data["runs"][0]["flops_ratio_to_baseline"] == pytest.approx(1.0, rel=0.02)
    assert {"loss", "loss/text", "loss/image"} <= set(data["runs"][0]["splits"]["val"])
    assert (out / "compare" / "step_matching_train.png").is_file()
    for name in ("dense-debug", "mot"):  # same seed and data for every run
        trained = yaml.safe_load((out / name / "config.yaml").read_text())
        assert trained["seed"] == 0
        pinned = yaml.safe_load((out / name / "sweep_config.yaml").read_text())
        for section in ("model", "objective", "train", "optim"):  # trained from the pinned file
            trained[section].pop("vocab_size", None)  # 0 (from the tokenizer) until it trains
            pinned[section].pop("vocab_size", None)
            assert trained[section] == pinned[section], (name, section)
    assert "mot" not in (out / "dense-debug" / "train.log").read_text()  # one log per run
    # a second invocation trains nothing
    before = (out / "mot" / "metrics.jsonl").read_text()
    assert main(["sweep", str(recipe), "--out", str(tmp_path / "again")]) == 0
    status = json.loads((out / "sweep_status.json").read_text())["status"]
    assert status == {"dense-debug": "skipped", "no-such-preset": "unresolved", "mot": "skipped"}
    assert (out / "mot" / "metrics.jsonl").read_text() == before
    assert (tmp_path / "again" / "compare.md").is_file()


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"runs": ["dense", "dense"]}, "duplicate run names"),
        ({"runs": ["mot"], "baseline": "dense"}, "sweep.baseline 'dense' is not one of"),
        ({"runs": ["dense"], "overides": []}, "did you mean 'overrides'"),
        ({"runs": ["dense"], "compare": {"fit_from": 2}}, "compare.fit_from"),
        ({"runs": []}, "at least one run"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path: Path, fields: dict, words: str):
    with pytest.raises(ConfigError, match=words):
        load_sweep(_recipe(tmp_path, **fields))


def test_shipped_sweep_recipes_load():
    files = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert files
    for path in files:
        cfg = load_sweep(path)
        assert cfg.baseline in [r.name for r in cfg.runs]
        for run in cfg.runs:  # every run resolves (a typo in an override names its key here)
            config = str(ROOT / run.config) if run.config.endswith(".yaml") else run.config
            resolve_config(config, [*cfg.overrides, *run.overrides])
    names = [r.name for r in load_sweep(ROOT / "configs/sweeps/replication_cpu.yaml").runs]
    assert names == ["dense", "mot", "moe-8x", "moma-1t1i", "moma-4t4i", "moma-4t4i-mod"]


def _rows(run_dir: Path) -> list[dict]:
    keep = ("step", "split", "loss", "loss/text", "loss/image", "tokens", "flops")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k in keep} for x in lines]


def _pair(cache: str, out: Path, *extra: str, **fields) -> Path:
    return _recipe(
        out.parent, out=str(out), baseline="dense-debug", threads=1,
        overrides=[f"tokenizer.cache_dir={cache}", "train.steps=6", "run.log_every=1",
                   "run.eval_every=3", "run.save_every=3", "run.progress=log", *extra],
        runs=["dense-debug", {"name": "mot", "config": "mot-debug"}],
        compare={"smoothing": 0.0}, **fields,
    )  # fmt: skip


def test_parallel_runs_and_chunks_equal_one_uninterrupted_sweep(tmp_path, tokenizer_cache):
    for name in ("one", "two", "chunks"):
        (tmp_path / name).mkdir()
    one, two, chunks = (tmp_path / n / "sweep" for n in ("one", "two", "chunks"))
    assert main(["sweep", str(_pair(tokenizer_cache, one))]) == 0
    assert main(["sweep", str(_pair(tokenizer_cache, two)), "--parallel", "2"]) == 0
    half = _pair(tokenizer_cache, chunks, "train.stop_at=3")
    assert main(["sweep", str(half), "--parallel", "2"]) == 0  # both runs stop at step 3
    status = json.loads((chunks / "sweep_status.json").read_text())
    assert status["status"] == {"dense-debug": "unfinished", "mot": "unfinished"}
    assert "step 3 of 6" in status["reason"]["mot"]
    report = (chunks / "compare" / "compare.md").read_text()
    assert "| mot | unfinished |" in report  # the report is written from what exists, marked
    assert main(["sweep", str(_pair(tokenizer_cache, chunks))]) == 0  # continues
    for run in ("dense-debug", "mot"):
        assert _rows(one / run) == _rows(two / run) == _rows(chunks / run), run


class _TrainingClock:
    """The sweep's ``time`` with a ``monotonic`` that stands still until ``metrics`` grows (the
    run trained a step): a loaded machine can spend a short budget importing torch alone, and
    these tests are about what the budget does to a run that trains, not about start-up time."""

    def __init__(self, metrics: Path) -> None:
        import time

        self._time, self._metrics = time, metrics
        self._size0, self._t0, self._start = self._size(), time.monotonic(), None

    def _size(self) -> int:
        return self._metrics.stat().st_size if self._metrics.exists() else 0

    def monotonic(self) -> float:
        now = self._time.monotonic()
        if self._start is None and self._size() > self._size0:
            self._start = now
        return self._t0 if self._start is None else self._t0 + now - self._start

    def __getattr__(self, name: str):
        return getattr(self._time, name)


def test_a_time_budget_stops_runs_at_a_checkpoint_and_the_next_sweep_continues(
    tmp_path, tokenizer_cache, monkeypatch
):
    from sparsefusion.checkpoint.store import latest_checkpoint
    from sparsefusion.compare import sweep

    out = tmp_path / "sweep"
    recipe = _recipe(
        tmp_path, out=str(out), baseline="dense-debug", threads=1, time_budget_s=12,
        overrides=[f"tokenizer.cache_dir={tokenizer_cache}", "train.steps=100000",
                   "run.log_every=1", "run.eval_every=0", "run.save_every=100000",
                   "run.progress=log"],
        runs=["dense-debug", {"name": "later", "config": "mot-debug"}],
    )  # fmt: skip
    metrics = out / "dense-debug" / "metrics.jsonl"
    monkeypatch.setattr(sweep, "time", _TrainingClock(metrics))
    assert main(["sweep", str(recipe)]) == 0  # no report yet: nothing to compare
    status = json.loads((out / "sweep_status.json").read_text())
    assert status["status"] == {"dense-debug": "unfinished", "later": "unfinished"}
    assert "time budget" in status["reason"]["dense-debug"]
    assert "not started" in status["reason"]["later"]
    first = latest_checkpoint(out / "dense-debug")  # written when the budget ran out
    assert first is not None and int(first.name[5:]) > 0
    monkeypatch.setattr(sweep, "time", _TrainingClock(metrics))  # from the resumed run's step
    assert main(["sweep", str(recipe), "--time-budget", "8"]) == 0
    second = latest_checkpoint(out / "dense-debug")
    assert int(second.name[5:]) > int(first.name[5:])
    steps = [r["step"] for r in _rows(out / "dense-debug")]
    assert steps == list(range(1, len(steps) + 1))  # resumed where it stopped: no step twice


def test_sigterm_stops_the_sweep_like_its_budget_and_leaves_no_trainer(tmp_path, tokenizer_cache):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    recipe = _recipe(
        tmp_path, out=str(out), baseline="dense-debug", threads=1,
        overrides=[f"tokenizer.cache_dir={tokenizer_cache}", "train.steps=100000",
                   "run.log_every=1", "run.eval_every=0", "run.save_every=100000",
                   "run.progress=log"],
        runs=["dense-debug", {"name": "later", "config": "mot-debug"}],
    )  # fmt: skip
    sweep = subprocess.Popen([sys.executable, "-m", "sparsefusion", "sweep", str(recipe)])
    metrics = out / "dense-debug" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and sweep.poll() is None, "the run never trained"
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(120) == 0
    status = json.loads((out / "sweep_status.json").read_text())
    assert status["status"] == {"dense-debug": "unfinished", "later": "unfinished"}
    left = []  # a trainer left running (orphaned) would still name the run folder
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"run.dir={out}".encode() in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:
            pass
    assert left == [], f"trainers left running: {left}"


def test_a_damaged_state_json_counts_as_unfinished(tmp_path: Path):
    from sparsefusion.compare.sweep import _finished

    step = tmp_path / "checkpoints" / "step_00000006"
    step.mkdir(parents=True)
    for text, done in (('{"step": 6}', True), ('{"step": 5}', False), ("{tru", False),
                       ("[6]", False), ('{"step": "6"}', False)):  # fmt: skip
        (step / "state.json").write_text(text)
        assert _finished(tmp_path, 6) is done, text


def test_a_run_stopped_while_starting_is_unfinished_not_failed(tmp_path: Path):
    """The budget can end while a trainer is still importing (a loaded machine): SIGTERM's
    default action kills it before it trained a step; nothing is lost, the next sweep starts it."""
    import signal
    import subprocess

    from sparsefusion.compare.sweep import SweepOutcome, _Job, _Scheduler, load_sweep

    cfg = load_sweep(_recipe(tmp_path, runs=["dense-debug"], baseline="dense-debug"))
    outcome = SweepOutcome()
    job = _Job("dense-debug", tmp_path / "run", "train", [], steps=10)
    job.proc = subprocess.Popen(["sleep", "60"])  # no SIGTERM handler, like a starting trainer
    _Scheduler(cfg, outcome)._stop([job])
    assert job.proc.wait(timeout=10) == -signal.SIGTERM
    _Scheduler(cfg, outcome)._finish(job)
    assert outcome.status["dense-debug"] == "unfinished"
    assert "step 0 of 10" in outcome.reason["dense-debug"]


def test_follow_up_stages_run_once_on_finished_runs(tmp_path, tokenizer_cache, tiny_evaluator):
    """train-aux on the batch-routed run only, then eval on both at their final step; a second
    invocation finds both stages done and runs nothing."""
    out = tmp_path / "sweep"
    evaluator = [f"eval.evaluator.{k}={v}" for k, v in tiny_evaluator.items()]
    recipe = _recipe(
        tmp_path, out=str(out), baseline="dense-debug", threads=1, parallel=2,
        overrides=[f"tokenizer.cache_dir={tokenizer_cache}", "train.steps=4", "run.log_every=1",
                   "run.eval_every=2", "run.progress=log", "data.val_batches=1"],
        runs=["dense-debug", {"name": "moe", "config": "moe-8x-debug"}],
        train_aux=["aux.steps=2", "aux.log_every=1"],
        evaluate=["eval.generate=false", "eval.val_batches=1", *evaluator],
        compare={"smoothing": 0.0},
    )  # fmt: skip
    assert main(["sweep", str(recipe)]) == 0
    status = json.loads((out / "sweep_status.json").read_text())
    assert status["stages"] == {"moe train-aux": "finished", "moe eval": "finished",
                                "dense-debug eval": "finished"}  # fmt: skip
    assert not (out / "dense-debug" / "aux_routers").exists()  # dense has no routers
    aux = [json.loads(x) for x in (out / "moe/aux_routers/metrics.jsonl").read_text().splitlines()]
    assert [r["main_step"] for r in aux] == [4]
    for run in ("dense-debug", "moe"):
        rows = [json.loads(x) for x in (out / run / "eval.jsonl").read_text().splitlines()]
        assert [(r["step"], r["size"]) for r in rows] == [(4, "full")], run
    moe_eval = json.loads((out / "moe" / "eval.jsonl").read_text())
    assert "ppl/causal" not in moe_eval.get("skipped", {})  # eval found the aux routers
    assert "| moe eval | finished |" in (out / "compare" / "compare.md").read_text()
    before = {r: (out / r / "eval.jsonl").read_text() for r in ("dense-debug", "moe")}
    assert main(["sweep", str(recipe)]) == 0
    status = json.loads((out / "sweep_status.json").read_text())
    assert set(status["stages"].values()) == {"skipped"}
    assert {r: (out / r / "eval.jsonl").read_text() for r in before} == before
    # routers retrained by hand: the eval row measured the old ones, so moe's eval runs again
    assert main(["train-aux", str(out / "moe"), "aux.steps=3", "aux.log_every=1"]) == 0
    assert main(["sweep", str(recipe)]) == 0
    status = json.loads((out / "sweep_status.json").read_text())
    assert status["stages"] == {"moe train-aux": "skipped", "moe eval": "finished",
                                "dense-debug eval": "skipped"}  # fmt: skip
    rows = [json.loads(x) for x in (out / "moe" / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["aux_routers"] != rows[1]["aux_routers"]


def test_a_failed_or_stopped_stage_is_reported_and_its_follow_up_waits(tmp_path: Path):
    import subprocess

    from sparsefusion.compare.sweep import SweepOutcome, _Job, _Scheduler, load_sweep

    cfg = load_sweep(_recipe(tmp_path, runs=["dense-debug"], baseline="dense-debug"))
    for stopped, command, word in (
        (False, ["false"], "failed"),
        (True, ["sleep", "60"], "unfinished"),
    ):
        outcome = SweepOutcome()
        ev = _Job("run", tmp_path, "eval", [], steps=4)
        aux = _Job("run", tmp_path, "train-aux", [], steps=4, then=[ev])
        aux.proc = subprocess.Popen(command)
        if stopped:
            _Scheduler(cfg, outcome)._stop([aux])
        aux.proc.wait(timeout=10)
        assert _Scheduler(cfg, outcome)._finish(aux) == []  # eval is not queued
        assert outcome.stages == {"run train-aux": word, "run eval": "unfinished"}
        assert "did not finish" in outcome.stage_reason["run eval"]
        assert outcome.status == {}  # the run's own status is its training's


def test_a_freed_slot_restarts_the_last_run_with_the_freed_threads(tmp_path: Path):
    """With the cores shared out (threads 0), a slot that comes free with nothing queued gives
    its threads to a run still training: it is stopped at a checkpoint and queued again with
    ``train.threads`` of its new share; a run near its end, or given its threads, is left alone."""
    import subprocess

    from sparsefusion.compare import sweep
    from sparsefusion.compare.sweep import SweepOutcome, _Job, _Scheduler, load_sweep

    cfg = load_sweep(_recipe(tmp_path, runs=["dense-debug"], baseline="dense-debug", parallel=2))
    scheduler = _Scheduler(cfg, SweepOutcome())
    args = ["pinned.yaml", "train.threads=1"]
    jobs = [_Job(n, tmp_path / n, "train", args, steps=100, threads=1, shared=shared)
            for n, shared in (("b", True), ("c", False))]  # fmt: skip
    for job in jobs:
        job.proc = subprocess.Popen(["sleep", "60"])
    real = sweep._cores
    try:
        sweep._cores = lambda: 8
        scheduler._regrow(jobs)  # two running: a share of 4 each
        assert [j.regrow for j in jobs] == [4, 0]  # c's threads were given: not touched
        jobs[0].proc.wait(timeout=10)
        (again,) = scheduler._finish(jobs[0])
        assert again.args == ["pinned.yaml", "train.threads=4"] and again.threads == 4
        assert (again.proc, again.stopped, again.regrow) == (None, False, 0)
        assert scheduler.outcome.status == {}  # neither finished nor unfinished: queued again
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "metrics.jsonl").write_text('{"step": 97, "loss": 1.0}\n')
        near = _Job("d", tmp_path / "d", "train", [], steps=100, threads=1, shared=True)
        near.proc = subprocess.Popen(["sleep", "60"])
        scheduler._regrow([near])  # 3 steps of 100 left: not worth a restart
        assert near.regrow == 0 and not near.stopped and not near.shared  # never looked at again
    finally:
        sweep._cores = real
        for job in [*jobs, near]:
            job.proc.kill()


def test_a_regrown_run_resumes_where_it_stopped_with_more_threads(
    tmp_path, tokenizer_cache, monkeypatch
):
    from sparsefusion.compare import sweep

    monkeypatch.setattr(sweep, "_cores", lambda: 4)  # two runs of 2 threads; the last gets 4
    out = tmp_path / "sweep"
    monkeypatch.setattr(sweep, "time", _TrainingClock(out / "mot" / "metrics.jsonl"))
    recipe = _recipe(
        tmp_path, out=str(out), baseline="dense-debug", parallel=2, time_budget_s=30,
        overrides=[f"tokenizer.cache_dir={tokenizer_cache}", "run.log_every=1",
                   "run.eval_every=0", "run.progress=log"],
        runs=[{"name": "dense-debug", "config": "dense-debug", "overrides": ["train.steps=2"]},
              {"name": "mot", "config": "mot-debug",
               "overrides": ["train.steps=100000", "run.save_every=100000"]}],
    )  # fmt: skip
    assert main(["sweep", str(recipe)]) == 0
    status = json.loads((out / "sweep_status.json").read_text())
    assert status["status"] == {"dense-debug": "finished", "mot": "unfinished"}
    log = (out / "mot" / "sweep_train.log").read_text()
    assert log.count("model mot") == 2, log  # started, then restarted
    assert resolve_config(str(out / "mot" / "config.yaml"), []).train.threads == 4
    assert resolve_config(str(out / "mot" / "sweep_config.yaml"), []).train.threads == 2
    steps = [r["step"] for r in _rows(out / "mot")]
    assert steps == list(range(1, len(steps) + 1))  # resumed where it stopped: no step twice
