"""The non-finite loss watcher names the step and the head."""

import types

import keras
import pytest

from effdet_tf import callbacks
from effdet_tf.intervals import Intervals


def _fake_model(step):
    metrics = [keras.metrics.Mean(name=n) for n in ("loss", "food_cls_loss", "food_loss", "appliance_loss")]
    optimizer = types.SimpleNamespace(iterations=keras.Variable(step, dtype="int64"))
    return types.SimpleNamespace(metrics=metrics, optimizer=optimizer, stop_training=False)


def test_watcher_stops_after_patience_naming_step_and_head():
    watcher = callbacks.NonFiniteLossWatcher(["appliance", "food"], patience=3)
    model = _fake_model(10)
    watcher.set_model(model)
    nan = float("nan")
    watcher.on_train_batch_end(0, {"loss": nan, "food_cls_loss": nan, "appliance_loss": 0.5})
    watcher.on_train_batch_end(1, {"loss": 1.0, "food_cls_loss": 0.5})  # recovered: counter resets
    assert not watcher.failed
    for i in range(3):
        model.optimizer.iterations.assign(20 + i)
        watcher.on_train_batch_end(i, {"loss": nan, "food_loss": float("inf"), "appliance_loss": 0.3})
    assert watcher.failed and model.stop_training
    message = str(watcher.error)
    assert "from step 20 to step 22" in message
    assert "head(s) with a non-finite loss: food" in message
    assert "appliance" not in message.split("head(s)")[1]


def test_watcher_resets_the_nan_running_mean():
    watcher = callbacks.NonFiniteLossWatcher(["food"], patience=5)
    model = _fake_model(1)
    tracker = model.metrics[1]
    tracker.update_state(float("nan"))
    watcher.set_model(model)
    watcher.on_train_batch_end(0, {"food_cls_loss": float(tracker.result())})
    tracker.update_state(2.0)
    assert float(tracker.result()) == pytest.approx(2.0)


class _FakeTime:
    """Stands in for time.perf_counter: batches take the seconds given."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run_batches(clock, fake, seconds):
    model = clock.model
    for i, s in enumerate(seconds):
        clock.on_train_batch_begin(i)
        fake.now += s
        clock.on_train_batch_end(i)
        fake.now += 100.0  # time between batches (evaluation, checkpoints) is not training time
        if model.stop_training:
            return i + 1
    return len(seconds)


def test_clock_counts_batches_after_the_first_and_stops_at_the_budget(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(callbacks.time, "perf_counter", fake)
    ticks, plans = [], []
    clock = callbacks.TrainingClock(budget_seconds=50, every_seconds=20, on_tick=lambda c: ticks.append(c.seconds),
                                    plan=plans.append, calibration_steps=2, initial_step=100)
    clock.set_model(types.SimpleNamespace(stop_training=False))
    # First batch 60 s (tracing): apart. Then 10 s each: 50 s after batch 6.
    done = _run_batches(clock, fake, [60.0] + [10.0] * 20)
    assert clock.first_step_seconds == 60.0
    assert done == 6 and clock.steps == 6 and clock.seconds == 50.0
    assert clock.expired and clock.model.stop_training
    # Ticks after the batches that crossed 20 s and 40 s of training.
    assert ticks == [20.0, 40.0]
    # Planned after 2 counted batches (20 s, 30 s left at 10 s/step: 3 more),
    # then at each tick: 100 + 3 steps + 3 = 106; at 20 s the same; at 40 s,
    # 100 + 5 + 1 = 106.
    assert plans == [106, 106, 106]


def test_clock_without_on_tick_says_due_until_ticked(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(callbacks.time, "perf_counter", fake)
    clock = callbacks.TrainingClock(every_seconds=15)
    clock.set_model(types.SimpleNamespace(stop_training=False))
    _run_batches(clock, fake, [5.0, 10.0])
    assert not clock.due()  # 10 s counted
    _run_batches(clock, fake, [10.0, 30.0])
    assert clock.due()  # 50 s: past the 15 s mark
    clock.tick()
    assert not clock.due()  # the next mark is 60 s
    assert not clock.expired and not clock.model.stop_training


def test_epoch_end_calls_fn_at_epochs_ticks_and_an_early_stop():
    calls = []
    ticked = {"due": False}
    end = callbacks.EpochEnd(Intervals.plan(30, 10, epochs=3), fn=lambda e, last: calls.append((e, last)),
                             also_if=lambda: ticked["due"])
    model = types.SimpleNamespace(stop_training=False)
    end.set_model(model)
    end.on_epoch_end(0)
    end.on_epoch_end(1)
    end.on_epoch_end(2)  # epoch 1 done
    ticked["due"] = True
    end.on_epoch_end(3)  # mid-epoch, but a tick is due
    ticked["due"] = False
    model.stop_training = True
    end.on_epoch_end(4)  # a spent time budget stops mid-epoch: the last call
    assert calls == [(1, False), (2, False), (2, True)]


def test_best_per_dataset_keeps_each_datasets_own_best(tmp_path):
    import json

    import numpy as np

    from effdet_tf import checkpoint

    def marked(value):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.layers[0].kernel.assign(np.full((2, 1), value, np.float32))
        return model

    evaluations = [  # (marker, AP of a, AP of b)
        (1.0, 0.2, 0.1),  # mean 0.15: a first best of everything
        (2.0, 0.1, 0.3),  # mean 0.20: best and best_b
        (3.0, 0.3, 0.0),  # mean 0.15: best_a only
    ]
    written = []
    for step, (marker, ap_a, ap_b) in enumerate(evaluations, 1):
        metrics = {"a": {"AP": ap_a}, "b": {"AP": ap_b}}
        written.append(callbacks.save_best_and_last(marked(marker), str(tmp_path), step, step, metrics,
                                                    (ap_a + ap_b) / 2, per_dataset=True))
    assert written == [["best", "best_a", "best_b"], ["best", "best_b"], ["best_a"]]
    for which, marker in (("best", 2.0), ("best_a", 3.0), ("best_b", 2.0), ("last", 3.0)):
        model = marked(0.0)
        model.load_weights(str(tmp_path / checkpoint.weights_file(which)))
        assert float(model.layers[0].kernel.numpy()[0, 0]) == marker, which
    with open(tmp_path / "best_a.json") as f:
        assert json.load(f)["AP"] == 0.3 and checkpoint.best_metrics(str(tmp_path), "best_a")["step"] == 3
    # Without the flag only best and last are written; --fresh_start clears all.
    assert callbacks.save_best_and_last(marked(4.0), str(tmp_path / "plain"), 1, 1, {"a": {"AP": 0.5}}, 0.5) == ["best"]
    assert not list((tmp_path / "plain").glob("best_*"))
    checkpoint.clear_checkpoints(str(tmp_path))
    assert not list(tmp_path.glob("best*")) and not (tmp_path / "last.weights.h5").exists()
