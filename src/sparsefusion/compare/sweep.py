"""``sparsefusion sweep RECIPE.yaml``: train configs on the same data and seed, then compare them.

A recipe (see ``configs/sweeps/``) names the runs, the overrides every run shares (size, steps,
seed: the same data and the same initialisation seed for all) and the baseline::

    out: runs/replication_cpu        # one run folder per entry, plus compare/
    baseline: dense
    overrides: [train.steps=1200]    # applied to every run, after its own config
    runs:
      - dense                        # a preset name or a YAML file; the folder is named after it
      - {name: mot-ffn, config: mot, overrides: [model.untie_attention=false]}

Every run trains in a process of its own (``sparsefusion train``), ``parallel`` of them at once,
each with ``threads`` torch threads (default: the cores shared out). Finished runs (a checkpoint at
their last step) are skipped; unfinished ones resume where they stopped. With a time budget
(``time_budget_s`` or ``sweep --time-budget``) the runs still training when it ends are stopped
as a preemption stops them (SIGTERM: the step finishes, a checkpoint is written) and the next
invocation continues them, so a long study runs in chunks. When the cores are shared out
(``threads`` 0) and a slot comes free with nothing left to queue, a run still training with fewer
threads than its new share is stopped at a checkpoint and restarted with that share (only while
at least ``REPLAN_MIN_LEFT`` of its steps remain), so the last run of a sweep does not train on
one core of many. A run whose config cannot be resolved
(for example a preset this version does not have) is reported and skipped; a run that fails is
reported and the sweep goes on. The report compares the baseline with every run that has
validation rows, finished or not, and its status table marks the unfinished ones with the step
they reached. While runs train, one line shows the whole sweep's progress.

After a run has finished, the recipe's follow-up stages run on it in the same slots, each in a
process of its own: ``train_aux`` (``sparsefusion train-aux RUN aux.*``; only runs with
batch-routed sites, expert-choice or MoD) and then ``evaluate`` (``sparsefusion eval RUN
--checkpoint STEPS eval.*``). A stage already done for the run's final step (an
``aux_routers/metrics.jsonl`` row of that ``main_step``, an ``eval.jsonl`` row of that step
and size ``full`` that used the run's current aux routers) is skipped, so re-running a
finished sweep does nothing, and routers retrained since (``train-aux`` by hand) are evaluated
again; a stage stopped by the budget runs again next time (neither writes a partial result). A
failed stage is reported and the sweep goes on::

    train_aux: [aux.steps=400]       # omit (or null) for no stage; [] for the defaults
    evaluate: [eval.num_samples=256]

Each invocation resolves every queued run's config once, when it starts, and writes it to
``<out>/<run>/sweep_config.yaml``; the run's trainer starts from that file. A run that waits in
the queue for hours therefore trains with the presets and recipe of the moment the sweep was
invoked, even if the source changes meanwhile (the trainer refuses a resume whose model, data
or objective changed).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from sparsefusion.compare.savings import CompareConfig
from sparsefusion.config import ConfigError, from_dict, load_yaml

log = logging.getLogger(__name__)

PINNED_CONFIG = "sweep_config.yaml"  # per run: the config resolved when the sweep started
REPLAN_MIN_LEFT = 0.05  # a run is restarted with more threads only with this share of steps left


@dataclass(kw_only=True)
class SweepRunConfig:
    """One run of a sweep.

    Attributes:
        name: the run folder's name under ``out`` (unique in the sweep).
        config: a preset name or a YAML file, as ``sparsefusion train`` takes.
        overrides: ``key=value`` overrides for this run, applied after the shared ones.
    """

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"sweep.runs: invalid run name {self.name!r}")


@dataclass(kw_only=True)
class SweepConfig:
    """A sweep recipe.

    Attributes:
        out: the sweep folder (``<out>/<run name>/`` per run, ``<out>/compare/`` for the report).
        baseline: the name of the run the others are compared with.
        seed: the seed of every run (model init and corpus).
        overrides: ``key=value`` overrides shared by every run (size, steps, data).
        runs: the runs, in training order (a plain string is a config used as its own name).
        compare: how the runs are compared.
        parallel: runs trained at once, each in its own process.
        threads: torch threads per run (0: the cores this process may use, shared out among
            the runs training at once, re-shared when a slot comes free at the end of the
            queue; with ``parallel`` 1, torch's default).
        time_budget_s: stop the runs still training after this many seconds, at a checkpoint,
            and start no more (0: no budget); the next invocation continues them.
        progress_every_s: seconds between progress lines while runs train.
        train_aux: ``aux.*`` overrides of ``sparsefusion train-aux``, run on each finished run
            with batch-routed sites (None: no such stage).
        evaluate: ``eval.*`` overrides of ``sparsefusion eval``, run on each finished run at
            its final step, after ``train_aux`` (None: no such stage).
    """

    out: str = "runs/sweep"
    baseline: str = "dense"
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    runs: list[SweepRunConfig]
    compare: CompareConfig = field(default_factory=CompareConfig)
    parallel: int = 1
    threads: int = 0
    time_budget_s: float = 0.0
    progress_every_s: float = 30.0
    train_aux: list[str] | None = None
    evaluate: list[str] | None = None

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"sweep.parallel must be >= 1, got {self.parallel}")
        if self.threads < 0 or self.time_budget_s < 0 or self.progress_every_s <= 0:
            raise ValueError(
                "sweep.threads and sweep.time_budget_s must be >= 0 and sweep.progress_every_s > 0"
            )
        if not self.runs:
            raise ValueError("sweep.runs must list at least one run")
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sweep.runs: duplicate run names {dup}; give each a 'name'")
        if self.baseline not in names:
            raise ValueError(f"sweep.baseline {self.baseline!r} is not one of the runs {names}")


def load_sweep(path: str | Path) -> SweepConfig:
    """Read a recipe strictly (unknown keys name the key); plain strings in ``runs`` expand."""
    data = load_yaml(path)
    runs = data.get("runs")
    if isinstance(runs, list):
        data["runs"] = [{"name": r, "config": r} if isinstance(r, str) else r for r in runs]
    try:
        return from_dict(SweepConfig, data, where="sweep")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


@dataclass
class SweepOutcome:
    """What happened to each run.

    Statuses: ``finished``, ``skipped`` (already done), ``unfinished`` (stopped by the time
    budget, or not started before it ran out; the next invocation continues it), ``unresolved``
    (its config could not be built, e.g. an unknown preset), ``failed`` (an error while training).
    ``stages`` holds the follow-up stages' statuses (the same words), keyed ``"RUN STAGE"``.
    """

    status: dict[str, str] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)
    stage_reason: dict[str, str] = field(default_factory=dict)
    report: Path | None = None

    @property
    def done(self) -> list[str]:
        return [n for n, s in self.status.items() if s in ("finished", "skipped")]


def run_sweep(cfg: SweepConfig, *, out: Path | None = None, recipe: str = "") -> SweepOutcome:
    """Train every run (skipping finished ones), then compare the runs to the baseline."""
    from sparsefusion.compare.report import run_compare
    from sparsefusion.runs.presets import resolve_config

    root = Path(cfg.out)
    outcome = SweepOutcome()
    todo: list[_Job] = []
    for run in cfg.runs:
        run_dir = root / run.name
        overrides = [f"seed={cfg.seed}", *_threads(cfg), *cfg.overrides, *run.overrides,
                     f"run.dir={run_dir}"]  # fmt: skip
        try:
            train_cfg = resolve_config(run.config, overrides)
        except (ConfigError, ValueError) as e:
            _record(outcome, run.name, "unresolved", str(e))
            continue
        stages = _stages(cfg, run.name, run_dir, train_cfg, outcome)
        if _finished(run_dir, train_cfg.train.steps):
            _record(outcome, run.name, "skipped", f"already finished in {run_dir}")
            todo += stages[:1]
            continue
        outcome.status[run.name] = "queued"
        pinned = _pin_config(run_dir, train_cfg)
        todo.append(_Job(run.name, run_dir, "train", [str(pinned)], train_cfg.train.steps,
                         then=stages[:1], threads=train_cfg.train.threads,
                         shared=_shares_cores(cfg, run)))  # fmt: skip
    _Scheduler(cfg, outcome).run(todo)
    _write_status(root, outcome, recipe)
    comparable = [n for n in outcome.status if _has_val_rows(root / n)]
    if cfg.baseline not in comparable:
        if outcome.status.get(cfg.baseline) == "unfinished":  # a chunk of a long study
            log.warning("sweep: the baseline %r has no validation rows yet; no report this time",
                        cfg.baseline)  # fmt: skip
            return outcome
        raise ValueError(f"sweep: the baseline {cfg.baseline!r} did not finish; nothing compared")
    others = [n for n in comparable if n != cfg.baseline]
    if not others:
        log.warning("sweep: no run besides the baseline has validation rows; nothing compared")
        return outcome
    comp, files = run_compare(
        root / cfg.baseline, [root / n for n in others], out or root / "compare", cfg.compare
    )
    _append_status(files[0], outcome, recipe)
    outcome.report = files[0]
    return outcome


def _pin_config(run_dir: Path, train_cfg) -> Path:
    """Write a run's config as resolved now to ``<run_dir>/sweep_config.yaml``, the file its
    trainer is started from: a run that waits in the queue trains with the presets and recipe
    of the moment the sweep started, not with whatever the source says when its turn comes."""
    from sparsefusion.checkpoint.store import write_atomic
    from sparsefusion.config import dump_yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PINNED_CONFIG
    write_atomic(path, lambda tmp: dump_yaml(train_cfg, tmp))
    return path


def _threads(cfg: SweepConfig, section: str = "train") -> list[str]:
    """``<section>.threads`` of every run's processes (before the recipe's overrides, which
    may set it): ``train``, ``aux`` (train-aux) or ``eval``."""
    if cfg.threads:
        return [f"{section}.threads={cfg.threads}"]
    if cfg.parallel == 1:
        return []
    return [f"{section}.threads={max(1, _cores() // cfg.parallel)}"]


def _cores() -> int:
    """The cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def _shares_cores(cfg: SweepConfig, run: SweepRunConfig) -> bool:
    """True when the sweep shares the cores out among this run's trainers (no threads given
    by the recipe, the command line or an override), so it may restart them with more."""
    given = any(o.startswith("train.threads=") for o in (*cfg.overrides, *run.overrides))
    return not cfg.threads and cfg.parallel > 1 and not given


