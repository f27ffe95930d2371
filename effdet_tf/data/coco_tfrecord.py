"""COCO json + image folder -> sharded TFRecords, a label map and a report.

    python -m effdet_tf.data.coco_tfrecord --coco_root=DATA/appliance --output_dir=OUT \\
        [--val_split=test]
    python -m effdet_tf.data.coco_tfrecord --annotations_file=A.json \\
        --image_dir=IMAGES --output_dir=OUT --split=train [--num_shards=N] [--strict]

--coco_root takes any layout effdet_tf.data.layouts finds (COCO 2017,
annotations/instances_<split>.json, a Roboflow export) and converts every
split: the training split as `train`, the evaluation split as `val`, others
under their own names, recorded in `OUT/splits.json`. Writes
`OUT/<split>-0000k-of-0000N.tfrecord` (tf.Example keys as the TF Object
Detection API's create_coco_tf_record.py names them; `image/object/class/label`
is the contiguous index 0..C-1), `OUT/label_map.json` (index -> COCO id and
name, sorted by COCO id), `OUT/<split>_annotations.json` (the COCO json of
exactly what went into the shards: the evaluator's ground truth) and
`OUT/report_<split>.json`. The source folder is only ever read.

Every image and annotation ends in the shards or in the report, under one
reason from `REASONS`. Output is deterministic: results come back from the
workers in input order, so the same input gives the same bytes whatever the
number of workers.
"""

import argparse
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import tensorflow as tf
from tqdm import tqdm

from effdet_tf.data import coco_checks, layouts
from effdet_tf.data.coco_checks import REASONS, SKIP_REASONS, ConversionError

# Bump when the output of the same input changes: invalidates ensure_tfrecords' cache.
CONVERTER_VERSION = "2"  # 2: any layout, every split, placeholder categories left out
_SHARD_BYTES = 128 << 20  # ~100-200 MB shards, as the tf.data performance guide suggests
_MAX_LISTED = 50  # problems listed per reason in the report (counts stay complete)
SPLITS_FILE = "splits.json"  # convert_root: which source split became train, val, ...


def _feature(values, kind):
    if kind == "bytes":
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if kind == "int":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _example(image_id, file_name, loaded, boxes):
    """tf.Example of one image; `boxes` are dicts from coco_checks.check_annotation."""
    h, w = loaded["height"], loaded["width"]
    f = {
        "image/encoded": _feature([loaded["encoded"]], "bytes"),
        "image/format": _feature([loaded["format"].encode()], "bytes"),
        "image/height": _feature([h], "int"),
        "image/width": _feature([w], "int"),
        "image/source_id": _feature([str(image_id).encode()], "bytes"),
        "image/filename": _feature([file_name.encode()], "bytes"),
        "image/object/bbox/xmin": _feature([b["xyxy"][0] / w for b in boxes], "float"),
        "image/object/bbox/ymin": _feature([b["xyxy"][1] / h for b in boxes], "float"),
        "image/object/bbox/xmax": _feature([b["xyxy"][2] / w for b in boxes], "float"),
        "image/object/bbox/ymax": _feature([b["xyxy"][3] / h for b in boxes], "float"),
        "image/object/class/label": _feature([b["label"] for b in boxes], "int"),
        "image/object/class/text": _feature([b["name"].encode() for b in boxes], "bytes"),
        "image/object/is_crowd": _feature([b["iscrowd"] for b in boxes], "int"),
        "image/object/area": _feature([b["area"] for b in boxes], "float"),
    }
    return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()


class _Report:
    """Counts every outcome by reason; lists the first few of each."""

    def __init__(self):
        self.counts, self.listed = {}, []

    def add(self, reason, file=None, image_id=None, annotation_id=None, detail=None):
        assert reason in REASONS, reason
        n = self.counts.get(reason, 0)
        self.counts[reason] = n + 1
        if n < _MAX_LISTED:
            entry = {"reason": reason, "file": file, "image_id": image_id}
            if annotation_id is not None:
                entry["annotation_id"] = annotation_id
            if detail:
                entry["detail"] = detail
            self.listed.append(entry)


