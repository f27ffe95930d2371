"""A generated pair of COCO datasets for the demo and the tests.

`make_demo_datasets(root)` writes two COCO roots in the layout users bring
(`root/appliance`, `root/food`, each with `annotations/instances_{train,val}2017.json`
and `train2017/`, `val2017/` JPEG folders). The two label spaces differ
(5 and 10 classes) and use COCO-style category ids that are neither 0/1-based
nor gap-free, so nothing downstream can get away with assuming contiguity.

Every class is one saturated colour and one shape (plus a texture for some),
drawn on a muted, cluttered background: a narrow detector can separate them
after a few CPU minutes, which is what the demo needs. A few images are
empty (negatives) and a few hold a crowd region (`iscrowd=1`, a cluster of
small same-class shapes with one box, as COCO marks crowds).

Everything is drawn from `numpy.random.default_rng(seed)`, so the same seed
gives the same bytes (JSON and JPEG) on the same OpenCV build.

CLI: `python -m effdet_tf.data.synthetic --output_dir=/tmp/demo_data`.
"""

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

# (COCO id, name, shape, RGB colour, texture). Ids are COCO's own for these
# names, except the last two foods (COCO has no cookie, and puts sandwich at
# 48): 63 and 65 keep food's ids non-contiguous, with gaps (54, 58, 62, 64).
# Colours are distinct within a dataset, so colour alone already tells the
# classes apart; the shape makes each class a distinct shape+colour pair.
APPLIANCE_CLASSES = (
    (78, "microwave", "rectangle", (230, 40, 40), "plain"),
    (79, "oven", "circle", (40, 90, 235), "stripes"),
    (80, "toaster", "triangle", (245, 215, 30), "plain"),
    (81, "sink", "ring", (40, 200, 60), "plain"),
    (82, "refrigerator", "cross", (225, 50, 225), "dots"),
)
FOOD_CLASSES = (
    (52, "banana", "diamond", (245, 215, 30), "plain"),
    (53, "apple", "circle", (230, 40, 40), "plain"),
    (55, "orange", "hexagon", (255, 140, 0), "dots"),
    (56, "broccoli", "star", (40, 200, 60), "plain"),
    (57, "carrot", "triangle", (255, 110, 170), "stripes"),
    (59, "pizza", "rectangle", (40, 90, 235), "checker"),
    (60, "donut", "ring", (225, 50, 225), "plain"),
    (61, "cake", "half_disk", (30, 215, 215), "plain"),
    (63, "sandwich", "cross", (245, 245, 245), "plain"),
    (65, "cookie", "hexagon", (130, 50, 200), "stripes"),
)
DATASETS = {"appliance": APPLIANCE_CLASSES, "food": FOOD_CLASSES}

# Aspect ratios (width / height) the images are drawn with.
_ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3)
_EMPTY_PROB = 0.06
_CROWD_PROB = 0.04
_JPEG_QUALITY = 92


