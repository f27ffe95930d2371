"""The model dir: what training leaves behind and what export reads.

Contract (model_dir/):
  config.json        the resolved frozen Config (effdet_tf/config.py) incl.
                     "detector_kwargs" (Detector's constructor arguments) and
                     "label_maps" ({dataset: label_map.json as the converter
                     wrote it: {"name", "classes": [{"index", "id", "name"}]}}).
  last.weights.h5    EMA weights of the detector at the end of the latest
                     epoch (model weights only, no optimizer).
  best.weights.h5    EMA weights with the best mean COCO AP over datasets.
  best.json          {"epoch", "step", "mean_ap", "metrics": {...}} of best.
  backup/            resumable training state (weights + optimizer + EMA +
                     step), see callbacks.ResumableBackup; not for export.
  data_cache/        converted TFRecords (unless --data_cache_dir).
  train/, eval/      TensorBoard event files.

Every file is written to a temporary name in the same folder and renamed,
so a run killed at any moment leaves either the old file or the new one.
"""

import glob
import json
import os
import shutil
import tempfile
from typing import List, Optional, Tuple

from absl import logging

from effdet_tf import compat
from effdet_tf.config import Config
from effdet_tf.modeling import factory
from effdet_tf.optimization import averaged_weights

CONFIG_FILE = "config.json"
BEST_WEIGHTS = "best.weights.h5"
LAST_WEIGHTS = "last.weights.h5"
BEST_METRICS = "best.json"
BACKUP_DIR = "backup"
_WHICH = {"best": BEST_WEIGHTS, "last": LAST_WEIGHTS}
# --keep_best_per_dataset: best_<dataset>.weights.h5 and best_<dataset>.json.
PER_DATASET_BEST = "best_"


def weights_file(which):
    """File name of checkpoint `which`: "best", "last" or "best_<dataset>"."""
    if which in _WHICH:
        return _WHICH[which]
    if which.startswith(PER_DATASET_BEST) and len(which) > len(PER_DATASET_BEST):
        return f"{which}.weights.h5"
    raise ValueError(f"which must be 'best', 'last' or 'best_<dataset>', got {which!r}")


def metrics_file(which):
    """best.json, or best_<dataset>.json: the evaluation that made `which`."""
    return BEST_METRICS if which == "best" else f"{which}.json"


class CheckpointNotFoundError(FileNotFoundError):
    """The model dir has no config.json or no weights to load."""


class IncompatibleModelDirError(ValueError):
    """The model dir holds a run with another architecture or label space."""


# ---------------------------------------------------------------- atomic IO
def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path, text):
    """Writes `text` to `path` through a temporary file + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_weights_only(model, path):
    """Model weights without the optimizer's slots: export needs only these
    and they are a third of the size with SGD momentum + EMA."""
    optimizer = getattr(model, "optimizer", None)
    compat.save_weights_without(model, path, [optimizer] if optimizer is not None else [])


def atomic_save_weights(model, path, weights_only=True):
    """Saves `model`'s weights to `path` (*.weights.h5) through a temporary
    file + rename. weights_only=False also saves the optimizer (resuming)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        if weights_only:
            _save_weights_only(model, tmp)
        else:
            model.save_weights(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------- config.json
def config_path(model_dir):
    return os.path.join(model_dir, CONFIG_FILE)


def write_config(model_dir, config: Config):
    atomic_write_text(config_path(model_dir), config.to_json() + "\n")


def read_config(model_dir) -> Config:
    path = config_path(model_dir)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"{model_dir} has no {CONFIG_FILE}: it is not a model dir written by train.py."
        )
    with open(path) as f:
        return Config.from_json(f.read())


def incompatibilities(saved: Config, new: Config) -> List[str]:
    """What makes `saved`'s checkpoints unusable for `new`: architecture,
    input size, datasets, their order and label spaces."""
    problems = []
    if saved.head_names != new.head_names:
        problems.append(f"datasets {list(saved.head_names)} in the model dir, {list(new.head_names)} now")
    else:
        for a, b in zip(saved.data.datasets, new.data.datasets):
            if a.num_classes != b.num_classes:
                problems.append(f"dataset {a.name!r} has {a.num_classes} classes in the model dir, {b.num_classes} now")
            elif [c.id for c in a.classes] != [c.id for c in b.classes]:
                problems.append(f"dataset {a.name!r} maps its classes to other COCO category ids")
    for field in ("image_size", "width_multiplier", "depth_multiplier", "fpn_channels", "fpn_repeats",
                  "head_depth", "min_level", "max_level", "num_scales", "aspect_ratios", "anchor_scale"):
        old, now = comparable_field(getattr(saved.model, field)), comparable_field(getattr(new.model, field))
        if old != now:
            problems.append(f"--{field}={format_field(old)} in the model dir, --{field}={format_field(now)} now")
    return problems


