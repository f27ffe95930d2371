"""Tests for dataset layout detection (effdet_tf.data.layouts): layouts made
on the fly in tmp folders (only file names matter here, never contents)."""

from pathlib import Path

import pytest

from effdet_tf.data import layouts
from effdet_tf.data.coco_checks import ConversionError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _touch(root, *paths):
    for p in paths:
        path = Path(root) / p
        path.parent.mkdir(parents=True, exist_ok=True)
        if p.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text("{}")
    return Path(root)


def _coco(root, *stems):
    return _touch(root, *[f"annotations/instances_{s}.json" for s in stems],
                  *[f"{s}/" for s in stems])


def _roboflow(root, *splits):
    return _touch(root, *[f"{s}/{layouts.ROBOFLOW_JSON}" for s in splits],
                  *[f"{s}/a.jpg" for s in splits])


def test_coco_2017_with_test_split(tmp_path):
    root = _coco(tmp_path, "train2017", "val2017", "test2017")
    _touch(root, "annotations/captions_train2017.json")  # not instances: not a split
    layout = layouts.find_layout(root)
    assert layout.kind == "coco"
    assert [s.name for s in layout.splits] == ["test", "train", "val"]
    assert layout.split("val").annotations == root / "annotations" / "instances_val2017.json"
    assert layout.split("val").image_dir == root / "val2017"
    assert (layout.train, layout.eval) == ("train", "val")
    assert dict(layout.written_as) == {"train": "train", "val": "val", "test": "test"}
    assert "evaluates on 'val'" in layout.describe() and "'test' as test" in layout.describe()


@pytest.mark.parametrize("val_split", ["test", "test2017"])
def test_val_split_picks_another(tmp_path, val_split):
    root = _coco(tmp_path, "train2017", "val2017", "test2017")
    layout = layouts.find_layout(root, val_split=val_split)
    assert layout.eval == "test"
    assert dict(layout.written_as) == {"train": "train", "test": "val"}
    # The real val's files would be read as the evaluation split: not converted.
    assert dict(layout.not_converted).keys() == {"val"}
    assert [(s.name, w) for s, w in layout.converted] == [("train", "train"), ("test", "val")]
    assert "evaluates on 'test'" in layout.describe() and "'val' not converted" in layout.describe()


def test_instances_any_split_name(tmp_path):
    root = _coco(tmp_path, "train", "valid", "holdout-2")
    layout = layouts.find_layout(root)
    assert layout.kind == "coco"
    assert layout.eval == "valid"
    # "holdout-2" written as holdout_2: a "-" would let the train-*/val-* globs
    # of other splits match its shards one day (e.g. "val-hard").
    assert dict(layout.written_as) == {"train": "train", "valid": "val", "holdout-2": "holdout_2"}
    assert layout.split("holdout-2").image_dir == root / "holdout-2"
    assert layouts.find_layout(root, "holdout-2").eval == "holdout-2"


def test_eval_preference_val_then_valid_then_test(tmp_path):
    assert layouts.find_layout(_coco(tmp_path / "a", "train", "test", "valid")).eval == "valid"
    assert layouts.find_layout(_coco(tmp_path / "b", "train", "test")).eval == "test"
    only = layouts.find_layout(_coco(tmp_path / "c", "train", "extra"))
    assert only.eval is None
    assert dict(only.written_as) == {"train": "train", "extra": "extra"}
    assert "no evaluation split" in only.describe()


def test_roboflow_export(tmp_path):
    root = _roboflow(tmp_path, "train", "valid", "test")
    _touch(root, "README.roboflow.txt")
    layout = layouts.find_layout(root)
    assert layout.kind == "roboflow"
    assert [s.name for s in layout.splits] == ["test", "train", "valid"]
    assert layout.split("valid").annotations == root / "valid" / layouts.ROBOFLOW_JSON
    assert layout.split("valid").image_dir == root / "valid"
    assert (layout.train, layout.eval) == ("train", "valid")
    assert dict(layout.written_as) == {"train": "train", "valid": "val", "test": "test"}
    assert layouts.find_layout(root, "test").written_as == (
        ("train", "train"), ("test", "val"), ("valid", "valid"))
    info = layout.to_json()
    assert info["layout"] == "roboflow" and info["eval"] == "valid"
    assert info["splits"]["valid"]["written_as"] == "val"