@dataclass
class _Job:
    name: str
    run_dir: Path
    stage: str  # "train", "train-aux" or "eval": the `sparsefusion` command it runs
    args: list[str]  # the command's arguments (train: the pinned config file)
    steps: int  # the run's final step
    then: list[_Job] = field(default_factory=list)  # queued first once this one has finished
    proc: subprocess.Popen | None = None
    stopped: bool = False  # sent SIGTERM by the time budget
    threads: int = 0  # train: the torch threads it trains with (0: torch's default)
    shared: bool = False  # train: its threads are the sweep's share of the cores (re-plannable)
    regrow: int = 0  # train: stopped to be restarted with this many threads

    @property
    def log_file(self) -> Path:
        """Its output file: ``sweep_train.log``, ``sweep_train_aux.log``, ``sweep_eval.log``."""
        return self.run_dir / f"sweep_{self.stage.replace('-', '_')}.log"


def _stages(cfg: SweepConfig, name: str, run_dir: Path, train_cfg, outcome: SweepOutcome):
    """The follow-up jobs a run still needs once trained, chained (each one's ``then`` holds
    the next); those already done for its final step are recorded as skipped."""
    steps, jobs = train_cfg.train.steps, []
    if cfg.train_aux is not None and _routed(train_cfg):
        if _aux_done(run_dir, steps):
            _record_stage(outcome, name, "train-aux", "skipped", f"routers for step {steps} exist")
        else:
            args = [str(run_dir), *_threads(cfg, "aux"), *cfg.train_aux]
            jobs.append(_Job(name, run_dir, "train-aux", args, steps))
    if cfg.evaluate is not None:
        if _eval_done(run_dir, steps) and not jobs:
            _record_stage(outcome, name, "eval", "skipped", f"eval.jsonl has step {steps}")
        else:
            args = [str(run_dir), "--checkpoint", str(steps), *_threads(cfg, "eval"),
                    *cfg.evaluate]  # fmt: skip
            jobs.append(_Job(name, run_dir, "eval", args, steps))
    for job, nxt in zip(jobs, jobs[1:], strict=False):
        job.then = [nxt]
    for job in jobs:
        outcome.stages[f"{name} {job.stage}"] = "queued"
    return jobs


