"""Load Darknet `.weights` files into `CSPDarknet53`.

Works with AlexeyAB/darknet's `yolov4.conv.137` (the YOLOv4 backbone plus
part of its neck) and `csdarknet53-omega_final.weights` (the ImageNet
classifier the backbone was pre-trained as).

File layout (darknet src/parser.c, `load_weights_upto`):

    int32 major, int32 minor, int32 revision
    seen: int64 if major * 10 + minor >= 2 and major < 1000 and minor < 1000,
          else int32
    then for each [convolutional] layer of the cfg, in file order:
        batch_normalize=1: beta[n], gamma[n], rolling_mean[n], rolling_var[n]
        (else bias[n])
        kernel[n, c, size, size]           all float32, little-endian

Every backbone conv has batch_normalize=1. Layers without weights (route,
shortcut) take no bytes. The backbone's convs come first in both files, in
the cfg order that `CSPDarknet53.darknet_layers()` reproduces (yolov4.cfg
layers 0-104; per stage: downsample, `part2` 1x1 conv whose output is
routed to the concat, `[route] layers=-2`, `part1` 1x1 conv, the residual
blocks, the post-block 1x1 conv, `[route] layers=-1,-k` i.e. concat
[post, part2], transition 1x1 conv). Only those convs are read: whatever
follows (yolov4's neck, the omega classifier) is reported as left unread.
"""

import logging

import numpy as np

HEADER_INT32S = 3


class DarknetWeightsError(ValueError):
    """The file is truncated or is not a Darknet weights file."""


def darknet_cfg_indices(layer_names):
    """Index in the Darknet cfg (counting route/shortcut layers) of each conv.

    For the full backbone these are yolov4.cfg's layer numbers (stem 0,
    stage 5 transition 104); they make error messages checkable against
    the cfg.
    """
    indices, index = [], 0
    for name in layer_names:
        indices.append(index)
        index += 1
        # A `[route] layers=-2` follows part2, a `[shortcut]` each block,
        # a `[route] layers=-1,-k` the post-block conv.
        if name.endswith(("_part2", "_conv2", "_post")):
            index += 1
    return indices


def _read_header(f, path):
    raw = f.read(4 * HEADER_INT32S)
    if len(raw) < 4 * HEADER_INT32S:
        raise DarknetWeightsError(
            f"{path}: header: expected {4 * HEADER_INT32S} bytes "
            f"(major, minor, revision), found {len(raw)}"
        )
    major, minor, revision = (int(v) for v in np.frombuffer(raw, "<i4"))
    if not all(0 <= v < 1000 for v in (major, minor, revision)):
        raise DarknetWeightsError(
            f"{path}: header (major={major}, minor={minor}, "
            f"revision={revision}) cannot be a Darknet weights file "
            "(expected small non-negative version numbers, e.g. 0.2.5)"
        )
    wide_seen = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    seen_bytes = 8 if wide_seen else 4
    raw = f.read(seen_bytes)
    if len(raw) < seen_bytes:
        raise DarknetWeightsError(
            f"{path}: header: expected {seen_bytes} bytes for `seen` "
            f"(version {major}.{minor}.{revision}), found {len(raw)}"
        )
    seen = int(np.frombuffer(raw, "<i8" if wide_seen else "<i4")[0])
    return major, minor, revision, seen


def load_darknet_weights(backbone, path):
    """Load a Darknet `.weights` file into `backbone` (a `CSPDarknet53`).

    Args:
        backbone: `CSPDarknet53`; its `darknet_layers()` are filled in order.
        path: path to the `.weights` file.

    Returns:
        dict report: "version" (str), "seen" (images seen in training),
        "layers_loaded", "values_loaded", "values_left_unread" (float32
        values after the backbone's convs: normal, the rest of the network
        the file was saved from) and "trailing_bytes" (bytes after the last
        whole float32, normally 0).

    Raises:
        DarknetWeightsError: bad header, or the file ends before the
        backbone's last conv (the message names the layer and gives the
        number of values expected and found).
    """
    with open(path, "rb") as f:
        major, minor, revision, seen = _read_header(f, path)
        payload = f.read()
    trailing = len(payload) % 4
    values = np.frombuffer(payload[: len(payload) - trailing], "<f4")

    layers = backbone.darknet_layers()
    cfg_indices = darknet_cfg_indices([l.name for l in layers])
    offset = 0
    for number, (layer, cfg_index) in enumerate(zip(layers, cfg_indices)):
        kernel_shape = tuple(layer.conv.kernel.shape)  # [h, w, in, out]
        h, w, c_in, n = kernel_shape
        expected = 4 * n + n * c_in * h * w
        found = len(values) - offset
        if found < expected:
            raise DarknetWeightsError(
                f"{path}: truncated at conv {number + 1} of {len(layers)} "
                f"({layer.name}, Darknet cfg layer {cfg_index}, "
                f"{n} filters {h}x{w} over {c_in} channels): expected "
                f"{expected} float32 values, found {found}"
            )
        beta, gamma, mean, var = values[offset : offset + 4 * n].reshape(4, n)
        offset += 4 * n
        kernel = values[offset : offset + n * c_in * h * w]
        offset += kernel.size
        if np.any(var < 0) or not np.all(np.isfinite(var)):
            raise DarknetWeightsError(
                f"{path}: conv {number + 1} ({layer.name}, Darknet cfg layer "
                f"{cfg_index}) has negative or non-finite BatchNorm variance: "
                "the file does not match this backbone's layout"
            )
        # Darknet stores [out, in, h, w]; Keras wants [h, w, in, out].
        kernel = kernel.reshape(n, c_in, h, w).transpose(2, 3, 1, 0)
        layer.conv.kernel.assign(kernel)
        layer.bn.gamma.assign(gamma)
        layer.bn.beta.assign(beta)
        layer.bn.moving_mean.assign(mean)
        layer.bn.moving_variance.assign(var)

    report = {
        "path": str(path),
        "version": f"{major}.{minor}.{revision}",
        "seen": seen,
        "layers_loaded": len(layers),
        "values_loaded": int(offset),
        "values_left_unread": int(len(values) - offset),
        "trailing_bytes": int(trailing),
    }
    logging.info(
        "Loaded %d Darknet convs (%d values) from %s (version %s, seen %d); "
        "%d values after them left unread (the rest of that network).",
        len(layers),
        offset,
        path,
        report["version"],
        seen,
        report["values_left_unread"],
    )
    return report
