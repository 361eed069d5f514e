"""Preemption: on SIGTERM or SIGINT, finish the current step, save a checkpoint, log it, exit.

SIGTERM is what Slurm and Kubernetes send before they kill a job; SIGINT is Ctrl-C. While the
training loop runs, the first signal is only recorded; at the end of the step the trainer saves a
checkpoint of that step and exits with code ``128 + signal`` (143 after SIGTERM, 130 after
SIGINT), so running the same command again resumes exactly. A second signal exits at once (same
code; the newest complete checkpoint stays usable, a save cut short leaves only a temporary
folder). A signal before the loop has started (tokenizer training, data indexing) exits at once
too: there is nothing to save yet.

Under torchrun the ranks agree on the step to stop at: each step sums a one-element flag over the
ranks (one tiny all-reduce), so a signal that reaches one rank stops all of them after the same
step with the same checkpoint.

Testing aid: ``SPARSEFUSION_FAULTS=sigterm_at_step=N`` makes rank 0 send itself SIGTERM at the
end of step N (see ``faults.py`` for the other faults).

Shape legend: none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import torch

from sparsefusion.runtime import faults

log = logging.getLogger("sparsefusion")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """The run stopped on a signal; ``code`` is ``128 + signal`` (a ``SystemExit``, so the
    command exits with it and no traceback; ``except Exception`` does not swallow it)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.message = signum, message

    def __str__(self) -> str:
        return self.message


class _State:
    requested = 0  # the first signal received (0: none)
    in_loop = False  # the training loop has started: a signal waits for the end of the step


_state = _State()


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum: int, frame: Any) -> None:
    if _state.requested:
        msg = f"second {_name(signum)}: exiting at once (exit code {128 + signum})"
        print(msg, file=sys.stderr, flush=True)
        log.warning(msg)
        for handler in logging.getLogger("sparsefusion").handlers:
            handler.flush()
        os._exit(128 + signum)
    _state.requested = signum
    if not _state.in_loop:
        msg = f"{_name(signum)} before training started: nothing to save; exiting ({128 + signum})"
        log.warning(msg)
        raise Preempted(signum, msg)
    log.warning(
        "%s received: finishing this step, then saving a checkpoint and exiting "
        "(send it again to exit at once)",
        _name(signum),
    )


@contextlib.contextmanager
def handlers() -> Iterator[None]:
    """Install the SIGTERM/SIGINT handlers for the duration of a run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    _state.requested, _state.in_loop = 0, False
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state.requested, _state.in_loop = 0, False


def stop_requested(step: int, env: Any) -> bool:
    """True when this step must be the last (call once per step, on every rank).

    Args:
        step: the step that just finished.
        env: the ``DistEnv``; under torchrun the ranks' flags are summed, so all agree.
    """
    _state.in_loop = True
    if faults.fault_step("sigterm_at_step") == step and env.is_main:
        signal.raise_signal(signal.SIGTERM)  # runs the handler before returning
    if not env.is_distributed:
        return bool(_state.requested)
    flag = torch.tensor([1.0 if _state.requested else 0.0], device=env.device)
    torch.distributed.all_reduce(flag)
    if flag.item() > 0 and not _state.requested:
        _state.requested = signal.SIGTERM  # another rank was signalled
    return flag.item() > 0


def exit_after_save(step: int, checkpoint: Any) -> NoReturn:
    """Log that ``checkpoint`` (of ``step``) is written and exit with ``128 + signal``."""
    signum = _state.requested or signal.SIGTERM
    msg = (
        f"{_name(signum)}: stopped after step {step}; checkpoint {checkpoint} is written. "
        f"Run the same command to resume (exit code {128 + signum})"
    )
    log.warning(msg)
    raise Preempted(signum, msg)
