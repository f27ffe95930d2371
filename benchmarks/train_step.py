"""Training-step throughput of the detector, with same-run baselines.

    python benchmarks/train_step.py                      # batch 8, 512 px, 5 repeats
    python benchmarks/train_step.py --batch 2 --image_size 256 --repeats 3

Measures, interleaved in one process so that machine load hits every
number alike (medians over --repeats):

  conv_peak  GFLOP/s of one large 3x3 conv2d (forward): the machine's
             practical peak for this kind of work.
  backbone   our CSPDarknet53 alone: forward + backward + SGD update.
  peer       keras-hub's CSPNetBackbone configured as timm's cspdarknet53
             with Mish (the same architecture and parameter count), same
             step and loss.
  detector   the full Detector(heads={"appliance": 5, "food": 10}): half the
             batch per dataset, real focal + Huber loss, SGD update.

FLOPs are counted by TensorFlow's profiler on the frozen forward graph at
batch 1 (2 FLOPs per multiply-add); a training step is counted as 3x the
forward (forward, gradient w.r.t. activations, gradient w.r.t. weights), the
usual convention. "% of peak" = achieved step GFLOP/s / conv_peak GFLOP/s.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from effdet_tf.modeling.backbone import CSPDarknet53  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image_size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after tracing")
    p.add_argument(
        "--parts",
        default="conv,backbone,peer,detector",
        help="comma list of conv,backbone,peer,detector",
    )
    p.add_argument("--jit_compile", action="store_true", help="XLA-compile the steps")
    p.add_argument("--width_multiplier", type=float, default=1.0)
    p.add_argument("--depth_multiplier", type=float, default=1.0)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


# --------------------------------------------------------------------------
# FLOPs


def forward_flops(model_fn, input_spec):
    """FLOPs of one forward pass, from TF's profiler on the frozen graph."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2_as_graph,
    )

    concrete = tf.function(model_fn).get_concrete_function(input_spec)
    frozen, _ = convert_variables_to_constants_v2_as_graph(concrete)
    opts = (
        tf.compat.v1.profiler.ProfileOptionBuilder(
            tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        )
        .with_empty_output()
        .build()
    )
    info = tf.compat.v1.profiler.profile(graph=frozen.graph, options=opts)
    return int(info.total_float_ops)


# --------------------------------------------------------------------------
# Steps: each returns a zero-argument callable that runs one step and blocks.


def conv_peak_step(jit_compile):
    """One 3x3 conv, 256 -> 256 channels on 8 x 64 x 64: 38.7 GFLOP."""
    shape, kernel = (8, 64, 64, 256), (3, 3, 256, 256)
    x = tf.random.normal(shape)
    w = tf.Variable(tf.random.normal(kernel, stddev=0.02))
    flops = 2 * np.prod(shape) * np.prod(kernel[:3])

    @tf.function(jit_compile=jit_compile)
    def step(x):
        return tf.reduce_sum(tf.nn.conv2d(x, w, 1, "SAME"))

    return (lambda: step(x).numpy()), flops


def _feature_step(model, images, jit_compile):
    """Forward + backward + SGD on sum of per-level output means."""
    optimizer = keras.optimizers.SGD(1e-6)
    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            if isinstance(outputs, dict):
                outputs = list(outputs.values())
            loss = tf.add_n([tf.reduce_mean(o) for o in outputs])
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return lambda: step(images).numpy()


def build_peer(image_size):
    """keras-hub CSPNetBackbone as timm's cspdarknet53 (keras_hub
    utils/timm/convert_cspnet.py settings), Mish, outputs at strides 8/16/32."""
    import keras_hub

    peer = keras_hub.models.CSPNetBackbone(
        stem_filters=32,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_depth=[1, 2, 8, 8, 4],
        stackwise_num_filters=[64, 128, 256, 512, 1024],
        bottle_ratio=(0.5, 1.0),
        block_ratio=(1.0, 0.5),
        expand_ratio=(2.0, 1.0),
        stem_padding="same",
        stem_pooling=None,
        stage_type="csp",
        groups=1,
        block_type="dark_block",
        down_growth=True,
        stackwise_strides=[2, 2, 2, 2, 2],
        avg_down=False,
        cross_linear=False,
        activation="mish",
        image_shape=(image_size, image_size, 3),
    )
    # keras-hub keys stage k's output "P{k+2}" although its stem has stride
    # 1; stages 2-4 (0-based) are the stride 8/16/32 maps.
    feats = [peer.pyramid_outputs[k] for k in ("P4", "P5", "P6")]
    return keras.Model(peer.inputs, feats, name="peer"), peer.count_params()