def comparable_field(v):
    """A model-config value in a form that compares equal across JSON
    round trips (lists -> tuples of floats)."""
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v


def format_field(v):
    """A model-config value as its flag is written."""
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def has_training_state(model_dir) -> bool:
    return any(
        os.path.exists(os.path.join(model_dir, name))
        for name in (CONFIG_FILE, BEST_WEIGHTS, LAST_WEIGHTS, BACKUP_DIR)
    )


def prepare_model_dir(config: Config, write=True):
    """Checks `config` against what the model dir holds, then writes it.

    A model dir from another run (other datasets, class counts, image size,
    architecture) is refused unless --fresh_start, which removes the old
    checkpoints (never the data cache). Returns the previous Config or None.
    """
    model_dir = config.train.model_dir
    previous = None
    if os.path.exists(config_path(model_dir)):
        previous = read_config(model_dir)
        problems = incompatibilities(previous, config)
        if problems and not config.train.fresh_start:
            raise IncompatibleModelDirError(
                f"--model_dir={model_dir} holds a run that cannot be resumed with these flags: "
                + "; ".join(problems)
                + ". Use another --model_dir, or --fresh_start to discard its checkpoints."
            )
    if config.train.fresh_start and write:
        clear_checkpoints(model_dir)
        previous = None
    if write:
        write_config(model_dir, config)
    return previous


def clear_checkpoints(model_dir):
    paths = [os.path.join(model_dir, n) for n in (BEST_WEIGHTS, LAST_WEIGHTS, BEST_METRICS, CONFIG_FILE)]
    paths += glob.glob(os.path.join(glob.escape(model_dir), f"{PER_DATASET_BEST}*"))  # best_<dataset>.*
    for path in paths:
        if os.path.isfile(path):
            os.remove(path)
    for name in (BACKUP_DIR, "train", "eval"):
        shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)


# ---------------------------------------------------------------- loading
def weights_path(model_dir, which="best"):
    """Path of the exportable weights. "best" falls back to "last" when no
    evaluation has run yet (a --mode=train run)."""
    path = os.path.join(model_dir, weights_file(which))
    if os.path.exists(path):
        return path
    if which == "best":
        last = os.path.join(model_dir, LAST_WEIGHTS)
        if os.path.exists(last):
            logging.warning("%s has no %s (no evaluation yet); using %s.", model_dir, BEST_WEIGHTS, LAST_WEIGHTS)
            return last
    raise CheckpointNotFoundError(
        f"{model_dir} has no checkpoint to load ({weights_file(which)}"
        + (f" or {LAST_WEIGHTS}" if which == "best" else "")
        + " missing): train first with `python train.py --model_dir=...`."
    )


def load_detector(model_dir, which="best") -> Tuple["factory.Detector", Config]:
    """Rebuilds the Detector from model_dir/config.json and loads its EMA
    weights (best.weights.h5 or last.weights.h5). Returns (detector, config).

    Raises CheckpointNotFoundError when the dir has no config.json or no
    weights. The detector is built in float32 whatever the training
    precision, as serving wants.
    """
    if not os.path.isdir(model_dir):
        raise CheckpointNotFoundError(f"Model dir {model_dir} does not exist.")
    config = read_config(model_dir)
    path = weights_path(model_dir, which)
    detector = factory.build_detector(config, dtype="float32")
    detector.load_weights(path)
    return detector, config


def best_metrics(model_dir, which="best") -> Optional[dict]:
    path = os.path.join(model_dir, metrics_file(which))
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- EMA
def save_ema_weights(model, model_dir, which):
    """Writes model_dir/{best,last,best_<dataset>}.weights.h5 with the EMA
    weights (and the EMA of the BatchNorm statistics)."""
    with averaged_weights(model):
        atomic_save_weights(model, os.path.join(model_dir, weights_file(which)), weights_only=True)


# ---------------------------------------------------------------- resuming
def list_backups(backup_dir):
    """Complete backups, newest first."""
    if not os.path.isdir(backup_dir):
        return []
    names = sorted((n for n in os.listdir(backup_dir) if n.startswith("ckpt-")), reverse=True)
    return [os.path.join(backup_dir, n) for n in names]


def restore_training_state(model, model_dir) -> Optional[dict]:
    """Loads the newest readable backup into `model` (compiled, optimizer
    included). Returns its state.json ({"step", "fit_epoch"}) or None when
    there is nothing to resume. An unreadable backup is reported and the
    previous one tried."""
    for path in list_backups(os.path.join(model_dir, BACKUP_DIR)):
        try:
            with open(os.path.join(path, "state.json")) as f:
                meta = json.load(f)
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(os.path.join(path, "state.weights.h5"))
        except Exception as e:  # noqa: BLE001 - any unreadable file: try older.
            logging.warning("Cannot restore %s (%s); trying an older backup.", path, e)
            continue
        logging.info("Resumed from %s at step %d.", path, meta["step"])
        return meta
    return None
