"""Stopping a run on SIGINT / SIGTERM without losing work.

While the loop runs, `StopSignals` turns the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption,
torchrun passing a Ctrl-C on) into a request: the step in progress finishes, the loop saves a checkpoint
and returns, and the summary names the signal so the CLI can say how to resume and exit with 128 + its
number. A second Ctrl-C aborts at once (KeyboardInterrupt), for a user who does not want to wait for the
save. Under torchrun every rank calls `agreed` after each step: an all-reduce (max) of the requests, so
all ranks stop after the same step even when only one of them was signalled, and the checkpoint (a
collective under FSDP) is written by all of them together.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager: while inside, SIGINT and SIGTERM request a stop instead of ending the process.

    Handlers can only be installed from the main thread; elsewhere (a training run in a worker thread),
    or when not `enabled`, it does nothing and the signals keep their usual effect; `enabled` must be the
    same on every rank (it decides whether `agreed` is a collective)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received = 0  # the first signal's number, 0 for none
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:  # Ctrl-C twice: do not wait
            raise KeyboardInterrupt
        self.received = self.received or signum

    def agreed(self, env: Any) -> int:
        """The signal every rank stops for (0: keep going); `env` a `flashlm.training.distributed.DistEnv`.
        A collective under torchrun, so every rank must call it after every step."""
        if not (env.enabled and self.enabled):
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def signal_name(signum: int) -> str:
    """SIGINT, SIGTERM, ... for a signal number."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
