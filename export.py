"""Export a trained model dir as a SavedModel for TF Serving.

    python export.py --model_dir=DIR [--export_dir=OUT] [--export_version=N]
        [--which=best|last|best_<dataset>] [--datasets=food,appliance]
        [--score_threshold=0.05 --nms_method=hard|gaussian --iou_threshold=0.5
         --soft_nms_sigma=0.5 --pre_nms_topk=1000 --max_detections=100]

Writes OUT/<N>/ (OUT: config.json's --export_dir, else DIR/export; N: the
next free version by default; --version is the same flag as --export_version): saved_model.pb, variables/,
assets/label_map.json and class_equivalence.json,
assets.extra/tf_serving_warmup_requests, tag `serve`, with signatures
`<dataset>`, `<dataset>_bytes`, `<dataset>_tf_example`, `all`, `all_bytes`,
`all_tf_example` and `serving_default` (the first dataset); and beside the
versions OUT/batching_parameters.txt and OUT/models.config
([--serving_model_name --serving_base_path --serving_max_batch_size
--serving_batch_timeout_micros --serving_batch_threads --keep_versions
--class_equivalence]). See effdet_tf/serving/export_lib.py, effdet_tf/serving/tf_serving.py
and the README's TF Serving section.

Post-processing comes from the model dir's config.json (the `postprocess`
section, what its evaluation used); a flag given here replaces that one
setting. `--score_threshold` equal to the config's `eval_score_threshold`
(0.001) gives evaluation's detections.
"""

import sys

from absl import app, flags

from effdet_tf import flags as config_flags

# Not a serving setting: evaluation's own threshold.
_NOT_EXPORTED = ("eval_score_threshold",)

flags.DEFINE_string("model_dir", None, "Training model dir (config.json + {best,last}.weights.h5).")
flags.DEFINE_string("which", "best", "Which checkpoint's EMA weights to export: best (mean AP over datasets), "
                    "last, or best_<dataset> (kept by train.py --keep_best_per_dataset).")
flags.DEFINE_list("datasets", [], "Datasets (heads) to export, in signature order (default: all).")
config_flags.define_override_flags("postprocess", exclude=_NOT_EXPORTED)
# Every other export setting (--export_dir included: default config.json's,
# else MODEL_DIR/export) reads config.json unless given. The version does
# not: the one training wrote exists already.
config_flags.define_override_flags("export", exclude=("export_version",))
config_flags.define_field_flag("export_version", " An existing version is an error.")
flags.DEFINE_alias("version", "export_version")
flags.mark_flags_as_required(["model_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from effdet_tf.tf_startup import import_tensorflow

    import_tensorflow()  # without a CPU-only machine's CUDA notices
    from effdet_tf.serving import export_lib

    try:
        path = export_lib.export_from_model_dir(
            FLAGS.model_dir,
            version=FLAGS.export_version,
            which=FLAGS.which,
            datasets=FLAGS.datasets,
            export_overrides=config_flags.overrides("export", exclude=("export_version",)),
            **config_flags.overrides("postprocess", exclude=_NOT_EXPORTED),
        )
    except export_lib.ExportError as e:
        sys.exit(f"export: {e}")
    print(f"SavedModel written to {path}")


if __name__ == "__main__":
    app.run(main)
