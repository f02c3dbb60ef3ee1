"""Stopping a training run cleanly when asked to: SIGTERM (a scheduler, a cloud machine about to be taken back,
`kill`), SIGINT (Ctrl-C) or SIGHUP (the terminal closed).

The handler only records the signal. The training loop asks once per step whether one came, so the step under way
finishes; the run then saves its checkpoint, exports its weights and exits with 128 + the signal's number (143 for
SIGTERM, 130 for SIGINT, 129 for SIGHUP), what a shell reports for a process ended by that signal. The handler stays
in place until the run has written its files: a second signal while saving is recorded and changes nothing.
"""
import signal
import threading

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
