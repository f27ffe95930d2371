"""The non-finite loss watcher names the step and the head."""

import types

import keras
import pytest

from effdet_tf import callbacks


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
