"""COCO mAP per dataset, with pycocotools, in each dataset's own terms.

Detections leave the model as yxyx boxes in model pixels with contiguous
class indices. COCO's evaluator wants original image ids, the dataset's own
category ids and [x, y, width, height] boxes in original image pixels; this
module is the edge where that translation happens (model px / scale, then
clip to the original image, then xywh), and the only place it happens.

`CocoEvaluator` is numpy only (tests feed it directly). `evaluate(...)` runs
a detector over a dataset's eval pipeline and feeds the evaluator;
callbacks.Evaluator (evaluation during training, and --mode=eval) calls it
with the EMA weights swapped in.
"""

import contextlib
import copy
import io
import json
from typing import Dict, Mapping, Sequence

import numpy as np

DETECTIONS_SUFFIX = "_detections.json"

# The 12 numbers of COCOeval.summarize(), in order; TensorBoard and the
# logs use these names.
METRIC_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def _quiet():
    """pycocotools prints progress to stdout; keep the training log clean."""
    return contextlib.redirect_stdout(io.StringIO())


def load_coco(annotations):
    """A pycocotools COCO from a json path or an already loaded dict."""
    from pycocotools.coco import COCO

    if isinstance(annotations, str) or hasattr(annotations, "__fspath__"):
        with open(annotations) as f:
            annotations = json.load(f)
    dataset = copy.deepcopy(dict(annotations))
    dataset.setdefault("info", {})
    dataset.setdefault("licenses", [])
    dataset.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


