"""SavedModel export for TF Serving: per-dataset signatures, all in the graph.

The SavedModel contract (shared/DESIGN.md) is what clients outside the
project rely on: one signature per dataset (`<name>`: uint8 images,
`<name>_bytes`: encoded JPEG/PNG), `serving_default` = the first dataset,
`all` / `all_bytes` running every head on one backbone pass, float32
normalised boxes of the INPUT image, the dataset's own COCO category ids
and their names (`detection_class_names`), and `assets/label_map.json`.

Why `keras.export.ExportArchive` and not `tf.saved_model.save` on a
`tf.Module`: TF Serving loads the graph through the C++ session loader, and a
Keras 3 model saved from a plain tf.Module loads in Python but fails there
with "Could not find variable ..." (seen with TF 2.21). ExportArchive tracks
the variables the endpoints use so both loaders work; the tests run
`saved_model_cli run`, which loads the session way.

Pre-processing is data/preprocess.py's (decode, letterbox), as in
evaluation; post-processing is ops/postprocess.py with the model dir's
config.PostprocessConfig at its export `score_threshold` (export.py's flags
override single fields). Exported at evaluation's threshold, a signature
returns the detections evaluation scored (tests/export_test.py).
"""

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from effdet_tf import compat, label_audit
from effdet_tf.config import ConfigError, ExportConfig, PostprocessConfig
from effdet_tf.data import preprocess
from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.postprocess import postprocess, suppress_across_heads
from effdet_tf.serving import tf_serving

LABEL_MAP_ASSET = "label_map.json"
EQUIVALENCE_ASSET = "class_equivalence.json"
_GROUP = "_equivalence_group"  # internal key: a detection's equivalence group (-1: padding)
LABEL_MAP_FORMAT = "effdet_tf.label_map.v1"
ALL_SIGNATURE = "all"
BYTES_SUFFIX = "_bytes"
TF_EXAMPLE_SUFFIX = "_tf_example"
# The tf.train.Example feature a *_tf_example signature decodes (the TF
# Object Detection API's and the Model Garden's name for it).
IMAGE_FEATURE = "image/encoded"


class ExportError(ValueError):
    """A user-facing export problem (bad model dir, name, version)."""


# ---------------------------------------------------------------------------
# Pre-processing: data/preprocess.py's, the evaluation pipeline's.


def _preprocess_images(images, image_size):
    """uint8 [B, H, W, 3] (one size per batch) -> model input, scales, sizes."""
    return preprocess.letterbox_batch(images, image_size)


