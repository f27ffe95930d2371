"""Draw detections on an image (numpy + OpenCV).

Used by the predict CLI and by the trainer's TensorBoard image summaries, so
it takes plain numpy arrays and never touches TensorFlow.
"""

import colorsys

import cv2
import numpy as np

# Boxes thinner than this vanish once TensorBoard downsizes a 512px image.
_MIN_THICKNESS = 1
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(class_id):
    """A stable, well separated RGB colour for a class id.

    Golden-ratio hue stepping spreads consecutive ids around the colour wheel,
    so neighbouring ids never look alike.
    """
    hue = (int(class_id) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _class_name(class_names, class_id):
    """Looks a name up in a dict (id -> name) or a list (index -> name)."""
    if class_names is None:
        return str(class_id)
    if isinstance(class_names, dict):
        if class_id in class_names:
            return str(class_names[class_id])
        # JSON round trips turn int keys into strings.
        return str(class_names.get(str(class_id), class_id))
    if 0 <= class_id < len(class_names):
        return str(class_names[class_id])
    return str(class_id)


def _text_color(color):
    """Black or white, whichever reads better on `color` (ITU-R BT.601 luma)."""
    r, g, b = color
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_detections(image, boxes, classes, scores=None, class_names=None, color=None):
    """Draws boxes with class names (and scores) on a copy of an image.

    Args:
      image: uint8 [H, W, 3] RGB image (also accepts a float image in 0..255).
      boxes: [K, 4] yxyx boxes in pixels of `image`. Boxes partly outside the
        image are clipped; boxes with no area after clipping are skipped.
      classes: [K] class ids used for the label and the colour.
      scores: [K] scores or None (e.g. ground-truth boxes).
      class_names: dict id -> name, list index -> name, or None (ids shown).
      color: one RGB tuple for every box, or None for a colour per class.

    Returns:
      A new uint8 [H, W, 3] image; the input is left untouched.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    canvas = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
    height, width = canvas.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1)
    if len(classes) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(classes)} classes")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")

    # Scale strokes and text with the image so both stay legible from 64 px
    # thumbnails to full-size photos.
    thickness = max(_MIN_THICKNESS, int(round(max(height, width) / 320)))
    font_scale = max(0.3, max(height, width) / 1200)
    font_thickness = max(1, thickness // 2)

    for i, (ymin, xmin, ymax, xmax) in enumerate(boxes):
        if not np.all(np.isfinite([ymin, xmin, ymax, xmax])):
            continue
        x0 = int(round(np.clip(xmin, 0, width - 1)))
        y0 = int(round(np.clip(ymin, 0, height - 1)))
        x1 = int(round(np.clip(xmax, 0, width - 1)))
        y1 = int(round(np.clip(ymax, 0, height - 1)))
        if x1 <= x0 or y1 <= y0:
            continue
        class_id = int(classes[i])
        box_color = tuple(int(c) for c in color) if color is not None else class_color(class_id)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), box_color, thickness)

        label = _class_name(class_names, class_id)
        if scores is not None:
            label = f"{label} {scores[i]:.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(label, _FONT, font_scale, font_thickness)
        # Label above the box, or inside it when the box touches the top edge.
        text_y0 = y0 - text_h - baseline - 2
        if text_y0 < 0:
            text_y0 = y0
        text_x1 = min(width - 1, x0 + text_w + 2)
        text_y1 = min(height - 1, text_y0 + text_h + baseline + 2)
        cv2.rectangle(canvas, (x0, text_y0), (text_x1, text_y1), box_color, cv2.FILLED)
        cv2.putText(
            canvas,
            label,
            (x0 + 1, text_y0 + text_h + 1),
            _FONT,
            font_scale,
            _text_color(box_color),
            font_thickness,
            cv2.LINE_AA,
        )
    return canvas
