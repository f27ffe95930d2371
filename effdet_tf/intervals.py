"""Checkpoint intervals: what a Keras epoch is in this project.

A training epoch is `steps_per_epoch` steps. Keras can start a fit only at
the start of one of its own epochs, and a killed run must resume at its last
backup, so `model.fit` runs one Keras epoch per checkpoint interval of
`checkpoint_every_steps` steps, and the training epoch is rounded up to a
whole number of intervals. This module is the one place that maps between
the two; the rest of the code speaks of steps and training epochs.
"""

import dataclasses
import math

from absl import logging


@dataclasses.dataclass(frozen=True)
class Intervals:
    """steps_per_epoch: a training epoch, in steps (whole intervals);
    interval_steps: one checkpoint interval = one Keras epoch, in steps;
    per_epoch: intervals in a training epoch; total: in the whole run."""

    steps_per_epoch: int
    interval_steps: int
    per_epoch: int
    total: int

    @classmethod
    def plan(cls, epoch_steps, checkpoint_every_steps, epochs):
        """An epoch of `epoch_steps` steps (rounded up to whole intervals)."""
        interval = min(checkpoint_every_steps, epoch_steps)
        per_epoch = math.ceil(epoch_steps / interval)
        if per_epoch * interval != epoch_steps:
            logging.info("Epoch rounded up from %d to %d steps (a whole number of %d-step checkpoint intervals).",
                         epoch_steps, per_epoch * interval, interval)
        return cls(per_epoch * interval, interval, per_epoch, per_epoch * epochs)

    def first_keras_epoch(self, step):
        """The Keras epoch a run resumed at `step` starts with; a step off an
        interval end cannot be resumed (RuntimeError)."""
        if not self.is_interval_end(step):
            raise RuntimeError(f"Backup at step {step} is not on a {self.interval_steps}-step checkpoint boundary; "
                             "was --checkpoint_every_steps changed? Use --fresh_start.")
        return step // self.interval_steps

    def is_interval_end(self, step):
        return step % self.interval_steps == 0

    def epoch_after(self, keras_epoch):
        """(training epoch under way once Keras epoch `keras_epoch` (0-based)
        ends, counted from 1; whether that ends a training epoch; whether it
        ends the run)."""
        done = keras_epoch + 1
        return math.ceil(done / self.per_epoch), done % self.per_epoch == 0, done >= self.total
