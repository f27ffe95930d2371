"""The one pre-processing (data/preprocess.py) and who uses it.

Checked against an OpenCV letterbox written independently, eagerly and
inside `tf.data`, and on the real 640 px COCO photos: the evaluation
pipeline's images must be the pixels the serving signatures compute from
the same file (no DCT-scaled decode on the evaluation path).
"""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from effdet_tf.serving import export_lib
from effdet_tf.data import decoder, pipeline, preprocess

S = 128
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = DATA / "appliance-dataset-5-tat-10"


def _letterbox_cv2(image, size):
    """Longer side = size, top-left on zeros, bilinear (OpenCV)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_h, new_w = min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[:new_h, :new_w] = cv2.resize(image.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return canvas, scale


def _smooth(h, w, seed):
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (max(2, h // 8), max(2, w // 8), 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def _photos(n=4):
    files = sorted((PHOTOS / "val2017").glob("*.jpg"))[:n]
    if not files:
        pytest.skip(f"{PHOTOS} not found")
    return files


@pytest.mark.parametrize("shape", [(96, 160), (200, 150), (40, 30), (128, 128), (640, 480)])
def test_letterbox_geometry_and_pixels(shape):
    image = _smooth(*shape, seed=shape[0])
    canvas, scale = preprocess.letterbox(image, S)
    want, want_scale = _letterbox_cv2(image, S)
    assert canvas.shape == (S, S, 3) and canvas.dtype == tf.float32
    assert float(scale) == pytest.approx(want_scale)
    # Same geometry: the padding is exactly where OpenCV's is.
    np.testing.assert_array_equal(canvas.numpy() == 0, want == 0)
    # Bilinear either way (OpenCV rounds its weights to 11 bits).
    assert np.abs(canvas.numpy() - want).max() < 1.0


def test_same_eagerly_in_dataset_map_and_batched():
    images = np.stack([_smooth(90, 140, 1), _smooth(90, 140, 2)])
    eager = [preprocess.letterbox(image, S) for image in images]
    mapped = list(tf.data.Dataset.from_tensor_slices(images).map(lambda i: preprocess.letterbox(i, S)))
    batch, scales, sizes = preprocess.letterbox_batch(tf.constant(images), S)
    for i, (canvas, scale) in enumerate(eager):
        np.testing.assert_array_equal(canvas.numpy(), mapped[i][0].numpy())
        np.testing.assert_array_equal(canvas.numpy(), batch[i].numpy())
        assert float(scale) == float(mapped[i][1]) == float(scales[i])
    np.testing.assert_array_equal(sizes.numpy(), [[90, 140], [90, 140]])


def test_pipeline_and_serving_use_this_letterbox():
    """pipeline.letterbox (also the input benchmark's floor) is this one,
    and the `images` signatures' pre-processing gives its pixels."""
    assert pipeline.letterbox is preprocess.letterbox
    image = _smooth(100, 70, 3)
    served, scales, sizes = export_lib._preprocess_images(tf.constant(image[None]), S)
    canvas, scale = preprocess.letterbox(image, S)
    np.testing.assert_array_equal(served[0].numpy(), canvas.numpy())
    assert float(scales[0]) == float(scale)
    np.testing.assert_array_equal(sizes.numpy(), [[100, 70]])


def test_decode_is_full_size_unlike_training_decode():
    """On a 640 px JPEG the training decode may use DCT scaling at a
    128 px input; evaluation's and serving's never do."""
    path = _photos(1)[0]
    data = path.read_bytes()
    height, width = cv2.imread(str(path)).shape[:2]
    full = preprocess.decode(tf.constant(data))
    assert full.shape == (height, width, 3) and full.dtype == tf.uint8
    small, original = decoder.decode_image(tf.constant(data), min_size=S)
    assert max(small.shape[:2]) < max(height, width)  # the premise: training's decode differs
    assert original.numpy().tolist() == [height, width]
    # A PNG and a greyscale JPEG come back as RGB at their size.
    grey = cv2.imencode(".jpg", cv2.cvtColor(_smooth(50, 60, 4), cv2.COLOR_RGB2GRAY))[1].tobytes()
    png = cv2.imencode(".png", _smooth(33, 21, 5))[1].tobytes()
    assert preprocess.decode(tf.constant(grey)).shape == (50, 60, 3)
    assert preprocess.decode(tf.constant(png)).shape == (33, 21, 3)


def _write_records(files, path):
    """A TFRecord of the files' bytes under the converter's keys (no boxes)."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, f in enumerate(files):
            feature = {
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f.read_bytes()])),
                "image/source_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(i).encode()])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def test_eval_pipeline_images_are_the_serving_signatures_pixels(tmp_path):
    """Real photos more than 2x the input: evaluation's model inputs,
    scales and sizes equal what `<dataset>_bytes` computes from the same
    bytes, bit for bit."""
    files = _photos(4)
    _write_records(files, tmp_path / "val-00000-of-00001.tfrecord")
    batches = list(pipeline.eval_dataset(str(tmp_path / "val-*.tfrecord"), batch_size=3, image_size=S))
    images = np.concatenate([b["images"].numpy() for b in batches])
    scales = np.concatenate([b["scale"].numpy() for b in batches])
    sizes = np.concatenate([b["original_size"].numpy() for b in batches])
    served, served_scales, served_sizes = export_lib._preprocess_bytes(
        tf.constant([f.read_bytes() for f in files]), S)
    np.testing.assert_array_equal(images, served.numpy())
    np.testing.assert_array_equal(scales, served_scales.numpy())
    np.testing.assert_array_equal(sizes, served_sizes.numpy())
    with open(PHOTOS / "annotations" / "instances_val2017.json") as f:
        info = {im["file_name"]: (im["height"], im["width"]) for im in json.load(f)["images"]}
    assert [tuple(s) for s in sizes] == [info[f.name] for f in files]
    assert min(max(s) for s in sizes) > 2 * S