def _encoded_images(serialized_examples):
    """string [B] of serialized tf.train.Example -> their `image/encoded`."""
    features = tf.io.parse_example(serialized_examples, {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
    return features[IMAGE_FEATURE]


def _preprocess_bytes(image_bytes, image_size):
    """string [B] JPEG/PNG, each its own size -> model input, scales, sizes."""
    return tf.map_fn(
        lambda encoded: preprocess.preprocess_encoded(encoded, image_size),
        image_bytes,
        fn_output_signature=(
            tf.TensorSpec([image_size, image_size, 3], tf.float32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([2], tf.int32),
        ),
    )


def postprocess_settings(postprocess_config=None, **overrides):
    """`postprocess_config` (default: PostprocessConfig()) with single fields
    replaced (export.py's flags), checked. Unknown names are an ExportError."""
    settings = postprocess_config or PostprocessConfig()
    known = {f.name for f in dataclasses.fields(PostprocessConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ExportError(f"Unknown post-processing setting(s) {unknown}; known: {sorted(known)}.")
    settings = dataclasses.replace(settings, **overrides)
    try:
        settings.check()
    except ConfigError as e:
        raise ExportError(str(e)) from None
    return settings


# ---------------------------------------------------------------------------
# Post-processing (after the network): input-image coordinates, COCO ids.


def _to_input_coordinates(boxes, scales, sizes):
    """yxyx model pixels [B, K, 4] -> normalised yxyx of each input, clipped."""
    boxes = boxes / scales[:, None, None]
    sizes = tf.cast(sizes, tf.float32)
    boxes = box_ops.normalize(boxes, sizes[:, 0:1], sizes[:, 1:2])
    return box_ops.clip(boxes, 1.0, 1.0)


def _valid_mask(num_detections, k):
    return tf.sequence_mask(num_detections, k)


class _Serving:
    """Builds the signature functions for one detector and its label maps."""

    def __init__(self, detector, label_maps, postprocess_config, equivalence=()):
        self.detector = detector
        self.head_names = list(label_maps)
        self.image_size = int(detector.image_size)
        self.postprocess_kwargs = postprocess_config.serving_kwargs()
        self.iou_threshold = float(postprocess_config.iou_threshold)
        # `all`: detections of equivalent classes from different heads on
        # one object are merged (label_audit.group_tables; no groups: off).
        self.merge_across_heads = bool(equivalence)
        self.group_ids = label_audit.group_tables(equivalence, label_maps)
        self.max_detections = int(postprocess_config.max_detections)
        self.anchors = detector.anchors.boxes
        # Contiguous index -> COCO category id, one table per head.
        ordered = {name: sorted(label_maps[name]["classes"], key=lambda c: int(c["index"]))
                   for name in self.head_names}
        self.category_ids = {name: [int(c["id"]) for c in classes] for name, classes in ordered.items()}
        # Contiguous index -> class name (the detection_class_names output).
        self.class_names = {name: [str(c["name"]) for c in classes] for name, classes in ordered.items()}
        # Backbone + neck as ONE tf.function shared by every endpoint, and
        # one per head: each is traced once, stored once in saved_model.pb,
        # and found in the trace cache when SavedModel re-traces every
        # signature while saving (inline copies of the whole detector in
        # each of the 7 signatures made export ~3x slower and the .pb larger).
        # A dataset's signature runs only its own head; `all` runs every head
        # on one backbone pass.
        self.features = tf.function(
            lambda x: detector.features(x, training=False),
            input_signature=[tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)],
            autograph=False,
        )
        self.heads = {name: tf.function(functools.partial(detector.run_head, name), autograph=False)
                      for name in self.head_names}

    def _head_detections(self, outputs, name, scales, sizes):
        detections = postprocess(
            tf.cast(outputs[name]["cls_logits"], tf.float32),
            tf.cast(outputs[name]["box_deltas"], tf.float32),
            self.anchors,
            **self.postprocess_kwargs,
        )
        k = self.max_detections
        num = tf.cast(detections["num_detections"], tf.int32)
        valid = _valid_mask(num, k)
        index = tf.cast(detections["classes"], tf.int32)
        classes = tf.gather(tf.constant(self.category_ids[name], tf.int32), index)
        names = tf.gather(tf.constant(self.class_names[name], tf.string), index)
        boxes = _to_input_coordinates(tf.cast(detections["boxes"], tf.float32), scales, sizes)
        zeros = tf.zeros_like
        return {
            "detection_boxes": tf.where(valid[..., None], boxes, zeros(boxes)),
            "detection_scores": tf.where(valid, tf.cast(detections["scores"], tf.float32), 0.0),
            "detection_classes": tf.where(valid, classes, zeros(classes)),
            "detection_class_names": tf.where(valid, names, ""),
            "num_detections": num,
            _GROUP: tf.where(valid, tf.gather(tf.constant(self.group_ids[name], tf.int32), index), -1),
        }

    def network(self, images, names):
        """Detector outputs of heads `names` ({name: {"cls_logits",
        "box_deltas"}}), the same as `detector(images)` restricted to them."""
        levels = list(self.features(images))
        return {name: self.heads[name](levels) for name in names}

    def detect(self, name, images, scales, sizes):
        """One head's detections."""
        outputs = self.network(images, [name])
        detections = self._head_detections(outputs, name, scales, sizes)
        del detections[_GROUP]
        return detections

    def detect_all(self, images, scales, sizes):
        """Every head on the same images (one backbone pass), merged by
        score, top K overall; with an equivalence table, a detection that
        overlaps a higher-scored one of an equivalent class from another
        head (IoU above the NMS threshold) is dropped first."""
        outputs = self.network(images, self.head_names)
        k = self.max_detections
        per_head = [self._head_detections(outputs, name, scales, sizes) for name in self.head_names]
        boxes = tf.concat([d["detection_boxes"] for d in per_head], axis=1)
        classes = tf.concat([d["detection_classes"] for d in per_head], axis=1)
        names = tf.concat([d["detection_class_names"] for d in per_head], axis=1)
        heads = tf.concat(
            [tf.fill(tf.shape(d["detection_classes"]), i) for i, d in enumerate(per_head)], axis=1
        )
        valid = tf.concat([_valid_mask(d["num_detections"], k) for d in per_head], axis=1)
        # Padding must sort after every real detection, even one scored 0.
        scores = tf.concat([d["detection_scores"] for d in per_head], axis=1)
        scores = tf.where(valid, scores, -1.0)
        if self.merge_across_heads:
            groups = tf.concat([d[_GROUP] for d in per_head], axis=1)
            keep = suppress_across_heads(boxes, scores, groups, heads, self.iou_threshold)
            scores = tf.where(keep, scores, -1.0)
        top_scores, order = tf.math.top_k(scores, k=k)
        num = tf.minimum(tf.reduce_sum(tf.cast(scores >= 0.0, tf.int32), axis=1), k)
        keep = _valid_mask(num, k)
        # Rows past num are padding: zeros (merged-away detections sort there).
        gather = lambda x, empty: tf.where(  # noqa: E731
            keep[..., None] if x.shape.rank == 3 else keep, tf.gather(x, order, batch_dims=1), empty)
        return {
            "detection_boxes": gather(boxes, 0.0),
            "detection_scores": tf.where(keep, top_scores, 0.0),
            "detection_classes": gather(classes, 0),
            "detection_class_names": gather(names, ""),
            "detection_heads": gather(heads, 0),
            "num_detections": num,
        }

    # Endpoint functions (traced by ExportArchive with autograph off).
    def images_fn(self, name):
        def serve(images):
            x, scales, sizes = _preprocess_images(images, self.image_size)
            return self.detect(name, x, scales, sizes)

        return serve

    def bytes_fn(self, name):
        def serve(image_bytes):
            x, scales, sizes = _preprocess_bytes(image_bytes, self.image_size)
            return self.detect(name, x, scales, sizes)

        return serve

    def tf_example_fn(self, name):
        def serve(serialized_examples):
            x, scales, sizes = _preprocess_bytes(_encoded_images(serialized_examples), self.image_size)
            return self.detect(name, x, scales, sizes)

        return serve

    def all_images_fn(self, images):
        return self.detect_all(*_preprocess_images(images, self.image_size))

    def all_bytes_fn(self, image_bytes):
        return self.detect_all(*_preprocess_bytes(image_bytes, self.image_size))

    def all_tf_example_fn(self, serialized_examples):
        return self.detect_all(*_preprocess_bytes(_encoded_images(serialized_examples), self.image_size))


def label_map_document(detector, label_maps, postprocess_config):
    """The `assets/label_map.json` content.

    `heads[i]` is head index i (the `detection_heads` output of `all`);
    each class lists its contiguous index, COCO category id and name. The
    post-processing settings the graph was built with are listed too.
    """
    post = postprocess_config
    return {
        "format": LABEL_MAP_FORMAT,
        "heads": [
            {
                "index": i,
                "name": name,
                "signatures": [name, name + BYTES_SUFFIX, name + TF_EXAMPLE_SUFFIX],
                "classes": [
                    {"index": int(c["index"]), "id": int(c["id"]), "name": str(c["name"])}
                    for c in sorted(label_maps[name]["classes"], key=lambda c: int(c["index"]))
                ],
            }
            for i, name in enumerate(label_maps)
        ],
        "serving_default": next(iter(label_maps)),
        "image_size": int(detector.image_size),
        "score_threshold": float(post.score_threshold),
        "nms_method": post.nms_method,
        "iou_threshold": float(post.iou_threshold),
        "soft_nms_sigma": float(post.soft_nms_sigma),
        "pre_nms_topk": int(post.pre_nms_topk),
        "max_detections": int(post.max_detections),
    }


def build_archive(
    detector,
    label_maps,
    asset_path,
    postprocess_config=None,
    equivalence=(),
    equivalence_path=None,
):
    """An ExportArchive with every signature of the contract.

    Args:
      detector: a built float32 `Detector`.
      label_maps: ordered dict head name -> {"classes": [{index, id, name}]};
        its order is the signature order (the first one is serving_default).
      asset_path: a file named label_map.json to ship as the asset.
      postprocess_config: PostprocessConfig (None: the defaults); the
        graph applies its `score_threshold`.
      equivalence: groups of "dataset:category_id" the `all` signatures
        merge across heads (label_audit); () merges none.
      equivalence_path: the class_equivalence.json asset to ship (None: none).
    """
    missing = [name for name in label_maps if name not in detector.head_names]
    if missing:
        raise ExportError(f"Label maps name heads {missing} the model does not have ({detector.head_names}).")
    serving = _Serving(detector, label_maps, postprocess_config or PostprocessConfig(), equivalence)
    images_spec = [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
    bytes_spec = [tf.TensorSpec([None], tf.string, name="image_bytes")]
    examples_spec = [tf.TensorSpec([None], tf.string, name="serialized_examples")]

    archive = keras.export.ExportArchive()
    # No archive.track(detector): the endpoints' variables are tracked
    # automatically, and track() would walk every sub-object of the model in
    # SavedModel mode, which rejects Keras' auto-wrapped dicts with int keys.
    # The detector holds no lookup tables, the one thing track() adds.
    # ExportArchive aliases its FIRST endpoint as serving_default.
    for name in label_maps:
        archive.add_endpoint(name, serving.images_fn(name), input_signature=images_spec)
        archive.add_endpoint(name + BYTES_SUFFIX, serving.bytes_fn(name), input_signature=bytes_spec)
        archive.add_endpoint(name + TF_EXAMPLE_SUFFIX, serving.tf_example_fn(name), input_signature=examples_spec)
    archive.add_endpoint(ALL_SIGNATURE, serving.all_images_fn, input_signature=images_spec)
    archive.add_endpoint(ALL_SIGNATURE + BYTES_SUFFIX, serving.all_bytes_fn, input_signature=bytes_spec)
    archive.add_endpoint(ALL_SIGNATURE + TF_EXAMPLE_SUFFIX, serving.all_tf_example_fn, input_signature=examples_spec)
    compat.attach_asset(archive, "label_map", asset_path)
    if equivalence_path is not None:
        compat.attach_asset(archive, "class_equivalence", equivalence_path)
    return archive


# ---------------------------------------------------------------------------
# Versioned writing.


def next_version(export_dir):
    """1 + the largest numeric sub-folder (TF Serving serves the largest)."""
    versions = tf_serving.versions(export_dir)
    return (versions[-1] + 1) if versions else 1


def signature_inputs(label_maps):
    """{signature name: its input's name} of every signature of the contract."""
    inputs = {"serving_default": "images"}
    for name in [*label_maps, ALL_SIGNATURE]:
        inputs.update({name: "images", name + BYTES_SUFFIX: "image_bytes",
                       name + TF_EXAMPLE_SUFFIX: "serialized_examples"})
    return inputs


def _check_head_names(names):
    for name in names:
        bad = name in (ALL_SIGNATURE, "serving_default") or name.endswith((BYTES_SUFFIX, TF_EXAMPLE_SUFFIX))
        if bad or not name.replace("_", "").isalnum():
            raise ExportError(
                f"Dataset name {name!r} cannot be a signature name (letters, digits, '_'; "
                f"not {ALL_SIGNATURE!r}, 'serving_default' or ending in {BYTES_SUFFIX!r} or {TF_EXAMPLE_SUFFIX!r})."
            )


class _RenamedInputsFilter(logging.Filter):
    """Drops TensorFlow's notice, one per endpoint, that it renames the
    captured variables of a function ("Function `serve` contains input
    name(s) 424210, 424212, ... which will be renamed to unknown, unknown_0,
    ..."): ~15 KB on one line, about internal names, not the signatures'
    inputs. Five of them made the demo's log unreadable."""

    def filter(self, record):
        return "contains input name(s)" not in record.getMessage()


@contextlib.contextmanager
def quiet_renamed_inputs():
    """absl's logger without the renamed-inputs notice, for a block
    (tensorflow/python/saved_model/signature_serialization.py logs it
    through absl.logging, as TF 2.21 does)."""
    from absl import logging as absl_logging

    logger, notice = absl_logging.get_absl_logger(), _RenamedInputsFilter()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def export_detector(
    detector,
    label_maps,
    export_dir,
    version=0,
    postprocess_config=None,
    equivalence=None,
    export_config=None,
    **overrides,
):
    """Writes `export_dir/<version>/` (0: next free) and returns its path.

    Post-processing: `postprocess_config` (None: PostprocessConfig()) with
    `overrides` (its field names, e.g. score_threshold=0.001) replaced.
    `equivalence`: the groups `all` merges across heads (None: the classes
    whose names match, label_audit.equivalence_from_names).
    `export_config` (ExportConfig; None: its defaults): the TF Serving
    files, written by tf_serving: the warm-up requests inside the version,
    batching_parameters.txt and models.config beside it (after pruning to
    --keep_versions once the new version is in place).

    Written to a hidden temporary folder inside `export_dir` first and renamed
    into place, so TF Serving (which polls the folder) never sees a half
    written version, and an existing version is never touched.
    """
    label_maps = dict(label_maps)
    _check_head_names(label_maps)
    post = postprocess_settings(postprocess_config, **overrides)
    export_config = export_config or ExportConfig()
    version = int(version) or next_version(export_dir)
    if version < 0:
        raise ExportError(f"--export_version must be a positive integer, got {version}.")
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final):
        raise ExportError(
            f"{final} already exists; nothing was written. Pass another --export_version "
            f"or leave it out to use the next free one ({next_version(export_dir)})."
        )
    os.makedirs(export_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
    try:
        doc = label_map_document(detector, label_maps, post)
        asset_dir = os.path.join(tmp, "asset_src")
        os.makedirs(asset_dir)
        asset_path = os.path.join(asset_dir, LABEL_MAP_ASSET)
        with open(asset_path, "w") as f:
            json.dump(doc, f, indent=2)
        source = "class names" if equivalence is None else "given"
        if equivalence is None:
            equivalence = label_audit.equivalence_from_names(label_maps)
        equivalence_path = os.path.join(asset_dir, EQUIVALENCE_ASSET)
        with open(equivalence_path, "w") as f:
            json.dump({"groups": equivalence, "from": source, "iou_threshold": post.iou_threshold}, f, indent=2)
        archive = build_archive(detector, label_maps, asset_path, post, equivalence, equivalence_path)
        saved = os.path.join(tmp, "saved_model")
        # Serving never differentiates: skipping the custom-gradient
        # functions (which SavedModel otherwise re-traces, quadratically in
        # graph size) makes writing several times faster.
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        with quiet_renamed_inputs():
            archive.write_out(saved, options=options, verbose=False)
        tf_serving.write_warmup(saved, signature_inputs(label_maps), sorted({1, export_config.serving_max_batch_size}))
        if os.path.exists(final):
            raise ExportError(f"{final} appeared while exporting; nothing was overwritten.")
        os.rename(saved, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tf_serving.write_server_files(export_dir, export_config)
    return final


# ---------------------------------------------------------------------------
# From a training model dir.


def _float32_detector(detector):
    """The same weights in a float32 detector (outputs float32 whatever the
    training precision; float16 NMS would also lose score resolution)."""
    if detector.dtype_policy.compute_dtype == "float32":
        return detector
    config = detector.get_config()
    config["dtype"] = "float32"
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        clone = detector.__class__.from_config(config)
    finally:
        keras.config.set_dtype_policy(previous)
    clone.set_weights(detector.get_weights())
    return clone


def check_model_dir(model_dir, which):
    """Clear errors before anything is built or written; returns
    (Config, weights path). "best" falls back to "last" when the run never
    evaluated (checkpoint.weights_path)."""
    from effdet_tf import checkpoint  # workflow-level import

    try:
        checkpoint.weights_file(which)
    except ValueError:
        raise ExportError(f"--which must be 'best', 'last' or 'best_<dataset>', got {which!r}.") from None
    if not model_dir or not os.path.isdir(model_dir):
        raise ExportError(f"--model_dir={model_dir!r} is not a directory.")
    try:
        config = checkpoint.read_config(model_dir)
        dataset = which[len(checkpoint.PER_DATASET_BEST):] if which.startswith(checkpoint.PER_DATASET_BEST) else None
        if dataset is not None and dataset not in config.head_names:
            raise ExportError(f"--which={which}: {model_dir} has no dataset {dataset!r} (its datasets: "
                              f"{', '.join(config.head_names)}).")
        path = checkpoint.weights_path(model_dir, which)
    except checkpoint.CheckpointNotFoundError as e:
        raise ExportError(str(e)) from None
    return config, path


def select_heads(label_maps, datasets):
    """The label maps of `datasets` (names, in that order), or all of them."""
    if not datasets:
        return dict(label_maps)
    unknown = [d for d in datasets if d not in label_maps]
    if unknown:
        raise ExportError(f"Unknown dataset(s) {unknown}; this model has {list(label_maps)}.")
    return {d: label_maps[d] for d in datasets}


def export_from_model_dir(
    model_dir,
    export_dir=None,
    version=0,
    which="best",
    datasets=None,
    export_overrides=None,
    **overrides,
):
    """Loads the EMA weights of a training model dir and exports them with
    the post-processing of its config.json (what its evaluation used),
    `overrides` replacing single fields (export.py's flags given).
    `export_overrides`: ExportConfig fields replacing config.json's (e.g.
    export_dir, class_equivalence, keep_versions, the serving_* batching
    settings). The export root: `export_dir`, else the export settings'
    export_dir, else MODEL_DIR/export (where train.py exports)."""
    from effdet_tf import checkpoint  # workflow-level import

    config, weights = check_model_dir(model_dir, which)
    known = {f.name for f in dataclasses.fields(ExportConfig)}
    unknown = sorted(set(export_overrides or {}) - known)
    if unknown:
        raise ExportError(f"Unknown export setting(s) {unknown}; known: {sorted(known)}.")
    export_config = dataclasses.replace(config.export, **(export_overrides or {}))
    export_dir = export_dir or export_config.export_dir or os.path.join(model_dir, "export")
    version = int(version or 0)
    if version and os.path.exists(os.path.join(export_dir, str(version))):
        raise ExportError(f"{os.path.join(export_dir, str(version))} already exists; nothing was written.")
    label_maps = select_heads(config.label_maps(), datasets)
    _check_head_names(label_maps)
    post = postprocess_settings(config.postprocess, **overrides)
    path = export_config.class_equivalence
    try:
        equivalence = label_audit.read_class_equivalence(path, label_maps) if path else None
    except ValueError as e:
        raise ExportError(str(e)) from None
    try:
        detector, _ = checkpoint.load_detector(model_dir, which=which)
    except (ValueError, OSError) as e:  # Keras: layout mismatch; h5py: not an HDF5 file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"Cannot load {weights} into the detector that {model_dir}/config.json describes "
            f"(corrupt, or written by another version of the model code): {first}"
        ) from None
    detector = _float32_detector(detector)
    return export_detector(
        detector,
        label_maps,
        export_dir,
        version=version,
        postprocess_config=post,
        equivalence=equivalence,
        export_config=export_config,
    )
