"""The files TF Serving reads besides the SavedModel.

In every version, `assets.extra/tf_serving_warmup_requests`: TF Serving's
"SavedModel Warmup" file, a TFRecord of `PredictionLog` records that the
server replays when it loads the version, before it takes traffic, so the
first real request does not pay for graph optimisation and memory
allocation (https://www.tensorflow.org/tfx/serving/saved_model_warmup; at
most 1,000 records are read). One request per signature at batch 1 and one
at the batching config's largest batch, on a small generated image (any
size is valid input: the graph letterboxes it; what warm-up needs is every
signature's graph run once).

Beside the versions, in the export dir:
- `batching_parameters.txt`, a `BatchingParameters` text proto for
  `--enable_batching --batching_parameters_file` (TF Serving's batching
  guide, tensorflow_serving/batching/README.md, for the meaning of each
  field and its advice: a timeout slightly above zero, e.g. 1 ms; as many
  enqueued batches as batch threads for online serving);
- `models.config`, a `ModelServerConfig` text proto for
  `--model_config_file`: the model's name and base path, the newest two
  versions served, labelled `stable` (the older) and `canary` (the newest).

The protos are the `tensorflow-serving-api` package's; `BatchingParameters`
is not in that package, so its file is written field by field.
"""

import os
import shutil
from typing import List

import cv2
import numpy as np
import tensorflow as tf

from effdet_tf.checkpoint import atomic_write_text

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
BATCHING_FILE = "batching_parameters.txt"
MODELS_CONFIG_FILE = "models.config"
WARMUP_IMAGE_SIZE = 64
MAX_WARMUP_RECORDS = 1000  # what TF Serving reads of the file


def _warmup_image():
    """A small smooth colour image (JPEG-encodable like a photo)."""
    y, x = np.mgrid[0:WARMUP_IMAGE_SIZE, 0:WARMUP_IMAGE_SIZE]
    return np.stack([x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8)


def warmup_inputs(batch) -> dict:
    """{input name: tensor} of each input kind at `batch` images."""
    image = _warmup_image()
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg]))})).SerializeToString()
    return {
        "images": np.repeat(image[None], batch, axis=0),
        "image_bytes": np.array([jpeg] * batch, dtype=object),
        "serialized_examples": np.array([example] * batch, dtype=object),
    }


def write_warmup(version_dir, signature_inputs, batch_sizes) -> int:
    """Writes `version_dir/assets.extra/tf_serving_warmup_requests`.

    `signature_inputs`: {signature name: its input name}. Returns the number
    of records (one per signature and batch size)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for batch in batch_sizes:
            inputs = warmup_inputs(batch)
            for signature, input_name in signature_inputs.items():
                request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
                request.inputs[input_name].CopyFrom(tf.make_tensor_proto(inputs[input_name]))
                log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
                writer.write(log.SerializeToString())
                count += 1
    if count > MAX_WARMUP_RECORDS:
        raise ValueError(f"{count} warm-up records; TF Serving reads at most {MAX_WARMUP_RECORDS}.")
    return count


def read_warmup(version_dir):
    """The PredictionLog records of a version's warm-up file."""
    from tensorflow_serving.apis import prediction_log_pb2

    records = tf.data.TFRecordDataset(os.path.join(version_dir, WARMUP_FILE))
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]


def allowed_batch_sizes(max_batch_size) -> List[int]:
    """1, 2, 4, ... up to max_batch_size, which is always the last (TF
    Serving pads a batch up to the next allowed size)."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


def batching_parameters(max_batch_size, batch_timeout_micros, num_batch_threads) -> str:
    lines = [
        "# TF Serving BatchingParameters (--enable_batching --batching_parameters_file=THIS).",
        "# Batches requests of one signature: string inputs (*_bytes, *_tf_example) batch",
        "# freely; uint8 `images` requests only with others of the same height and width.",
        f"max_batch_size {{ value: {max_batch_size} }}",
        f"batch_timeout_micros {{ value: {batch_timeout_micros} }}",
        f"num_batch_threads {{ value: {num_batch_threads} }}",
        f"max_enqueued_batches {{ value: {num_batch_threads} }}",
    ]
    lines += [f"allowed_batch_sizes: {size}" for size in allowed_batch_sizes(max_batch_size)]
    return "\n".join(lines) + "\n"


def versions(export_dir) -> List[int]:
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(d) for d in os.listdir(export_dir) if d.isdigit())


def models_config(model_name, base_path, served_versions) -> str:
    """ModelServerConfig text: serve `served_versions` (the newest two),
    the older labelled stable, the newest canary (one version: stable)."""
    served = sorted(served_versions)[-2:]
    labels = {"stable": served[0]}
    if len(served) > 1:
        labels["canary"] = served[1]
    policy = " ".join(f"versions: {v}" for v in served)
    label_lines = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n' for k, v in labels.items())
    return ("model_config_list {\n  config {\n"
            f'    name: "{model_name}"\n'
            f'    base_path: "{base_path}"\n'
            '    model_platform: "tensorflow"\n'
            f"    model_version_policy {{ specific {{ {policy} }} }}\n"
            f"{label_lines}  }}\n}}\n")


def prune_versions(export_dir, keep) -> List[int]:
    """Removes the oldest versions beyond the newest `keep` (0: none).
    Returns the versions removed."""
    if keep <= 0:
        return []
    old = versions(export_dir)[:-keep]
    for v in old:
        shutil.rmtree(os.path.join(export_dir, str(v)))
    return old


def write_server_files(export_dir, export_config):
    """batching_parameters.txt and models.config beside the versions, after
    --keep_versions has pruned the oldest. Returns their paths."""
    c = export_config
    prune_versions(export_dir, c.keep_versions)
    threads = c.serving_batch_threads or os.cpu_count() or 1
    name = c.serving_model_name
    batching = os.path.join(export_dir, BATCHING_FILE)
    atomic_write_text(batching, batching_parameters(c.serving_max_batch_size, c.serving_batch_timeout_micros,
                                                    threads))
    config = os.path.join(export_dir, MODELS_CONFIG_FILE)
    atomic_write_text(config, models_config(name, c.serving_base_path or f"/models/{name}", versions(export_dir)))
    return batching, config
