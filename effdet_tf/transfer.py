"""Growing a trained model: --init_from, --reinit_heads and --freeze.

A run can start from another run's model dir: the shared trunk (backbone
and BiFPN) and every head whose dataset name and label map match are
loaded from its best EMA weights; a dataset new to the model gets a fresh
head. A head of the earlier run that this run names no data for is carried
over frozen (its dataset is kept in the config with `trains=False`, so
export and evaluation still know its label map), which is how a dataset is
added without retraining, or forgetting, the others: with the trunk and the
old heads frozen, their detections are bit-identical to the earlier run's.

Frozen parts are Keras layers with `trainable=False`: they take no
gradient, their BatchNorm runs in inference mode (Keras 3's BatchNormalization
uses batch statistics only when both `training` and `trainable`), the
optimizer is built on the trainable variables only, so it holds no slots
for them, and the EMA leaves them out (optimization.batchnorm_statistics
and make_optimizer average trainable layers only).

Without freezing the same path is fine-tuning: --init_from a run on one
dataset, train on another with a fresh head and the trunk free.
"""

import dataclasses
import os
from typing import List, NamedTuple, Tuple

from absl import logging

from effdet_tf import checkpoint
from effdet_tf.config import Config, ConfigError

FREEZE_PARTS = ("backbone", "trunk")
HEADS_PREFIX = "heads:"

# Model fields that change the shape of some weight: a run that differs in
# one cannot load the other's weights. image_size and anchor_scale change
# the anchors, not the weights, so fine-tuning at another size is allowed.
WEIGHT_SHAPING_FIELDS = ("width_multiplier", "depth_multiplier", "fpn_channels", "fpn_repeats", "head_depth",
                         "min_level", "max_level", "num_scales", "aspect_ratios")


class Freeze(NamedTuple):
    backbone: bool = False
    neck: bool = False
    heads: Tuple[str, ...] = ()


def parse_freeze(items) -> Freeze:
    """--freeze's list: backbone, trunk, heads:NAME, and further NAMEs after a
    heads: item (the flag splits 'heads:a,b' into 'heads:a' and 'b')."""
    backbone = neck = False
    heads: List[str] = []
    in_heads = False
    for item in items:
        if item == "backbone":
            backbone, in_heads = True, False
        elif item == "trunk":
            backbone = neck = True
            in_heads = False
        elif item.startswith(HEADS_PREFIX):
            name = item[len(HEADS_PREFIX):]
            if not name:
                raise ConfigError("--freeze=heads: needs a dataset name (heads:NAME[,NAME...]).")
            heads.append(name)
            in_heads = True
        elif in_heads and ":" not in item:
            heads.append(item)
        else:
            raise ConfigError(f"--freeze={','.join(items)}: {item!r} is not backbone, trunk or heads:NAME.")
    return Freeze(backbone, neck, tuple(dict.fromkeys(heads)))


def _classes(dataset):
    return [(c.id, c.name) for c in dataset.classes]


def _label_map_difference(old, new) -> str:
    old_classes, new_classes = _classes(old), _classes(new)
    only_old = [f"{i} {n!r}" for i, n in old_classes if (i, n) not in new_classes]
    only_new = [f"{i} {n!r}" for i, n in new_classes if (i, n) not in old_classes]
    parts = []
    if only_old:
        parts.append(f"only in --init_from: {', '.join(only_old)}")
    if only_new:
        parts.append(f"only now: {', '.join(only_new)}")
    if not parts:
        parts.append("the same classes in another order")
    return "; ".join(parts)


