"""pipeline: train/eval datasets, multi-dataset steps, end-to-end geometry."""


import keras
import numpy as np
import pytest
import tensorflow as tf

from augment_test import PALETTE, _assert_on_objects
from decoder_test import make_example, write_records
from effdet_tf.data import augment
from effdet_tf.data import pipeline
from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.anchors import Anchors
from effdet_tf.ops.label_encoder import LabelEncoder

S = 64


def _records(tmp_path, name, num, seed=0, fmt="png", crowd=True):
    """num images of 64-128 px, 1-2 rectangles each; class k has colour k."""
    rng = np.random.default_rng(seed)
    examples, truth = [], []
    for i in range(num):
        h, w = rng.integers(64, 129, 2)
        image = np.zeros((h, w, 3), np.uint8)
        boxes, classes = [], []
        for j in range(1 + i % 2):
            bh, bw = rng.integers(20, 40, 2)
            y0 = rng.integers(0, h - bh) if j == 0 else h - bh
            x0 = rng.integers(0, w // 2 - 5) if j == 0 else w - bw
            k = int(rng.integers(0, 6))
            image[y0:y0 + bh, x0:x0 + bw] = PALETTE[k]
            boxes.append([y0, x0, y0 + bh, x0 + bw])
            classes.append(k)
        is_crowd = [int(crowd and j == 1) for j in range(len(boxes))]
        examples.append(make_example(image, boxes, classes, is_crowd, 1000 + i, fmt))
        truth.append((image, np.array(boxes, np.float32), classes))
    path = write_records(tmp_path / f"{name}.tfrecord", examples)
    return path, truth


def _encoder(size=S):
    return LabelEncoder(Anchors(size))


def test_train_dataset_shapes_and_reproducible(tmp_path):
    path, _ = _records(tmp_path, "a", 10)

    def first_batches(seed):
        ds = pipeline.train_dataset(path, 3, S, _encoder(), group_size=4,
                                    shuffle_buffer=16, seed=seed,
                                    jit_label_encoder=False)
        return list(ds.take(2))

    batches = first_batches(3)
    images, targets = batches[0]
    num_anchors = Anchors(S).num_anchors
    assert images.shape == (3, S, S, 3) and images.dtype == tf.float32
    assert targets["cls_targets"].shape == (3, num_anchors)
    assert targets["cls_targets"].dtype == tf.int32
    assert targets["box_targets"].shape == (3, num_anchors, 4)
    assert float(tf.reduce_max(images)) <= 255.0
    assert int(tf.reduce_sum(tf.cast(targets["cls_targets"] >= 0, tf.int32))) > 0

    again = first_batches(3)
    for (i1, t1), (i2, t2) in zip(batches, again):
        np.testing.assert_array_equal(i1.numpy(), i2.numpy())
        np.testing.assert_array_equal(t1["cls_targets"].numpy(), t2["cls_targets"].numpy())


def test_targets_sit_on_objects_after_augmentation(tmp_path):
    """End to end: decode every positive anchor's target box and look at the
    image under it (Mosaic, flip, scale, translate on; MixUp and colour off
    so the colours stay exact)."""
    path, _ = _records(tmp_path, "a", 8, crowd=False)
    config = augment.AugmentConfig(mosaic_prob=0.5, mixup_prob=0.0, hsv_prob=0.0)
    anchors = Anchors(S)
    ds = pipeline.train_dataset(path, 4, S, LabelEncoder(anchors), config,
                                group_size=4, seed=1, jit_label_encoder=False)
    checked = 0
    for images, targets in ds.take(4):
        boxes = box_ops.decode(targets["box_targets"], anchors.boxes[None]).numpy()
        for i in range(4):
            cls = targets["cls_targets"][i].numpy()
            positive = cls >= 0
            unique, index = np.unique(np.round(boxes[i][positive], 2), axis=0,
                                      return_index=True)
            checked += _assert_on_objects(images[i].numpy(), unique,
                                          cls[positive][index], min_fraction=0.85)
    assert checked >= 8


def test_pipeline_is_float32_under_mixed_precision(tmp_path):
    path, _ = _records(tmp_path, "a", 6)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        config = augment.AugmentConfig(mosaic_prob=1.0, mixup_prob=1.0)
        ds = pipeline.train_dataset(path, 2, S, _encoder(), config, group_size=2,
                                    seed=0, jit_label_encoder=False)
        images, targets = next(iter(ds))
    finally:
        keras.config.set_dtype_policy(policy)
    assert images.dtype == tf.float32
    assert targets["box_targets"].dtype == tf.float32


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_eval_scale_and_original_size_map_boxes_back(tmp_path, fmt):
    path, truth = _records(tmp_path, "val", 5, seed=4, fmt=fmt)
    # A large JPEG is decoded at 1/4 (320 // 4 = 80 >= S): scale still
    # refers to the stored size.
    big = np.zeros((320, 240, 3), np.uint8)
    big[40:200, 60:180] = PALETTE[2]
    write_records(tmp_path / "val_big.tfrecord",
                  [make_example(big, [[40, 60, 200, 180]], [2], [0], 77, "jpeg")])
    truth.append((big, np.array([[40, 60, 200, 180]], np.float32), [2]))

    batches = list(pipeline.eval_dataset(str(tmp_path / "val*.tfrecord"), 4, S))
    assert [b["images"].shape[0] for b in batches] == [4, 2]
    out = {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}
    assert out["images"].dtype == np.float32 and out["images"].shape[1:] == (S, S, 3)
    assert out["image_id"].tolist() == [1000, 1001, 1002, 1003, 1004, 77]
    for i, (image, boxes, classes) in enumerate(truth):
        h, w = image.shape[:2]
        assert out["original_size"][i].tolist() == [h, w]
        assert out["scale"][i] == pytest.approx(S / max(h, w))
        model_boxes = boxes * out["scale"][i]
        _assert_on_objects(out["images"][i], model_boxes, classes, min_fraction=0.8)
        # Back to original pixels: model px / scale.
        np.testing.assert_allclose(model_boxes / out["scale"][i], boxes, rtol=1e-6)
        # Letterbox: zero pad bottom/right of the resized image.
        new_h, new_w = round(h * out["scale"][i]), round(w * out["scale"][i])
        assert not out["images"][i, new_h + 1:].any()
        assert not out["images"][i, :, new_w + 1:].any()


def test_multi_dataset_structure_and_batch_sizes(tmp_path):
    path_a, _ = _records(tmp_path, "a", 5)
    path_b, _ = _records(tmp_path, "b", 9, seed=1)
    none = augment.AugmentConfig.none()
    datasets = {
        "appliance": pipeline.train_dataset(path_a, 2, S, _encoder(), none, seed=0,
                                            jit_label_encoder=False),
        "food": pipeline.train_dataset(path_b, 3, S, _encoder(), none, seed=0,
                                       jit_label_encoder=False),
    }
    ds = pipeline.multi_dataset(datasets)
    steps = 0
    for images, targets in ds.take(7):  # more steps than either dataset holds
        assert list(images) == ["appliance", "food"]
        assert list(targets) == ["appliance", "food"]
        assert images["appliance"].shape == (2, S, S, 3)
        assert images["food"].shape == (3, S, S, 3)
        assert targets["appliance"]["cls_targets"].shape[0] == 2
        assert targets["food"]["box_targets"].shape[0] == 3
        steps += 1
    assert steps == 7


def test_box_counts_pad_to_the_next_bucket():
    # 0, 1..4 exact, then 1.5x / 2x steps; beyond the largest bucket the
    # count is kept (compiled as its own shape).
    for count, want in ((0, 0), (4, 4), (5, 6), (7, 8), (13, 16), (200, 256),
                        (1024, 1024), (1500, 1500)):
        padded = pipeline._pad_to_bucket(tf.ones([count, 4]), -1.0)
        assert padded.shape == (want, 4), (count, padded.shape)
        np.testing.assert_array_equal(padded[:count].numpy(), 1.0)
        np.testing.assert_array_equal(padded[count:].numpy(), -1.0)
    # Crowd lists: coarser buckets (fewer compiled (objects, crowd) pairs).
    for count, want in ((0, 0), (1, 4), (5, 16), (2000, 2000)):
        padded = pipeline._pad_to_bucket(
            tf.ones([count, 4]), table=pipeline._CROWD_BUCKET_OF)
        assert padded.shape == (want, 4), (count, padded.shape)


def test_pipelines_sharing_an_encoder_share_its_compiled_programs():
    encoder = _encoder()
    first = pipeline._TargetEncoder(encoder, jit=True)
    second = pipeline._TargetEncoder(encoder, jit=True)
    assert first._call is second._call
    assert pipeline._TargetEncoder(_encoder(), jit=True)._call is not first._call


def test_jit_label_encoder_matches_plain_call():
    encoder = _encoder()
    plain = pipeline._TargetEncoder(encoder, jit=False)
    jit = pipeline._TargetEncoder(encoder, jit=True)
    cases = [
        ([[4, 4, 30, 40], [20, 30, 60, 62], [0, 0, 0, 0]], [1, 2, -1], [False, True, False]),
        (np.zeros([0, 4]), [], []),
        ([[10, 10, 50, 30]] * 5, [0, 1, 2, 3, 4], [False] * 5),
    ]
    for boxes, classes, crowd in cases:
        args = (tf.constant(boxes, tf.float32), tf.constant(classes, tf.int32),
                tf.constant(crowd, tf.bool))
        a, b = plain(*args), jit(*args)
        np.testing.assert_array_equal(a["cls_targets"].numpy(), b["cls_targets"].numpy())
        np.testing.assert_allclose(a["box_targets"].numpy(), b["box_targets"].numpy(),
                                   atol=1e-4)


def test_any_label_encoder_callable_and_errors(tmp_path):
    path, _ = _records(tmp_path, "a", 4)

    def count_boxes(boxes, classes, is_crowd):
        return {"num_boxes": tf.shape(boxes)[0], "num_crowd": tf.reduce_sum(tf.cast(is_crowd, tf.int32))}

    ds = pipeline.train_dataset(path, 4, S, count_boxes, augment.AugmentConfig.none(),
                                seed=0, jit_label_encoder=False)
    _, targets = next(iter(ds))
    # Records hold 1 or 2 boxes, the second one a crowd box.
    num_boxes = targets["num_boxes"].numpy()
    assert set(num_boxes) <= {1, 2}
    np.testing.assert_array_equal(targets["num_crowd"].numpy(), num_boxes - 1)

    with pytest.raises(ValueError, match="No TFRecord"):
        pipeline.train_dataset(str(tmp_path / "missing*"), 2, S, count_boxes)
    with pytest.raises(ValueError, match="group_size"):
        pipeline.train_dataset(path, 2, S, count_boxes, group_size=1)


def test_letterbox_and_target_encoder_same_eagerly_and_in_dataset_map():
    image = np.random.default_rng(0).integers(0, 255, (50, 80, 3)).astype(np.uint8)
    eager = pipeline.letterbox(image, S)
    mapped = next(iter(tf.data.Dataset.from_tensors(image).map(
        lambda i: pipeline.letterbox(i, S))))
    for a, b in zip(eager, mapped):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    boxes = tf.constant([[4, 4, 30, 40], [20, 30, 60, 62], [0, 0, 0, 0]], tf.float32)
    classes = tf.constant([1, 2, -1])
    crowd = tf.constant([False, True, False])
    for jit in (False, True):
        encoder = pipeline._TargetEncoder(_encoder(), jit=jit)
        eager = encoder(boxes, classes, crowd)
        mapped = next(iter(tf.data.Dataset.from_tensors((boxes, classes, crowd)).map(
            encoder)))
        for key in eager:
            np.testing.assert_array_equal(eager[key].numpy(), mapped[key].numpy())


def _id_files(tmp_path, sizes):
    """TFRecord files of plain byte records b"<file>:<record>"."""
    paths = []
    for f, n in enumerate(sizes):
        path = str(tmp_path / f"train-{f:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for r in range(n):
                w.write(f"{f}:{r}".encode())
        paths.append(path)
    return str(tmp_path / "train-*.tfrecord"), paths


@pytest.mark.parametrize("sizes,workers,by_file", [((5, 4, 6), 2, True), ((5, 4, 6), 3, True),
                                                   ((7,), 2, False), ((5, 4, 6), 4, False)])
def test_workers_read_disjoint_shares_that_cover_every_record(tmp_path, sizes, workers, by_file):
    pattern, paths = _id_files(tmp_path, sizes)
    every = {f"{f}:{r}" for f, n in enumerate(sizes) for r in range(n)}
    shares = []
    for index in range(workers):
        # Each worker shuffles its files with its own seed.
        records = pipeline._records(pattern, shuffle=True, seed=11 + index, shard=(workers, index))
        shares.append([r.decode() for r in records.as_numpy_iterator()])
    seen = [x for share in shares for x in share]
    assert len(seen) == len(set(seen)) and set(seen) == every
    readers = {f: {i for i, share in enumerate(shares) if any(x.split(":")[0] == str(f) for x in share)}
               for f in range(len(sizes))}
    if by_file:  # whole files, each kept by one worker only
        assert all(len(r) == 1 for r in readers.values()), readers
    else:  # every worker keeps its own records of every file
        assert all(r == set(range(workers)) for r in readers.values()), readers
        assert all(abs(len(share) - len(every) / workers) <= len(sizes) for share in shares)


def test_a_shard_index_outside_the_count_is_an_error(tmp_path):
    pattern, _ = _id_files(tmp_path, (2,))
    with pytest.raises(ValueError, match=r"shard index 2 is not in \[0, 2\)"):
        pipeline._records(pattern, shuffle=False, seed=None, shard=(2, 2))
