"""Where a dataset root keeps its splits: COCO, instances_<split> and Roboflow layouts.

Users arrive with one of three folder layouts; each split is a COCO json and
the folder its `file_name`s are relative to:

- COCO 2017: `annotations/instances_train2017.json` + `train2017/` (and val,
  test). A year suffix is dropped from the split's name: "train2017" is
  "train", so runs and reports speak of train/val/test whatever the year.
- instances_<split>: `annotations/instances_<split>.json` + `<split>/`, any
  split name (train, val, valid, test, ...). COCO 2017 is the special case
  with a year in the name; both are `kind == "coco"`.
- Roboflow "COCO JSON" export: `train/`, `valid/`, `test/`, each with
  `_annotations.coco.json` beside its images (`kind == "roboflow"`).

The training split is "train". The evaluation split is --val_split when
given, else the first of EVAL_PREFERENCE present (none: no evaluation). The
converter writes the training split as `train` and the evaluation split as
`val`, the names training and evaluation read (`written_as`); any other
split keeps its name, so it can be evaluated later.

Only file names are read here (no json, no image), so finding a layout is
cheap enough to run on every start of train.py.
"""

import dataclasses
import re
from pathlib import Path
from typing import Optional, Tuple

from effdet_tf.data.coco_checks import ConversionError

TRAIN = "train"
EVAL_PREFERENCE = ("val", "valid", "test")
ROBOFLOW_JSON = "_annotations.coco.json"
_INSTANCES = re.compile(r"instances_(?P<stem>.+)\.json")
_YEAR = re.compile(r"(?P<name>.+?)(19|20)\d\d")
_SAFE = re.compile(r"[^A-Za-z0-9_]")
_LOOKED_FOR = (
    "looked for annotations/instances_<split>.json with a <split>/ image folder beside"
    " annotations/ (COCO: instances_train2017.json + train2017/, or any split name:"
    " instances_valid.json + valid/) and for <split>/" + ROBOFLOW_JSON +
    " (Roboflow COCO JSON export: train/, valid/, test/)")
KINDS = {"coco": "COCO layout (annotations/instances_<split>.json)",
         "roboflow": "Roboflow COCO JSON export (<split>/" + ROBOFLOW_JSON + ")"}


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: its name (year dropped), COCO json and image folder."""

    name: str
    annotations: Path
    image_dir: Path


@dataclasses.dataclass(frozen=True)
class Layout:
    """The splits of a root and their roles.

    `written_as` maps a split's name to the prefix its converted files get:
    train -> "train", the evaluation split -> "val", others their own name
    (made file-name safe). A split literally named "val" that is not the
    evaluation split (--val_split chose another) is not converted: its files
    would be read as the evaluation split. `not_converted` says why.
    """

    root: Path
    kind: str
    splits: Tuple[Split, ...]
    train: str
    eval: Optional[str]
    written_as: Tuple[Tuple[str, str], ...]
    not_converted: Tuple[Tuple[str, str], ...] = ()

    def split(self, name):
        for s in self.splits:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def converted(self):
        """(Split, output prefix) of every split the converter writes."""
        return tuple((self.split(n), w) for n, w in self.written_as)

    def describe(self):
        """One line for logs: which split trains, which evaluates."""
        def where(s):
            return str(s.annotations.relative_to(self.root))
        evals = (f"evaluates on {self.eval!r} ({where(self.split(self.eval))}, written as val)"
                 if self.eval else "no evaluation split (looked for "
                 + ", ".join(EVAL_PREFERENCE) + ")")
        others = [f"{n!r} as {w}" for n, w in self.written_as if n not in (self.train, self.eval)]
        skipped = [f"{n!r} not converted ({why})" for n, why in self.not_converted]
        return (f"{self.root}: {KINDS[self.kind]}; trains on {self.train!r}"
                f" ({where(self.split(self.train))}), {evals}"
                + "".join(f"; {t}" for t in others + skipped)
                + "; --val_split picks another evaluation split")

    def to_json(self):
        """What the converter saves as splits.json beside the TFRecords."""
        return {"root": str(self.root), "layout": self.kind, "train": self.train,
                "eval": self.eval,
                "splits": {s.name: {"annotations": str(s.annotations),
                                    "image_dir": str(s.image_dir),
                                    "written_as": dict(self.written_as).get(s.name)}
                           for s in self.splits},
                "not_converted": dict(self.not_converted)}


def split_name(stem):
    """A split's name from its file or folder stem: "train2017" -> "train"."""
    year = _YEAR.fullmatch(stem)
    return year.group("name") if year else stem


def _coco_splits(root):
    ann_dir = root / "annotations"
    if not ann_dir.is_dir():
        return []
    splits = []
    for f in sorted(ann_dir.iterdir()):
        m = _INSTANCES.fullmatch(f.name)
        if not m or not f.is_file():
            continue
        stem = m.group("stem")
        image_dir = root / stem
        if not image_dir.is_dir():
            raise ConversionError(f"{f}: no image folder {image_dir}/ (a COCO layout keeps"
                                  f" annotations/instances_<split>.json beside <split>/)")
        splits.append(Split(split_name(stem), f, image_dir))
    return splits


