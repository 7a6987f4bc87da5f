"""Run `dwakd train` and stop it at a chosen optimizer step by a signal sent from inside the training loop.

    python tests/_stop_at_step.py STEP SIGNAL CONFIG [key=value ...]

At the end of optimizer step STEP (a `TrainerCallback.on_step_end`, i.e. after the update and before that
step is logged or saved) the process sends itself SIGNAL: `KILL` (the process dies there, like an OOM kill or
a preemption) or `INT` (Ctrl-C: `SaveOnInterrupt` saves that step and stops). A step count, not a timer, so
the stop cannot race the end of the run. Exits with `dwakd train`'s own code when the signal does not end it.
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback


class SignalAtStep(TrainerCallback):
    """Send `signum` to this process at the end of optimizer step `step`."""

    def __init__(self, step: int, signum: int) -> None:
        self.step = step
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)
        return control


def trainer_signalling_at(step: int, signum: int):
    """A `DistillationTrainer` subclass that sends `signum` to its own process at the end of step `step`."""
    from dwakd.trainer import DistillationTrainer

    class Trainer(DistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # first in line: the signal is raised before SaveOnInterrupt looks at its flag in the same step
            self.callback_handler.callbacks.insert(0, SignalAtStep(step, signum))

    return Trainer


def main() -> int:
    step, name, *train_args = sys.argv[1:]
    signum = {"KILL": signal.SIGKILL, "INT": signal.SIGINT}[name]

    import dwakd.run
    from dwakd.cli import main as dwakd_main

    dwakd.run.DistillationTrainer = trainer_signalling_at(int(step), signum)
    return dwakd_main(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main())