def _routed(train_cfg) -> bool:
    """True when the run's model has batch-routed sites (causal generation needs aux routers)."""
    import torch

    from sparsefusion.models.transformer import Transformer

    model = train_cfg.model  # the vocabulary comes from the tokenizers: any size will do here
    with torch.device("meta"):
        return bool(Transformer(replace(model, vocab_size=model.vocab_size or 8)).router_sites())


def _rows(path: Path) -> list[dict]:
    from sparsefusion.runs.folder import read_metrics

    return read_metrics(path) if path.is_file() else []


def _aux_done(run_dir: Path, steps: int) -> bool:
    return any(r.get("main_step") == steps for r in _rows(run_dir / "aux_routers/metrics.jsonl"))


def _eval_done(run_dir: Path, steps: int) -> bool:
    """An ``eval.jsonl`` row of ``steps`` and size ``full`` that measured the run's current aux
    routers (retrained since: the row is stale; rows older than the key count as current)."""
    from sparsefusion.checkpoint.store import file_digest
    from sparsefusion.runs.folder import aux_routers_path

    aux = aux_routers_path(run_dir)
    digest = file_digest(aux) if aux.is_file() else None
    rows = _rows(run_dir / "eval.jsonl")
    return any(r.get("step") == steps and r.get("size") == "full"
               and r.get("aux_routers", digest) == digest for r in rows)  # fmt: skip


