"""Tests for the COCO -> TFRecord converter (effdet_tf.data.coco_tfrecord)."""

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO

from effdet_tf.data import coco_tfrecord, data_cache
from effdet_tf.data.coco_checks import ConversionError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = ("appliance-dataset-5-tat-10", "food-dataset-10-tat-10")

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/source_id": tf.io.FixedLenFeature([], tf.string),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
    "image/object/class/text": tf.io.VarLenFeature(tf.string),
    "image/object/is_crowd": tf.io.VarLenFeature(tf.int64),
    "image/object/area": tf.io.VarLenFeature(tf.float32),
}


def _records(out, split):
    """{image id: parsed example as numpy} over all shards of a split."""
    files = sorted(Path(out).glob(f"{split}-*-of-*.tfrecord"))
    result = {}
    for raw in tf.data.TFRecordDataset([str(f) for f in files]):
        ex = tf.io.parse_single_example(raw, _FEATURES)
        ex = {k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v).numpy()
              for k, v in ex.items()}
        h, w = ex["image/height"], ex["image/width"]
        x0, y0 = ex["image/object/bbox/xmin"] * w, ex["image/object/bbox/ymin"] * h
        x1, y1 = ex["image/object/bbox/xmax"] * w, ex["image/object/bbox/ymax"] * h
        ex["boxes_xywh"] = np.stack([x0, y0, x1 - x0, y1 - y0], -1).reshape(-1, 4)
        result[int(ex["image/source_id"])] = ex
    return result


def _snapshot(root):
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(Path(root).rglob("*")) if p.is_file()} | {
        str(p): p.stat().st_mtime_ns for p in sorted(Path(root).rglob("*")) if p.is_dir()}


# ----------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    before = _snapshot(SHARED_DATA)
    out = tmp_path_factory.mktemp("real")
    reports = {d: coco_tfrecord.convert_root(SHARED_DATA / d, out / d, num_workers=2,
                                             progress=False, verbose=False) for d in REAL}
    return out, reports, before


@pytest.mark.parametrize("dataset", REAL)
@pytest.mark.parametrize("split", ("train", "val"))
def test_real_data_matches_json(real, dataset, split):
    out, reports, _ = real
    coco = json.loads((SHARED_DATA / dataset / "annotations" /
                       f"instances_{split}2017.json").read_text())
    report = reports[dataset][split]
    label_map = json.loads((out / dataset / "label_map.json").read_text())
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    assert [(c["id"], c["name"]) for c in label_map["classes"]] == [
        (c["id"], c["name"]) for c in cats]
    assert [c["index"] for c in label_map["classes"]] == list(range(len(cats)))
    id_of = {c["index"]: c["id"] for c in label_map["classes"]}

    records = _records(out / dataset, split)
    assert len(records) == len(coco["images"]) - report["images"]["skipped"]
    assert report["images"]["skipped"] == 0  # the samples are clean
    n_boxes = 0
    for im in coco["images"]:
        ex = records[im["id"]]
        image = tf.io.decode_image(ex["image/encoded"], channels=3).numpy()
        assert image.shape == (im["height"], im["width"], 3)
        assert (ex["image/height"], ex["image/width"]) == (im["height"], im["width"])
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(anns) == len(ex["image/object/class/label"])
        for k, ann in enumerate(anns):
            np.testing.assert_allclose(ex["boxes_xywh"][k], ann["bbox"], atol=1.0)
            assert id_of[ex["image/object/class/label"][k]] == ann["category_id"]
            assert ex["image/object/is_crowd"][k] == ann["iscrowd"]
            assert ex["image/object/class/text"][k].decode() == next(
                c["name"] for c in cats if c["id"] == ann["category_id"])
        n_boxes += len(anns)
    assert n_boxes == report["annotations"]["written"] == len(coco["annotations"])

    # The evaluator's copy lines up with the original ids.
    gt = COCO(str(out / dataset / f"{split}_annotations.json"))
    assert sorted(gt.getImgIds()) == sorted(im["id"] for im in coco["images"])
    assert sorted(gt.getAnnIds()) == sorted(a["id"] for a in coco["annotations"])
    assert sorted(gt.getCatIds()) == [c["id"] for c in cats]


def test_real_data_report_and_source_untouched(real):
    out, reports, before = real
    for d in REAL:
        for split in ("train", "val"):
            saved = json.loads((out / d / f"report_{split}.json").read_text())
            assert saved["images"] == reports[d][split]["images"]
    food = reports["food-dataset-10-tat-10"]
    assert food["train"]["counts"].get("crowd", 0) >= 1
    assert _snapshot(SHARED_DATA) == before


