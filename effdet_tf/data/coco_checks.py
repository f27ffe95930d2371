"""What the COCO converter checks: the json's structure, each image file, each box.

Split from coco_tfrecord.py so the per-image work (`load_image`) runs in
worker processes that import only OpenCV and numpy, never TensorFlow.

Decisions worth knowing (each outcome is counted under a key of `REASONS`):
- Pixel orientation: COCO boxes are in the stored pixel grid (COCO's own
  tools and the TF Object Detection API ignore EXIF orientation, as does
  tf.io.decode_jpeg), so images are decoded ignoring EXIF. Only when the
  json's width/height are the file's transposed and applying the EXIF
  rotation reproduces the json's size is the rotation applied.
- Real size differs from the json's (not a transposition): the file wins; the
  boxes are scaled by real/json per axis, on the reading that the image was
  resized after labelling (the usual cause), which keeps boxes on their objects.
- Alpha is dropped without compositing, as PIL's convert("RGB") does.
- Only RGB JPEG and 8-bit RGB PNG bytes are passed through untouched; others
  are re-encoded (JPEG sources as JPEG q95, anything else as lossless PNG).
"""

import json
import math
import os
import struct
from pathlib import Path

import cv2
import numpy as np

# reason -> (kind, description). kind: "skip" (image left out), "drop"
# (annotation left out), "fix" (kept after a change), "kept" (kept as is),
# "category" (a category left out of the label map).
REASONS = {
    "missing_file": ("skip", "image file not found"),
    "unreadable_image": ("skip", "unreadable or corrupt image file"),
    "size_mismatch_transposed": ("skip", "file is the json's size transposed (EXIF?)"),
    "all_annotations_invalid": ("skip", "every annotation invalid: not a negative"),
    "annotations_of_skipped_images": ("drop", "annotations of skipped images"),
    "unknown_image_id": ("drop", "annotation of an image id not in the json"),
    "unknown_category": ("drop", "category id not in the categories"),
    "bbox_null": ("drop", "bbox missing, null or not 4 numbers"),
    "bbox_nan": ("drop", "bbox has NaN or infinite values"),
    "bbox_nonpositive_size": ("drop", "bbox width or height <= 0"),
    "bbox_outside_image": ("drop", "bbox wholly outside the image"),
    "bbox_clipped": ("fix", "bbox partly outside the image: clipped"),
    "size_mismatch_rescaled": ("fix", "file size differs from json: boxes scaled"),
    "size_missing_in_json": ("fix", "json has no width/height: file size used"),
    "exif_orientation_applied": ("fix", "EXIF rotation applied to match the json size"),
    "grayscale_converted": ("fix", "grayscale image converted to RGB"),
    "cmyk_converted": ("fix", "CMYK JPEG converted to RGB JPEG"),
    "rgba_converted": ("fix", "alpha channel dropped"),
    "png_converted": ("fix", "palette/16-bit PNG converted to 8-bit RGB PNG"),
    "other_format_converted": ("fix", "not JPEG/PNG: converted to PNG"),
    "jpeg_verified": ("fix", "JPEG without end marker decoded by TF: kept"),
    "png_kept": ("kept", "RGB PNG kept as PNG"),
    "kept_unusable": ("kept", "every annotation invalid: kept (--keep_unusable)"),
    "negative_image": ("kept", "no annotations: kept as a negative"),
    "crowd": ("kept", "crowd annotation: kept with is_crowd=1 (no training target)"),
    "placeholder_category": ("category", "supercategory of the others, no box: not a class"),
}
SKIP_REASONS = frozenset(r for r, (kind, _) in REASONS.items() if kind in ("skip", "drop"))
_CLIP_TOLERANCE = 1e-3  # px; below this a clip is float noise, not worth a report line
_JPEG_QUALITY = 95