def _roboflow_splits(root):
    return [Split(d.name, d / ROBOFLOW_JSON, d) for d in sorted(root.iterdir())
            if d.is_dir() and (d / ROBOFLOW_JSON).is_file()]


def find_splits(root):
    """(kind, [Split]) of a dataset root, in name order.

    Raises:
      ConversionError: not a folder, no known layout (the message says what
        was looked for and what is there), both layouts at once, an
        annotations json without its image folder, or two splits of one name.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"{root}: not a folder")
    coco, roboflow = _coco_splits(root), _roboflow_splits(root)
    if coco and roboflow:
        raise ConversionError(
            f"{root}: holds both a COCO layout ({coco[0].annotations.relative_to(root)}) and"
            f" a Roboflow export ({roboflow[0].annotations.relative_to(root)}): give a folder"
            " with one of them")
    if not coco and not roboflow:
        if (root / ROBOFLOW_JSON).is_file():
            raise ConversionError(f"{root}: one split of a Roboflow export ({ROBOFLOW_JSON}"
                                  " beside images): give the folder holding train/ and valid/")
        there = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        raise ConversionError(
            f"{root}: no dataset layout found: {_LOOKED_FOR}; found: "
            + (", ".join(there[:12]) + (", ..." if len(there) > 12 else "") or "an empty folder"))
    splits = coco or roboflow
    names = [s.name for s in splits]
    for s in splits:
        if names.count(s.name) > 1:
            twins = [str(t.annotations) for t in splits if t.name == s.name]
            raise ConversionError(f"{root}: two splits named {s.name!r}: {', '.join(twins)}")
    return ("coco" if coco else "roboflow"), splits


def find_layout(root, val_split=""):
    """The Layout of `root`: its splits, which trains and which evaluates.

    Args:
      root: a dataset root in one of the layouts above.
      val_split: the evaluation split's name ("" = the first present of
        EVAL_PREFERENCE). "val2017" names the split "val" too.

    Raises:
      ConversionError: as find_splits; no "train" split; --val_split naming a
        split that is absent, or the training split.
    """
    root = Path(root)
    kind, splits = find_splits(root)
    names = [s.name for s in splits]
    if TRAIN not in names:
        raise ConversionError(f"{root}: no training split named {TRAIN!r} (splits found:"
                              f" {', '.join(names)}; {_LOOKED_FOR})")
    if val_split:
        wanted = val_split if val_split in names else split_name(val_split)
        if wanted == TRAIN:
            raise ConversionError(f"--val_split={val_split}: the training split can't also be"
                                  f" the evaluation split (splits of {root}: {', '.join(names)})")
        if wanted not in names:
            raise ConversionError(f"--val_split={val_split}: {root} has no split {wanted!r}"
                                  f" (splits: {', '.join(names)})")
        eval_split = wanted
    else:
        eval_split = next((n for n in EVAL_PREFERENCE if n in names), None)
    written, skipped = [(TRAIN, TRAIN)], []
    if eval_split:
        written.append((eval_split, "val"))
    taken = {"train", "val"}
    for n in names:
        if n in (TRAIN, eval_split):
            continue
        if n == "val":
            skipped.append((n, f"--val_split={val_split} evaluates on {eval_split!r}, written"
                               " as val"))
            continue
        # train-*/val-* globs must never match another split's files.
        safe = _SAFE.sub("_", n)
        if safe in taken:
            raise ConversionError(f"{root}: split {n!r} would be written as {safe!r}, a name"
                                  " already used")
        taken.add(safe)
        written.append((n, safe))
    return Layout(root, kind, tuple(splits), TRAIN, eval_split, tuple(written), tuple(skipped))


def split_of(root, name):
    """The Split called `name` in `root` (convert_coco's one-split path)."""
    kind, splits = find_splits(root)
    for s in splits:
        if s.name == name or s.annotations.name == f"instances_{name}.json":
            return s
    raise ConversionError(f"{root}: no split {name!r} (splits: "
                          f"{', '.join(s.name for s in splits)})")


def parse_val_split(value, dataset_names):
    """--val_split -> {dataset name: split name or ""}.

    "test" applies to every dataset; "bccd=test,raccoon=valid" to the named
    ones (the others choose automatically).
    """
    if "=" not in value:
        return {n: value.strip() for n in dataset_names}
    out = {n: "" for n in dataset_names}
    for item in filter(None, (t.strip() for t in value.split(","))):
        name, _, split = item.partition("=")
        name, split = name.strip(), split.strip()
        if name not in out or not split:
            raise ConversionError(
                f"--val_split={value}: {item!r} is not DATASET=SPLIT with a dataset of"
                f" --dataset ({', '.join(dataset_names)})")
        out[name] = split
    return out