class CocoEvaluator:
    """Accumulates one dataset's detections and computes COCO metrics.

    Args:
      annotations: the dataset's COCO ground truth (json path or dict) with
        its original image and category ids (the converter's
        `<split>_annotations.json`).
      category_ids: [C] COCO category id of each contiguous class index
        (label_map.json's "id" in index order).
    """

    def __init__(self, annotations, category_ids: Sequence[int]):
        self.coco = load_coco(annotations)
        self.category_ids = np.asarray(category_ids, np.int64)
        unknown = set(self.category_ids.tolist()) - set(self.coco.getCatIds())
        if unknown:
            raise ValueError(f"Label map category ids {sorted(unknown)} are not in the ground truth's categories.")
        self.reset()

    def reset(self):
        self.results = []
        self.image_ids = set()
        # [{"index", "id", "name", "ground_truth", "AP", "AP50"}] per
        # label-map class, set by result().
        self.per_class = None

    def add(self, image_ids, boxes, scores, classes, num_detections, scales, original_sizes=None):
        """Adds a batch of detections.

        Args:
          image_ids: [B] original COCO image ids.
          boxes: [B, K, 4] yxyx in MODEL pixels (original px * scale).
          scores: [B, K]; classes: [B, K] contiguous indices;
          num_detections: [B] valid entries of K.
          scales: [B] model px per original px.
          original_sizes: [B, 2] (height, width) to clip to; None: the
            ground truth's image sizes.
        """
        image_ids = np.asarray(image_ids).reshape(-1).astype(np.int64)
        boxes = np.asarray(boxes, np.float64)
        scores = np.asarray(scores, np.float64)
        classes = np.asarray(classes).astype(np.int64)
        num_detections = np.asarray(num_detections).reshape(-1).astype(np.int64)
        scales = np.asarray(scales, np.float64).reshape(-1)
        for b, image_id in enumerate(image_ids):
            image_id = int(image_id)
            if image_id not in self.coco.imgs:
                raise ValueError(f"Image id {image_id} is not in the ground truth.")
            self.image_ids.add(image_id)
            if original_sizes is not None:
                height, width = (float(v) for v in np.asarray(original_sizes)[b])
            else:
                info = self.coco.imgs[image_id]
                height, width = float(info["height"]), float(info["width"])
            n = int(num_detections[b])
            if n == 0:
                continue
            # Model px -> original px, clipped to the original image (the
            # padded area lies outside it).
            yxyx = boxes[b, :n] / scales[b]
            yxyx[:, 0::2] = np.clip(yxyx[:, 0::2], 0.0, height)
            yxyx[:, 1::2] = np.clip(yxyx[:, 1::2], 0.0, width)
            xywh = np.stack([yxyx[:, 1], yxyx[:, 0], yxyx[:, 3] - yxyx[:, 1], yxyx[:, 2] - yxyx[:, 0]], axis=-1)
            for box, score, cls in zip(xywh, scores[b, :n], classes[b, :n]):
                if box[2] <= 0 or box[3] <= 0:
                    continue
                self.results.append({
                    "image_id": image_id,
                    "category_id": int(self.category_ids[int(cls)]),
                    "bbox": [round(float(v), 3) for v in box],
                    "score": float(score),
                })

    def add_coco_results(self, results, image_ids=None):
        """Adds detections already in COCO results format."""
        self.results.extend(results)
        self.image_ids.update(int(i) for i in (image_ids if image_ids is not None else
                                                [r["image_id"] for r in results]))

    def result(self) -> Dict[str, float]:
        """COCO metrics over the images added so far (all zero without
        detections). Only the evaluated images count, so a partial pass
        (e.g. images the decoder skipped as corrupt) is not penalised."""
        from pycocotools.cocoeval import COCOeval

        if not self.image_ids:
            raise ValueError("No images were evaluated.")
        if not self.results:
            self.per_class = self._per_class(None)
            return {name: 0.0 for name in METRIC_NAMES}
        with _quiet():
            detections = self.coco.loadRes(copy.deepcopy(self.results))
            coco_eval = COCOeval(self.coco, detections, iouType="bbox")
            coco_eval.params.imgIds = sorted(self.image_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self.per_class = self._per_class(coco_eval)
        # -1 marks "no ground truth in this area range": report 0 instead of
        # a negative AP on charts.
        return {name: float(max(v, 0.0)) for name, v in zip(METRIC_NAMES, coco_eval.stats)}

    def _per_class(self, coco_eval):
        """AP and AP50 of each label-map class over the evaluated images,
        from the same COCOeval as the summary: its precision array is
        [IoU threshold, recall point, category, area range, max dets], and
        a class's AP is the mean of its entries over every IoU threshold
        and recall point (area "all", 100 detections), AP50 the same at
        IoU 0.5 alone; summarize()'s AP is their mean over the classes.
        A class with no ground truth in the evaluated images has no AP
        (None), as COCO marks it -1 and leaves it out of the mean."""
        image_ids = self.image_ids
        out = []
        for index, category_id in enumerate(self.category_ids.tolist()):
            annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=sorted(image_ids), catIds=[category_id]))
            ground_truth = sum(1 for a in annotations if not a.get("iscrowd", 0))
            row = {"index": index, "id": int(category_id), "name": self.coco.cats[category_id].get("name", ""),
                   "ground_truth": ground_truth, "AP": None, "AP50": None}
            if coco_eval is None:
                if ground_truth:
                    row["AP"] = row["AP50"] = 0.0
            else:
                k = coco_eval.params.catIds.index(category_id)
                precision = coco_eval.eval["precision"][:, :, k, 0, -1]
                iou_50 = int(np.argmin(np.abs(coco_eval.params.iouThrs - 0.5)))
                if (precision > -1).any():
                    row["AP"] = float(np.mean(precision[precision > -1]))
                    at_50 = precision[iou_50]
                    row["AP50"] = float(np.mean(at_50[at_50 > -1]))
            out.append(row)
        return out


def per_class_table(per_class) -> str:
    """A fixed-width table of CocoEvaluator.per_class (class, id, ground
    truth boxes, AP, AP50; "-" where a class has no ground truth)."""

    def number(v):
        return "-" if v is None else f"{v:.4f}"

    rows = [(r["name"], str(r["id"]), str(r["ground_truth"]), number(r["AP"]), number(r["AP50"])) for r in per_class]
    header = ("class", "id", "boxes", "AP", "AP50")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join(lines)


