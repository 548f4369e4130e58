"""What keeps a long run safe: stopping cleanly on a signal, and skipping numerically broken updates.

Both stages use one `StepGuard` around their loop:

    guard = StepGuard(accelerator, max_bad_steps=run.max_bad_steps)
    guard.load(state.get("guard", {}))                      # when resuming
    with guard:                                             # SIGTERM/SIGINT now request a stop
        while step < run.max_steps:
            ...forward, backward...
            if guard.check(losses, params):                 # all processes agree; False: skip
                clip, optimizer.step(), ...
            optimizer.zero_grad()
            if guard.end_step(step):                        # counts; NumericalFault after K bad in a row
                lr_scheduler.step(), ema.step(...)
            step += 1
            ...
            if guard.stop_requested:                        # the same answer on every process
                save the checkpoint (state={"guard": guard.state(), ...}); raise guard.preempted(step, folder)

Why one all-reduce per step: in a multi-process run each process sees its own loss and its own
signals (a scheduler may signal one process only), but every process must skip the same update
and stop after the same step, or the collectives of the next step deadlock. So the two flags
"something here is non-finite" and "a stop was requested here" travel together in one tiny
all-reduce, and every process acts on the sum.

Exit statuses (see docs/reliability.md): `Preempted` → 75 (EX_TEMPFAIL: stopped early, a
checkpoint was saved, run again with `--resume latest`); `NumericalFault` → 3 (the run diverged;
the last good checkpoint is intact).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import torch

log = logging.getLogger("ldm.train")

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later" — resume me
EXIT_NUMERICAL_FAULT = 3
EXIT_SAVE_FAILED = 74  # sysexits.h EX_IOERR: a checkpoint could not be written (full disk, quota, I/O error)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """The run ended before max_steps for a reason that is not a bug; `exit_status` says which."""

    exit_status = 1


class Preempted(RunStopped):
    """A stop signal arrived; the run saved `checkpoint` at `step` and can be resumed exactly."""

    exit_status = EXIT_PREEMPTED

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"stopped by a signal after step {step}; checkpoint {checkpoint} saved; run the same command with --resume latest to continue")


class NumericalFault(RunStopped):
    """Too many non-finite losses or gradients in a row."""

    exit_status = EXIT_NUMERICAL_FAULT

    def __init__(self, step: int, in_a_row: int, checkpoint: Path | None):
        self.step, self.in_a_row, self.checkpoint = step, in_a_row, checkpoint
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
        super().__init__(f"{in_a_row} non-finite losses or gradients in a row up to step {step}, so the run stopped (run.max_bad_steps); "
                         f"{where}; lower optim.lr or check the data, then resume from it")


def report_stop(error: RunStopped, prog: str) -> int:
    """For a CLI: print the stop's one line on stderr and return its exit status."""
    import sys

    print(f"{prog}: {' '.join(str(error).split())}", file=sys.stderr)
    return error.exit_status


