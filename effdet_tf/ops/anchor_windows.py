"""Exact IoU matching of boxes to grid anchors, looking at few anchors.

`LabelEncoder` needs, for an `Anchors` grid and M boxes: each anchor's best
IoU and the first box reaching it, and each box's best anchor over all N
anchors (first index on ties, as `tf.argmax`). The dense pass computes all
M x N IoUs; this module gets the same numbers, bit for bit (the same
float32 operations on the same operands), from a window of anchors around
each box: 2,907 of the 49,104 anchors at 512 px.

The window bound. An anchor of height h_a and a box of height h_b whose
centres are dy apart intersect over ih <= (h_a + h_b) / 2 - |dy| and
ih <= h_a rows; the intersection width is at most the narrower width, so
IoU <= ih / (h_a + h_b - ih). IoU >= t then needs ih >= t (h_a + h_b) / (1 + t),
hence h_b <= h_a / t and |dy| <= h_a (1 - t) / (2 t) (= h_a / 2 at t = 0.5);
the same along x with widths. So, per level, anchor rows (columns) whose
centres are farther than that from the box centre, for the level's largest
anchor, are below t = `unmatched_threshold` with the box; an anchor below t
with every box is background, whatever its exact IoU. The window: K
consecutive rows x K columns (K = 9 at defaults, clamped to the grid)
holding every centre within that distance, the A shapes of each location.

Per-anchor maximum: one scatter-max over the window entries of
(IoU bits, M - box index) keys (float bits of IoUs >= 0 order as ints; the
largest key is the largest IoU, then the lowest box index).

Per-box best anchor: IoU never increases with |dy| or |dx| within one
shape (the intersection only shrinks), so each shape's best anchor is the
nearest to the box centre, inside the window (it reaches a stride either
side and covers |dy| <= h_a / 2, where an anchor holds the box). Ties are
the catch: where anchors lie inside the box along an axis (a "plateau": a
thin box much longer than the anchors), the intersection along it is the
anchor's own side, equal in real numbers but not in float32 (the stored
sides differ by an ulp from row to row), so the dense arg-max picks
whichever row rounds best, anywhere on the plateau. A box whose best
shape's plateau (or the row just past it, an ulp-close near-tie) reaches
out of the window, with a window maximum within `_NEAR_TIE` of the box's
best, gets the dense arg-max over all N anchors instead (a loop over those
boxes only: thin boxes, none in most images). Any other anchor outside the
window is worse than the nearest one by far more than rounding.

Anchor edges are recomputed from grid positions as `anchors.py` does
(float64 centre minus half side, rounded to float32; no gathers): exact when
the centres (r + 0.5) * stride are exact in float64, which `AnchorWindows`
checks (it raises ValueError otherwise, e.g. 300 px: strides 300 / 38...).
"""

import fractions
import math

import numpy as np
import tensorflow as tf

# Slack on the window half-size, in strides: covers float32 rounding of the
# box centre in cells (~1e-5 cells for boxes within a few image sizes).
_MARGIN = 1e-3
# A block whose window maximum is this close (relative) to the box's best
# may hide an ulp-better anchor outside the window (plateau rounding).
_NEAR_TIE = 1e-4


def _edges(pos, stride, half):
    """Anchor edges at grid positions `pos` (int32 [..., 1] or [..., A])
    for half sides `half` (float64 [A]), as anchors.py rounds them."""
    centre = (tf.cast(pos, tf.float64) + 0.5) * stride
    return (tf.cast(centre - half, tf.float32),
            tf.cast(centre + half, tf.float32))