def detector_step(model, batch, image_size, jit_compile):
    """A real multi-dataset step: half the batch per head, focal+Huber loss."""
    rng = np.random.default_rng(0)
    n = int(model.anchors.boxes.shape[0])
    names = model.head_names
    sizes = [batch // len(names) + (i < batch % len(names)) for i in range(len(names))]
    images, targets = {}, {}
    for name, b in zip(names, sizes):
        images[name] = tf.constant(
            rng.uniform(0, 255, (b, image_size, image_size, 3)).astype("float32")
        )
        cls = rng.integers(-1, model.heads[name], (b, n)).astype("int32")
        cls[rng.random((b, n)) < 0.95] = -1  # mostly background, like real data
        targets[name] = {
            "cls_targets": tf.constant(cls),
            "box_targets": tf.constant(rng.normal(0, 0.5, (b, n, 4)).astype("float32")),
        }
    optimizer = keras.optimizers.SGD(1e-6)
    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return lambda: step(images, targets).numpy()


# --------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    b, s = args.batch, args.image_size
    rng = np.random.default_rng(0)
    images01 = tf.constant(rng.random((b, s, s, 3)).astype("float32"))
    spec01 = tf.TensorSpec((1, s, s, 3), tf.float32)

    steps, info = {}, {}
    print(
        f"tf {tf.__version__}, keras {keras.__version__}, "
        f"{os.cpu_count()} CPUs, batch {b}, {s}x{s}, float32, "
        f"jit_compile={args.jit_compile}",
        flush=True,
    )
    if "conv" in parts:
        steps["conv_peak"], info["conv_peak_flops"] = conv_peak_step(args.jit_compile)
    if "backbone" in parts:
        ours = CSPDarknet53(
            args.width_multiplier, args.depth_multiplier, image_shape=(s, s, 3)
        )
        info["backbone_params"] = ours.count_params()
        info["backbone_fwd_flops"] = forward_flops(lambda x: ours(x), spec01)
        steps["backbone"] = _feature_step(ours, images01, args.jit_compile)
    if "peer" in parts:
        peer, info["peer_params"] = build_peer(s)
        info["peer_fwd_flops"] = forward_flops(lambda x: peer(x), spec01)
        steps["peer"] = _feature_step(peer, images01, args.jit_compile)
    if "detector" in parts:
        from effdet_tf.modeling.detector import Detector

        det = Detector(
            heads={"appliance": 5, "food": 10},
            image_size=s,
            width_multiplier=args.width_multiplier,
            depth_multiplier=args.depth_multiplier,
        )
        info["detector_params"] = det.count_params()
        # Every head on every image is what one image costs at inference;
        # the training step runs each head on its own half only.
        info["detector_fwd_flops"] = forward_flops(
            lambda x: det.feature_extractor(x), spec01
        )
        head_flops = forward_flops(
            lambda x: det(x), spec01
        ) - info["detector_fwd_flops"]
        info["detector_step_flops_per_image"] = 3 * (
            info["detector_fwd_flops"] + head_flops / len(det.head_names)
        )
        info["detector_fwd_flops_all_heads"] = info["detector_fwd_flops"] + head_flops
        steps["detector"] = detector_step(det, b, s, args.jit_compile)

    # Trace and warm up every step, then time them interleaved.
    for name, run in steps.items():
        t0 = time.perf_counter()
        run()
        print(f"  {name}: first call (trace) {time.perf_counter() - t0:.1f}s", flush=True)
        for _ in range(args.warmup):
            run()
    # Wall time is what counts; process CPU time (all threads) is reported
    # too because it is much less sensitive to other jobs sharing the CPU.
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for r in range(args.repeats):
        for name, run in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
        print(f"  repeat {r + 1}/{args.repeats}: "
              + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    results = {
        "args": vars(args),
        "median_seconds": med,
        "median_cpu_seconds": med_cpu,
        "times": times,
        "cpu_times": cpu_times,
        **info,
    }
    peak = None
    if "conv_peak" in med:
        peak = info["conv_peak_flops"] / med["conv_peak"] / 1e9
        results["conv_peak_gflops"] = peak
    rows = []
    for name in ("backbone", "peer", "detector"):
        if name not in med:
            continue
        per_image = (
            info["detector_step_flops_per_image"]
            if name == "detector"
            else 3 * info[f"{name}_fwd_flops"]
        )
        gflops = per_image * b / med[name] / 1e9
        results[f"{name}_images_per_s"] = b / med[name]
        results[f"{name}_step_gflops"] = gflops
        if peak:
            results[f"{name}_pct_of_peak"] = 100 * gflops / peak
        rows.append((name, med[name], b / med[name], gflops))
    if "backbone" in med and "peer" in med:
        results["backbone_speed_vs_peer"] = med["peer"] / med["backbone"]
        results["backbone_cpu_vs_peer"] = med_cpu["peer"] / med_cpu["backbone"]

    print()
    if peak:
        print(f"conv peak: {peak:.1f} GFLOP/s (median {med['conv_peak']:.3f}s "
              f"for {info['conv_peak_flops'] / 1e9:.1f} GFLOP)")
    for key in ("backbone", "peer", "detector"):
        if f"{key}_fwd_flops" in info:
            extra = ""
            if key == "detector":
                extra = (f" (+heads: {info['detector_fwd_flops_all_heads'] / 1e9:.2f} "
                         f"all heads, train step {info['detector_step_flops_per_image'] / 1e9:.2f})")
            print(f"{key} forward: {info[f'{key}_fwd_flops'] / 1e9:.2f} GFLOP/image{extra}")
    print(f"{'step':<10}{'median s':>10}{'cpu s':>8}{'images/s':>10}{'GFLOP/s':>10}{'% peak':>8}")
    for name, sec, ips, gf in rows:
        pct = f"{100 * gf / peak:.0f}%" if peak else "-"
        print(f"{name:<10}{sec:>10.3f}{med_cpu[name]:>8.2f}{ips:>10.2f}{gf:>10.1f}{pct:>8}")
    if "backbone_speed_vs_peer" in results:
        print(f"backbone speed / peer speed: {results['backbone_speed_vs_peer']:.2f}x wall, "
              f"{results['backbone_cpu_vs_peer']:.2f}x CPU time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
