"""What a run on a shared cluster needs around the training loop: reacting to the scheduler's
warning signal (preemption), wall-time checkpoints that every rank agrees on, and a watchdog
that turns a hung step into a stack dump and a non-zero exit.

Signals are caught with `signal.signal` (main thread only) and only set a flag: the loop reads
it between steps, so a checkpoint is never written from inside a signal handler. The decision
to stop or to checkpoint is all-reduced (max) over the job every step, so all ranks act at the
same step even when the signal reached only some of them.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import time

import torch
import torch.distributed as dist


class PreemptionSignals:
    """Catch `names` (e.g. ["SIGTERM", "SIGUSR1"]) while the context is open; `received` holds
    the first one caught (None: none yet). The previous handlers come back on exit."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def number(self) -> int:
        """The caught signal's number (0: none)."""
        return int(getattr(signal, self.received)) if self.received else 0

    def _handle(self, signum: int, _frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"[mdt] received {self.received}: finishing the current step, then writing a checkpoint and "
                  "exiting", file=sys.stderr, flush=True)

    def __enter__(self) -> "PreemptionSignals":
        for name in self.names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


class WallClockCheckpoints:
    """Whether `every_minutes` of wall time passed since the last checkpoint (0: never)."""

    def __init__(self, every_minutes: float):
        self.every_s = every_minutes * 60.0
        self.last = time.monotonic()

    def due(self) -> bool:
        """True once the interval has passed since the last `written()`."""
        return self.every_s > 0 and time.monotonic() - self.last >= self.every_s

    def written(self) -> None:
        """A checkpoint was just written: the interval starts again."""
        self.last = time.monotonic()


def agree(values: list[int], device: torch.device) -> list[int]:
    """The maximum of each value over all ranks, on every rank (e.g. a caught signal's number,
    0 where none was caught; local without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    stacked = torch.tensor(values, dtype=torch.int64, device=device)  # [len(values)]
    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return [int(v) for v in stacked.tolist()]


class HangWatchdog:
    """`faulthandler.dump_traceback_later` re-armed before every step: if a step (a stuck
    collective, a dead peer) takes longer than `timeout_s`, faulthandler's own thread (it runs
    even while the main thread is blocked in C++) writes every thread's Python stack to stderr
    and exits the process with status 1. 0 disables it."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def __enter__(self) -> "HangWatchdog":
        self.arm()
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()

    def arm(self) -> None:
        """Start (or restart) the countdown."""
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)

    def disarm(self) -> None:
        """Stop the countdown (the loop ended)."""
        if self.timeout_s > 0:
            faulthandler.cancel_dump_traceback_later()