class _LevelAxis:
    """One axis (rows, or columns) of one level: the window of `width`
    positions shared by the A anchor shapes, and where the plateaus are."""

    def __init__(self, size, stride, halves, threshold):
        self.size, self.stride = size, stride
        self.halves = np.array(halves, np.float64)  # [A], pixels
        centres = (np.arange(size) + 0.5) * stride
        exact = fractions.Fraction(stride)
        if any(fractions.Fraction(c) != (r + fractions.Fraction(1, 2)) * exact
               for r, c in enumerate(centres)):
            raise ValueError("anchor centres are not exact in float64")
        self.lows = (centres[:, None] - self.halves).astype(np.float32)
        self.highs = (centres[:, None] + self.halves).astype(np.float32)
        # Half window: the IoU >= t bound, at least half the anchor (the
        # box-inside-anchor plateau) and a stride, for the largest shape.
        extent = 2.0 * float(np.max(self.halves))
        self.cells = max(extent * (1.0 - threshold) / (2.0 * threshold),
                         extent / 2.0, stride) / stride + _MARGIN
        self.width = min(int(math.floor(2.0 * self.cells)) + 1, size)

    def window(self, low, high):
        """Box edges [BM] -> first window position [BM] (int32)."""
        centre = (low + high) * 0.5
        start = tf.clip_by_value(
            tf.math.ceil(centre / np.float32(self.stride) - 0.5
                         - np.float32(self.cells)),
            0.0, float(self.size - self.width))
        return tf.cast(start, tf.int32)

    def features(self, start, low, high):
        """Window of boxes [BM] -> positions [BM, K, 1], intersection
        lengths (as the dense IoU computes them) and anchor sides
        [BM, K, A]."""
        pos = start[:, None, None] + np.arange(self.width, dtype=np.int32)[:, None]
        a_low, a_high = _edges(pos, self.stride, self.halves)
        inter = tf.maximum(tf.minimum(a_high, high[:, None, None])
                           - tf.maximum(a_low, low[:, None, None]), 0.0)
        return pos, inter, tf.maximum(a_high - a_low, 0.0)

    def escapes(self, start, low, high):
        """[BM, A] bool: the shape's plateau (rows whose anchor lies inside
        the box along this axis) or a row next to it is outside the
        window, where rounding may make it an ulp better than any row in."""
        if self.width == self.size:
            return None  # the window is the whole axis
        low, high = low[:, None], high[:, None]
        stride32 = np.float32(self.stride)
        half32 = self.halves.astype(np.float32)
        # first = first row with anchor low >= box low, last + 1 = first
        # with anchor high > box high: estimated in float32 (off by at most
        # one) and settled on the exact edges.
        guess = tf.cast(tf.math.ceil((low + half32) / stride32 - 0.5), tf.int32)
        first = guess - 1
        for shift in (-1, 0):
            edge, _ = _edges(guess + shift, self.stride, self.halves)
            first += tf.cast(edge < low, tf.int32)
        guess = tf.cast(tf.math.floor((high - half32) / stride32 - 0.5),
                        tf.int32) + 1
        last = guess - 2
        for shift in (-1, 0):
            _, edge = _edges(guess + shift, self.stride, self.halves)
            last += tf.cast(edge <= high, tf.int32)
        start = start[:, None]
        return (first <= last) & (
            (tf.maximum(first - 1, 0) < start)
            | (tf.minimum(last + 1, self.size - 1) >= start + self.width))