def plan(config: Config) -> Config:
    """Checks --init_from / --reinit_heads / --freeze against the earlier
    run and returns the config with its data-less frozen heads added
    (first, in that run's order). Messages name the flag and what differs.
    The config's own datasets must be resolved (their label maps known)."""
    t = config.train
    freeze = parse_freeze(t.freeze)
    datasets = list(config.data.datasets)
    if t.init_from:
        if not os.path.isdir(t.init_from):
            raise ConfigError(f"--init_from={t.init_from}: not a directory.")
        try:
            old = checkpoint.read_config(t.init_from)
            checkpoint.weights_path(t.init_from, "best")
        except checkpoint.CheckpointNotFoundError as e:
            raise ConfigError(f"--init_from={t.init_from}: {e}") from None
        if t.backbone_weights:
            raise ConfigError("--backbone_weights and --init_from both set the backbone: give one.")
        problems = []
        for f in WEIGHT_SHAPING_FIELDS:
            there, now = getattr(old.model, f), getattr(config.model, f)
            if checkpoint.comparable_field(there) != checkpoint.comparable_field(now):
                problems.append(f"--{f}={checkpoint.format_field(there)} there, {checkpoint.format_field(now)} now")
        if problems:
            raise ConfigError(f"--init_from={t.init_from}: another architecture, its weights do not fit: "
                              + "; ".join(problems) + ".")
        named = {d.name for d in datasets}
        for d in datasets:
            if d.name in old.head_names and d.name not in t.reinit_heads:
                before = old.data.dataset(d.name)
                if _classes(before) != _classes(d):
                    raise ConfigError(
                        f"--init_from={t.init_from}: dataset {d.name!r} has another label map "
                        f"({_label_map_difference(before, d)}); use --reinit_heads={d.name} to start its head "
                        "fresh.")
        carried = [d for d in old.data.datasets if d.name not in named]
        for d in carried:
            if d.name not in freeze.heads:
                raise ConfigError(
                    f"--init_from={t.init_from}: its dataset {d.name!r} has no --dataset here; name its data to "
                    f"keep training it, or keep its head as it is with --freeze=heads:{d.name}.")
            if d.name in t.reinit_heads:
                raise ConfigError(f"--reinit_heads={d.name}: a head with no data here cannot start fresh.")
        datasets = [dataclasses.replace(d, trains=False) for d in carried] + datasets
    names = [d.name for d in datasets]
    unknown = [n for n in freeze.heads if n not in names]
    if unknown:
        raise ConfigError(f"--freeze=heads:{','.join(unknown)}: no such dataset (datasets: {', '.join(names)}).")
    unknown = [n for n in t.reinit_heads if n not in names]
    if unknown:
        raise ConfigError(f"--reinit_heads={','.join(unknown)}: no such dataset (datasets: {', '.join(names)}).")
    if t.reinit_heads and not t.init_from:
        raise ConfigError("--reinit_heads needs --init_from.")
    if not any(d.trains for d in datasets):
        raise ConfigError("No dataset to train: every head is carried over frozen; add a --dataset.")
    return config.with_datasets(datasets) if datasets != list(config.data.datasets) else config


def apply_freeze(detector, freeze_items):
    """Marks the frozen parts non-trainable (before compile and the
    optimizer's build). Returns the Freeze applied."""
    freeze = parse_freeze(freeze_items)
    if freeze.backbone:
        detector.backbone.trainable = False
    if freeze.neck:
        detector.neck.trainable = False
    for name in freeze.heads:
        detector.class_nets[name].trainable = False
        detector.box_nets[name].trainable = False
    if freeze != Freeze():
        logging.info("Frozen: %s; %d trainable variables left.", ", ".join(
            (["backbone"] if freeze.backbone else []) + (["BiFPN"] if freeze.neck else [])
            + [f"head {n}" for n in freeze.heads]), len(detector.trainable_variables))
    return freeze


def load_initial_weights(detector, config: Config):
    """Copies --init_from's best EMA weights into `detector`: the trunk and
    every head but the new ones and --reinit_heads (plan() has checked
    that their label maps match). Returns {"trunk": ..., "loaded": [...],
    "fresh": [...]}."""
    t = config.train
    source, old_config = checkpoint.load_detector(t.init_from, which="best")
    detector.backbone.set_weights(source.backbone.get_weights())
    detector.neck.set_weights(source.neck.get_weights())
    loaded, fresh = [], []
    for name in detector.head_names:
        if name in old_config.head_names and name not in t.reinit_heads:
            detector.class_nets[name].set_weights(source.class_nets[name].get_weights())
            detector.box_nets[name].set_weights(source.box_nets[name].get_weights())
            loaded.append(name)
        else:
            fresh.append(name)
    logging.info("--init_from=%s: trunk and heads %s loaded; fresh heads: %s.", t.init_from,
                 ", ".join(loaded) or "none", ", ".join(fresh) or "none")
    return {"trunk": t.init_from, "loaded": loaded, "fresh": fresh}
