"""Tests for --dataset=NAME=PATH's conversion cache (effdet_tf.data.data_cache),
and train.py end to end on the two real sample layouts of ../shared/data:
a Roboflow export (raccoon) and a COCO 2017 root with a test split (bccd)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from effdet_tf.data import data_cache
from effdet_tf.data.coco_checks import ConversionError
from coco_tfrecord_test import _records, _roboflow_root, _snapshot

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RACCOON, BCCD = SHARED_DATA / "raccoon-roboflow", SHARED_DATA / "bccd-coco"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
QUIET = {"num_workers": 1, "progress": False}


def _ensure(path, cache, **kw):
    """ensure_tfrecords and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        target = data_cache.ensure_tfrecords(path, cache, **{**QUIET, **kw})
    return target, printed.getvalue()


# ------------------------------------------------------------ generated data

def test_val_split_enters_the_fingerprint(tmp_path):
    root, cache = tmp_path / "pets", tmp_path / "cache"
    _roboflow_root(root)
    auto, printed = _ensure(root, cache, name="pets")
    assert _ensure(root, cache, name="pets", val_split="valid")[0] == auto  # same choice
    on_test, _ = _ensure(root, cache, name="pets", val_split="test")
    assert on_test != auto and on_test.parent == auto.parent == cache
    assert data_cache.read_splits(auto)["eval"] == "valid"
    assert data_cache.read_splits(on_test)["eval"] == "test"
    assert sorted(_records(on_test, "val")) == [0]  # test's one image, written as val
    assert sorted(_records(on_test, "valid")) == [0, 1]
    assert "evaluates on 'valid' (2 images, as val); also converted: 'test' (1 images)" in (
        data_cache.describe_conversion(auto))
    # A converted folder is used as is: --val_split may only name its own choice.
    assert data_cache.ensure_tfrecords(auto, tmp_path / "other", val_split="valid") == auto
    with pytest.raises(ConversionError, match="converted with 'valid' as the evaluation split"):
        data_cache.ensure_tfrecords(auto, tmp_path / "other", val_split="test")
    with pytest.raises(ConversionError, match="--val_split=nope: .* has no split 'nope'"):
        data_cache.ensure_tfrecords(root, cache, val_split="nope")


def test_printed_report_paths_are_where_the_reports_stay(tmp_path):
    root, cache = tmp_path / "pets", tmp_path / "cache"
    _roboflow_root(root)
    target, printed = _ensure(root, cache, name="pets")
    assert f"report: {target / 'report_train.json'}" in printed
    assert f"report: {target / 'report_val.json'}" in printed
    assert ".tmp" not in printed
    assert "[pets] " in printed and "evaluates on 'valid'" in printed