class AnchorWindows:
    """Windowed IoU matching against the anchors of an `Anchors` grid.

    Args:
      anchors: `ops.anchors.Anchors`.
      threshold: the lowest IoU that matters (> 0): anchors below it with
        every box get the same targets whatever their exact IoU.

    Raises ValueError when the anchor edges cannot be recomputed exactly
    (centres inexact in float64: strides that are not dyadic).
    `entries_per_box`: IoUs computed per box (instead of N).
    """

    def __init__(self, anchors, threshold):
        if not threshold > 0.0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        stored = anchors.numpy()
        self.anchors = stored
        self.area = (np.maximum(stored[:, 2] - stored[:, 0], 0.0)
                     * np.maximum(stored[:, 3] - stored[:, 1], 0.0))
        self.num_anchors = len(stored)
        self.per_location = anchors.num_anchors_per_location
        # Half sides per unit stride, as anchors.py makes them.
        halves = []
        for octave in range(anchors.num_scales):
            base = anchors.anchor_scale * 2.0 ** (octave / anchors.num_scales)
            for ratio in anchors.aspect_ratios:
                halves.append((base / math.sqrt(ratio) / 2.0,
                               base * math.sqrt(ratio) / 2.0))
        halves = np.array(halves, np.float64)
        self.levels = []
        location = 0
        self.entries_per_box = 0
        for height, width in anchors.level_sizes:
            stride_y = anchors.image_size[0] / height
            stride_x = anchors.image_size[1] / width
            y = _LevelAxis(height, stride_y, halves[:, 0] * stride_y, threshold)
            x = _LevelAxis(width, stride_x, halves[:, 1] * stride_x, threshold)
            grid = stored[location * self.per_location:
                          (location + height * width) * self.per_location]
            grid = grid.reshape(height, width, self.per_location, 4)
            if not (np.array_equal(grid[:, 0, :, 0], y.lows)
                    and np.array_equal(grid[:, 0, :, 2], y.highs)
                    and np.array_equal(grid[0, :, :, 1], x.lows)
                    and np.array_equal(grid[0, :, :, 3], x.highs)):
                raise ValueError("anchor edges differ from the recomputed ones")
            self.levels.append((y, x, location))
            location += height * width
            self.entries_per_box += y.width * x.width * self.per_location

    def match(self, boxes, valid):
        """boxes [B, M, 4] yxyx, valid [B, M] ->

        max_iou [B, N]: each anchor's best IoU, exact where some box's
          window reaches it (so wherever it is >= the threshold), else -1;
        matched [B, N] int32: the first box reaching it (M: none);
        best_iou [B, M], best_anchor [B, M]: each box's best IoU over all
          anchors and the first anchor reaching it (-1 / any for invalid
          boxes), all as the dense pass has them.
        """
        batch, num_gt = tf.shape(boxes)[0], tf.shape(boxes)[1]
        num, per_location = self.num_anchors, self.per_location
        flat = tf.reshape(boxes, [-1, 4])
        ymin, xmin, ymax, xmax = tf.unstack(flat, 4, 1)  # [BM]
        valid = tf.reshape(valid, [-1])
        # Same operations, same order as the dense IoU.
        box_area = tf.maximum(
            tf.maximum(ymax - ymin, 0.0) * tf.maximum(xmax - xmin, 0.0), 0.0)
        bm = lambda t: t[:, None, None, None]
        column = tf.range(batch * num_gt)
        gt_rank = bm(tf.cast(num_gt - column % num_gt, tf.int64))
        image_location = (column // num_gt * (num // per_location))[:, None, None]
        shape_index = np.arange(per_location, dtype=np.int32)

        keys, indices, pieces, escaped = [], [], [], []
        for axis_y, axis_x, location in self.levels:
            start_y = axis_y.window(ymin, ymax)
            start_x = axis_x.window(xmin, xmax)
            pos_y, inter_y, side_y = axis_y.features(start_y, ymin, ymax)
            pos_x, inter_x, side_x = axis_x.features(start_x, xmin, xmax)
            # [BM, Ky, Kx, A]: boxes first, so that per-box reductions run
            # over contiguous rows.
            inter = inter_y[:, :, None] * inter_x[:, None]
            # The no-op max keeps LLVM from contracting the product and the
            # union's sum into one FMA (one rounding less than eagerly).
            area = tf.maximum(side_y[:, :, None] * side_x[:, None], 0.0)
            union = (area + bm(box_area)) - inter
            iou = tf.where(bm(valid), tf.math.divide_no_nan(inter, union), -1.0)
            grid = pos_y[:, :, None] * axis_x.size + pos_x[:, None] + location
            keys.append(tf.reshape(
                tf.cast(tf.bitcast(iou, tf.int32), tf.int64) * (1 << 32)
                + gt_rank, [-1, per_location]))
            indices.append(tf.reshape(grid[..., 0] + image_location, [-1, 1]))
            # Per (box, shape) maxima: the escape masks act on these, not on
            # every entry (XLA would recompute them per entry).
            block_best = tf.reduce_max(iou, [1, 2])  # [BM, A]
            pieces.append((iou, grid * per_location + shape_index,
                           tf.reduce_max(block_best, 1)))
            escapes = [e for e in (axis_y.escapes(start_y, ymin, ymax),
                                   axis_x.escapes(start_x, xmin, xmax))
                       if e is not None]
            if escapes:
                escapes = escapes[0] if len(escapes) == 1 else (
                    escapes[0] | escapes[1])
                escaped.append(tf.reduce_max(
                    tf.where(escapes, block_best, -1.0), 1))

        # Per-anchor max and first box reaching it: one scatter-max of
        # (IoU bits, M - box index) keys, a row of the A shapes of a grid
        # location per update. IoUs >= 0 order as their int32 bits; -1
        # (invalid box) gives a negative key, as does "no box" (the fill).
        best = tf.tensor_scatter_nd_max(
            tf.fill([batch * (num // per_location), per_location],
                    tf.constant(-1, tf.int64)),
            tf.concat(indices, 0), tf.concat(keys, 0))
        best = tf.reshape(best, [batch, num])
        found = best >= 0
        max_iou = tf.where(found, tf.bitcast(tf.cast(
            tf.bitwise.right_shift(best, 32), tf.int32), tf.float32), -1.0)
        matched = tf.where(found, num_gt - tf.cast(tf.bitwise.bitwise_and(
            best, tf.constant(0xFFFFFFFF, tf.int64)), tf.int32), num_gt)

        # Per-box best anchor in the windows, the first on ties: a float max
        # of (N - index) over the entries reaching the max (N < 2^24).
        best_iou = tf.reduce_max(tf.stack([p[2] for p in pieces], -1), -1)
        ranks = [tf.reduce_max(tf.where(iou == bm(best_iou),
                                        tf.cast(num - anchor, tf.float32), 0.0),
                               [1, 2, 3])
                 for iou, anchor, _ in pieces]
        best_anchor = num - tf.cast(tf.reduce_max(tf.stack(ranks, -1), -1),
                                    tf.int32)
        if escaped:
            # Boxes whose best may sit on a plateau reaching out of the
            # window: the exact arg-max over all N anchors, one box at a
            # time (thin boxes only; none in most images).
            near = tf.reduce_max(tf.stack(escaped, -1), -1) >= (
                best_iou * (1.0 - _NEAR_TIE))
            best_iou, best_anchor = self._exact_best(
                flat, box_area, valid & (best_iou > 0.0) & near,
                best_iou, best_anchor)
        return (max_iou, matched, tf.reshape(best_iou, [batch, num_gt]),
                tf.reshape(best_anchor, [batch, num_gt]))

    def _exact_best(self, boxes, box_area, redo, best_iou, best_anchor):
        """The dense per-box arg-max for the boxes flagged in `redo` [BM]."""
        num = self.num_anchors
        # A dummy row everywhere: for M = 0 XLA still compiles the loop, and
        # its compile-time analysis aborts on zero-size tensors (TF 2.21).
        redo = tf.concat([tf.cast(redo, tf.int32), [0]], 0)
        count = tf.reduce_sum(redo)
        order = tf.argsort(1 - redo, stable=True)  # flagged boxes first
        boxes = tf.concat([boxes, tf.zeros([1, 4])], 0)
        box_area = tf.concat([box_area, [0.0]], 0)
        best_iou = tf.concat([best_iou, [0.0]], 0)
        best_anchor = tf.concat([best_anchor, [0]], 0)
        anchors = [self.anchors[:, i] for i in range(4)]
        rank = (num - np.arange(num)).astype(np.float32)

        def body(i, best_iou, best_anchor):
            j = order[i]
            box = boxes[j]
            height = tf.maximum(tf.minimum(anchors[2], box[2])
                                - tf.maximum(anchors[0], box[0]), 0.0)
            width = tf.maximum(tf.minimum(anchors[3], box[3])
                               - tf.maximum(anchors[1], box[1]), 0.0)
            inter = height * width
            iou = tf.math.divide_no_nan(inter, (self.area + box_area[j]) - inter)
            value = tf.reduce_max(iou)
            anchor = num - tf.cast(
                tf.reduce_max(tf.where(iou == value, rank, 0.0)), tf.int32)
            return (i + 1,
                    tf.tensor_scatter_nd_update(best_iou, [[j]], [value]),
                    tf.tensor_scatter_nd_update(best_anchor, [[j]], [anchor]))

        _, best_iou, best_anchor = tf.while_loop(
            lambda i, *_: i < count, body, (0, best_iou, best_anchor))
        return best_iou[:-1], best_anchor[:-1]