class ConversionError(ValueError):
    """The input can't be converted; the message names file and record."""


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_coco(path):
    """Reads a COCO json and checks what every later step relies on."""
    path = Path(path)
    try:
        coco = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConversionError(f"{path}: annotations file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: malformed json: {e}") from None
    if not isinstance(coco, dict):
        raise ConversionError(f"{path}: malformed json: top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ConversionError(f"{path}: malformed json: no '{key}' list")
    required = {"images": ("id", "file_name"), "annotations": ("id", "image_id"),
                "categories": ("id", "name")}
    for key, fields in required.items():
        seen = {}
        for i, rec in enumerate(coco[key]):
            where = f"{key}[{i}]"
            if not isinstance(rec, dict):
                raise ConversionError(f"{path}: malformed json: {where} is not an object")
            for field in fields:
                v = rec.get(field)
                # Image and category ids travel as int64 (source_id, evaluator,
                # SavedModel classes); annotation ids only need to be unique.
                ok = (isinstance(v, str) if field in ("file_name", "name") else
                      isinstance(v, (int, str)) and not isinstance(v, bool)
                      and (isinstance(v, int) or (key, field) == ("annotations", "id")))
                if not ok:
                    raise ConversionError(
                        f"{path}: malformed json: {where} (id {rec.get('id')!r}) has no"
                        f" valid '{field}' (ids are integers, names strings)")
            if rec["id"] in seen:
                kind = key[:-1] if key != "categories" else "category"
                raise ConversionError(
                    f"{path}: duplicate {kind} id {rec['id']!r} ({key}[{seen[rec['id']]}]"
                    f" and {where})")
            seen[rec["id"]] = i
    return coco


def make_label_map(categories, name, source):
    """{"name", "classes": [{"index", "id", "name"}]}, sorted by COCO id."""
    if not categories:
        raise ConversionError(f"{source}: no categories")
    cats = sorted(categories, key=lambda c: c["id"])
    return {"name": name, "classes": [{"index": i, "id": c["id"], "name": c["name"]}
                                      for i, c in enumerate(cats)]}


def placeholder_categories(categories, annotation_lists):
    """The categories that only group the others: Roboflow's COCO export adds
    one (id 0, named after the project) that every other category names as
    its supercategory and no box uses. As a class it would only give the head
    an output no image teaches, so the label map leaves it out (reported).

    Args:
      categories: COCO category dicts (the union of the splits').
      annotation_lists: every split's annotations: a category some box
        (valid or not) uses is a class, whatever its supercategory.
    """
    used = {a.get("category_id") for anns in annotation_lists for a in anns
            if isinstance(a.get("category_id"), (int, str))}
    return [c for c in categories
            if len(categories) > 1 and c["id"] not in used
            and all(o.get("supercategory") == c["name"] for o in categories if o is not c)]


def union_categories(cocos):
    """The categories of several loaded jsons (name, coco) merged by id."""
    by_id = {}
    for source, coco in cocos:
        for c in coco["categories"]:
            old = by_id.setdefault(c["id"], c)
            if old["name"] != c["name"]:
                raise ConversionError(f"{source}: category {c['id']} is named {c['name']!r}"
                                      f" here and {old['name']!r} in another split")
    return sorted(by_id.values(), key=lambda c: c["id"])


def file_size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def worker_init():
    # One image per worker at a time: OpenCV's own threads would only contend.
    cv2.setNumThreads(0)


def _sniff(data):
    """("jpeg", components) | ("png", (colour type, bit depth)) | ("other", None)."""
    if data[:3] == b"\xff\xd8\xff":
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in (0x01, *range(0xD0, 0xD8)):  # no length field
                pos += 2
                continue
            (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return "jpeg", data[pos + 9] if pos + 9 < len(data) else None
            if marker == 0xDA:
                break
            pos += 2 + length
        return "jpeg", None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 26:
        return "png", (data[25], data[24])
    return "other", None


def _skip(reason, detail=None):
    return {"skip": True, "notes": [(reason, detail)]}


def load_image(job):
    """Worker: reads, checks and (if needed) re-encodes one image.

    job: (path, json height or None, json width or None). Returns a dict with
    skip, notes [(reason, detail)], encoded, format, height, width, scale
    (sx, sy) from json to file pixels, verify (JPEG for TF to confirm).
    """
    path, json_h, json_w = job
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return _skip("missing_file")
    except OSError as e:
        return _skip("unreadable_image", f"{type(e).__name__}: {e.strerror or e}")
    kind, info = _sniff(data)
    arr = np.frombuffer(data, np.uint8)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(arr, flags) if data else None
    if img is None:
        return _skip("unreadable_image", f"not a decodable image ({len(data)} bytes)")
    notes, reencode = [], True
    if kind == "jpeg":
        reason = {3: None, 1: "grayscale_converted", 4: "cmyk_converted"}.get(
            info, "other_format_converted")
        reencode = reason is not None
    elif kind == "png":
        colour_type, depth = info
        reason = ("png_kept" if (colour_type, depth) == (2, 8) else
                  "grayscale_converted" if colour_type == 0 else
                  "rgba_converted" if colour_type in (4, 6) else "png_converted")
        reencode = reason != "png_kept"
    else:
        reason = "other_format_converted"
    if reason:
        notes.append((reason, None if reason == "png_kept" else f"{kind} source"))
    h, w = img.shape[:2]
    scale = (1.0, 1.0)
    sized = all(_is_number(v) and v > 0 for v in (json_h, json_w))
    if not sized:
        notes.append(("size_missing_in_json", f"file is {w}x{h}"))
    elif (h, w) != (json_h, json_w):
        if (h, w) == (json_w, json_h):
            rotated = cv2.imdecode(arr, cv2.IMREAD_COLOR)
            if rotated is None or rotated.shape[:2] != (json_h, json_w):
                return _skip("size_mismatch_transposed",
                             f"json {json_w}x{json_h}, file {w}x{h}, no EXIF rotation")
            img, (h, w), reencode = rotated, rotated.shape[:2], True
            notes.append(("exif_orientation_applied", f"file {json_h}x{json_w} rotated"))
        else:
            # Resized after labelling: keep each box on its object.
            scale = (w / json_w, h / json_h)
            notes.append(("size_mismatch_rescaled",
                          f"json {json_w}x{json_h}, file {w}x{h}: boxes scaled by"
                          f" {scale[0]:.4g} x {scale[1]:.4g}"))
    fmt = "png" if kind != "jpeg" else "jpeg"
    if reencode:
        params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if fmt == "jpeg" else []
        ok, buf = cv2.imencode("." + ("jpg" if fmt == "jpeg" else "png"), img, params)
        if not ok:
            return _skip("unreadable_image", "decoded but could not be re-encoded")
        data = buf.tobytes()
    # Some OpenCV builds decode a truncated JPEG with a warning; TF's decoder
    # (the one training uses) would fail on it, so let TF judge those.
    verify = fmt == "jpeg" and not reencode and data.rstrip(b"\0\r\n ")[-2:] != b"\xff\xd9"
    return {"skip": False, "notes": notes, "encoded": data, "format": fmt,
            "height": int(h), "width": int(w), "scale": scale, "verify": verify}


def check_annotation(ann, image, by_id):
    """Validates one annotation against its loaded image.

    Returns (reason or None, detail or None, box or None); box holds xyxy
    (file pixels, clipped), label (contiguous index), name, iscrowd, area,
    and is None when the annotation is dropped.
    """
    cat = by_id.get(ann.get("category_id")) if not isinstance(
        ann.get("category_id"), (dict, list)) else None
    if cat is None:
        return "unknown_category", f"category_id {ann.get('category_id')!r}", None
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        return "bbox_null", f"bbox {bbox!r}"[:80], None
    if not all(math.isfinite(v) for v in bbox):
        return "bbox_nan", f"bbox {bbox!r}", None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return "bbox_nonpositive_size", f"bbox {bbox!r}", None
    sx, sy = image["scale"]
    x, y, w, h = x * sx, y * sy, w * sx, h * sy
    W, H = image["width"], image["height"]
    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
    if x1 <= x0 or y1 <= y0:
        return "bbox_outside_image", f"bbox {bbox!r} in a {W}x{H} image", None
    reason = detail = None
    if max(abs(x0 - x), abs(y0 - y), abs(x1 - x - w), abs(y1 - y - h)) > _CLIP_TOLERANCE:
        reason, detail = "bbox_clipped", f"bbox {bbox!r} in a {W}x{H} image"
    area = ann.get("area")
    area = (float(area) * sx * sy if _is_number(area) and math.isfinite(area) and area > 0
            else (x1 - x0) * (y1 - y0))
    box = {"xyxy": (x0, y0, x1, y1), "label": cat["index"], "name": cat["name"],
           "iscrowd": 1 if ann.get("iscrowd") else 0, "area": area}
    return reason, detail, box


def evaluator_annotation(ann, box, image):
    """The annotation as the evaluator's ground truth: the box and area as
    written to the TFRecord, in the file's pixels."""
    x0, y0, x1, y1 = box["xyxy"]
    out = {**ann, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": box["area"],
           "iscrowd": box["iscrowd"]}
    sx, sy = image["scale"]
    if (sx, sy) != (1.0, 1.0) and "segmentation" in out:
        seg = out["segmentation"]
        if isinstance(seg, list):  # polygons scale; an RLE cannot be rescaled here
            out["segmentation"] = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(p)]
                                   for p in seg if isinstance(p, list)]
        else:
            del out["segmentation"]
    return out
