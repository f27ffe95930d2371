"""augment: boxes stay on their objects, crowd flags follow, seeds reproduce.

Scenes are solid rectangles of distinct colours on black; a rectangle's
class is its index in PALETTE, so the colour under any output box says
which object it claims to be.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from effdet_tf.data import augment
from effdet_tf.data import colour
from effdet_tf.data import pipeline

PALETTE = np.array(
    [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
     (0, 255, 255), (255, 128, 0), (128, 0, 255), (0, 128, 255),
     (255, 255, 255), (128, 255, 0), (255, 0, 128)],
    np.float32,
)
S = 96
NONE = augment.AugmentConfig.none()


def _scene(height, width, rects):
    """rects: [(class, ymin, xmin, ymax, xmax)] -> (uint8 image, boxes, classes)."""
    image = np.zeros((height, width, 3), np.uint8)
    for k, y0, x0, y1, x1 in rects:
        image[y0:y1, x0:x1] = PALETTE[k]
    boxes = np.array([r[1:] for r in rects], np.float32).reshape(-1, 4)
    return image, boxes, np.array([r[0] for r in rects], np.int32)


def _group(num=4, crowd_classes=()):
    """num S x S images, 2 rectangles each, in cells unique across the group
    (so a MixUp partner is black under every box)."""
    cells = [(r, c) for r in range(3) for c in range(3)]
    images, boxes, classes = [], [], []
    for i in range(num):
        rects = []
        for j in range(2):
            k = 2 * i + j
            r, c = cells[k]
            rects.append((k, 32 * r + 4, 32 * c + 4, 32 * r + 28, 32 * c + 26))
        image, b, cl = _scene(S, S, rects)
        images.append(image)
        boxes.append(b)
        classes.append(cl)
    classes = np.stack(classes)
    return {
        "image": tf.constant(np.stack(images)),
        "boxes": tf.constant(np.stack(boxes)),
        "classes": tf.constant(classes),
        "is_crowd": tf.constant(np.isin(classes, crowd_classes)),
    }


def _assert_on_objects(image, boxes, classes, min_fraction=0.9):
    """Pixels under each box (1 px in from its edges) are its class colour."""
    image = np.asarray(image, np.float32)
    checked = 0
    for box, k in zip(np.asarray(boxes), np.asarray(classes)):
        if k < 0:
            continue
        y0, x0, y1, x1 = box
        region = image[int(np.ceil(y0)) + 1 : int(np.floor(y1)) - 1,
                       int(np.ceil(x0)) + 1 : int(np.floor(x1)) - 1]
        if region.size == 0:
            continue
        close = np.abs(region - PALETTE[k]).max(-1) < 40
        assert close.mean() >= min_fraction, (k, box, close.mean())
        checked += 1
    return checked


@pytest.mark.parametrize("seed", range(6))
def test_random_resize_keeps_boxes_on_objects(seed):
    image, boxes, classes = _scene(
        72, 108, [(0, 5, 5, 30, 40), (1, 40, 60, 70, 100), (2, 10, 70, 25, 105)]
    )
    example = {
        "image": tf.constant(image), "boxes": tf.constant(boxes),
        "classes": tf.constant(classes), "is_crowd": tf.constant([False, True, False]),
    }
    config = augment.AugmentConfig(flip_prob=0.5, scale_min=0.5, scale_max=1.5,
                                   translate=1.0)
    out = augment.random_resize(example, S, tf.constant([seed, 3]), config)
    assert out["image"].shape == (S, S, 3) and out["image"].dtype == tf.uint8
    assert _assert_on_objects(out["image"], out["boxes"], out["classes"]) >= 1
    # Crowd flags follow their boxes (class 1 is the crowd one).
    np.testing.assert_array_equal(out["is_crowd"].numpy(), out["classes"].numpy() == 1)


def test_flip_mirrors_boxes():
    image, boxes, classes = _scene(48, 96, [(0, 5, 10, 20, 30)])
    example = {"image": image, "boxes": boxes, "classes": classes,
               "is_crowd": np.array([False])}
    config = dataclasses.replace(NONE, flip_prob=1.0)
    out = augment.random_resize(example, S, tf.constant([0, 0]), config)
    np.testing.assert_allclose(out["boxes"].numpy(), [[5, 66, 20, 86]], atol=1e-4)
    _assert_on_objects(out["image"], out["boxes"], out["classes"])


def test_no_augmentation_is_the_letterbox():
    image, boxes, classes = _scene(60, 120, [(0, 6, 10, 30, 50)])
    example = {"image": image, "boxes": boxes, "classes": classes,
               "is_crowd": np.array([False])}
    out = augment.random_resize(example, S, tf.constant([1, 2]), NONE)
    expected, scale = pipeline.letterbox(image, S)
    assert float(scale) == pytest.approx(0.8)
    assert np.abs(out["image"].numpy() - expected.numpy()).max() <= 0.5
    np.testing.assert_allclose(out["boxes"].numpy(), boxes * 0.8, atol=1e-4)
    assert not out["image"].numpy()[48:].any()  # zero pad bottom


def _group_augment(config, seed, group):
    return augment.GroupAugment(S, config)(group, tf.constant([seed, 11]))


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_keeps_boxes_on_objects(seed):
    config = dataclasses.replace(NONE, mosaic_prob=1.0)
    out = _group_augment(config, seed, _group())
    checked = 0
    for i in range(4):
        checked += _assert_on_objects(out["image"][i], out["boxes"][i], out["classes"][i])
    assert checked >= 4
    # A mosaic shows parts of other images: some image holds a class that
    # was not its own.
    own = np.arange(8).reshape(4, 2)
    classes = out["classes"].numpy()
    assert any(set(c[c >= 0]) - set(own[i]) for i, c in enumerate(classes))


def test_mosaic_pixels_equal_keras_cv_augment_images():
    """The XLA gather computes exactly keras-cv Mosaic's image (its
    augment_images with resize_method="nearest")."""
    import keras_cv

    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (6, S, S, 3)).astype(np.uint8))
    layer = keras_cv.layers.Mosaic(bounding_box_format="yxyx", dtype="float32")
    for trial in range(4):
        transformations = {
            "permutation_order": tf.constant(rng.integers(0, 6, (6, 4)), tf.int32),
            "mosaic_centers": tf.constant(rng.uniform(0.25, 0.75, (6, 2)), tf.float32),
        }
        expected = layer.augment_images(
            images, transformations=transformations, resize_method="nearest")
        ours = augment._mosaic_pixels(
            images, transformations["permutation_order"],
            transformations["mosaic_centers"])
        np.testing.assert_array_equal(ours.numpy(), expected.numpy().astype(np.uint8))


@pytest.mark.parametrize("seed", range(3))
def test_mixup_blends_near_half_and_keeps_both_box_sets(seed):
    config = dataclasses.replace(NONE, mixup_prob=1.0)
    group = _group()
    out = _group_augment(config, seed, group)
    image = out["image"].numpy().astype(np.float32)
    classes = out["classes"].numpy()
    assert classes.shape[1] == 4  # own 2 + partner's 2
    for i in range(4):
        valid = classes[i][classes[i] >= 0]
        assert len(set(valid)) == 4
        for box, k in zip(out["boxes"][i].numpy(), classes[i]):
            y0, x0, y1, x1 = box.astype(int)
            mean = image[i, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].reshape(-1, 3).mean(0)
            colour = PALETTE[k]
            # The box holds its object's colour at a visible weight: Beta(32, 32)
            # keeps it in ~[0.3, 0.7]; keras-cv's alpha=0.2 would give ~0 or ~1.
            ratio = mean @ colour / (colour @ colour)
            assert 0.25 < ratio < 0.75, (k, ratio)
            np.testing.assert_allclose(mean, ratio * colour, atol=6)


def test_mixup_weights_are_beta_32():
    aug = augment.GroupAugment(S, dataclasses.replace(NONE, mixup_prob=1.0))
    weights = []
    for seed in range(20):
        w, _, _ = aug._mixup_boxes(
            tf.zeros([16, 1, 4]), tf.zeros([16, 1]), tf.range(16)[::-1],
            tf.constant([seed, 0]),
        )
        weights.append(w.numpy())
    weights = np.concatenate(weights)
    assert weights.min() > 0.25 and weights.max() < 0.75
    assert abs(weights.mean() - 0.5) < 0.02


def _colour_boxes(image):
    """{class: (pixel count, yxyx bounding box)} of each palette colour in
    a uint8 image (the scenes' objects, exact: no resampling)."""
    found = {}
    for k, rgb in enumerate(PALETTE):
        ys, xs = np.nonzero((image == rgb).all(-1))
        if ys.size:
            found[k] = (ys.size, (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1))
    return found


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_boxes_are_exactly_their_visible_objects(seed):
    """Every box CutMix keeps is the bounding box of what shows of its
    object; an image's own object keeps its box iff >= cutmix_min_visible
    of it shows, a pasted one iff >= min_box_area_ratio of it does."""
    config = dataclasses.replace(NONE, cutmix_prob=1.0)
    group = _group()
    out = _group_augment(config, seed, group)
    area = 24 * 22  # every rectangle of _group
    images = out["image"].numpy()
    pasted = 0
    for i in range(4):
        before = group["image"][i].numpy()
        ys, xs = np.nonzero((images[i] != before).any(-1))
        if ys.size:  # (a patch of black on black changes nothing)
            # The pixels that changed come from one partner at the same place.
            window = np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            assert any((images[i][window] == group["image"][j].numpy()[window]).all() for j in range(4) if j != i)
        shown = _colour_boxes(images[i])
        kept = {int(k): box for k, box in zip(out["classes"][i].numpy(), out["boxes"][i].numpy()) if k >= 0}
        for k, (count, bbox) in shown.items():
            own = k // 2 == i
            pasted += not own
            threshold = config.cutmix_min_visible if own else config.min_box_area_ratio
            assert (k in kept) == (count >= threshold * area), (i, k, count)
            if k in kept:
                np.testing.assert_array_equal(kept[k], bbox, err_msg=f"image {i} class {k}")
        assert set(kept) <= set(shown)
    assert pasted  # some partner object did show


def test_cutmix_at_half_pastes_about_half_the_images():
    config = dataclasses.replace(NONE, cutmix_prob=0.5)
    group = _group()
    changed = [
        (_group_augment(config, seed, group)["image"].numpy() != group["image"].numpy()).any((1, 2, 3))
        for seed in range(40)
    ]
    assert 0.35 < np.mean(changed) < 0.6  # a pasted black-on-black patch changes nothing


def test_crowd_flags_survive_mosaic_cutmix_and_mixup():
    config = dataclasses.replace(NONE, mosaic_prob=1.0, mixup_prob=1.0, cutmix_prob=1.0)
    crowd = (1, 4, 6)
    seen = set()
    for seed in range(4):
        out = _group_augment(config, seed, _group(crowd_classes=crowd))
        classes, is_crowd = out["classes"].numpy(), out["is_crowd"].numpy()
        valid = classes >= 0
        np.testing.assert_array_equal(is_crowd[valid], np.isin(classes[valid], crowd))
        assert not is_crowd[~valid].any()
        assert classes.max() < 8  # the crowd offset never leaks out
        seen |= set(classes[valid & is_crowd])
    assert seen  # some crowd box did survive


def test_colour_jitter_keeps_grey_and_casts_to_float32():
    config = augment.AugmentConfig()
    u = tf.random.stateless_uniform([64, 4], [1, 2])
    m = colour._colour_matrices(u, config).numpy()
    grey = m @ np.array([100.0, 100.0, 100.0])
    np.testing.assert_allclose(grey, grey[:, :1].repeat(3, 1), rtol=1e-5)
    assert 59 < grey.min() and grey.max() < 141  # value gain 1 +- 0.4
    off = colour._colour_matrices(u, NONE).numpy()
    np.testing.assert_allclose(off, np.broadcast_to(np.eye(3), off.shape), atol=1e-6)

    images = _group()["image"]
    out = augment.colour_jitter(images, tf.constant([3, 4]), config)
    assert out.dtype == tf.float32 and out.shape == images.shape
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
    assert not np.allclose(out.numpy(), images.numpy())
    # Black stays black (the letterbox padding is not coloured in).
    assert not out.numpy()[(images.numpy() == 0).all(-1)].any()
    plain = augment.colour_jitter(images, tf.constant([3, 4]), NONE)
    np.testing.assert_array_equal(plain.numpy(), images.numpy().astype(np.float32))


def test_gaussian_blur_matches_opencv_and_leaves_the_rest_untouched():
    """blur_prob 1 at a fixed sigma is OpenCV's GaussianBlur (reflected
    border) on every image; blur_prob 0 is the identity; in between, an
    image is either exactly itself or blurred."""
    import cv2

    rng = np.random.RandomState(0)
    images = rng.uniform(0, 255, size=(3, 40, 48, 3)).astype(np.float32)
    for sigma in (0.7, 1.6):
        config = dataclasses.replace(NONE, blur_prob=1.0, blur_sigma=(sigma, sigma))
        out = augment.gaussian_blur(tf.constant(images), tf.constant([5, 6]), config).numpy()
        radius = int(np.ceil(3 * sigma))
        for i in range(3):
            want = cv2.GaussianBlur(images[i], (2 * radius + 1, 2 * radius + 1), sigma,
                                    borderType=cv2.BORDER_REFLECT_101)
            np.testing.assert_allclose(out[i], want, atol=1e-3)
    np.testing.assert_array_equal(augment.gaussian_blur(tf.constant(images), tf.constant([5, 6]), NONE), images)
    config = dataclasses.replace(NONE, blur_prob=0.5)
    out = augment.gaussian_blur(tf.constant(np.repeat(images, 8, 0)), tf.constant([1, 2]), config).numpy()
    same = [np.array_equal(o, x) for o, x in zip(out, np.repeat(images, 8, 0))]
    assert 0 < sum(same) < len(same)
    for o, x, unchanged in zip(out, np.repeat(images, 8, 0), same):
        # A blurred image is smoother (sigma may be as small as 0.1): neighbours differ less.
        assert unchanged or np.abs(np.diff(o, axis=1)).mean() < np.abs(np.diff(x, axis=1)).mean()


def _assert_same(a, b):
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_same_result_eagerly_and_in_dataset_map():
    image, boxes, classes = _scene(72, 108, [(0, 5, 5, 30, 40), (1, 40, 60, 70, 100)])
    example = {"image": image, "boxes": boxes, "classes": classes,
               "is_crowd": np.array([False, True])}
    config = augment.AugmentConfig(mosaic_prob=1.0, mixup_prob=0.5, cutmix_prob=0.5)
    seed = tf.constant([5, 6], tf.int64)
    eager = augment.random_resize(example, S, seed, config)
    ds = tf.data.Dataset.from_tensors((example, seed))
    mapped = next(iter(ds.map(lambda e, s: augment.random_resize(e, S, s, config))))
    _assert_same(eager, mapped)

    group = _group(crowd_classes=(3,))
    aug = augment.GroupAugment(S, config)
    eager = aug(group, seed)
    mapped = next(iter(tf.data.Dataset.from_tensors(group).map(lambda g: aug(g, seed))))
    _assert_same(eager, mapped)

    eager = augment.colour_jitter(group["image"], seed, config)
    mapped = next(iter(tf.data.Dataset.from_tensors(group["image"]).map(
        lambda images: augment.colour_jitter(images, seed, config))))
    np.testing.assert_array_equal(eager.numpy(), mapped.numpy())


def test_float32_under_mixed_precision_policy():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        config = augment.AugmentConfig(mosaic_prob=1.0, mixup_prob=1.0, cutmix_prob=1.0)
        out = augment.GroupAugment(S, config)(_group(), tf.constant([0, 1]))
    finally:
        keras.config.set_dtype_policy(policy)
    assert out["boxes"].dtype == tf.float32
    assert out["image"].dtype == tf.uint8
    assert out["classes"].dtype == tf.int32


def test_images_without_boxes():
    group = _group()
    empty = {
        "image": group["image"],
        "boxes": tf.zeros([4, 0, 4]),
        "classes": tf.zeros([4, 0], tf.int32),
        "is_crowd": tf.zeros([4, 0], tf.bool),
    }
    config = augment.AugmentConfig(mosaic_prob=1.0, mixup_prob=1.0, cutmix_prob=1.0)
    out = augment.GroupAugment(S, config)(empty, tf.constant([0, 1]))
    assert out["image"].shape == (4, S, S, 3)
    assert not (out["classes"].numpy() >= 0).any()

    example = {"image": np.zeros((50, 70, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
               "classes": np.zeros((0,), np.int32), "is_crowd": np.zeros((0,), bool)}
    out = augment.random_resize(example, S, tf.constant([0, 1]), config)
    assert out["boxes"].shape == (0, 4)
