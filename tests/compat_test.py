"""compat.py: every internal it reaches is there, and each use does its job
on a tiny model (an upgrade that breaks one fails here, by name)."""

import inspect
import os

import keras
import keras_cv
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer

from effdet_tf import compat


def test_every_internal_is_in_the_installed_versions():
    assert compat.missing() == [], "an upgrade moved these; see effdet_tf/compat.py:\n" + "\n".join(compat.missing())


def test_a_moved_internal_is_reported_by_name_and_checked_version(monkeypatch):
    monkeypatch.setattr(compat, "INTERNALS", (("a walk", "keras.Model", "_no_such_walk"),
                                              ("a module", "keras.src.no_such_module", "f")))
    problems = compat.missing()
    assert problems[0].startswith("a walk: keras.Model._no_such_walk (checked against {'keras': '3.15'")
    assert problems[1].startswith("a module: keras.src.no_such_module.f")


def test_sublayers_reaches_layers_nested_in_submodels():
    inner = keras.Sequential([keras.layers.Dense(2), keras.layers.BatchNormalization()])
    inputs = keras.Input([3])
    outer = keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))
    kinds = [type(layer).__name__ for layer in compat.sublayers(outer)]
    assert kinds.count("BatchNormalization") == 1 and kinds.count("Dense") == 2
    assert outer not in compat.sublayers(outer)


def test_multi_worker_log_patch_takes_the_first_replica_under_multi_worker_only(monkeypatch):
    seen = []
    monkeypatch.setattr(tf_trainer, "reduce_per_replica", lambda values, strategy, reduction: seen.append(reduction))
    compat.patch_multi_worker_logs()
    compat.patch_multi_worker_logs()  # idempotent: wrapped once
    # An instance without __init__: isinstance is all the patch looks at, and
    # a real one would start the collective runtime in this process.
    multi_worker = object.__new__(tf.distribute.MultiWorkerMirroredStrategy)
    tf_trainer.reduce_per_replica(1.0, multi_worker, "auto")
    tf_trainer.reduce_per_replica(1.0, tf.distribute.get_strategy(), "auto")
    tf_trainer.reduce_per_replica(1.0, multi_worker, "sum")
    assert seen == ["first", "auto", "sum"]


def test_skipped_symbolic_build_takes_the_arguments_keras_passes():
    # Keras's trainer calls model._maybe_symbolic_build(iterator=..., data_batch=...).
    assert {"iterator", "data_batch"} <= set(inspect.signature(keras.Model._maybe_symbolic_build).parameters)
    model = keras.Sequential([keras.layers.Dense(1)])
    compat.skip_symbolic_build(model)
    assert model._maybe_symbolic_build(iterator=None, data_batch=(np.zeros([1, 2]),)) is None
    assert not model.built


def test_weights_saved_without_the_optimizer_load_back_and_are_smaller(tmp_path):
    model = keras.Sequential([keras.Input([64]), keras.layers.Dense(64)])
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    full, bare = str(tmp_path / "full.weights.h5"), str(tmp_path / "bare.weights.h5")
    model.save_weights(full)
    compat.save_weights_without(model, bare, [model.optimizer])
    assert os.path.getsize(bare) < 0.6 * os.path.getsize(full)  # Adam keeps two slots per weight
    fresh = keras.Sequential([keras.Input([64]), keras.layers.Dense(64)])
    fresh.load_weights(bare)
    for a, b in zip(fresh.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_attached_asset_is_written_into_the_saved_model(tmp_path):
    source = tmp_path / "label_map.json"
    source.write_text('{"heads": []}')
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serve", tf.function(lambda x: x + 1.0), input_signature=[tf.TensorSpec([None], tf.float32)])
    compat.attach_asset(archive, "label_map", str(source))
    archive.write_out(str(tmp_path / "saved"), verbose=False)
    assert (tmp_path / "saved" / "assets" / "label_map.json").read_text() == '{"heads": []}'
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    assert loaded.label_map.asset_path.numpy().decode().endswith("assets/label_map.json")


class _Doubling(compat.OptimizerHooks, keras.optimizers.SGD):
    def __init__(self, transform, **kwargs):
        super().__init__(**kwargs)
        self.transforms_reduced_gradients = transform
        self.applied = tf.Variable(0, trainable=False)

    def reduced_gradients(self, grads):
        return [2.0 * g for g in grads]

    def after_apply(self):
        self.applied.assign_add(1)


@pytest.mark.parametrize("transform, moved", [(True, 2.0), (False, 1.0)])
def test_optimizer_hooks_run_between_reduce_and_update_and_after_apply(transform, moved):
    w = keras.Variable(np.zeros([3], np.float32))
    optimizer = _Doubling(transform, learning_rate=1.0, name="doubling")

    @tf.function
    def step():
        optimizer.apply_gradients([(tf.ones([3]), w)])

    step()
    step()
    np.testing.assert_allclose(w.numpy(), [-2 * moved] * 3)
    assert int(optimizer.applied.numpy()) == 2 and int(optimizer.iterations.numpy()) == 2


def test_mixup_box_rule_appends_each_partner_boxes_at_full_weight():
    mixup = keras_cv.layers.MixUp()
    own = {"boxes": tf.constant([[[0.0, 0, 1, 1]], [[2.0, 2, 3, 3]]]), "classes": tf.constant([[0.0], [1.0]])}
    out = compat.mixup_boxes(mixup, own, tf.constant([1, 0]))  # image 0 mixes with 1, 1 with 0
    np.testing.assert_array_equal(out["boxes"].numpy(), [[[0, 0, 1, 1], [2, 2, 3, 3]], [[2, 2, 3, 3], [0, 0, 1, 1]]])
    np.testing.assert_array_equal(out["classes"].numpy(), [[0, 1], [1, 0]])
