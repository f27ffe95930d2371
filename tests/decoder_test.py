"""decoder.decode_example: keys, dtypes, boxes in pixels, reduced decoding.

`make_example` / `write_records` build TF Object Detection API records from
numpy images and pixel boxes; augment_test and pipeline_test import them.
"""

import numpy as np
import pytest
import tensorflow as tf

from effdet_tf.data import decoder


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def make_example(image, boxes, classes, is_crowd=None, image_id=1, fmt="png"):
    """Serialized tf.Example from uint8 [H, W, 3] + yxyx pixel boxes."""
    height, width = image.shape[:2]
    encoded = (
        tf.io.encode_png(image) if fmt == "png"
        else tf.io.encode_jpeg(image, quality=95)
    ).numpy()
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    feature = {
        "image/encoded": _bytes([encoded]),
        "image/format": _bytes([fmt.encode()]),
        "image/height": _ints([height]),
        "image/width": _ints([width]),
        "image/source_id": _bytes([str(image_id).encode()]),
        "image/object/bbox/ymin": _floats(boxes[:, 0] / height),
        "image/object/bbox/xmin": _floats(boxes[:, 1] / width),
        "image/object/bbox/ymax": _floats(boxes[:, 2] / height),
        "image/object/bbox/xmax": _floats(boxes[:, 3] / width),
        "image/object/class/label": _ints(classes),
    }
    if is_crowd is not None:
        feature["image/object/is_crowd"] = _ints(is_crowd)
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


def write_records(path, examples):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for example in examples:
            writer.write(example)
    return str(path)


def _image(height, width):
    image = np.zeros((height, width, 3), np.uint8)
    image[10:30, 20:60] = (255, 0, 0)
    image[40:50, 5:15] = (0, 255, 0)
    return image


_BOXES = [[10, 20, 30, 60], [40, 5, 50, 15]]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_decode_example(fmt):
    record = make_example(_image(64, 96), _BOXES, [3, 0], [0, 1], 42, fmt)
    out = decoder.decode_example(tf.constant(record))
    assert out["image"].dtype == tf.uint8
    assert out["image"].shape == (64, 96, 3)
    np.testing.assert_allclose(out["boxes"].numpy(), _BOXES, atol=1e-3)
    assert out["boxes"].dtype == tf.float32
    assert out["classes"].dtype == tf.int32
    assert out["classes"].numpy().tolist() == [3, 0]
    assert out["is_crowd"].numpy().tolist() == [False, True]
    assert out["image_id"].dtype == tf.int64 and int(out["image_id"]) == 42
    assert (int(out["height"]), int(out["width"])) == (64, 96)
    red = out["image"].numpy()[12:28, 22:58].reshape(-1, 3).mean(0)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_no_boxes_and_no_crowd_key():
    record = make_example(_image(32, 32), np.zeros([0, 4]), [], None, 7)
    out = decoder.decode_example(tf.constant(record))
    assert out["boxes"].shape == (0, 4)
    assert out["classes"].shape == (0,)
    assert out["is_crowd"].shape == (0,)

    record = make_example(_image(64, 96), _BOXES, [1, 2], None, 7)
    assert decoder.decode_example(record)["is_crowd"].numpy().tolist() == [False, False]


def test_reduced_jpeg_decode_keeps_boxes_and_original_size():
    image = np.zeros((256, 512, 3), np.uint8)
    image[64:128, 128:256] = (0, 0, 255)
    record = make_example(image, [[64, 128, 128, 256]], [1], [0], 5, "jpeg")
    out = decoder.decode_example(tf.constant(record), min_size=100)
    # 512 / 4 = 128 >= 100 > 512 / 8: decoded at 1/4.
    assert out["image"].shape == (64, 128, 3)
    np.testing.assert_allclose(out["boxes"].numpy(), [[16, 32, 32, 64]], atol=1e-3)
    assert (int(out["height"]), int(out["width"])) == (256, 512)
    blue = out["image"].numpy()[18:30, 34:62].reshape(-1, 3).mean(0)
    assert blue[2] > 230 and blue[0] < 25

    # Small enough already, or PNG: decoded in full.
    assert decoder.decode_example(record, min_size=300)["image"].shape == (256, 512, 3)
    png = make_example(image, [[64, 128, 128, 256]], [1], [0], 5, "png")
    assert decoder.decode_example(png, min_size=100)["image"].shape == (256, 512, 3)


def test_same_result_eagerly_and_in_dataset_map():
    records = [
        make_example(_image(64, 96), _BOXES, [3, 0], [0, 1], 42, "jpeg"),
        make_example(np.full((300, 200, 3), 128, np.uint8), _BOXES, [1, 1], [0, 0], 43),
    ]
    for min_size in (None, 64):
        eager = [decoder.decode_example(tf.constant(r), min_size) for r in records]
        mapped = list(
            tf.data.Dataset.from_tensor_slices(records).map(
                lambda r: decoder.decode_example(r, min_size)
            )
        )
        for a, b in zip(eager, mapped):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
