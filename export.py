"""Export a trained model dir as a SavedModel for TF Serving.

    python export.py --model_dir=DIR --export_dir=OUT [--version=N]
        [--which=best|last] [--datasets=food,appliance]
        [--score_threshold=0.05 --iou_threshold=0.5 --max_detections=100]

Writes OUT/<N>/ (next free version by default): saved_model.pb, variables/,
assets/label_map.json, tag `serve`, with signatures `<dataset>`,
`<dataset>_bytes`, `all`, `all_bytes` and `serving_default` (the first
dataset). See effdet_tf/export_lib.py and the README's TF Serving section.
"""

import sys

from absl import app, flags

from effdet_tf.config import ExportConfig

_DEFAULTS = ExportConfig()

flags.DEFINE_string("model_dir", None, "Training model dir (config.json + {best,last}.weights.h5).")
flags.DEFINE_string("export_dir", None, "SavedModel root; the version goes in a numbered sub-folder.")
flags.DEFINE_integer("version", 0, "SavedModel version (0: next free integer). An existing one is an error.")
flags.DEFINE_enum("which", "best", ["best", "last"], "Which checkpoint's EMA weights to export.")
flags.DEFINE_list("datasets", [], "Datasets (heads) to export, in signature order (default: all).")
flags.DEFINE_float("score_threshold", _DEFAULTS.score_threshold, "Detections scored below this are dropped.")
flags.DEFINE_float("iou_threshold", _DEFAULTS.iou_threshold, "Per-class NMS IoU threshold.")
flags.DEFINE_integer("max_detections", _DEFAULTS.max_detections, "Detections per image (padded).")
flags.DEFINE_integer("pre_nms_topk", 1000, "Candidates kept (by score) per image before NMS.")
flags.mark_flags_as_required(["model_dir", "export_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from effdet_tf import export_lib

    try:
        path = export_lib.export_from_model_dir(
            FLAGS.model_dir,
            FLAGS.export_dir,
            version=FLAGS.version,
            which=FLAGS.which,
            datasets=FLAGS.datasets,
            score_threshold=FLAGS.score_threshold,
            iou_threshold=FLAGS.iou_threshold,
            max_detections=FLAGS.max_detections,
            pre_nms_topk=FLAGS.pre_nms_topk,
        )
    except export_lib.ExportError as e:
        sys.exit(f"export: {e}")
    print(f"SavedModel written to {path}")


if __name__ == "__main__":
    app.run(main)
