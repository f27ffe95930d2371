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
  recipe     the step model.fit runs for a flagfile (--flagfile, default
             configs/cpu_real.flags): the model, batch, image size and
             optimizer (Adam, EMA, clipping) that train.py builds from it,
             on one dataset of --recipe_classes classes, called through
             Keras's own train_function on a fixed batch (what fit calls
             once per step, without the input pipeline and callbacks).
             --recipe_compare=FLAGS adds a second row with FLAGS on top
             (e.g. "--optimizer=sgd --ema_momentum=0": the optimizer's cost).

With --profile DIR the recipe's step is also traced by tf.profiler
(DIR holds the trace for TensorBoard's profile plugin) and its op time is
summed by op type, by part of the step (forward, backward, optimizer) and
by block of the model (backbone stem and stages, BiFPN, heads).

FLOPs are counted by TensorFlow's profiler on the frozen forward graph at
batch 1 (2 FLOPs per multiply-add); a training step is counted as 3x the
forward (forward, gradient w.r.t. activations, gradient w.r.t. weights), the
usual convention. "% of peak" = achieved step GFLOP/s / conv_peak GFLOP/s.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from effdet_tf.modeling.backbone import CSPDarknet53  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image_size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after tracing")
    p.add_argument(
        "--parts",
        default="conv,backbone,peer,detector",
        help="comma list of conv,backbone,peer,detector,recipe",
    )
    p.add_argument("--jit_compile", action="store_true", help="XLA-compile the steps")
    p.add_argument("--width_multiplier", type=float, default=1.0)
    p.add_argument("--depth_multiplier", type=float, default=1.0)
    p.add_argument("--flagfile", default=os.path.join(REPO, "configs", "cpu_real.flags"),
                   help="the recipe row's flagfile")
    p.add_argument("--recipe_classes", type=int, default=3, help="classes of the recipe's one dataset")
    p.add_argument("--recipe_compare", default="", help="flags of a second recipe row (space separated)")
    p.add_argument("--profile", default=None, help="trace the recipe's step into this directory")
    p.add_argument("--profile_steps", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


# --------------------------------------------------------------------------
# FLOPs


def forward_flops(model_fn, input_spec, by_block=False):
    """FLOPs of one forward pass, from TF's profiler on the frozen graph
    (with by_block, a dict of them by `_block_of_step`)."""
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
    if by_block:
        import collections

        blocks = collections.Counter()
        for node in info.children:
            blocks[_block_of_step("/" + node.name)] += node.total_float_ops
        return dict(blocks)
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


def synthetic_batch(model, sizes, image_size, positive):
    """({name: images}, {name: targets}) with `sizes[name]` random images
    per head and a `positive` fraction of anchors assigned a class (the
    rest background, like real data)."""
    rng = np.random.default_rng(0)
    n = int(model.anchors.boxes.shape[0])
    images, targets = {}, {}
    for name, b in sizes.items():
        images[name] = tf.constant(rng.uniform(0, 255, (b, image_size, image_size, 3)).astype("float32"))
        cls = rng.integers(0, model.heads[name], (b, n)).astype("int32")
        cls[rng.random((b, n)) >= positive] = -1
        targets[name] = {
            "cls_targets": tf.constant(cls),
            "box_targets": tf.constant(rng.normal(0, 0.5, (b, n, 4)).astype("float32")),
        }
    return images, targets


def detector_step(model, batch, image_size, jit_compile):
    """A real multi-dataset step: half the batch per head, focal+Huber loss."""
    names = model.head_names
    sizes = {name: batch // len(names) + (i < batch % len(names)) for i, name in enumerate(names)}
    images, targets = synthetic_batch(model, sizes, image_size, positive=0.05)
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


def recipe_model(flagfile, classes, extra_flags=()):
    """(config, model) as train.py builds them from `flagfile`, for one
    dataset of `classes` classes (no data is read: the dataset's path is
    an empty temporary directory)."""
    import dataclasses
    import shutil
    import tempfile

    from effdet_tf import flags as flags_lib
    from effdet_tf import train_lib
    from effdet_tf.config import ClassEntry

    tmp = tempfile.mkdtemp(prefix="train_step_")
    try:
        config = flags_lib.config_from_argv(
            ["train_step", f"--flagfile={flagfile}", f"--dataset=real={tmp}", f"--model_dir={tmp}", *extra_flags])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the paths are only checked for existence
    dataset = dataclasses.replace(
        config.data.datasets[0], classes=tuple(ClassEntry(i, i + 1, f"class{i}") for i in range(classes)),
        num_train_examples=160)
    config = config.with_datasets([dataset])
    keras.mixed_precision.set_global_policy(config.train.precision)
    strategy = train_lib.make_strategy(config.train.strategy)
    model = train_lib.build_model(config, strategy, steps_per_epoch=20)
    keras.mixed_precision.set_global_policy("float32")
    return config, strategy, model


def recipe_step(config, strategy, model):
    """One step of Keras's train_function (what model.fit calls per step)
    on a fixed batch of the config's size, through the strategy's
    distributed input as in train.py."""
    sizes = {d.name: d.batch_size for d in config.data.training_datasets}
    images, targets = synthetic_batch(model, sizes, config.model.image_size, positive=0.01)
    batches = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((images, targets)).repeat()))
    model.make_train_function()
    train_function = model.train_function
    return lambda: float(train_function(batches)["loss"])


def detector_flops(det, image_size):
    """(forward FLOPs per image of the trunk and every head, training-step
    FLOPs per image: the trunk and its own dataset's head, 3x forward)."""
    spec = tf.TensorSpec((1, image_size, image_size, 3), tf.float32)
    trunk = forward_flops(lambda x: det.feature_extractor(x), spec)
    heads = forward_flops(lambda x: det(x), spec) - trunk
    return trunk + heads, 3 * (trunk + heads / len(det.head_names))


def _part_of_step(op_name):
    low = op_name.lower()
    if re.search(r"(^|/)recipe_[a-z_]+/", low):  # the name scope of optimization.recipe_class (recipe_adam, ...)
        return "optimizer's scope (Adam, clipping)"
    if "gradient_tape" in low:
        return "backward"
    if re.search(r"(^|/)detector[_\d]*/", low):  # Keras suffixes _1, _1_1, ... per model built
        return "forward"
    return "other (outside those scopes: loss, EMA update, L2)"


def _block_of_step(op_name):
    """The model block an op (forward or backward) belongs to: the
    backbone's stem or stage N, the BiFPN, the class or box heads; else
    "outside the model"."""
    match = re.search(r"/(stem|stage\d)[_/]|/(bifpn)[_\d]*/|_(class_net|box_net)[_\d]*/", op_name.lower())
    if not match:
        return "outside the model (loss, optimizer, EMA)"
    block = next(g for g in match.groups() if g)
    return {"class_net": "class heads", "box_net": "box heads", "bifpn": "BiFPN"}.get(block, "backbone " + block)


def summarise_profile(log_dir, steps):
    """Op time and op counts per step from the newest tf.profiler trace in
    `log_dir`, by op type and by part of the step. Times are the ops'
    durations on TF's inter-op threads (an op's intra-op work is inside
    its duration); per-op scheduling overhead is in none of them."""
    import collections
    import glob

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    by_type, by_part, by_block, counts = (collections.Counter() for _ in range(4))
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if "::" in name or ":" not in name:  # executor and thread-pool regions
                    continue
                op, op_type = name.rsplit(":", 1)
                ms = event.duration_ps / 1e9 / steps
                by_type[op_type.replace("_MklNative", "").replace("_Mkl", "")] += ms
                part = _part_of_step(op)
                by_part[part] += ms
                by_block[_block_of_step(op)] += ms
                counts[part] += 1 / steps
    return {"trace": path, "ms_per_step_by_op_type": dict(by_type.most_common()),
            "ms_per_step_by_part": dict(by_part.most_common()), "ops_per_step_by_part": dict(counts.most_common()),
            "ms_per_step_by_block": dict(by_block.most_common())}


def print_profile(summary, step_seconds):
    total = sum(summary["ms_per_step_by_part"].values())
    print(f"\nrecipe step profile ({summary['trace']}): {total:.0f} ms of op time per step "
          f"(a {1000 * step_seconds:.0f} ms step on {os.cpu_count()} cores)")
    print(f"{'part':<48}{'ms/step':>9}{'share':>7}{'ops/step':>10}")
    for part, ms in summary["ms_per_step_by_part"].items():
        print(f"{part:<48}{ms:>9.0f}{100 * ms / total:>6.1f}%{summary['ops_per_step_by_part'][part]:>10.0f}")
    flops = summary["forward_flops_by_block"]
    print(f"{'block (forward + backward)':<48}{'ms/step':>9}{'share':>7}{'FLOP share':>12}")
    for block, ms in summary["ms_per_step_by_block"].items():
        print(f"{block:<48}{ms:>9.0f}{100 * ms / total:>6.1f}%{100 * flops.get(block, 0) / sum(flops.values()):>11.1f}%")
    print(f"{'op type (top 15)':<48}{'ms/step':>9}{'share':>7}")
    for op_type, ms in list(summary["ms_per_step_by_op_type"].items())[:15]:
        print(f"{op_type:<48}{ms:>9.0f}{100 * ms / total:>6.1f}%")


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
        info["detector_fwd_flops_all_heads"], info["detector_step_flops_per_image"] = detector_flops(det, s)
        steps["detector"] = detector_step(det, b, s, args.jit_compile)
    recipes = {}
    if "recipe" in parts:
        recipes["recipe"] = recipe_model(args.flagfile, args.recipe_classes)
        if args.recipe_compare:
            recipes["recipe_alt"] = recipe_model(args.flagfile, args.recipe_classes, args.recipe_compare.split())
    for name, (config, strategy, model) in recipes.items():
        m, t = config.model, config.train
        label = {"recipe": "", "recipe_alt": " " + args.recipe_compare}
        info[f"{name}_setup"] = (f"{os.path.basename(args.flagfile)}{label[name]}: "
                                 f"{m.image_size} px, width {m.width_multiplier:g}, batch {config.data.images_per_step}, "
                                 f"{t.optimizer}, EMA {t.ema_momentum:g}, clip {t.global_clipnorm:g}, {t.precision}")
        info[f"{name}_batch"] = config.data.images_per_step
        info[f"{name}_params"] = model.count_params()
        info[f"{name}_fwd_flops"], info[f"{name}_step_flops_per_image"] = detector_flops(model, m.image_size)
        steps[name] = recipe_step(config, strategy, model)

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
    for name in ("backbone", "peer", "detector", "recipe", "recipe_alt"):
        if name not in med:
            continue
        per_image = info.get(f"{name}_step_flops_per_image", 3 * info.get(f"{name}_fwd_flops", 0))
        batch = info.get(f"{name}_batch", b)
        gflops = per_image * batch / med[name] / 1e9
        results[f"{name}_images_per_s"] = batch / med[name]
        results[f"{name}_step_gflops"] = gflops
        if peak:
            results[f"{name}_pct_of_peak"] = 100 * gflops / peak
        rows.append((name, med[name], batch / med[name], gflops))
    if "backbone" in med and "peer" in med:
        results["backbone_speed_vs_peer"] = med["peer"] / med["backbone"]
        results["backbone_cpu_vs_peer"] = med_cpu["peer"] / med_cpu["backbone"]

    print()
    if peak:
        print(f"conv peak: {peak:.1f} GFLOP/s (median {med['conv_peak']:.3f}s "
              f"for {info['conv_peak_flops'] / 1e9:.1f} GFLOP)")
    for key in ("backbone", "peer", "recipe", "recipe_alt"):
        if f"{key}_fwd_flops" in info:
            print(f"{key} forward: {info[f'{key}_fwd_flops'] / 1e9:.2f} GFLOP/image")
    if "detector_step_flops_per_image" in info:
        print(f"detector forward: {info['detector_fwd_flops_all_heads'] / 1e9:.2f} GFLOP/image with every head, "
              f"train step {info['detector_step_flops_per_image'] / 1e9:.2f} (each head on its own images)")
    for key in ("recipe", "recipe_alt"):
        if f"{key}_setup" in info:
            print(f"{key}: {info[f'{key}_setup']}")
    print(f"{'step':<10}{'median s':>10}{'cpu s':>8}{'images/s':>10}{'GFLOP/s':>10}{'% peak':>8}")
    for name, sec, ips, gf in rows:
        pct = f"{100 * gf / peak:.0f}%" if peak else "-"
        print(f"{name:<10}{sec:>10.3f}{med_cpu[name]:>8.2f}{ips:>10.2f}{gf:>10.1f}{pct:>8}")
    if "backbone_speed_vs_peer" in results:
        print(f"backbone speed / peer speed: {results['backbone_speed_vs_peer']:.2f}x wall, "
              f"{results['backbone_cpu_vs_peer']:.2f}x CPU time")
    if args.profile and "recipe" in steps:
        tf.profiler.experimental.start(args.profile)
        for _ in range(args.profile_steps):
            steps["recipe"]()
        tf.profiler.experimental.stop()
        results["recipe_profile"] = summarise_profile(args.profile, args.profile_steps)
        model = recipes["recipe"][2]
        size = recipes["recipe"][0].model.image_size
        results["recipe_profile"]["forward_flops_by_block"] = forward_flops(
            lambda x: model(x), tf.TensorSpec((1, size, size, 3), tf.float32), by_block=True)
        print_profile(results["recipe_profile"], med["recipe"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