def test_deterministic_whatever_the_workers(real, tmp_path):
    out, _, _ = real
    src = SHARED_DATA / REAL[0]
    coco_tfrecord.convert_coco(src, None, tmp_path / "one", "train", num_shards=3,
                               num_workers=1, progress=False, verbose=False)
    coco_tfrecord.convert_coco(src, None, tmp_path / "two", "train", num_shards=3,
                               num_workers=2, progress=False, verbose=False)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len([n for n in names if n.endswith(".tfrecord")]) == 3
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes(), n
    # Same records as the 1-shard conversion of the fixture.
    assert _records(tmp_path / "one", "train").keys() == _records(out / REAL[0], "train").keys()


# ------------------------------------------------------------- bad inputs

def _noise_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)


def _flat_jpeg(h, w, levels, adobe=False):
    """A baseline JPEG of one flat colour with len(levels) components,
    assembled by hand (OpenCV cannot write 4-component, i.e. CMYK, JPEGs).
    Custom Huffman tables: DC categories {0, 10}, AC only end-of-block."""
    n = len(levels)
    seg = lambda m, body: b"\xff" + bytes([m]) + struct.pack(">H", len(body) + 2) + body
    out = b"\xff\xd8"
    if adobe:  # Adobe APP14, transform 0: the 4 components are CMYK
        out += seg(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0))
    out += seg(0xDB, b"\x00" + b"\x01" * 64)
    out += seg(0xC0, struct.pack(">BHHB", 8, h, w, n)
               + b"".join(bytes([i + 1, 0x11, 0]) for i in range(n)))
    dc = b"\x00" + bytes([1, 1] + [0] * 14) + bytes([0, 10])
    ac = b"\x10" + bytes([1] + [0] * 15) + bytes([0])
    out += seg(0xC4, dc + ac)
    out += seg(0xDA, bytes([n]) + b"".join(bytes([i + 1, 0]) for i in range(n)) + b"\x00\x3f\x00")
    bits = []
    for mcu in range((h // 8) * (w // 8)):
        for level in levels:
            if mcu == 0:
                v = 8 * (level - 128)
                assert 512 <= abs(v) <= 1023
                bits += "10" + format(v if v > 0 else v + 1023, "010b")
            else:
                bits += "0"
            bits += "0"  # end of block
    bits += "1" * (-len(bits) % 8)
    data = bytes(int("".join(bits[i:i + 8]), 2) for i in range(0, len(bits), 8))
    return out + data.replace(b"\xff", b"\xff\x00") + b"\xff\xd9"


def _exif_jpeg(img, orientation):
    """JPEG with an EXIF orientation tag (as phone cameras write)."""
    data = cv2.imencode(".jpg", img)[1].tobytes()
    tiff = (b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00" * 4)
    app1 = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _bad_dataset(root):
    """A COCO root whose images and annotations hit every outcome once."""
    d = root / "train2017"
    enc = lambda ext, img: cv2.imencode(ext, img)[1].tobytes()
    images, anns = [], []

    def add(image_id, name, h, w, boxes=(), data=None, **extra):
        if data is not None:
            _write(d / name, data)
        rec = {"id": image_id, "file_name": name, "height": h, "width": w, **extra}
        images.append(rec)
        for box in boxes:
            anns.append({"id": 1000 + len(anns), "image_id": image_id, "iscrowd": 0,
                         "area": 100.0, **box})

    ok = lambda bbox, cat=7: {"bbox": bbox, "category_id": cat}
    add(10, "ok.jpg", 64, 96, [ok([10, 10, 30, 20]), ok([80, 40, 40, 40], 9),
                               ok([100, 10, 20, 20]), {**ok([0, 0, 50, 40]), "iscrowd": 1}],
        enc(".jpg", _noise_image(64, 96)))
    add(11, "missing.jpg", 64, 64, [ok([1, 1, 5, 5])])
    add(12, "corrupt.jpg", 64, 64, [ok([1, 1, 5, 5])],
        enc(".jpg", _noise_image(64, 64))[:300])
    add(13, "resized.jpg", 96, 128, [ok([32, 32, 64, 32])], enc(".jpg", _noise_image(48, 64)))
    add(14, "gray.jpg", 48, 48, [ok([4, 4, 20, 20])], enc(".jpg", _noise_image(48, 48)[..., 0]))
    add(15, "cmyk.jpg", 16, 24, [ok([2, 2, 10, 10])], _flat_jpeg(16, 24, (230, 20, 20, 230), True))
    rgba = np.dstack([_noise_image(32, 32), np.full((32, 32), 128, np.uint8)])
    add(16, "rgba.png", 32, 32, [ok([4, 4, 8, 8])], enc(".png", rgba))
    add(17, "rgb.png", 32, 40, [ok([4, 4, 8, 8])], enc(".png", _noise_image(32, 40)))
    add(18, "negative.jpg", 40, 40, [], enc(".jpg", _noise_image(40, 40)))
    add(19, "unusable.jpg", 40, 40,
        [{"bbox": None, "category_id": 7}, ok([1, 1, float("nan"), 5]), ok([1, 1, 0, 5]),
         ok([5, 5, 5, -3]), ok([1, 1, 5, 5], 99), ok([50, 50, 5, 5]),
         {"category_id": 7}, ok([1, 1, 5])],
        enc(".jpg", _noise_image(40, 40)))
    add(20, "transposed.jpg", 64, 32, [ok([1, 1, 5, 5])], enc(".jpg", _noise_image(32, 64)))
    add(21, "exif.jpg", 80, 40, [ok([5, 50, 20, 20])], _exif_jpeg(_noise_image(40, 80), 6))
    add(22, "nosize.jpg", None, None, [ok([2, 2, 10, 10])], enc(".jpg", _noise_image(30, 50)))
    add(23, "bitmap.bmp", 24, 24, [ok([2, 2, 10, 10])], enc(".bmp", _noise_image(24, 24)))
    # Trailing bytes after the JPEG end marker: TF's decoder confirms it is fine.
    add(24, "trailing.jpg", 24, 24, [ok([2, 2, 10, 10])],
        enc(".jpg", _noise_image(24, 24)) + b"camera junk" * 5)
    anns.append({"id": 5000, "image_id": 999, "bbox": [1, 1, 2, 2], "category_id": 7,
                 "iscrowd": 0, "area": 4})
    coco = {"info": {}, "images": images, "annotations": anns,
            "categories": [{"id": 9, "name": "nine"}, {"id": 7, "name": "seven"}]}
    _write(root / "annotations" / "instances_train2017.json", json.dumps(coco).encode())
    return coco


EXPECTED_COUNTS = {
    "missing_file": 1, "unreadable_image": 1, "size_mismatch_rescaled": 1,
    "grayscale_converted": 1, "cmyk_converted": 1, "rgba_converted": 1, "png_kept": 1,
    "negative_image": 1, "all_annotations_invalid": 1, "size_mismatch_transposed": 1,
    "exif_orientation_applied": 1, "size_missing_in_json": 1, "other_format_converted": 1,
    "bbox_clipped": 1, "bbox_outside_image": 2, "crowd": 1, "unknown_image_id": 1,
    "unknown_category": 1, "bbox_null": 3, "bbox_nan": 1, "bbox_nonpositive_size": 2,
    "annotations_of_skipped_images": 3, "jpeg_verified": 1,
}


@pytest.fixture()
def bad(tmp_path):
    root = tmp_path / "bad"
    coco = _bad_dataset(root)
    return root, coco, tmp_path / "out"


def _convert(root, out, **kw):
    kw = {"num_workers": 1, "progress": False, "verbose": False, **kw}
    return coco_tfrecord.convert_coco(root, None, out, "train", **kw)


def test_every_bad_input_gets_its_outcome(bad):
    root, coco, out = bad
    before = _snapshot(root)
    report = _convert(root, out, num_workers=2)
    assert report["counts"] == EXPECTED_COUNTS
    assert _snapshot(root) == before
    records = _records(out, "train")
    assert sorted(records) == [10, 13, 14, 15, 16, 17, 18, 21, 22, 23, 24]
    assert report["images"] == {"in_json": 15, "written": 11, "negatives": 1, "skipped": 4}
    listed = {(p["reason"], p["image_id"]) for p in report["problems"]}
    for reason, image_id in [("missing_file", 11), ("unreadable_image", 12),
                             ("size_mismatch_transposed", 20),
                             ("all_annotations_invalid", 19), ("unknown_image_id", 999)]:
        assert (reason, image_id) in listed
    assert all(p["file"] for p in report["problems"])
    assert {p["file"] for p in report["problems"] if p["image_id"] == 11} == {
        str(root / "train2017" / "missing.jpg")}

    ok = records[10]  # label map sorted by id: 7 -> 0, 9 -> 1
    assert list(ok["image/object/class/label"]) == [0, 1, 0]
    assert list(ok["image/object/is_crowd"]) == [0, 0, 1]
    np.testing.assert_allclose(ok["boxes_xywh"], [[10, 10, 30, 20], [80, 40, 16, 24],
                                                  [0, 0, 50, 40]], atol=1e-3)
    # Resized 128x96 -> 64x48 after labelling: box scaled by 0.5.
    np.testing.assert_allclose(records[13]["boxes_xywh"], [[16, 16, 32, 16]], atol=1e-3)
    assert records[13]["image/object/area"][0] == pytest.approx(25.0)
    assert len(records[18]["image/object/class/label"]) == 0
    for image_id, ex in records.items():
        image = tf.io.decode_image(ex["image/encoded"]).numpy()
        assert image.shape == (ex["image/height"], ex["image/width"], 3), image_id
    assert records[17]["image/format"] == b"png" and records[16]["image/format"] == b"png"
    assert records[15]["image/format"] == b"jpeg" and records[23]["image/format"] == b"png"
    assert records[21]["image/height"] == 80 and records[21]["image/width"] == 40
    assert records[22]["image/height"] == 30 and records[22]["image/width"] == 50

    gt = json.loads((out / "train_annotations.json").read_text())
    assert sorted(im["id"] for im in gt["images"]) == sorted(records)
    assert {im["id"]: (im["height"], im["width"]) for im in gt["images"]}[22] == (30, 50)
    kept = [a for a in gt["annotations"] if a["image_id"] == 13]
    assert kept[0]["bbox"] == pytest.approx([16, 16, 32, 16])
    assert sum(len(r["image/object/class/label"]) for r in records.values()) == len(
        gt["annotations"]) == report["annotations"]["written"] == 12


def test_keep_unusable(bad):
    root, _, out = bad
    report = _convert(root, out, keep_unusable=True)
    assert report["counts"]["kept_unusable"] == 1
    assert "all_annotations_invalid" not in report["counts"]
    assert len(_records(out, "train")[19]["image/object/class/label"]) == 0


def test_strict_makes_skips_errors(bad):
    root, _, out = bad
    with pytest.raises(ConversionError, match="strict.*missing_file"):
        _convert(root, out, strict=True)
    assert not list(out.glob("*.tfrecord"))
    # A clean dataset passes strict.
    clean = out.parent / "clean"
    _write(clean / "train2017" / "a.jpg", cv2.imencode(".jpg", _noise_image(32, 32))[1].tobytes())
    _write(clean / "annotations" / "instances_train2017.json", json.dumps(
        {"images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}],
         "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 1, 9, 9], "category_id": 3,
                          "iscrowd": 0, "area": 81}],
         "categories": [{"id": 3, "name": "c"}]}).encode())
    assert _convert(clean, out / "c", strict=True)["images"]["written"] == 1


def _mutate(root, fn):
    path = root / "annotations" / "instances_train2017.json"
    coco = json.loads(path.read_text())
    fn(coco)
    path.write_text(json.dumps(coco))


@pytest.mark.parametrize("mutation, message", [
    (lambda c: c["images"].append(dict(c["images"][0])), "duplicate image id 10"),
    (lambda c: c["annotations"].append(dict(c["annotations"][0])), "duplicate annotation id 1000"),
    (lambda c: c["images"][1].pop("file_name"), r"images\[1\] \(id 11\) has no valid 'file_name'"),
    (lambda c: c.pop("annotations"), "no 'annotations' list"),
    (lambda c: c["categories"][0].update(id="9"), r"categories\[0\] \(id '9'\) has no valid 'id'"),
    (lambda c: c["categories"].clear(), "no categories"),
    (lambda c: c["images"].__setitem__(slice(None), c["images"][1:3]), "no usable image"),
])
def test_errors_name_the_problem(bad, mutation, message):
    root, _, out = bad
    _mutate(root, mutation)
    with pytest.raises(ConversionError, match=message) as e:
        _convert(root, out)
    assert "instances_train2017.json" in str(e.value)


def test_cli_malformed_json_exits_nonzero(bad):
    root, _, out = bad
    path = root / "annotations" / "instances_train2017.json"
    path.write_text(path.read_text()[:-20])
    run = subprocess.run([sys.executable, "-m", "effdet_tf.data.coco_tfrecord",
                          f"--annotations_file={path}", f"--image_dir={root / 'train2017'}",
                          f"--output_dir={out}", "--split=train", "--no_progress"],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "malformed json" in run.stderr and str(path) in run.stderr


def test_cli_coco_root_and_output_inside_source(bad):
    root, _, out = bad
    with pytest.raises(ConversionError, match="never written"):
        _convert(root, root / "train2017" / "out")
    assert coco_tfrecord.main([f"--coco_root={root}", f"--output_dir={out}", "--no_progress",
                               "--num_shards=2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "label_map.json", "report_train.json", "splits.json", "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord", "train_annotations.json"]


def test_ensure_tfrecords_caches(bad, tmp_path, capsys):
    root, _, _ = bad
    cache = tmp_path / "cache"
    first = data_cache.ensure_tfrecords(root, cache, name="bad", progress=False,
                                           verbose=False)
    assert first.parent == cache and first.name.startswith("bad-")
    shard = next(first.glob("*.tfrecord"))
    mtime = shard.stat().st_mtime_ns
    assert data_cache.ensure_tfrecords(root, cache, name="bad") == first
    assert shard.stat().st_mtime_ns == mtime  # not converted again
    assert data_cache.ensure_tfrecords(first, tmp_path / "other") == first  # as is
    _mutate(root, lambda c: c["annotations"].pop())
    second = data_cache.ensure_tfrecords(root, cache, name="bad", progress=False,
                                            verbose=False)
    assert second != first and second.is_dir()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    # The older conversion is reported, not deleted (another run may use it).
    assert "older conversion(s) of 'bad'" in capsys.readouterr().out
    assert first.is_dir()
    assert data_cache.stale_conversions(second, "bad") == [first]
    assert data_cache.stale_conversions(second, "ba") == []
    with pytest.raises(ConversionError, match="no dataset layout found.*nor is it converted"):
        data_cache.ensure_tfrecords(tmp_path, cache)


# ------------------------------------------------ layouts and placeholder categories

PETS = [{"id": 0, "name": "pets", "supercategory": "none"},  # Roboflow's placeholder
        {"id": 3, "name": "cat", "supercategory": "pets"},
        {"id": 1, "name": "dog", "supercategory": "pets"}]


def _split_json(folder, json_path, n_images, first_id, categories=PETS):
    """n_images noise JPEGs in `folder`, each with a dog (id 1) and a cat (id 3)."""
    images, anns = [], []
    for k in range(n_images):
        image_id, name = first_id + k, f"img{first_id + k}.jpg"
        _write(folder / name, cv2.imencode(".jpg", _noise_image(48, 64, seed=image_id))[1].tobytes())
        images.append({"id": image_id, "file_name": name, "height": 48, "width": 64})
        for cat, bbox in ((1, [2, 2, 20, 20]), (3, [30, 10, 30, 30])):
            anns.append({"id": 100 * image_id + cat, "image_id": image_id, "category_id": cat,
                         "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    coco = {"info": {"description": "pets"}, "images": images, "annotations": anns,
            "categories": categories}
    _write(json_path, json.dumps(coco).encode())
    return coco


def _roboflow_root(root, splits=(("train", 3), ("valid", 2), ("test", 1))):
    """A Roboflow COCO JSON export: <split>/_annotations.coco.json beside its images.
    Image ids restart at 0 in each split, as Roboflow writes them."""
    return {s: _split_json(root / s, root / s / "_annotations.coco.json", n, 0)
            for s, n in splits}


def test_roboflow_export_every_split_placeholder_left_out(tmp_path, capsys):
    root, out = tmp_path / "pets", tmp_path / "out"
    cocos = _roboflow_root(root)
    before = _snapshot(root)
    reports = coco_tfrecord.convert_root(root, out, num_workers=1, progress=False)
    printed = capsys.readouterr().out
    assert _snapshot(root) == before

    # Ids as COCO gives them, contiguous indices by id; placeholder 0 absent.
    label_map = json.loads((out / "label_map.json").read_text())
    assert label_map["classes"] == [{"index": 0, "id": 1, "name": "dog"},
                                    {"index": 1, "id": 3, "name": "cat"}]
    # valid is the evaluation split, written as val; test under its own name.
    assert set(reports) == {"train", "val", "test"}
    splits = json.loads((out / "splits.json").read_text())
    assert (splits["layout"], splits["train"], splits["eval"]) == ("roboflow", "train", "valid")
    assert {n: s["written_as"] for n, s in splits["splits"].items()} == {
        "train": "train", "valid": "val", "test": "test"}
    for written, source in (("train", "train"), ("val", "valid"), ("test", "test")):
        report = reports[written]
        n = len(cocos[source]["images"])
        assert report["images"] == {"in_json": n, "written": n, "negatives": 0, "skipped": 0}
        assert report["annotations"]["written"] == 2 * n
        assert report["counts"] == {"placeholder_category": 1}
        assert report["categories"] == {"in_json": 3, "in_label_map": 2,
                                        "left_out": [{"id": 0, "name": "pets"}]}
        assert report["annotations_file"] == str(root / source / "_annotations.coco.json")
        gt = json.loads((out / f"{written}_annotations.json").read_text())
        assert [c["id"] for c in gt["categories"]] == [1, 3]
        assert sorted(im["file_name"] for im in gt["images"]) == sorted(
            im["file_name"] for im in cocos[source]["images"])
        records = _records(out, written)
        assert len(records) == n
        assert all(list(r["image/object/class/label"]) == [0, 1] for r in records.values())
    assert "evaluates on 'valid'" in printed
    assert "category 0 'pets' left out of the label map" in printed
    assert f"report: {out / 'report_val.json'}" in printed


def test_placeholder_rule(tmp_path):
    def label_ids(categories, used=()):
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        coco = _split_json(root / "train", root / "train" / "_annotations.coco.json", 1, 0,
                           categories)
        for cat in used:
            coco["annotations"][0]["category_id"] = cat
        (root / "train" / "_annotations.coco.json").write_text(json.dumps(coco))
        report = coco_tfrecord.convert_root(root, tmp_path / f"{root.name}-out", num_workers=1,
                                            progress=False, verbose=False)["train"]
        label_map = json.loads((tmp_path / f"{root.name}-out" / "label_map.json").read_text())
        assert report["counts"].get("placeholder_category", 0) == 3 - len(label_map["classes"])
        return [c["id"] for c in label_map["classes"]]

    assert label_ids(PETS) == [1, 3]
    # A box of the placeholder's id makes it a class.
    assert label_ids(PETS, used=[0]) == [0, 1, 3]
    # Not the supercategory of every other category: a class (with no box).
    assert label_ids([PETS[0], PETS[1], {**PETS[2], "supercategory": "animals"}]) == [0, 1, 3]
    # COCO's own categories have supercategories that are not categories.
    assert label_ids([{**c, "supercategory": "animal"} for c in PETS]) == [0, 1, 3]


def test_single_json_leaves_the_placeholder_out(tmp_path):
    root = tmp_path / "pets"
    _roboflow_root(root, (("train", 2),))
    report = coco_tfrecord.convert_coco(root / "train" / "_annotations.coco.json", root / "train",
                                        tmp_path / "out", "train", num_workers=1, progress=False,
                                        verbose=False)
    assert report["counts"] == {"placeholder_category": 1}
    assert [c["id"] for c in json.loads((tmp_path / "out" / "label_map.json").read_text())[
        "classes"]] == [1, 3]
    # A root's split by name, whatever the layout.
    assert coco_tfrecord.convert_coco(root, None, tmp_path / "out2", "train", num_workers=1,
                                      progress=False, verbose=False)["images"]["written"] == 2


def test_instances_split_layout_and_cli_val_split(tmp_path):
    root, out = tmp_path / "pets", tmp_path / "out"
    for k, split in enumerate(("train", "valid", "holdout")):
        _split_json(root / split, root / "annotations" / f"instances_{split}.json", 2, 10 * k,
                    PETS[1:])
    assert coco_tfrecord.main([f"--coco_root={root}", f"--output_dir={out}", "--no_progress",
                               "--val_split=holdout", "--num_workers=1"]) == 0
    splits = json.loads((out / "splits.json").read_text())
    assert (splits["layout"], splits["eval"]) == ("coco", "holdout")
    assert {n: s["written_as"] for n, s in splits["splits"].items()} == {
        "train": "train", "valid": "valid", "holdout": "val"}
    assert sorted(_records(out, "val")) == [20, 21]  # holdout's image ids
    assert sorted(_records(out, "valid")) == [10, 11]
    assert coco_tfrecord.main([f"--coco_root={root}", f"--output_dir={tmp_path / 'x'}",
                               "--no_progress", "--val_split=test"]) == 1
