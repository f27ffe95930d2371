"""--init_from / --reinit_heads / --freeze: the plan's refusals, the frozen
parts (no gradient, BatchNorm in inference mode, no optimizer slots, no
EMA). The end-to-end promise (a dataset added, old heads bit-identical) is
in train_lib_test, on a real training run."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from effdet_tf import checkpoint, compat, optimization, transfer
from effdet_tf.modeling import factory
from effdet_tf.config import ClassEntry, Config, ConfigError, DataConfig, DatasetConfig, ModelConfig, TrainConfig

MODEL = ModelConfig(image_size=128, width_multiplier=0.125, depth_multiplier=0.34, fpn_channels=16,
                    fpn_repeats=1, head_depth=1)


def _dataset(name, classes, **kwargs):
    return DatasetConfig(name=name, path=f"/data/{name}", tfrecord_dir=f"/cache/{name}",
                         classes=tuple(ClassEntry(i, cid, n) for i, (cid, n) in enumerate(classes)), **kwargs)


TOOLS = _dataset("tools", [(1, "hammer"), (2, "saw")])
FOOD = _dataset("food", [(52, "banana"), (53, "apple")])
PETS = _dataset("pets", [(3, "cat")])


def _config(datasets, model=MODEL, **train):
    return Config(model=model, data=DataConfig(datasets=tuple(datasets)),
                  train=TrainConfig(model_dir="/tmp/unused", **train))


@pytest.fixture
def earlier(tmp_path):
    """A model dir of a run on tools + food (config.json and a weights file)."""
    model_dir = tmp_path / "earlier"
    checkpoint.write_config(str(model_dir), _config([TOOLS, FOOD]))
    (model_dir / checkpoint.BEST_WEIGHTS).write_bytes(b"weights")
    return str(model_dir)


def test_parse_freeze():
    assert transfer.parse_freeze([]) == transfer.Freeze()
    assert transfer.parse_freeze(["backbone"]) == transfer.Freeze(backbone=True)
    # The flag splits "trunk,heads:food,tools" at every comma.
    assert transfer.parse_freeze(["trunk", "heads:food", "tools"]) == transfer.Freeze(True, True, ("food", "tools"))
    with pytest.raises(ConfigError, match="'neck' is not backbone, trunk or heads:NAME"):
        transfer.parse_freeze(["neck"])
    with pytest.raises(ConfigError, match="heads: needs a dataset name"):
        transfer.parse_freeze(["heads:"])


def test_plan_adds_the_earlier_runs_frozen_heads_first_without_data(earlier):
    config = transfer.plan(_config([PETS], init_from=earlier, freeze=("trunk", "heads:tools", "food")))
    assert config.head_names == ("tools", "food", "pets")
    assert [d.trains for d in config.data.datasets] == [False, False, True]
    assert [d.name for d in config.data.training_datasets] == ["pets"]
    # The carried heads keep the earlier run's label maps and converted data.
    assert config.data.dataset("food").classes == FOOD.classes
    assert config.data.dataset("food").tfrecord_dir == "/cache/food"
    assert config.data.images_per_step == PETS.batch_size
    # Naming a dataset of the earlier run keeps training it: nothing added.
    same = transfer.plan(_config([TOOLS, FOOD], init_from=earlier))
    assert same.head_names == ("tools", "food") and all(d.trains for d in same.data.datasets)


def test_plan_refuses_a_changed_label_map_naming_the_classes(earlier):
    changed = _dataset("food", [(52, "banana"), (61, "cake")])
    with pytest.raises(ConfigError, match=r"dataset 'food' has another label map \(only in --init_from: 53 'apple'; "
                                          r"only now: 61 'cake'\); use --reinit_heads=food"):
        transfer.plan(_config([TOOLS, changed], init_from=earlier))
    fresh = transfer.plan(_config([TOOLS, changed], init_from=earlier, reinit_heads=("food",)))
    assert fresh.head_names == ("tools", "food")


def test_plan_refuses_another_architecture_and_unclear_heads(earlier):
    wider = dataclasses.replace(MODEL, width_multiplier=0.25, fpn_channels=32)
    with pytest.raises(ConfigError, match=r"another architecture.*--width_multiplier=0.125 there, 0.25 now; "
                                          r"--fpn_channels=16 there, 32 now"):
        transfer.plan(_config([TOOLS, FOOD], model=wider, init_from=earlier))
    # Another input size changes the anchors, not the weights: allowed.
    larger = dataclasses.replace(MODEL, image_size=256)
    assert transfer.plan(_config([TOOLS, FOOD], model=larger, init_from=earlier)).head_names == ("tools", "food")
    with pytest.raises(ConfigError, match=r"its dataset 'food' has no --dataset here.*--freeze=heads:food"):
        transfer.plan(_config([TOOLS], init_from=earlier))
    with pytest.raises(ConfigError, match=r"--freeze=heads:cars: no such dataset"):
        transfer.plan(_config([TOOLS], freeze=("heads:cars",)))
    with pytest.raises(ConfigError, match="--reinit_heads needs --init_from"):
        transfer.plan(_config([TOOLS], reinit_heads=("tools",)))
    with pytest.raises(ConfigError, match="not a directory"):
        transfer.plan(_config([TOOLS], init_from=earlier + "-missing"))
    with pytest.raises(ConfigError, match="No dataset to train"):
        transfer.plan(_config([], init_from=earlier, freeze=("heads:tools", "food")))


def test_frozen_parts_take_no_gradient_no_slots_no_average_and_keep_batchnorm_in_inference():
    config = _config([TOOLS, FOOD], freeze=("trunk", "heads:tools"), optimizer="adam", ema_momentum=0.9)
    detector = factory.build_detector(config)
    everything = len(detector.trainable_variables)
    transfer.apply_freeze(detector, config.train.freeze)
    trainable = detector.trainable_variables
    food_head = detector.class_nets["food"].trainable_variables + detector.box_nets["food"].trainable_variables
    assert {id(v) for v in trainable} == {id(v) for v in food_head} and len(trainable) < everything
    optimizer = optimization.make_optimizer(config.train, detector, 16, 10)
    optimizer.build(trainable)
    # Adam: two slots (m, v) per trainable variable, none for frozen ones.
    slots = [v for v in optimizer.variables if "momentum" in v.path or "velocity" in v.path]
    assert len(slots) == 2 * len(trainable)
    frozen_stats = {id(v) for layer in compat.sublayers(detector.feature_extractor)
                    if isinstance(layer, keras.layers.BatchNormalization)
                    for v in (layer.moving_mean, layer.moving_variance)}
    assert frozen_stats and not frozen_stats & {id(v) for v in optimizer.averaged_variables}
    # In training mode a frozen part still normalises with its moving
    # statistics and leaves them as they were.
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, [2, 128, 128, 3]), tf.float32)
    stats_before = [v.numpy() for v in detector.feature_extractor.non_trainable_variables]
    inference = detector(images, training=False)
    training = detector(images, training=True)
    np.testing.assert_array_equal(training["tools"]["cls_logits"], inference["tools"]["cls_logits"])
    for before, v in zip(stats_before, detector.feature_extractor.non_trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())
    # The food head is not frozen: its BatchNorm uses the batch statistics.
    assert not np.array_equal(training["food"]["cls_logits"], inference["food"]["cls_logits"])
