"""The assembled detector: shapes, per-dataset routing, serialization, overfit."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from conftest import TINY_DETECTOR, config_round_trip, saving_round_trip
from effdet_tf.modeling.detector import Detector
from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.label_encoder import LabelEncoder

TINY = TINY_DETECTOR


def tiny_detector(heads=None, **overrides):
    return Detector(heads=heads or {"appliance": 5, "food": 10}, **{**TINY, **overrides})


def test_full_size_detector_class_and_box_shapes_at_512():
    model = Detector(heads={"appliance": 5, "food": 10}, image_size=512)
    outputs = model(tf.zeros([1, 512, 512, 3]))
    assert model.anchors.boxes.shape[0] == 49104
    assert outputs["appliance"]["cls_logits"].shape == (1, 49104, 5)
    assert outputs["food"]["cls_logits"].shape == (1, 49104, 10)
    assert outputs["appliance"]["box_deltas"].shape == (1, 49104, 4)
    assert outputs["food"]["box_deltas"].shape == (1, 49104, 4)
    # The backbone is pinned by its own test; heads and neck are small by
    # comparison (D0's neck + one head pair is well under 1M parameters).
    extra = model.count_params() - model.backbone.count_params()
    assert 0 < extra < 1_500_000


def test_dict_input_runs_each_head_on_its_own_images_only():
    model = tiny_detector()
    rng = np.random.default_rng(0)
    appliance_images = tf.constant(rng.uniform(0, 255, [2, 128, 128, 3]), tf.float32)
    food_images = tf.constant(rng.uniform(0, 255, [3, 128, 128, 3]), tf.float32)
    routed = model({"appliance": appliance_images, "food": food_images}, training=False)
    assert set(routed) == {"appliance", "food"}
    assert routed["appliance"]["cls_logits"].shape == (2, model.anchors.boxes.shape[0], 5)
    assert routed["food"]["cls_logits"].shape == (3, model.anchors.boxes.shape[0], 10)
    # In inference mode every op is per-image, so routing must equal running
    # all heads on each dataset's images separately.
    alone = model(food_images, training=False)["food"]
    np.testing.assert_allclose(routed["food"]["cls_logits"], alone["cls_logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(routed["food"]["box_deltas"], alone["box_deltas"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown datasets"):
        model({"cars": appliance_images})


def test_detect_runs_only_the_heads_asked_for():
    model = tiny_detector()
    images = tf.constant(np.random.default_rng(1).uniform(0, 255, [2, 128, 128, 3]), tf.float32)
    every_head = model.detect(images, score_threshold=0.0)

    def refuse(*args, **kwargs):
        raise AssertionError("the appliance head ran")

    model.class_nets["appliance"].call = refuse
    model.box_nets["appliance"].call = refuse
    # The patch is live: asking for every head reaches the appliance head.
    with pytest.raises(AssertionError, match="appliance head ran"):
        model.detect(images)
    food = model.detect(images, heads=["food"], score_threshold=0.0)
    assert set(food) == {"food"}
    for key in ("boxes", "scores", "classes", "num_detections"):
        np.testing.assert_allclose(food["food"][key], every_head["food"][key], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="unknown heads.*cars"):
        model.detect(images, heads=["cars"])


def test_bn_momentum_reaches_every_batchnorm_and_its_moving_statistics():
    images = tf.constant(np.random.default_rng(2).uniform(0, 255, [2, 128, 128, 3]), tf.float32)
    stems = {}
    for momentum in (0.9, None):  # None: the layers' own 0.99
        keras.utils.set_random_seed(0)
        model = tiny_detector(bn_momentum=momentum)
        norms = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
        assert len(norms) > 50 and {l.momentum for l in norms} == {momentum or 0.99}
        model(images, training=True)
        stems[momentum] = next(l for l in norms if l.path.startswith("stem")).moving_mean.numpy()
    assert Detector.from_config(tiny_detector(bn_momentum=0.9).get_config()).bn_momentum == 0.9
    # From 0, one step moves the moving mean (1 - momentum) of the way to the
    # batch mean: ten times as far at 0.9 as at 0.99 (same weights, same batch).
    assert np.any(stems[None] != 0)
    np.testing.assert_allclose(stems[0.9], 10 * stems[None], rtol=1e-3, atol=1e-7)


def test_logits_are_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tiny_detector()
        outputs = model(tf.zeros([1, 128, 128, 3]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert outputs["food"]["cls_logits"].dtype == tf.float32
    assert outputs["food"]["box_deltas"].dtype == tf.float32


def test_get_config_round_trip():
    model = tiny_detector(head_loss_weights={"food": 2.0}, box_loss="giou")
    clone = config_round_trip(model)
    assert clone.count_params() == model.count_params()
    assert clone.head_loss_weights == {"appliance": 1.0, "food": 2.0}


def test_keras_file_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_detector()
    images = tf.constant(np.random.default_rng(1).uniform(0, 255, [2, 128, 128, 3]), tf.float32)
    loaded = saving_round_trip(model, images, str(tmp_path / "detector.keras"), atol=0)
    assert list(loaded.head_names) == ["appliance", "food"]


def _overfit_batch(image_size=128):
    """Two images with solid rectangles: class 0 red, class 1 green (yxyx px)."""
    specs = [
        [([16, 20, 64, 76], 0), ([72, 60, 120, 116], 1)],
        [([30, 70, 100, 118], 1), ([10, 8, 50, 40], 0)],
    ]
    colours = {0: (230, 30, 30), 1: (30, 220, 40)}
    images = np.full([len(specs), image_size, image_size, 3], 90, np.float32)
    for i, objects in enumerate(specs):
        for (y0, x0, y1, x1), label in objects:
            images[i, y0:y1, x0:x1] = colours[label]
    return images, specs


@pytest.mark.slow
def test_overfit_few_images_detections_land_on_ground_truth():
    """Targets, loss and decoding agree: a few steps fit, detections match GT."""
    keras.utils.set_random_seed(0)
    model = tiny_detector(heads={"shapes": 2})
    encoder = LabelEncoder(model.anchors)
    images, specs = _overfit_batch()
    targets = [
        encoder(
            tf.constant([b for b, _ in objects], tf.float32),
            tf.constant([c for _, c in objects], tf.int32),
            tf.zeros([len(objects)], tf.bool),
        )
        for objects in specs
    ]
    y = {"shapes": {key: tf.stack([t[key] for t in targets]) for key in ("cls_targets", "box_targets")}}
    x = {"shapes": tf.constant(images)}
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    history = model.fit(dataset, steps_per_epoch=40, epochs=5, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.25 * losses[0], losses
    assert history.history["shapes_box_loss"][-1] < history.history["shapes_box_loss"][0]

    # A fit on one fixed batch leans on that batch's BatchNorm statistics,
    # which the moving averages (momentum 0.99) only approach over hundreds
    # of steps, compounding over ~30 layers. Load them exactly (momentum 0,
    # one forward pass, no weight update) so inference sees what training saw.
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(tf.constant(images), training=True)

    detections = model.detect(tf.constant(images), score_threshold=0.3)["shapes"]
    for i, objects in enumerate(specs):
        count = int(detections["num_detections"][i])
        found = detections["boxes"][i, :count]
        found_classes = detections["classes"][i, :count].numpy()
        for gt_box, label in objects:
            ious = box_ops.iou(tf.constant([gt_box], tf.float32), found).numpy()[0]
            matching = ious[found_classes == label]
            assert matching.size and matching.max() >= 0.5, (i, gt_box, label, found.numpy(), found_classes)
