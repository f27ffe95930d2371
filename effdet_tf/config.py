"""Frozen run configuration: model, data, augment, train, export and postprocess sections.

Flags become a `Config` once (effdet_tf/flags.py); every workflow below takes
the config and never reads flags. The resolved config (with each dataset's
label map as the converter wrote it) is written as JSON next to the
checkpoints, so a model dir rebuilds its detector without the command line
that made it (effdet_tf/checkpoint.py).

Every field carries `metadata["help"]`; flags.py turns fields into absl
flags of the same name, so a field and its flag cannot drift apart. Field
names are therefore unique across sections.
"""

import dataclasses
import json
import math
from typing import Any, Dict, Mapping, Tuple

# Bumped when a field changes meaning, so an old config.json is read with care.
CONFIG_VERSION = 1

MODES = ("train", "eval", "train_and_eval")
STRATEGIES = ("mirrored", "multi_worker", "one_device")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
OPTIMIZERS = ("sgd", "adam", "adamw")
BOX_LOSSES = ("huber", "giou", "ciou")
NMS_METHODS = ("hard", "gaussian")


class ConfigError(ValueError):
    """A flag value (or combination) that cannot run; the message starts
    with the flag it is about, e.g. "--batch_size=6: ..."."""


def _field(default, help, choices=None, flag=True, items=float):
    """A dataclass field with the help text (and choices) its flag shows;
    `items`: the element type of a tuple field's comma-separated flag."""
    metadata = {"help": help, "flag": flag, "items": items}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict)):
        raise TypeError("Use tuples for frozen defaults.")
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ClassEntry:
    """One class of a dataset: contiguous index, COCO category id, name."""

    index: int
    id: int
    name: str


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One dataset = one head. `path` is what the user gave; `tfrecord_dir`
    is where its TFRecords and label_map.json live after conversion."""

    name: str
    path: str
    tfrecord_dir: str = ""
    classes: Tuple[ClassEntry, ...] = ()
    batch_size: int = 8  # global (all replicas) images of this dataset per step
    loss_weight: float = 1.0
    num_train_examples: int = 0  # filled from the converter's report if known
    # False: a head carried over from --init_from and frozen, with no
    # training data in this run (still evaluated if its val split exists).
    trains: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label_map(self) -> Dict[str, Any]:
        """The converter's label_map.json layout."""
        return {
            "name": self.name,
            "classes": [dataclasses.asdict(c) for c in self.classes],
        }


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture. Defaults are CSPDarknet53 + EfficientDet-D0's BiFPN and
    heads (Tan et al. 2020, Table 1: 64 BiFPN channels, 3 BiFPN layers, 3
    head layers at 512) and its anchors (levels 3-7, 3 scales, 3 ratios,
    anchor scale 4)."""

    image_size: int = _field(512, "Square input size S of the network.")
    width_multiplier: float = _field(1.0, "Backbone channel multiplier (1.0 = CSPDarknet53).")
    depth_multiplier: float = _field(1.0, "Backbone block-count multiplier (1.0 = CSPDarknet53).")
    fpn_channels: int = _field(64, "BiFPN channels (D0: 64).")
    fpn_repeats: int = _field(3, "BiFPN layers (D0: 3).")
    head_depth: int = _field(3, "Conv layers in each class/box net (D0: 3).")
    min_level: int = _field(3, "Lowest pyramid level.")
    max_level: int = _field(7, "Highest pyramid level.")
    num_scales: int = _field(3, "Anchor scales per octave.")
    aspect_ratios: Tuple[float, ...] = _field((1.0, 2.0, 0.5), "Anchor aspect ratios.")
    anchor_scale: float = _field(4.0, "Anchor size in units of the level's stride.")
    box_loss: str = _field("huber", "Box regression loss.", BOX_LOSSES)
    label_smoothing: float = _field(
        0.0, "Class label smoothing eps of the focal loss's cross-entropy: targets 1 - eps/2 and eps/2 "
        "(automl's label_smoothing, YOLOv5's smooth_BCE; YOLOv4's bag of freebies).")
    bn_momentum: float = _field(
        0.99, "Momentum of every BatchNorm's moving statistics (EfficientDet, Darknet: 0.99, an average "
        "over ~100 steps; ultralytics YOLOv8: 0.97). A run of a few hundred steps needs a lower one: the "
        "moving statistics otherwise lag the weights and evaluation collapses (BENCHMARKS.md).")

    def check(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label_smoothing={self.label_smoothing}: must be in [0, 1).")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ConfigError(f"--bn_momentum={self.bn_momentum}: must be in [0, 1).")
        if self.image_size % (2 ** self.max_level):
            raise ConfigError(
                f"--image_size={self.image_size} must be a multiple of "
                f"2**max_level = {2 ** self.max_level}."
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Datasets and the input pipeline (augmentation: AugmentConfig)."""

    datasets: Tuple[DatasetConfig, ...] = _field((), "Set by --dataset=NAME=PATH.", flag=False)
    data_cache_dir: str = _field(
        "", "Where converted TFRecords go (default MODEL_DIR/data_cache). "
        "The source dataset folder is never written to.")
    val_split: str = _field(
        "", "Split a dataset root is evaluated on (converted as val): empty = val, else valid, "
        "else test; SPLIT for every dataset, or NAME=SPLIT,... for some (the others: auto).")
    batch_size: int = _field(
        8, "Global batch per dataset and step (summed over replicas); "
        "--dataset_batch_size=NAME=N overrides it for one dataset.")
    eval_batch_size: int = _field(8, "Global batch for evaluation.")
    shuffle_buffer: int = _field(1024, "Shuffle buffer (examples) per dataset.")
    cache_images: str = _field(
        "auto", "Keep decoded training images in memory: auto = when a dataset's "
        "TFRecords total at most 32 MiB, yes, no.", choices=("auto", "yes", "no"))
    seed: int = _field(0, "Seed for data order, augmentation and initialisation.")

    @property
    def head_names(self) -> Tuple[str, ...]:
        return tuple(d.name for d in self.datasets)

    def dataset(self, name: str) -> DatasetConfig:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(f"No dataset named {name!r}; known: {self.head_names}")

    @property
    def training_datasets(self) -> Tuple[DatasetConfig, ...]:
        """The datasets this run reads training data from (not the heads
        --init_from carried over frozen and without data)."""
        return tuple(d for d in self.datasets if d.trains)

    @property
    def images_per_step(self) -> int:
        return sum(d.batch_size for d in self.training_datasets)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (effdet_tf/data/augment.py), YOLOv4's
    (Bochkovskiy et al. 2020): Mosaic, MixUp, CutMix (off by default), HSV
    jitter, blur (off by default), flip, scale and translation. Colour, flip
    and scale defaults are YOLOv5's `hyp.scratch-low` (hsv 0.015/0.7/0.4,
    fliplr 0.5, scale 0.5), box survival its `box_candidates` (wh_thr=2,
    area_thr=0.1).

    Mosaic is drawn per group of images (keras-cv's Mosaic computes all or
    none of a group; a per-image draw would pay for every image anyway).
    `mixup_alpha` 32 as YOLOv5: blend weights near 0.5, so both images'
    objects are visible (keras-cv's default 0.2 gives weights near 0 or 1:
    targets for invisible objects)."""

    mosaic_prob: float = _field(0.5, "Probability of a Mosaic batch element.")
    mosaic_offset: Tuple[float, ...] = _field(
        (0.25, 0.75), "Range of the Mosaic centre, as fractions of the input size (lo,hi).")
    mixup_prob: float = _field(0.15, "Probability of MixUp, per image, with another image of its group.")
    mixup_alpha: float = _field(32.0, "MixUp blend weight ~ Beta(alpha, alpha).")
    cutmix_prob: float = _field(
        0.0, "Probability of CutMix, per image: a random rectangle of another image of its group pasted at the "
        "same place, with that image's boxes clipped to it (Yun et al. 2019).")
    cutmix_min_visible: float = _field(
        0.4, "An image's own box survives a CutMix rectangle if at least this fraction of its area stays "
        "visible (YOLOv5's cutout drops labels more than 60% obscured).")
    hsv_prob: float = _field(1.0, "Probability of HSV colour jitter.")
    hsv_gains: Tuple[float, ...] = _field(
        (0.015, 0.7, 0.4), "HSV jitter ranges h,s,v: hue shift of +-h turns, saturation and value gains in "
        "1 +- s and 1 +- v.")
    blur_prob: float = _field(0.0, "Probability of a Gaussian blur of an image (YOLOv4's blur).")
    blur_sigma: Tuple[float, ...] = _field((0.1, 2.0), "Range of the blur's standard deviation, pixels (lo,hi).")
    flip_prob: float = _field(0.5, "Probability of a horizontal flip.")
    scale_min: float = _field(0.5, "Smallest random scale, relative to the letterbox size.")
    scale_max: float = _field(1.5, "Largest random scale, relative to the letterbox size.")
    translate: float = _field(
        1.0, "Random placement: the fraction of the free room (canvas minus the scaled image) an image "
        "moves by (0: the top-left letterbox of evaluation, 1: anywhere).")
    min_box_size: float = _field(
        2.0, "A box a crop cuts into survives if both its sides stay at least this many pixels "
        "and --min_box_area_ratio holds.")
    min_box_area_ratio: float = _field(
        0.1, "A box a crop cuts into survives if it keeps at least this fraction of its area "
        "and --min_box_size holds.")

    @classmethod
    def none(cls) -> "AugmentConfig":
        """No augmentation: the plain letterbox of evaluation."""
        return cls(mosaic_prob=0.0, mixup_prob=0.0, cutmix_prob=0.0, hsv_prob=0.0, blur_prob=0.0, flip_prob=0.0,
                   scale_min=1.0, scale_max=1.0, translate=0.0)

    @property
    def uses_groups(self) -> bool:
        """Whether the group stage (Mosaic, CutMix, MixUp) has anything to do."""
        return self.mosaic_prob > 0.0 or self.mixup_prob > 0.0 or self.cutmix_prob > 0.0

    def check(self):
        if self.scale_min <= 0 or self.scale_min > self.scale_max:
            raise ConfigError(
                f"--scale_min={self.scale_min} / --scale_max={self.scale_max}: need 0 < scale_min <= scale_max.")
        for name in ("mosaic_prob", "mixup_prob", "cutmix_prob", "cutmix_min_visible", "hsv_prob", "blur_prob",
                     "flip_prob", "translate", "min_box_area_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name}={value}: must be in [0, 1].")
        lo_hi = self.mosaic_offset
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ConfigError(f"--mosaic_offset={_csv(lo_hi)}: need two values 0 <= lo <= hi <= 1.")
        lo_hi = self.blur_sigma
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 10.0:
            raise ConfigError(f"--blur_sigma={_csv(lo_hi)}: need two values 0 < lo <= hi <= 10.")
        if len(self.hsv_gains) != 3 or min(self.hsv_gains) < 0:
            raise ConfigError(f"--hsv_gains={_csv(self.hsv_gains)}: need three values h,s,v >= 0.")
        if self.mixup_alpha <= 0:
            raise ConfigError(f"--mixup_alpha={self.mixup_alpha}: must be positive.")
        if self.min_box_size < 0:
            raise ConfigError(f"--min_box_size={self.min_box_size}: must be >= 0.")


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training recipe. Defaults are EfficientDet's (Tan et al. 2020, sec. 5.1
    and google/automl hparams): SGD momentum 0.9, LR 0.08 per 64 images with
    linear warmup then cosine decay, L2 weight decay 4e-5 in the loss,
    gradient clip norm 10 on the aggregated gradient, EMA 0.9998 with
    warm-up (effdet_tf/optimization.py says how each differs from Keras's
    own)."""

    model_dir: str = _field("", "Where config.json, checkpoints and TensorBoard logs go.")
    mode: str = _field("train_and_eval", "What to run.", MODES)
    strategy: str = _field(
        "mirrored", "mirrored: all visible GPUs (or the CPU); multi_worker: "
        "MultiWorkerMirroredStrategy from TF_CONFIG; one_device.", STRATEGIES)
    precision: str = _field("float32", "Compute precision; losses stay float32.", PRECISIONS)
    sync_batchnorm: bool = _field(False, "Synchronise BatchNorm statistics across replicas.")
    optimizer: str = _field("sgd", "Optimizer.", OPTIMIZERS)
    learning_rate: float = _field(0.08, "Peak LR per --lr_reference_batch images.")
    lr_reference_batch: int = _field(64, "Images per step at which --learning_rate applies (scaled linearly).")
    momentum: float = _field(0.9, "SGD momentum (Adam beta_1 for adam/adamw).")
    l2_weight_decay: float = _field(
        4e-5, "EfficientDet's weight decay: wd/2 * sum(kernel**2) added to the loss (gradient wd * kernel, "
        "through the momentum); BatchNorm and biases excluded. 0: off.")
    weight_decay: float = _field(
        0.0, "Decoupled weight decay (AdamW's: w -= lr * wd * w after the update, outside the momentum); "
        "BatchNorm and biases excluded. 0: off.")
    global_clipnorm: float = _field(
        10.0, "Clip the gradient of the global batch (all replicas summed) to this global norm (0: off).")
    ema_momentum: float = _field(
        0.9998, "Momentum of the EMA of the weights and BatchNorm statistics, warmed up as "
        "min(m, (1+t)/(10+t)) at step t (0: no EMA).")
    epochs: int = _field(300, "Training epochs.")
    steps_per_epoch: int = _field(0, "Steps per epoch (0: the largest dataset seen once).")
    warmup_epochs: float = _field(1.0, "Linear LR warmup length in epochs.")
    eval_every_epochs: int = _field(1, "Evaluate (COCO mAP, best checkpoint) every N epochs.")
    precise_bn_batches: int = _field(
        0, "Before each evaluation (and at the end of training), recompute the evaluated weights' BatchNorm "
        "statistics from this many training batches with the weights fixed (PreciseBN): moving averages lag "
        "weights that move fast, in short runs at a high LR. Saved and exported weights carry them; the time "
        "is not counted in --train_minutes, as evaluation's is not. 0: off.")
    train_minutes: float = _field(
        0.0, "Wall-clock training budget of this run in minutes (evaluation and checkpoint time not "
        "counted; 0: none): training stops once it is spent (or after --epochs), and the LR schedule's "
        "cosine is re-planned to end there from the measured step time.")
    eval_every_minutes: float = _field(
        0.0, "Also evaluate at the first checkpoint-interval end after every N minutes of training "
        "(0: only every --eval_every_epochs).")
    keep_best_per_dataset: bool = _field(
        False, "Besides best.weights.h5 (the best mean AP over datasets), keep best_<dataset>.weights.h5 "
        "(+ best_<dataset>.json) at each dataset's own best AP; export.py --which=best_<dataset> exports it.")
    checkpoint_every_steps: int = _field(100, "Save a resumable checkpoint every N steps.")
    init_from: str = _field(
        "", "Start from a trained run's model dir (its best EMA weights): the trunk (backbone + BiFPN) and "
        "every head whose dataset name and label map match are loaded, a new dataset gets a fresh head; a "
        "head of that run not named by --dataset is kept if frozen (--freeze=heads:NAME). A resumable "
        "backup in --model_dir takes precedence.")
    reinit_heads: Tuple[str, ...] = _field(
        (), "With --init_from: datasets whose head starts fresh (e.g. its label map changed).", items=str)
    freeze: Tuple[str, ...] = _field(
        (), "Parts that take no gradient, keep BatchNorm in inference mode and get no optimizer slots: "
        "backbone, trunk (backbone + BiFPN), heads:NAME[,NAME...], e.g. --freeze=trunk,heads:food,tools.",
        items=str)
    backbone_weights: str = _field("", "Darknet .weights file for the CSPDarknet53 backbone.")
    fresh_start: bool = _field(False, "Start over in a model dir that holds another run.")
    max_nonfinite_steps: int = _field(20, "Stop after this many consecutive steps with a non-finite loss.")
    tensorboard_images: int = _field(4, "Validation images per dataset drawn to TensorBoard.")
    export_after_training: bool = _field(False, "Export a SavedModel after training.")
    visualize_after_training: bool = _field(False, "Write a picture of detections after training.")
    generate_demo_data: str = _field(
        "", "Generate the demo dataset pair into this folder (if absent) "
        "and train on it; used by configs/demo.flags.")
    verbose: int = _field(
        -1, "Keras fit verbosity: 1 a progress bar, 2 one line per checkpoint interval, 0 none; "
        "-1: a bar on a terminal, one line per interval when stdout is a file.")

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return int(math.ceil(self.warmup_epochs * steps_per_epoch))


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Where export.py writes (what it exports: PostprocessConfig)."""

    export_dir: str = _field(
        "", "SavedModel root; versions go in numbered subfolders (empty: MODEL_DIR/export).")
    export_version: int = _field(0, "SavedModel version (0: next free).")
    serving_model_name: str = _field("effdet", "The model's name in models.config (TF Serving's MODEL_NAME).")
    serving_base_path: str = _field(
        "", "base_path in models.config: where the server sees the export dir (default /models/<name>, "
        "the docker mount of the README).")
    serving_max_batch_size: int = _field(
        8, "batching_parameters.txt's max_batch_size, also the warm-up's largest batch.")
    serving_batch_timeout_micros: int = _field(
        1000, "batching_parameters.txt's batch_timeout_micros (TF Serving's batching guide: slightly above 0).")
    serving_batch_threads: int = _field(
        0, "batching_parameters.txt's num_batch_threads and max_enqueued_batches (0: this machine's CPU count).")
    keep_versions: int = _field(
        0, "After a new version is complete, remove the oldest beyond the newest N (0: keep all).")
    class_equivalence: str = _field(
        "", "JSON file of the classes the `all` signatures merge across heads: a list of lists of "
        "\"dataset:category_id\" that mean the same thing ([]: no merging). Default: the classes whose "
        "names match (MODEL_DIR/label_audit.json's \"shared\").")


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """Head outputs -> detections (ops/postprocess.py), ONE setting for
    evaluation, Detector.detect and every export signature, so the mAP that
    training reports is the served model's. The score threshold is the one
    difference: COCO AP is computed over (nearly) every detection, serving
    keeps the confident ones; a model exported with
    --score_threshold=<eval_score_threshold> gives evaluation's detections.

    nms_method "gaussian" is Soft-NMS (Bodla et al. 2017), the default of
    google/automl's EfficientDet (nms_configs.method): overlapping boxes of
    a class are down-weighted by exp(-IoU^2 / (2 * soft_nms_sigma)) (TF's
    formula) instead of removed, and iou_threshold is not used. "hard" is
    greedy NMS at iou_threshold. Gaussian is the default: on BCCD it gave
    about twice hard NMS's AP with the same weights (BENCHMARKS.md); it
    also keeps lowered duplicates of a box, which a display threshold above
    their scores (or --nms_method=hard at export) hides."""

    eval_score_threshold: float = _field(0.001, "Score threshold of COCO evaluation (the usual for AP).")
    score_threshold: float = _field(
        0.05, "Score threshold of the exported model (serving). Detections must score above it.")
    nms_method: str = _field(
        "gaussian", "Per-class NMS: gaussian (Soft-NMS; higher COCO AP, BENCHMARKS.md) or hard.", NMS_METHODS)
    iou_threshold: float = _field(0.5, "Hard NMS: same-class boxes overlapping more than this are removed.")
    soft_nms_sigma: float = _field(0.5, "Soft-NMS: score decay exp(-IoU^2 / (2 sigma)) (TF's soft_nms_sigma).")
    pre_nms_topk: int = _field(1000, "(anchor, class) candidates per image kept, by score, before NMS.")
    max_detections: int = _field(100, "Detections per image (COCO evaluation: 100).")

    def kwargs(self, score_threshold: float) -> Dict[str, Any]:
        """Keyword arguments of ops.postprocess.postprocess (and
        Detector.detect) at `score_threshold`."""
        return {
            "score_threshold": float(score_threshold),
            "iou_threshold": float(self.iou_threshold),
            "max_detections": int(self.max_detections),
            "pre_nms_topk": int(self.pre_nms_topk),
            "nms_method": self.nms_method,
            "soft_nms_sigma": float(self.soft_nms_sigma),
        }

    def eval_kwargs(self) -> Dict[str, Any]:
        return self.kwargs(self.eval_score_threshold)

    def serving_kwargs(self) -> Dict[str, Any]:
        return self.kwargs(self.score_threshold)

    def check(self):
        for name in ("eval_score_threshold", "score_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"--{name}={value}: must be in [0, 1).")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(f"--iou_threshold={self.iou_threshold}: must be in (0, 1].")
        if self.soft_nms_sigma <= 0:
            raise ConfigError(f"--soft_nms_sigma={self.soft_nms_sigma}: must be positive.")
        if self.nms_method not in NMS_METHODS:
            raise ConfigError(f"--nms_method={self.nms_method}: one of {', '.join(NMS_METHODS)}.")
        for name in ("max_detections", "pre_nms_topk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be positive.")


SECTIONS = (("model", ModelConfig), ("data", DataConfig), ("augment", AugmentConfig), ("train", TrainConfig),
            ("export", ExportConfig), ("postprocess", PostprocessConfig))


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    postprocess: PostprocessConfig = PostprocessConfig()

    # ---- what other modules need, named once ----
    @property
    def head_names(self) -> Tuple[str, ...]:
        return self.data.head_names

    @property
    def heads(self) -> Dict[str, int]:
        """{dataset name: number of classes}, in dataset order."""
        return {d.name: d.num_classes for d in self.data.datasets}

    def label_maps(self) -> Dict[str, Dict[str, Any]]:
        return {d.name: d.label_map() for d in self.data.datasets}

    def detector_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of modeling.detector.Detector for this config."""
        m = self.model
        return {
            "heads": self.heads,
            "image_size": m.image_size,
            "width_multiplier": m.width_multiplier,
            "depth_multiplier": m.depth_multiplier,
            "fpn_channels": m.fpn_channels,
            "fpn_repeats": m.fpn_repeats,
            "head_depth": m.head_depth,
            "min_level": m.min_level,
            "max_level": m.max_level,
            "num_scales": m.num_scales,
            "aspect_ratios": tuple(m.aspect_ratios),
            "anchor_scale": m.anchor_scale,
            "head_loss_weights": {d.name: d.loss_weight for d in self.data.datasets},
            "box_loss": m.box_loss,
            "label_smoothing": m.label_smoothing,
            "bn_momentum": m.bn_momentum,
        }

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)

    def with_datasets(self, datasets) -> "Config":
        return self.replace(data=dataclasses.replace(self.data, datasets=tuple(datasets)))

    # ---- JSON ----
    def to_dict(self) -> Dict[str, Any]:
        out = {"config_version": CONFIG_VERSION}
        out.update(dataclasses.asdict(self))
        # Derived, for readers that do not import effdet_tf (export, people).
        out["detector_kwargs"] = self.detector_kwargs()
        out["label_maps"] = self.label_maps()
        return _jsonable(out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        version = d.get("config_version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(
                f"config.json has config_version {version}, newer than this "
                f"code's {CONFIG_VERSION}."
            )
        d = _moved_augment_keys(_moved_postprocess_keys(d))
        sections = {}
        for name, klass in SECTIONS:
            sections[name] = _from_dict(klass, d.get(name, {}), name)
        return cls(**sections)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _from_dict(klass, d: Mapping[str, Any], where: str):
    """Builds dataclass `klass` from JSON, turning lists back into tuples.

    Unknown keys are an error (a typo in a hand-edited config.json should not
    silently fall back to a default)."""
    known = {f.name: f for f in dataclasses.fields(klass)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"Unknown keys in config section {where!r}: {unknown}")
    kwargs = {}
    for name, value in d.items():
        if klass is DataConfig and name == "datasets":
            value = tuple(_dataset_from_dict(v) for v in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return klass(**kwargs)


# Where config.json files written before the postprocess section kept its
# settings: (old section, old key) -> new key, evaluation's first (what the
# AP in best.json was measured with) when both sections had one.
_MOVED_TO_POSTPROCESS = (
    (("train", "eval_score_threshold"), "eval_score_threshold"),
    (("export", "score_threshold"), "score_threshold"),
    (("train", "eval_iou_threshold"), "iou_threshold"),
    (("export", "iou_threshold"), "iou_threshold"),
    (("train", "eval_max_detections"), "max_detections"),
    (("export", "max_detections"), "max_detections"),
)


def _moved_postprocess_keys(d: Mapping[str, Any]) -> Dict[str, Any]:
    """A config dict with the keys of older files moved into "postprocess"
    (a key the section already has wins). Such files predate Soft-NMS:
    their models keep the hard NMS they were evaluated with."""
    d = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}
    old = "postprocess" not in d
    post = d.setdefault("postprocess", {})
    for (section, key), new in _MOVED_TO_POSTPROCESS:
        if key in d.get(section, {}):
            value = d[section].pop(key)
            post.setdefault(new, value)
    if old:
        post.setdefault("nms_method", "hard")
    return d


# The augmentation settings config.json files kept in "data" before the
# augment section existed.
_MOVED_TO_AUGMENT = ("mosaic_prob", "mixup_prob", "hsv_prob", "flip_prob", "scale_min", "scale_max", "translate")


def _moved_augment_keys(d: Mapping[str, Any]) -> Dict[str, Any]:
    """A config dict with older files' augmentation keys moved from "data"
    into "augment" (a key the section already has wins)."""
    d = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}
    augment = d.setdefault("augment", {})
    for key in _MOVED_TO_AUGMENT:
        if key in d.get("data", {}):
            augment.setdefault(key, d["data"].pop(key))
    return d