def make_detect_fn(detector, head, postprocess_kwargs=None):
    """A traced images -> head detections function; build once, call per
    batch (a new tf.function per evaluation would trace every time).

    `postprocess_kwargs`: ops.postprocess.postprocess's settings, normally
    `config.postprocess.eval_kwargs()` (those of every export signature at
    evaluation's score threshold); None: PostprocessConfig's defaults."""
    import tensorflow as tf

    if postprocess_kwargs is None:
        from effdet_tf.config import PostprocessConfig

        postprocess_kwargs = PostprocessConfig().eval_kwargs()
    postprocess_kwargs = dict(postprocess_kwargs)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def detect(images):
        return detector.detect(images, heads=[head], **postprocess_kwargs)[head]

    return detect


def evaluate(detector, dataset, evaluator: CocoEvaluator, head: str, postprocess_kwargs=None,
             keep_images=0, detect_fn=None):
    """Runs `detector`'s head `head` over an eval pipeline and returns
    (metrics, samples).

    `dataset` yields dicts {"images" [B,S,S,3], "image_id" [B], "scale" [B],
    "original_size" [B,2]} (data.pipeline.eval_dataset). `samples` holds the
    first `keep_images` images with their detections (model px) for
    TensorBoard. `detect_fn`: from make_detect_fn (built here from
    `postprocess_kwargs` if None). The detections scored are left in
    `evaluator.results` (COCO results format).
    """
    detect = detect_fn or make_detect_fn(detector, head, postprocess_kwargs)
    evaluator.reset()
    samples = []
    for batch in dataset:
        out = {k: v.numpy() for k, v in detect(batch["images"]).items()}
        evaluator.add(batch["image_id"].numpy(), out["boxes"], out["scores"], out["classes"],
                      out["num_detections"], batch["scale"].numpy(), batch["original_size"].numpy())
        for b in range(len(out["num_detections"])):
            if len(samples) >= keep_images:
                break
            n = int(out["num_detections"][b])
            samples.append({
                "image": batch["images"][b].numpy(),
                "image_id": int(batch["image_id"][b].numpy()),
                "scale": float(batch["scale"][b].numpy()),
                "original_size": batch["original_size"][b].numpy().tolist(),
                "boxes": out["boxes"][b, :n], "scores": out["scores"][b, :n], "classes": out["classes"][b, :n],
            })
    return evaluator.result(), samples


def ground_truth_in_model_px(coco, image_id, scale, category_ids):
    """Non-crowd ground truth of one image as (yxyx model px, class index)."""
    index_of = {int(c): i for i, c in enumerate(category_ids)}
    boxes, classes = [], []
    for ann in coco.imgToAnns.get(int(image_id), []):
        if ann.get("iscrowd", 0) or int(ann["category_id"]) not in index_of:
            continue
        x, y, w, h = ann["bbox"]
        boxes.append([y * scale, x * scale, (y + h) * scale, (x + w) * scale])
        classes.append(index_of[int(ann["category_id"])])
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)


def detections_file(eval_dir, name):
    """MODEL_DIR/eval/<dataset>_detections.json: the COCO results the last
    evaluation of that dataset scored (the model-dir contract)."""
    import os

    return os.path.join(eval_dir, f"{name}{DETECTIONS_SUFFIX}")


def served_share(results, image_ids, score_threshold) -> Dict[str, int]:
    """How much of an evaluation the exported model would return: the
    detections scoring above the export's `score_threshold` (serving applies
    it as evaluation applies its own lower one; same NMS, so the rest are
    the same boxes), and the images left with at least one."""
    kept = [r for r in results if r["score"] > score_threshold]
    return {
        "detections": len(results),
        "served_detections": len(kept),
        "images": len(image_ids),
        "images_with_served_detections": len({r["image_id"] for r in kept}),
    }


def mean_ap(metrics: Mapping[str, Mapping[str, float]]) -> float:
    """Mean over datasets of COCO AP@[.5:.95] (what picks the best checkpoint)."""
    return float(np.mean([m["AP"] for m in metrics.values()])) if metrics else 0.0