class StepGuard:
    """Signals → a stop after the current step; non-finite updates → skipped, counted, and fatal
    after `max_bad_steps` in a row. Use as a context manager around the loop (installs the signal
    handlers in the main thread, restores the old ones on exit)."""

    def __init__(self, accelerator=None, max_bad_steps: int = 10, signals=STOP_SIGNALS):
        if max_bad_steps < 1:
            raise ValueError(f"run.max_bad_steps must be ≥ 1, got {max_bad_steps}")
        self.accelerator = accelerator
        self.max_bad_steps = max_bad_steps
        self.signals = signals
        self.bad_total = 0  # skipped updates in the whole run (saved with checkpoints)
        self.bad_in_a_row = 0
        self.last_good_checkpoint: Path | None = None
        self._signal_seen: int | None = None  # set by the handler, this process only
        self._stop_agreed = False  # set by check(): the same on every process
        self._step_ok = True
        self._previous: dict = {}

    # -- signals ---------------------------------------------------------------------------------

    def __enter__(self) -> "StepGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self._signal_seen is None:
            self._signal_seen = signum
            # os.write, not logging: a signal handler may interrupt a log call (logging is not re-entrant)
            name = signal.Signals(signum).name
            os.write(2, f"ldm: {name} received: finishing this step, saving a checkpoint, then exiting with status {EXIT_PREEMPTED} "
                        f"(send it again to stop at once; the previous checkpoint stays intact)\n".encode())
            return
        # A second signal: stop now, the default way. Checkpoints are written to a temporary folder
        # and renamed when complete, so an interrupted save leaves the previous checkpoint intact.
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    @property
    def stop_requested(self) -> bool:
        """Whether any process got a stop signal before the last `check` (the same on all processes)."""
        return self._stop_agreed

    def preempted(self, step: int, checkpoint: Path | None) -> Preempted:
        return Preempted(step, checkpoint)

    # -- numerical faults ------------------------------------------------------------------------

    def check(self, losses, parameters=None) -> bool:
        """True when every process's losses (and gradients, when no fp16 GradScaler handles them)
        are finite; call it once per optimizer, before clipping and `optimizer.step()`, on every
        process. It is a collective call: it also agrees on `stop_requested`."""
        if torch.is_tensor(losses):
            losses = [losses]
        device = self.accelerator.device if self.accelerator is not None else torch.device("cpu")
        bad = torch.zeros((), device=device)
        for loss in losses:
            bad = bad + (~torch.isfinite(loss.detach())).any().to(device)
        # An fp16 GradScaler already skips overflowing steps and lowers its scale; counting those
        # as bad would stop runs that are fine, so only the loss is checked then.
        scaler = getattr(self.accelerator, "scaler", None)
        if parameters is not None and scaler is None:
            grads = [p.grad for p in parameters if p.grad is not None]
            if grads:
                bad = bad + (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).to(device)
        flags = torch.stack([bad.float(), torch.tensor(float(self._signal_seen is not None), device=device)])
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(flags)  # sum over processes: one collective per call
        bad_anywhere, stop_anywhere = (flags > 0).tolist()
        self._stop_agreed = self._stop_agreed or stop_anywhere
        self._step_ok = self._step_ok and not bad_anywhere
        return not bad_anywhere

    def end_step(self, step: int) -> bool:
        """Close optimizer step `step` (0-based, before the increment): True if all its checks
        passed (step the LR schedule and EMA then); False if the update was skipped. Raises
        NumericalFault after `max_bad_steps` skipped updates in a row."""
        ok, self._step_ok = self._step_ok, True
        if ok:
            self.bad_in_a_row = 0
            return True
        self.bad_total += 1
        self.bad_in_a_row += 1
        if self.accelerator is None or self.accelerator.is_main_process:
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in this run)", step + 1, self.bad_in_a_row, self.bad_total)
        if self.bad_in_a_row >= self.max_bad_steps:
            raise NumericalFault(step + 1, self.bad_in_a_row, self.last_good_checkpoint)
        return False

    # -- checkpointed state ----------------------------------------------------------------------

    def state(self) -> dict:
        return {"bad_total": self.bad_total, "bad_in_a_row": self.bad_in_a_row}

    def load(self, state: dict) -> None:
        self.bad_total = int(state.get("bad_total", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers are forked with the training process's handlers, and
    stop signals often reach every process of a job: a terminal's Ctrl-C goes to the whole process
    group, systemd and Slurm send SIGTERM to every process of the unit or job step. A worker that
    died of it would make the training process fail with "DataLoader worker killed by signal"
    before it could save (seen in a real run). Only the training process decides when to stop, so
    workers ignore SIGINT, and SIGTERM while their parent lives; the loader still ends them with
    its shutdown sentinel, and an orphaned worker exits on SIGTERM as before."""
    parent = os.getppid()

    def on_sigterm(signum, frame):
        if os.getppid() != parent:  # the training process is gone: nobody else will end us
            os._exit(128 + signum)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)


__all__ = ["StepGuard", "RunStopped", "Preempted", "NumericalFault", "report_stop", "ignore_stop_signals_in_worker",
           "EXIT_PREEMPTED", "EXIT_NUMERICAL_FAULT"]