def test_failed_conversion_keeps_its_reports(tmp_path):
    root, cache = tmp_path / "pets", tmp_path / "cache"
    _roboflow_root(root)
    for image in (root / "valid").glob("*.jpg"):
        image.rename(image.with_suffix(".moved"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(ConversionError) as e:
        data_cache.ensure_tfrecords(root, cache, name="pets", **QUIET)
    failed = next(cache.glob("pets-*.failed"))
    message = str(e.value)
    assert "no usable image" in message and "missing_file: 2" in message
    assert message.endswith(f"report: {failed / 'report_val.json'}")
    assert sorted(p.name for p in failed.iterdir()) == ["report_train.json", "report_val.json"]
    assert json.loads((failed / "report_val.json").read_text())["counts"]["missing_file"] == 2
    assert ".tmp" not in printed.getvalue() and str(failed) in printed.getvalue()
    assert [p.name for p in cache.iterdir()] == [failed.name]  # no tmp, no half conversion
    # Fixed data converts; the failed attempt's reports go.
    for image in (root / "valid").glob("*.moved"):
        image.rename(image.with_suffix(".jpg"))
    target, _ = _ensure(root, cache, name="pets")
    assert [p.name for p in cache.iterdir()] == [target.name]


# ------------------------------------------------------------ real data

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """raccoon (Roboflow, auto: valid) and bccd (COCO 2017, --val_split=test)
    converted into one cache, as train.py's resolve_datasets would."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    before = {p: _snapshot(p) for p in (RACCOON, BCCD)}
    cache = tmp_path_factory.mktemp("cache")
    raccoon, raccoon_log = _ensure(RACCOON, cache, name="raccoon", num_workers=2)
    bccd, bccd_log = _ensure(BCCD, cache, name="bccd", val_split="test", num_workers=2)
    assert {p: _snapshot(p) for p in (RACCOON, BCCD)} == before
    return {"cache": cache, "raccoon": raccoon, "bccd": bccd,
            "log": {"raccoon": raccoon_log, "bccd": bccd_log}}


def _report(folder, split):
    return json.loads((folder / f"report_{split}.json").read_text())


def test_real_roboflow_export(real):
    out = real["raccoon"]
    label_map = json.loads((out / "label_map.json").read_text())
    assert label_map["classes"] == [{"index": 0, "id": 1, "name": "raccoon"}]
    splits = data_cache.read_splits(out)
    assert (splits["layout"], splits["train"], splits["eval"]) == ("roboflow", "train", "valid")
    train, val = _report(out, "train"), _report(out, "val")
    assert (train["images"]["written"], train["annotations"]["written"]) == (160, 175)
    assert (val["images"]["written"], val["annotations"]["written"]) == (40, 42)
    for report in (train, val):
        assert report["categories"]["left_out"] == [{"id": 0, "name": "raccoons"}]
        assert report["counts"]["placeholder_category"] == 1
        assert report["images"]["skipped"] == report["annotations"]["dropped"] == 0
    assert train["counts"]["grayscale_converted"] >= 1  # the README's grayscale images
    assert {c["id"] for c in json.loads((out / "val_annotations.json").read_text())[
        "categories"]} == {1}
    log = real["log"]["raccoon"]
    assert "category 0 'raccoons' left out of the label map" in log
    assert "trains on 'train'" in log and "evaluates on 'valid'" in log
    assert f"report: {out / 'report_val.json'}" in log and ".tmp" not in log


def test_real_coco_root_with_test_split(real):
    out = real["bccd"]
    label_map = json.loads((out / "label_map.json").read_text())
    assert [(c["index"], c["id"], c["name"]) for c in label_map["classes"]] == [
        (0, 1, "RBC"), (1, 2, "WBC"), (2, 3, "Platelets")]
    splits = data_cache.read_splits(out)
    assert splits["eval"] == "test" and set(splits["not_converted"]) == {"val"}
    assert {n: s["written_as"] for n, s in splits["splits"].items()} == {
        "train": "train", "val": None, "test": "val"}
    train, val = _report(out, "train"), _report(out, "val")
    assert val["annotations_file"].endswith("instances_test2017.json")
    assert (train["images"]["written"], val["images"]["written"]) == (205, 72)
    # The one zero-size box of train is dropped and reported; nothing else is.
    assert train["counts"]["bbox_nonpositive_size"] == 1
    assert train["annotations"] == {**train["annotations"], "in_json": 2805, "written": 2804}
    assert val["annotations"]["written"] == val["annotations"]["in_json"] == 945
    assert "placeholder_category" not in train["counts"]
    assert not list(out.glob("test-*")), "the evaluation split is written once, as val"
    assert len(_records(out, "val")) == 72


@pytest.mark.slow
def test_train_eval_export_on_real_layouts(real, tmp_path):
    """train.py from the raw roots (the fixture's cache: no second
    conversion), 2 steps, COCO eval on each evaluation split; the label
    maps (what export ships) hold no placeholder class."""
    model_dir = tmp_path / "model"
    listing = sorted(p.name for p in real["cache"].iterdir())
    args = [f"--dataset=raccoon={RACCOON}", f"--dataset=bccd={BCCD}", "--val_split=bccd=test",
            f"--data_cache_dir={real['cache']}", f"--model_dir={model_dir}",
            "--image_size=128", "--width_multiplier=0.125", "--batch_size=2",
            "--eval_batch_size=16", "--epochs=1", "--steps_per_epoch=2",
            "--checkpoint_every_steps=2", "--strategy=one_device", "--precision=float32",
            "--optimizer=adam", "--mosaic_prob=0", "--mixup_prob=0", "--tensorboard_images=1",
            "--verbose=2"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert sorted(p.name for p in real["cache"].iterdir()) == listing  # reused
    assert "Dataset raccoon trains on 'train' (160 images), evaluates on 'valid' (40 images" in log
    assert "Dataset bccd trains on 'train' (205 images), evaluates on 'test' (72 images" in log
    for name in ("raccoon", "bccd"):
        assert f"{name}: AP " in log, log[-3000:]  # COCO eval on the split written as val

    # The label maps export ships (config.json's): no placeholder class.
    saved = json.loads((model_dir / "config.json").read_text())["label_maps"]
    heads = {name: [c["id"] for c in label_map["classes"]] for name, label_map in saved.items()}
    assert heads == {"raccoon": [1], "bccd": [1, 2, 3]}