def _map_ordered(fn, items, num_workers, desc, progress):
    """fn over items in order: a process pool when it pays, else in-process."""
    bar = dict(total=len(items), desc=desc, unit="img", disable=not progress)
    if num_workers <= 1 or len(items) < 16:
        yield from tqdm(map(fn, items), **bar)
        return
    # fork: the workers only run cv2/numpy (never TensorFlow), and forking
    # avoids re-importing the caller's __main__ (train.py and its TF) per worker.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(num_workers, initializer=coco_checks.worker_init) as pool:
        # imap keeps input order, so scheduling never changes the output bytes.
        yield from tqdm(pool.imap(fn, items, chunksize=8), **bar)


def _check_outside(out, sources):
    o = Path(out).resolve()
    for source in {Path(p).resolve() for p in sources}:
        if o == source or source in o.parents:
            raise ConversionError(f"output_dir {out} is inside the source folder {source}:"
                                  " the source is never written to")


def convert_coco(coco_root_or_json, image_dir=None, output_dir=None, split="train",
                 num_shards=None, strict=False, keep_unusable=False, num_workers=None,
                 min_shards=1, name=None, categories=None, left_out=(), progress=True, verbose=True,
                 coco=None):
    """Converts one split; returns the report dict (also saved as report_<split>.json).

    Args:
      coco_root_or_json: a dataset root in a layout effdet_tf.data.layouts
        knows (its split named `split`) or the annotations json itself.
      image_dir: image folder (default: the split's, for a root).
      output_dir: where shards, label_map.json, <split>_annotations.json and
        report_<split>.json go. Must not be inside the source folder.
      split: "train" or "val" (any name works; it prefixes the outputs).
      num_shards: default: one per ~128 MB of source images, and at least
        `min_shards` (capped at the image count).
      min_shards: the training machines (train.py passes its TF_CONFIG's
        worker count), so that each reads whole files of its own.
      strict: any skipped image or dropped annotation raises ConversionError.
      keep_unusable: keep images whose every annotation was invalid (as
        images with no boxes) instead of leaving them out.
      num_workers: processes decoding images (default: all cores).
      name: dataset name for label_map.json (default: the root folder's name).
      categories: COCO category dicts defining the label map (default: the
        json's less placeholder categories); convert_root passes the union of
        every split's.
      left_out: placeholder categories convert_root left out of `categories`
        (reported in the splits whose json lists them).
      coco: the json already loaded by coco_checks.load_coco (saves a re-read).

    Raises:
      ConversionError: malformed json, duplicate ids, no usable image, a label
        map differing from one already in output_dir, or (strict) any skip.
    """
    src = Path(coco_root_or_json)
    ann_file, image_dir, name = _source_files(src, image_dir, name, split)
    if output_dir is None:
        raise ConversionError("output_dir is required")
    out = Path(output_dir)
    _check_outside(out, [image_dir, ann_file.parent] + ([src] if src.is_dir() else []))
    coco = coco or coco_checks.load_coco(ann_file)
    if categories is None:
        left_out = coco_checks.placeholder_categories(coco["categories"], [coco["annotations"]])
        categories = [c for c in coco["categories"] if c not in left_out]
    label_map = coco_checks.make_label_map(categories, name, ann_file)
    out.mkdir(parents=True, exist_ok=True)
    _check_label_map_matches(out / "label_map.json", label_map, ann_file)

    report = _Report()
    listed = {c["id"] for c in coco["categories"]}
    left_out = [c for c in left_out if c["id"] in listed]
    for c in left_out:
        report.add("placeholder_category", str(ann_file),
                   detail=f"category {c['id']} {c['name']!r} left out of the label map")
    anns_of = _annotations_by_image(coco, ann_file, report)
    images = coco["images"]
    if num_shards is None:
        num_shards = _default_shard_count(images, image_dir, min_shards)
    shard_names = [f"{split}-{k:05d}-of-{num_shards:05d}.tfrecord" for k in range(num_shards)]
    kept = _write_shards(images, anns_of, image_dir, label_map, [out / (n + ".tmp") for n in shard_names],
                         report, keep_unusable, num_workers or os.cpu_count() or 1, split, progress)

    summary = _summary(name, split, ann_file, image_dir, coco, label_map, left_out, kept, report,
                       shard_names, strict=strict, keep_unusable=keep_unusable)
    report_path = out / f"report_{split}.json"
    report_path.write_text(json.dumps(summary, indent=1) + "\n")
    error = _conversion_error(ann_file, len(images), kept["written"], report, strict)
    if error:
        for n in shard_names:
            (out / (n + ".tmp")).unlink(missing_ok=True)
        if verbose:
            print_report(summary, report_path)
        raise ConversionError(f"{error}; report: {report_path}")
    _publish(out, split, shard_names, coco, kept, categories, label_map)
    if verbose:
        print_report(summary, report_path)
    return summary