class _Scheduler:
    """Runs ``parallel`` training processes at a time until the queue or the budget ends."""

    def __init__(self, cfg: SweepConfig, outcome: SweepOutcome) -> None:
        self.cfg, self.outcome = cfg, outcome
        self.deadline = time.monotonic() + cfg.time_budget_s if cfg.time_budget_s else None

    def run(self, queue: list[_Job]) -> None:
        """Train the queue; SIGTERM to the sweep ends it as its time budget would (every
        running run stops at a checkpoint, the rest are marked not started, the report is
        written), so a preempted sweep continues where it stopped."""
        previous = _on_sigterm(self._preempted)
        try:
            self._run(queue)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _preempted(self, signum, frame) -> None:
        log.warning("sweep: SIGTERM: stopping the runs at a checkpoint")
        self.deadline = time.monotonic()

    def _run(self, queue: list[_Job]) -> None:
        running: list[_Job] = []
        last_line = 0.0
        try:
            while queue or running:
                expired = self.deadline is not None and time.monotonic() >= self.deadline
                while queue and len(running) < self.cfg.parallel and not expired:
                    running.append(self._start(queue.pop(0)))
                if expired:
                    self._stop(running)
                    for job in _with_followups(queue):
                        self._done(job, "unfinished", "not started: the time budget ran out "
                                   "(or the sweep was stopped)")  # fmt: skip
                    queue = []
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    queue[:0] = self._finish(job)
                if not queue and not expired:
                    self._regrow(running)
                if time.monotonic() - last_line >= self.cfg.progress_every_s:
                    log.info("sweep: %s", self.progress(running, queue))
                    last_line = time.monotonic()
                time.sleep(0.2)
        finally:  # an interrupted sweep leaves no orphaned trainer behind
            self._stop(running)
            for job in running:
                job.proc.wait()

    def _regrow(self, running: list[_Job]) -> None:
        """With nothing left to queue, stop each run that trains on fewer threads than its share
        of the cores now (at a checkpoint: SIGTERM); ``_finish`` restarts it with the share."""
        share = _cores() // max(1, len(running))
        for job in running:
            if job.stage != "train" or not job.shared or job.stopped or job.threads >= share:
                continue
            left = job.steps - _last_step(job.run_dir)
            if left < REPLAN_MIN_LEFT * job.steps:
                job.shared = False  # too near its end now and later: not read again
                continue
            log.info("sweep: a slot came free: restarting %s with %d threads (from %d) at its "
                     "next checkpoint", job.name, share, job.threads)  # fmt: skip
            job.regrow = share
            self._stop([job])

    def _start(self, job: _Job) -> _Job:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "sparsefusion", job.stage, *job.args]
        with open(job.log_file, "ab") as out:
            job.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        if job.stage == "train":
            self.outcome.status[job.name] = "running"
        else:
            self.outcome.stages[f"{job.name} {job.stage}"] = "running"
        log.info("sweep: %s %s in %s (pid %d)", job.stage, job.name, job.run_dir, job.proc.pid)
        return job

    def _stop(self, running: list[_Job]) -> None:
        for job in running:
            if not job.stopped and job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)  # the step finishes, a checkpoint is saved
                job.stopped = True

    def _finish(self, job: _Job) -> list[_Job]:
        """Record how ``job`` ended; returns the jobs to queue first (its follow-ups)."""
        if job.stage != "train":
            return self._finish_stage(job)
        code, step = job.proc.returncode, _last_step(job.run_dir)
        if code == 0 and _finished(job.run_dir, job.steps):
            self._done(job, "finished", f"trained in {job.run_dir}")
            return job.then
        elif job.regrow and code in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
            return [_regrown(job)]
        elif job.stopped and code in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
            # (-SIGTERM: stopped while still starting, before its handler was installed)
            self._done(job, "unfinished", f"stopped by the time budget (or SIGTERM) at step "
                       f"{step} of {job.steps}; run the sweep again to continue")  # fmt: skip
        elif code == 0:  # train.stop_at ended this invocation early
            self._done(job, "unfinished", f"stopped at step {step} of {job.steps} "
                       "(train.stop_at); run the sweep again to continue")  # fmt: skip
        else:
            tail = _tail(job.log_file)
            self._done(job, "failed", f"exit code {code} at step {step}: {tail}")
        for nxt in _with_followups(job.then):
            self._done(nxt, "unfinished", "not started: the run has not finished training")
        return []

    def _finish_stage(self, job: _Job) -> list[_Job]:
        code = job.proc.returncode
        if code == 0:
            self._done(job, "finished", f"{job.stage} at step {job.steps}")
            return job.then
        if job.stopped:  # neither stage writes a partial result: it runs again next time
            self._done(job, "unfinished", "stopped by the time budget (or SIGTERM); run the "
                       "sweep again to run it")  # fmt: skip
        else:
            self._done(job, "failed", f"exit code {code}: {_tail(job.log_file)}")
        for nxt in _with_followups(job.then):  # eval waits for the aux routers it measures
            self._done(nxt, "unfinished", f"not started: {job.stage} did not finish")
        return []

    def _done(self, job: _Job, status: str, reason: str) -> None:
        if job.stage == "train":
            _record(self.outcome, job.name, status, reason)
        else:
            _record_stage(self.outcome, job.name, job.stage, status, reason)

    def progress(self, running: list[_Job], queue: list[_Job]) -> str:
        """One line: how many runs are done, each running run's step (or stage), how many wait."""
        done = sum(s in ("finished", "skipped") for s in self.outcome.status.values())
        parts = [f"{done}/{len(self.cfg.runs)} done"]
        parts += [
            f"{j.name} step {_last_step(j.run_dir)}/{j.steps}"
            if j.stage == "train"
            else f"{j.name} {j.stage}"
            for j in running
        ]
        if queue:
            parts.append(f"{len(queue)} queued")
        return " | ".join(parts)


