"""intervals.py: training epochs as whole checkpoint intervals (fit's epochs)."""

import pytest

from effdet_tf.intervals import Intervals


def test_an_epoch_is_rounded_up_to_whole_intervals():
    assert Intervals.plan(25, 10, epochs=4) == Intervals(steps_per_epoch=30, interval_steps=10, per_epoch=3, total=12)
    # An interval longer than the epoch is the epoch.
    assert Intervals.plan(7, 100, epochs=2) == Intervals(7, 7, 1, 2)


def test_keras_epochs_map_back_to_training_epochs():
    intervals = Intervals.plan(30, 10, epochs=2)
    assert [intervals.epoch_after(k) for k in range(6)] == [
        (1, False, False), (1, False, False), (1, True, False),
        (2, False, False), (2, False, False), (2, True, True)]


def test_resuming_starts_at_the_interval_of_the_backup_and_only_on_its_end():
    intervals = Intervals.plan(30, 10, epochs=2)
    assert intervals.first_keras_epoch(0) == 0 and intervals.first_keras_epoch(40) == 4
    assert intervals.is_interval_end(20) and not intervals.is_interval_end(25)
    with pytest.raises(RuntimeError, match="step 25 is not on a 10-step checkpoint boundary"):
        intervals.first_keras_epoch(25)