@pytest.mark.parametrize("make, message", [
    (lambda r: r, "no dataset layout found: looked for annotations/instances_<split>.json"),
    (lambda r: _touch(r, "annotations/captions_train2017.json", "train2017/"),
     "found: annotations/, train2017/"),
    (lambda r: _touch(r, "annotations/instances_train2017.json"),
     "instances_train2017.json: no image folder .*train2017/"),
    (lambda r: _coco(r, "val2017", "test2017"), "no training split named 'train'.*test, val"),
    (lambda r: _roboflow(r, "train") / "train", "one split of a Roboflow export"),
    (lambda r: _roboflow(_coco(r, "train"), "valid"), "both a COCO layout"),
    (lambda r: _coco(r, "train", "train2017"), "two splits named 'train'"),
    (lambda r: _coco(r, "train", "val-x", "val_x"), "'val_x', a name already used"),
])
def test_unknown_layouts_name_path_and_what_was_looked_for(tmp_path, make, message):
    root = make(tmp_path / "data")
    (tmp_path / "data").mkdir(exist_ok=True)
    with pytest.raises(ConversionError, match=message) as e:
        layouts.find_layout(root)
    assert str(root) in str(e.value)


def test_not_a_folder(tmp_path):
    with pytest.raises(ConversionError, match="not a folder"):
        layouts.find_layout(tmp_path / "absent")


@pytest.mark.parametrize("val_split, message", [
    ("valid", r"--val_split=valid: .* has no split 'valid' \(splits: test, train, val\)"),
    ("train", "--val_split=train: the training split can't also be the evaluation split"),
])
def test_bad_val_split(tmp_path, val_split, message):
    root = _coco(tmp_path, "train2017", "val2017", "test2017")
    with pytest.raises(ConversionError, match=message):
        layouts.find_layout(root, val_split)


def test_split_of_and_split_name(tmp_path):
    root = _coco(tmp_path, "train2017", "val2017")
    assert layouts.split_of(root, "val").annotations.name == "instances_val2017.json"
    assert layouts.split_of(root, "val2017").name == "val"
    with pytest.raises(ConversionError, match="no split 'test'"):
        layouts.split_of(root, "test")
    assert [layouts.split_name(s) for s in ("train2017", "val2014", "valid", "2017")] == [
        "train", "val", "valid", "2017"]


def test_parse_val_split():
    names = ("raccoon", "bccd")
    assert layouts.parse_val_split("", names) == {"raccoon": "", "bccd": ""}
    assert layouts.parse_val_split("test", names) == {"raccoon": "test", "bccd": "test"}
    assert layouts.parse_val_split("bccd=test", names) == {"raccoon": "", "bccd": "test"}
    assert layouts.parse_val_split(" bccd=test, raccoon=valid ", names) == {
        "raccoon": "valid", "bccd": "test"}
    for bad in ("food=test", "bccd=", "bccd=test,valid"):
        with pytest.raises(ConversionError, match="not DATASET=SPLIT"):
            layouts.parse_val_split(bad, names)


def test_shared_sample_layouts():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    raccoon = layouts.find_layout(SHARED_DATA / "raccoon-roboflow")
    assert (raccoon.kind, raccoon.eval, dict(raccoon.written_as)) == (
        "roboflow", "valid", {"train": "train", "valid": "val"})
    bccd = layouts.find_layout(SHARED_DATA / "bccd-coco")
    assert (bccd.kind, bccd.eval, dict(bccd.written_as)) == (
        "coco", "val", {"train": "train", "val": "val", "test": "test"})
