"""When a training run stops: when asked to, by SIGTERM (a scheduler, a cloud machine about to be taken back, `kill`),
SIGINT (Ctrl-C) or SIGHUP (the terminal closed); and when its --minutes of wall time are spent (`Budget`).

The handler only records the signal. The training loop asks once per step whether one came, so the step under way
finishes; the run then saves its checkpoint, exports its weights and exits with 128 + the signal's number (143 for
SIGTERM, 130 for SIGINT, 129 for SIGHUP), what a shell reports for a process ended by that signal. The handler stays
in place until the run has written its files: a second signal while saving is recorded and changes nothing.
"""
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopSignals:
    """While the `with` block runs, SIGNALS are recorded instead of ending the process (Python's default for SIGINT
    raises KeyboardInterrupt wherever the program happens to be, possibly halfway through writing a file)."""

    def __init__(self):
        self.received = None  # the first signal this process got
        self.signum = None  # the signal the run stops for, the same in every process (see `requested`)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _record(self, signum, frame):
        if self.received is None:
            self.received = signum

    def requested(self, ddp: bool, device: torch.device) -> bool:
        """Whether a signal asked the run to stop; under torchrun for every process as soon as for one of them, so
        that they stop together, at the same step, for the same signal."""
        got = torch.tensor(self.received or 0, device=device)
        if ddp:
            dist.all_reduce(got, op=dist.ReduceOp.MAX)
        if int(got):
            self.signum = int(got)
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def ignore_in_worker(worker_id: int):
    """DataLoader worker_init_fn: a signal sent to the whole process group (Ctrl-C, a scheduler) leaves the workers
    running; the main process decides when to stop, and shuts them down itself."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


_IMPORTED = time.time()


def process_start() -> float:
    """When this process started (seconds since the epoch), from /proc on Linux: the interpreter's and torch's
    start-up count too. Elsewhere, when this module was imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # from field 3 (state) on
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: clock ticks after boot
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED
    return min(start, _IMPORTED)  # btime is rounded to the second


class Budget:
    """--minutes: wall time from `start` (by default the process's), start-up (reading the videos, the bf16 probe)
    included.

    The lr milestones and p(gt) are spread over the run's length, so it is fixed early: steps SKIP+1 .. SKIP+TIMED
    are timed (the first SKIP left out: allocator, loader start, cuDNN autotuning), or fewer when they already
    took a tenth of the budget, and the steps that fit in what is left at that speed become the run's length
    (3% kept for saves and validation). Under torchrun the first process decides for all."""

    SKIP = 5  # steps left out of the timing
    TIMED = 20  # steps timed, at most

    def __init__(self, minutes: float, start: float = None):
        self.minutes = minutes
        self.deadline = (process_start() if start is None else start) + 60 * minutes
        self.first = self.t_timed = None  # the step this process started at; when timing began
        self.speed = None  # seconds per step, once measured

    def left(self) -> float:
        return self.deadline - time.time()

    def fix_length(self, step: int, ddp: bool, device: torch.device, reserve: float = 0.0):
        """Called before each step: None until the run's length is known, then that length (once); `reserve`
        seconds are kept for the end (its validation)."""
        if self.first is None:
            self.first = step
        timed = step - self.first - self.SKIP
        if timed == 0:
            self.t_timed = time.time()
        if timed < 2:
            return None
        spent = time.time() - self.t_timed
        done = torch.tensor(float(timed >= self.TIMED or spent >= 6 * self.minutes), device=device)  # or a tenth
        if ddp:  # the first process's clock decides: every process calls the broadcast below, or none
            dist.broadcast(done, 0)
        if not done.item():
            return None
        left = max(self.left() - reserve, 0.0)
        total = torch.tensor(step + int(0.97 * left * timed / max(spent, 1e-9)), device=device)
        if ddp:
            dist.broadcast(total, 0)
        self.speed = spent / timed  # seconds per step
        return max(step + 1, int(total))

    def spent(self, ddp: bool, device: torch.device) -> bool:
        """Whether the time is up; under torchrun, for every process as soon as for one (they stop together)."""
        late = torch.tensor(float(time.time() > self.deadline), device=device)
        if ddp:
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return bool(late.item())