def _source_files(src, image_dir, name, split):
    """(annotations json, image folder, dataset name) of a root or a json."""
    if src.is_dir():
        found = layouts.split_of(src, split)
        return found.annotations, Path(image_dir) if image_dir else found.image_dir, name or src.name
    if image_dir is None:
        raise ConversionError(f"{src}: image_dir is required with a json file")
    return src, Path(image_dir), name or src.stem


def _check_label_map_matches(label_map_path, label_map, ann_file):
    """The other split converted into the same folder must share the label map."""
    if label_map_path.exists():
        old = json.loads(label_map_path.read_text())
        if old.get("classes") != label_map["classes"]:
            raise ConversionError(
                f"{label_map_path} holds a different label map than {ann_file}'s categories:"
                " convert both splits with --coco_root, or use an empty output_dir")


def _annotations_by_image(coco, ann_file, report):
    """{image id: [annotations]}; an annotation of an unlisted image is reported."""
    anns_of = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        if ann["image_id"] in anns_of:
            anns_of[ann["image_id"]].append(ann)
        else:
            report.add("unknown_image_id", str(ann_file), ann["image_id"], ann["id"])
    return anns_of


def _default_shard_count(images, image_dir, min_shards):
    """One shard per ~128 MB of source images, at least `min_shards`
    (capped at the image count)."""
    size = sum(coco_checks.file_size(image_dir / im["file_name"]) for im in images)
    return max(1, min(1024, -(-size // _SHARD_BYTES)), min(min_shards, len(images)))


def _skip_annotations(report, count):
    """A skipped image's annotations go with it (counted, not listed one by one)."""
    report.counts["annotations_of_skipped_images"] = report.counts.get("annotations_of_skipped_images", 0) + count


def _jpeg_decodes_in_tf(loaded, file, image_id, report):
    """Whether TF decodes a JPEG that OpenCV only read with a warning."""
    try:
        tf.io.decode_jpeg(loaded["encoded"])
    except tf.errors.InvalidArgumentError as e:
        report.add("unreadable_image", file, image_id, detail=f"TF: {e.message.splitlines()[-1][:100]}")
        return False
    report.add("jpeg_verified", file, image_id)
    return True


def _usable_boxes(im, anns, loaded, file, by_id, report):
    """(boxes for the TFRecord, annotations for the evaluator json) of the
    image's valid annotations; each dropped or crowd one is reported."""
    boxes, out_anns = [], []
    for ann in anns:
        reason, detail, box = coco_checks.check_annotation(ann, loaded, by_id)
        if reason:
            report.add(reason, file, im["id"], ann["id"], detail)
        if box is None:
            continue
        if box["iscrowd"]:
            report.add("crowd", file, im["id"], ann["id"])
        boxes.append(box)
        out_anns.append(coco_checks.evaluator_annotation(ann, box, loaded))
    return boxes, out_anns


def _write_shards(images, anns_of, image_dir, label_map, paths, report, keep_unusable, num_workers, split,
                  progress):
    """Decodes and checks every image (in a process pool) and writes the
    usable ones round-robin into the shards at `paths`, in json order.
    Returns what was kept: {"written", "images", "annotations", "per_class"}."""
    by_id = {c["id"]: c for c in label_map["classes"]}
    jobs = [(str(image_dir / im["file_name"]), im.get("height"), im.get("width")) for im in images]
    kept = {"written": 0, "images": [], "annotations": [], "per_class": [0] * len(label_map["classes"])}
    writers = [tf.io.TFRecordWriter(str(p)) for p in paths]
    try:
        results = _map_ordered(coco_checks.load_image, jobs, num_workers, split, progress)
        # results first: zip then runs the generator to its end, and the bar closes.
        for loaded, im, (file, _, _) in zip(results, images, jobs):
            for reason, detail in loaded["notes"]:
                report.add(reason, file, im["id"], detail=detail)
            anns = anns_of[im["id"]]
            if loaded["skip"] or (loaded["verify"] and not _jpeg_decodes_in_tf(loaded, file, im["id"], report)):
                _skip_annotations(report, len(anns))
                continue
            boxes, out_anns = _usable_boxes(im, anns, loaded, file, by_id, report)
            if anns and not boxes:
                if not keep_unusable:
                    report.add("all_annotations_invalid", file, im["id"],
                               detail=f"{len(anns)} annotations, none usable")
                    continue
                report.add("kept_unusable", file, im["id"])
            elif not anns:
                report.add("negative_image", file, im["id"])
            for b in boxes:
                kept["per_class"][b["label"]] += 1
            writers[kept["written"] % len(writers)].write(_example(im["id"], im["file_name"], loaded, boxes))
            kept["written"] += 1
            kept["images"].append({**im, "height": loaded["height"], "width": loaded["width"]})
            kept["annotations"].extend(out_anns)
    finally:
        for w in writers:
            w.close()
    return kept


def _summary(name, split, ann_file, image_dir, coco, label_map, left_out, kept, report, shard_names, **options):
    """The report_<split>.json document: what was read, written and why not."""
    images, written, kept_anns = coco["images"], kept["written"], kept["annotations"]
    return {
        "dataset": name, "split": split, "converter_version": CONVERTER_VERSION,
        "annotations_file": str(ann_file), "image_dir": str(image_dir),
        "options": options,
        "images": {"in_json": len(images), "written": written,
                   "negatives": report.counts.get("negative_image", 0),
                   "skipped": len(images) - written},
        "annotations": {"in_json": len(coco["annotations"]), "written": len(kept_anns),
                        "crowd": sum(a.get("iscrowd", 0) == 1 for a in kept_anns),
                        "dropped": len(coco["annotations"]) - len(kept_anns)},
        "categories": {"in_json": len(coco["categories"]),
                       "in_label_map": len(label_map["classes"]),
                       "left_out": [{"id": c["id"], "name": c["name"]} for c in left_out]},
        "boxes_per_class": {c["name"]: n for c, n in zip(label_map["classes"], kept["per_class"])},
        "counts": dict(sorted(report.counts.items())),
        "problems": report.listed,
        "problems_listed_per_reason": _MAX_LISTED,
        "files": {"tfrecords": shard_names, "label_map": "label_map.json",
                  "annotations": f"{split}_annotations.json"},
    }


def _conversion_error(ann_file, num_images, written, report, strict):
    """Why the conversion fails (no usable image; --strict and a skip), or None."""
    if written == 0:
        return f"{ann_file}: no usable image ({num_images} in the json; {_describe(report.counts)})"
    skips = {r: n for r, n in report.counts.items() if r in SKIP_REASONS and n}
    if strict and skips:
        first = next(p for p in report.listed if p["reason"] in SKIP_REASONS)
        return (f"{ann_file}: --strict: {sum(skips.values())} skips ({_describe(skips)});"
                f" first: {_describe_problem(first)}")
    return None


def _publish(out, split, shard_names, coco, kept, categories, label_map):
    """Renames the finished shards into place (removing an earlier
    conversion's with another shard count) and writes the evaluator's json
    and label_map.json."""
    for stale in out.glob(f"{split}-*-of-*.tfrecord"):
        if stale.name not in shard_names:
            stale.unlink()
    for n in shard_names:
        os.replace(out / (n + ".tmp"), out / n)
    evaluator_json = {k: v for k, v in coco.items() if k not in ("images", "annotations", "categories")}
    evaluator_json.update(images=kept["images"], annotations=kept["annotations"],
                          categories=sorted(categories, key=lambda c: c["id"]))
    (out / f"{split}_annotations.json").write_text(json.dumps(evaluator_json))
    (out / "label_map.json").write_text(_label_map_text(label_map))


def _label_map_text(label_map):
    """label_map.json with one class a line (readable, diff-friendly)."""
    rows = ",\n".join("  " + json.dumps(c) for c in label_map["classes"])
    return f'{{"name": {json.dumps(label_map["name"])},\n "classes": [\n{rows}\n ]}}\n'


def _describe(counts):
    return ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())) or "nothing usable"


def _describe_problem(p):
    rec = f"image {p['image_id']}" + (f" annotation {p['annotation_id']}"
                                      if "annotation_id" in p else "")
    return f"{p['file']} ({rec}): {p['reason']}" + (f" ({p['detail']})" if "detail" in p else "")


def print_report(summary, path=None):
    im, an = summary["images"], summary["annotations"]
    print(f"[{summary['dataset']}/{summary['split']}] images: {im['written']} written of"
          f" {im['in_json']} ({im['negatives']} negatives, {im['skipped']} skipped);"
          f" annotations: {an['written']} written of {an['in_json']} ({an['crowd']} crowd,"
          f" {an['dropped']} dropped)")
    for reason, n in summary["counts"].items():
        print(f"  {n:7d}  {reason:32s} {REASONS.get(reason, ('', ''))[1]}")
    for c in summary.get("categories", {}).get("left_out", []):
        print(f"    category {c['id']} {c['name']!r} left out of the label map")
    # One example of each skip/drop first: those are what a user must look at.
    shown = [p for p in summary["problems"] if p["reason"] in SKIP_REASONS]
    shown = list({p["reason"]: p for p in reversed(shown)}.values())[::-1][:10]
    for p in shown:
        print(f"    e.g. {_describe_problem(p)}")
    if path:
        print(f"  report: {path}")


def print_reports(folder, splits):
    """Prints the saved reports of `splits` found in `folder`, naming them
    where they are (after any rename)."""
    for split in splits:
        path = Path(folder) / f"report_{split}.json"
        if path.is_file():
            print_report(json.loads(path.read_text()), path)


def convert_root(root, output_dir, name=None, val_split="", layout=None, **kwargs):
    """Converts every split of a dataset root into output_dir with one label
    map: the union of the splits' categories less placeholder categories.

    The root's layout (effdet_tf.data.layouts: COCO, instances_<split>,
    Roboflow) names the outputs: the training split is written as `train`,
    the evaluation split (`val_split`, else val / valid / test) as `val`, the
    others under their own names; `splits.json` says which source split each
    came from. Returns {written name: report}.
    """
    root = Path(root)
    layout = layout or layouts.find_layout(root, val_split)
    name = name or root.name
    _check_outside(output_dir, [root])
    verbose = kwargs.pop("verbose", True)
    if verbose:
        print(f"[{name}] {layout.describe()}")
    cocos = {s.name: coco_checks.load_coco(s.annotations) for s, _ in layout.converted}
    cats = coco_checks.union_categories([(s.annotations, cocos[s.name])
                                         for s, _ in layout.converted])
    left_out = coco_checks.placeholder_categories(cats, [c["annotations"] for c in cocos.values()])
    kept = [c for c in cats if c not in left_out]
    reports = {}
    try:
        for s, written in layout.converted:
            reports[written] = convert_coco(
                s.annotations, s.image_dir, output_dir, written, name=name, categories=kept,
                left_out=left_out, coco=cocos[s.name], verbose=False, **kwargs)
    finally:  # a failed split's report too: it says why
        if verbose:
            print_reports(output_dir, [w for _, w in layout.converted])
    (Path(output_dir) / SPLITS_FILE).write_text(json.dumps(layout.to_json(), indent=1) + "\n")
    return reports


def main(argv=None):
    p = argparse.ArgumentParser(
        description="COCO json + images -> sharded TFRecords + label_map.json + report.")
    p.add_argument("--coco_root", help="dataset root (COCO: annotations/instances_<split>.json"
                   " + <split>/; Roboflow: <split>/_annotations.coco.json): converts every split")
    p.add_argument("--val_split", default="",
                   help="with --coco_root: the split written as val (default: val, else valid,"
                   " else test)")
    p.add_argument("--annotations_file", help="one split's COCO json (with --image_dir)")
    p.add_argument("--image_dir", help="the images of --annotations_file")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--split", default="train", help="output prefix with --annotations_file")
    p.add_argument("--name", help="dataset name in label_map.json")
    p.add_argument("--num_shards", type=int, help="default: one per ~128 MB of images")
    p.add_argument("--num_workers", type=int, help="default: all cores")
    p.add_argument("--strict", action="store_true", help="any skip is an error")
    p.add_argument("--keep_unusable", action="store_true",
                   help="keep images whose every annotation was invalid (as no boxes)")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    opts = dict(num_shards=a.num_shards, num_workers=a.num_workers, strict=a.strict,
                keep_unusable=a.keep_unusable, progress=not a.no_progress)
    try:
        if a.coco_root and not a.annotations_file:
            convert_root(a.coco_root, a.output_dir, name=a.name, val_split=a.val_split, **opts)
        elif a.annotations_file and a.image_dir and not a.coco_root and not a.val_split:
            convert_coco(a.annotations_file, a.image_dir, a.output_dir, a.split,
                         name=a.name, **opts)
        else:
            p.error("give --coco_root [--val_split], or --annotations_file with --image_dir")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