def _dataset_from_dict(d: Mapping[str, Any]) -> DatasetConfig:
    d = dict(d)
    d["classes"] = tuple(ClassEntry(**c) for c in d.get("classes", ()))
    return _from_dict(DatasetConfig, d, "data.datasets")


def classes_from_label_map(label_map: Mapping[str, Any]) -> Tuple[ClassEntry, ...]:
    """label_map.json (converter format) -> ClassEntry tuple, checked to be
    contiguous 0..C-1 so head outputs index it directly."""
    classes = tuple(
        ClassEntry(index=int(c["index"]), id=int(c["id"]), name=str(c["name"]))
        for c in label_map["classes"]
    )
    classes = tuple(sorted(classes, key=lambda c: c.index))
    if [c.index for c in classes] != list(range(len(classes))):
        raise ValueError("label_map.json indices are not contiguous 0..C-1.")
    return classes


def check(config: "Config"):
    """Checks that need no strategy and no files. Messages name the flag."""
    config.model.check()
    config.augment.check()
    config.postprocess.check()
    t, d = config.train, config.data
    positive = {"batch_size": d.batch_size, "eval_batch_size": d.eval_batch_size, "epochs": t.epochs,
                "checkpoint_every_steps": t.checkpoint_every_steps, "eval_every_epochs": t.eval_every_epochs,
                "lr_reference_batch": t.lr_reference_batch}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{name}={value}: must be positive.")
    if t.steps_per_epoch < 0:
        raise ConfigError(f"--steps_per_epoch={t.steps_per_epoch}: must be >= 0 (0: one pass over the data).")
    e = config.export
    if e.serving_max_batch_size <= 0:
        raise ConfigError(f"--serving_max_batch_size={e.serving_max_batch_size}: must be positive.")
    for name in ("serving_batch_timeout_micros", "serving_batch_threads", "keep_versions"):
        if getattr(e, name) < 0:
            raise ConfigError(f"--{name}={getattr(e, name)}: must be >= 0.")
    for name in ("l2_weight_decay", "weight_decay", "global_clipnorm", "train_minutes", "eval_every_minutes"):
        if getattr(t, name) < 0:
            raise ConfigError(f"--{name}={getattr(t, name)}: must be >= 0 (0: off).")
    for name in ("train_minutes", "eval_every_minutes"):
        if t.strategy == "multi_worker" and getattr(t, name):
            # Each worker's clock would stop or evaluate at its own step,
            # and the workers' collectives would then wait for each other.
            raise ConfigError(f"--{name}={getattr(t, name)}: a clock per worker under --strategy=multi_worker; "
                              "give the length in steps (--epochs, --eval_every_epochs).")
    if t.precise_bn_batches < 0:
        raise ConfigError(f"--precise_bn_batches={t.precise_bn_batches}: must be >= 0 (0: off).")
    if t.precise_bn_batches and (t.strategy == "multi_worker" or t.sync_batchnorm):
        # The chief alone runs the forward passes, outside the replicas: not
        # tested with other workers' variables or cross-replica BatchNorm.
        raise ConfigError(f"--precise_bn_batches={t.precise_bn_batches}: not supported with "
                          f"{'--strategy=multi_worker' if t.strategy == 'multi_worker' else '--sync_batchnorm'} yet "
                          "(pass --precise_bn_batches=0 after a flagfile that sets it, such as configs/cpu_real.flags).")
    if not 0.0 <= t.ema_momentum < 1.0:
        raise ConfigError(f"--ema_momentum={t.ema_momentum}: must be in [0, 1).")
    if t.learning_rate <= 0:
        raise ConfigError(f"--learning_rate={t.learning_rate}: must be positive.")


def check_replicas(config: "Config", num_replicas: int):
    """Each dataset's global batch must split evenly over the replicas."""
    for ds in config.data.training_datasets:
        if ds.batch_size % num_replicas:
            flag = "--batch_size" if ds.batch_size == config.data.batch_size else f"--dataset_batch_size={ds.name}"
            raise ConfigError(
                f"{flag}={ds.batch_size} is not divisible by the {num_replicas} replicas of "
                f"--strategy={config.train.strategy} (dataset {ds.name!r}).")


def flag_fields():
    """(section name, dataclass field) for every field that is a flag."""
    out = []
    for section, klass in SECTIONS:
        for f in dataclasses.fields(klass):
            if f.metadata.get("flag", False):
                out.append((section, f))
    return out


def check_unique_field_names():
    names = [f.name for _, f in flag_fields()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AssertionError(f"Config field names must be unique: {dupes}")


check_unique_field_names()
