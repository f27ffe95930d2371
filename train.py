"""Train / evaluate the multi-dataset detector.

    python train.py --flagfile=configs/d0_csp.flags     # the real run
    python train.py --flagfile=configs/demo.flags       # embedded default, CPU, minutes
    python train.py --flagfile=configs/d0_csp.flags --mode=eval
    tensorboard --logdir=MODEL_DIR

Flags: `python train.py --helpfull`; they are the fields of effdet_tf/config.py.
"""

import sys

from absl import app, flags as absl_flags, logging

from effdet_tf import flags
from effdet_tf.config import ConfigError

flags.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments (not flags): {' '.join(argv[1:])}")
    try:
        config = flags.config_from_flags()
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    from effdet_tf.tf_startup import import_tensorflow

    import_tensorflow()  # after the flag checks; without a CPU-only machine's CUDA notices
    from effdet_tf import callbacks, checkpoint, train_lib

    try:
        result = train_lib.run(config)
    except (ConfigError, checkpoint.IncompatibleModelDirError, checkpoint.CheckpointNotFoundError,
            callbacks.NonFiniteLossError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    summary = result.get("eval")
    if summary:
        for name, m in summary["metrics"].items():
            logging.info("%s: AP %.4f AP50 %.4f AP75 %.4f", name, m["AP"], m["AP50"], m["AP75"])
    if config.train.mode == "eval":
        from effdet_tf.evaluation import per_class_table

        for name, rows in summary["per_class"].items():
            print(f"\n{name}: per class ({config.train.model_dir}/eval/report.json)\n{per_class_table(rows)}")
    return 0


def run():
    try:
        app.run(main, flags_parser=flags.parse_argv)
    except absl_flags.Error as e:  # pragma: no cover - absl reports bad flags itself
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