def _regrown(job: _Job) -> _Job:
    """``job`` again, to resume with ``job.regrow`` threads (the pinned config, overridden)."""
    args = [a for a in job.args if not a.startswith("train.threads=")]
    return replace(job, args=[*args, f"train.threads={job.regrow}"], threads=job.regrow,
                   proc=None, stopped=False, regrow=0)  # fmt: skip


def _with_followups(jobs: list[_Job]) -> list[_Job]:
    """``jobs`` and, after each, the follow-up stages chained to it."""
    out: list[_Job] = []
    for job in jobs:
        out += [job, *_with_followups(job.then)]
    return out


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM (main thread only); the previous handler, or None."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _last_step(run_dir: Path) -> int:
    from sparsefusion.runs.folder import last_logged_step

    return last_logged_step(run_dir) or 0


def _has_val_rows(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and '"split": "val"' in path.read_text(errors="replace")


def _tail(path: Path, lines: int = 3) -> str:
    if not path.is_file():
        return ""
    return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def _record(outcome: SweepOutcome, name: str, status: str, reason: str) -> None:
    outcome.status[name], outcome.reason[name] = status, reason
    level = logging.WARNING if status in ("unresolved", "failed") else logging.INFO
    log.log(level, "sweep: %s %s: %s", name, status, reason)


def _record_stage(outcome: SweepOutcome, name: str, stage: str, status: str, reason: str) -> None:
    key = f"{name} {stage}"
    outcome.stages[key], outcome.stage_reason[key] = status, reason
    level = logging.WARNING if status == "failed" else logging.INFO
    log.log(level, "sweep: %s %s: %s", key, status, reason)


def _finished(run_dir: Path, steps: int) -> bool:
    from sparsefusion.checkpoint.store import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return False
    try:  # a damaged newest checkpoint: the trainer resumes from an older one, or says why
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= steps


def _status_lines(outcome: SweepOutcome, recipe: str) -> list[str]:
    head = f"## Sweep runs ({recipe})" if recipe else "## Sweep runs"
    lines = [head, "", "| run | status | detail |", "| --- | --- | --- |"]
    rows = [*outcome.status.items(), *outcome.stages.items()]
    reasons = {**outcome.reason, **outcome.stage_reason}
    for name, status in rows:
        detail = reasons.get(name, "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {status} | {detail} |")
    return lines + [""]


def _write_status(root: Path, outcome: SweepOutcome, recipe: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep_status.json").write_text(
        json.dumps(
            {
                "recipe": recipe,
                "status": outcome.status,
                "reason": outcome.reason,
                "stages": outcome.stages,
                "stage_reason": outcome.stage_reason,
            },
            indent=2,
        )  # fmt: skip
    )


def _append_status(md: Path, outcome: SweepOutcome, recipe: str) -> None:
    md.write_text(md.read_text() + "\n" + "\n".join(_status_lines(outcome, recipe)))