def _shape_polygon(shape, x0, y0, w, h):
    """Outer outline of `shape` in the box (x0, y0, w, h) as int32 [K, 2] xy."""
    cx, cy, rx, ry = x0 + w / 2, y0 + h / 2, w / 2, h / 2
    if shape == "rectangle":
        pts = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    elif shape in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)
    elif shape == "half_disk":
        t = np.linspace(np.pi, 2 * np.pi, 17)
        pts = np.stack([cx + rx * np.cos(t), y0 + h + 2 * ry * np.sin(t)], 1)
    elif shape == "triangle":
        pts = [(cx, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    elif shape == "diamond":
        pts = [(cx, y0), (x0 + w, cy), (cx, y0 + h), (x0, cy)]
    elif shape == "hexagon":
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)
    elif shape == "star":
        t = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], 1)
    elif shape == "cross":
        a, b = 0.3, 0.7
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1),
               (a, b), (0, b), (0, a), (a, a)]
        pts = [(x0 + u * w, y0 + v * h) for u, v in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    pts = np.asarray(pts, np.float64)
    # Keep the outline inside the box even after rounding.
    pts[:, 0] = np.clip(pts[:, 0], x0, x0 + w - 1)
    pts[:, 1] = np.clip(pts[:, 1], y0, y0 + h - 1)
    return np.round(pts).astype(np.int32)


def _draw_object(img, rng, shape, rgb, texture, x0, y0, w, h):
    """Draws one object into `img` (BGR uint8); returns (polygon, area)."""
    colour = tuple(int(c) for c in rgb[::-1])
    poly = _shape_polygon(shape, x0, y0, w, h)
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(mask, [poly], 1)
    if shape == "ring":
        # The hole is background: a ring is told from a disk by it.
        hole = _shape_polygon("circle", x0 + w * 0.3, y0 + h * 0.3, w * 0.4, h * 0.4)
        cv2.fillPoly(mask, [hole], 0)
    yy, xx = np.nonzero(mask)
    layer = np.empty((len(yy), 3), np.float32)
    layer[:] = colour
    # Textures darken the class colour in a pattern; the hue stays the class's.
    if texture == "stripes":
        period = max(4, int(min(w, h) / 5))
        dark = ((xx + yy - x0 - y0) // (period // 2)) % 2 == 1
        layer[dark] *= 0.6
    elif texture == "checker":
        cell = max(3, int(min(w, h) / 6))
        dark = (((xx - x0) // cell + (yy - y0) // cell) % 2) == 1
        layer[dark] *= 0.65
    elif texture == "dots":
        cell = max(5, int(min(w, h) / 5))
        u, v = (xx - x0) % cell - cell / 2, (yy - y0) % cell - cell / 2
        dark = u * u + v * v < (cell / 4) ** 2
        layer[dark] *= 0.55
    layer += rng.normal(0, 6, size=layer.shape)
    img[yy, xx] = np.clip(layer, 0, 255).astype(np.uint8)
    return poly, float(len(yy))


def _background(rng, h, w):
    """A muted (low-saturation) cluttered background, BGR uint8."""
    base = rng.uniform(70, 170, size=3)
    base = base.mean() + (base - base.mean()) * 0.25  # desaturate
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    slope = rng.uniform(-0.25, 0.25, size=2)
    img = base[None, None, :] + (slope[0] * gy + slope[1] * gx)[..., None]
    img += rng.normal(0, 8, size=(h, w, 1))  # grey grain
    img = np.clip(img, 50, 200).astype(np.uint8)
    # Clutter: grey lines, outlines and blobs, the kind of structure a real
    # scene has and a detector must learn to ignore.
    for _ in range(int(rng.integers(6, 14))):
        g = int(rng.integers(50, 200))
        tint = rng.integers(-12, 13, size=3)
        c = tuple(int(np.clip(g + t, 0, 255)) for t in tint)
        kind = rng.integers(3)
        p = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if kind == 0:
            q = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p, q, c, int(rng.integers(1, 4)))
        elif kind == 1:
            r = int(rng.integers(4, max(5, min(h, w) // 5)))
            cv2.circle(img, p, r, c, int(rng.choice([-1, 1, 2])))
        else:
            q = (p[0] + int(rng.integers(-40, 41)), p[1] + int(rng.integers(-40, 41)))
            cv2.rectangle(img, p, q, c, int(rng.choice([-1, 1, 2])))
    return img


def _overlaps(box, boxes, margin=2):
    x, y, w, h = box
    for bx, by, bw, bh in boxes:
        if (x < bx + bw + margin and bx < x + w + margin
                and y < by + bh + margin and by < y + h + margin):
            return True
    return False


def _rle_of_box(x, y, w, h, height, width):
    """Uncompressed COCO RLE (column-major run lengths) of an integer box."""
    counts, prev = [], 0
    for col in range(x, x + w):
        start = col * height + y
        counts += [start - prev, h]
        prev = start + h
    counts.append(height * width - prev)
    return {"counts": counts, "size": [height, width]}


def _make_image(rng, classes, height, width, object_size, kind=None):
    """One image: returns (BGR image, list of annotation dicts without ids)."""
    img = _background(rng, height, width)
    anns, taken = [], []
    if (rng.random() < _EMPTY_PROB or kind == "empty") and kind != "crowd":
        return img, anns
    short = min(height, width)
    if rng.random() < _CROWD_PROB or kind == "crowd":
        # A crowd: several small same-class objects under one box.
        k = int(rng.integers(len(classes)))
        cid, _, shape, rgb, texture = classes[k]
        cw, ch = int(short * rng.uniform(0.35, 0.5)), int(short * rng.uniform(0.3, 0.45))
        cx, cy = int(rng.integers(0, width - cw)), int(rng.integers(0, height - ch))
        s = max(6, int(min(cw, ch) / 3.2))
        for gy in range(cy, cy + ch - s + 1, s + 1):
            for gx in range(cx, cx + cw - s + 1, s + 1):
                _draw_object(img, rng, shape, rgb, texture, gx, gy, s, s)
        taken.append((cx, cy, cw, ch))
        anns.append({"category_id": cid, "iscrowd": 1, "bbox": [cx, cy, cw, ch],
                     "area": float(cw * ch),
                     "segmentation": _rle_of_box(cx, cy, cw, ch, height, width)})
    for _ in range(int(rng.integers(1, 5))):
        cid, _, shape, rgb, texture = classes[int(rng.integers(len(classes)))]
        for _attempt in range(20):
            side = short * rng.uniform(*object_size)
            aspect = rng.uniform(0.75, 1.33)
            w = int(min(width - 2, side * aspect))
            h = int(min(height - 2, side / aspect))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if not _overlaps((x, y, w, h), taken):
                break
        else:
            continue
        poly, area = _draw_object(img, rng, shape, rgb, texture, x, y, w, h)
        taken.append((x, y, w, h))
        anns.append({"category_id": cid, "iscrowd": 0, "bbox": [x, y, w, h],
                     "area": area,
                     "segmentation": [poly.reshape(-1).astype(float).tolist()]})
    return img, anns


def _write_split(rng, root, name, classes, split, num_images, image_size, first_id,
                 object_size):
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_id * 10
    for i in range(num_images):
        aspect = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
        long_side = int(rng.integers(int(image_size * 0.625), image_size + 1))
        if aspect >= 1:
            width, height = long_side, int(round(long_side / aspect))
        else:
            height, width = long_side, int(round(long_side * aspect))
        # Spread-out ids: never 0..N-1, so no code can confuse id and position.
        image_id = first_id + 7 * i
        file_name = f"{image_id:012d}.jpg"
        # Images 1 and 2 of every split are an empty one and one with a crowd,
        # so even small splits have both.
        kind = {1: "empty", 2: "crowd"}.get(i)
        img, anns = _make_image(rng, classes, height, width, object_size, kind)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        assert ok
        (image_dir / file_name).write_bytes(buf.tobytes())
        images.append({"id": image_id, "file_name": file_name,
                       "height": height, "width": width, "license": 1})
        for a in anns:
            ann_id += 1
            annotations.append({"id": ann_id, "image_id": image_id, **a})
    categories = [{"id": c[0], "name": c[1], "supercategory": name} for c in classes]
    coco = {
        "info": {"description": f"effdet_tf synthetic {name} dataset", "version": "1.0"},
        "licenses": [{"id": 1, "name": "generated", "url": ""}],
        "images": images, "annotations": annotations, "categories": categories,
    }
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    with open(ann_dir / f"instances_{split}2017.json", "w") as f:
        json.dump(coco, f)


def make_demo_datasets(root, seed=0, num_train=300, num_val=60, image_size=256,
                       object_size=(0.2, 0.5)):
    """Writes the appliance (5 classes) and food (10 classes) COCO datasets.

    Args:
      root: output folder; `root/appliance` and `root/food` are created.
      seed: all randomness derives from it (same seed, same bytes).
      num_train, num_val: images per split per dataset.
      image_size: longest image side; images get sides between 0.625x and
        1x of it with aspect ratios 1, 4:3, 3:4, 3:2, 2:3.
      object_size: (min, max) object side as a fraction of the image's shorter
        side (times an aspect jitter of 0.75-1.33). In model pixels an object
        spans about 0.13-0.5 of the input size S, so at S=128 the smallest are
        ~17 px: pair small inputs with small anchors (anchor_scale 2-3).

    Returns:
      dict dataset name -> Path of its COCO root, in order appliance, food.
    """
    root = Path(root)
    paths = {}
    for d, (name, classes) in enumerate(DATASETS.items()):
        droot = root / name
        for s, (split, n) in enumerate((("train", num_train), ("val", num_val))):
            rng = np.random.default_rng([seed, d, s])
            first_id = 100000 * (d + 1) + 50000 * s + 13
            _write_split(rng, droot, name, classes, split, n, image_size, first_id,
                         object_size)
        paths[name] = droot
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=300)
    parser.add_argument("--num_val", type=int, default=60)
    parser.add_argument("--image_size", type=int, default=256)
    args = parser.parse_args(argv)
    paths = make_demo_datasets(args.output_dir, args.seed, args.num_train,
                               args.num_val, args.image_size)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
