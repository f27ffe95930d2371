"""train.py end to end in subprocesses, on a tiny copy of the demo config.

One run carries several checks, because building and tracing the detector
dominates the cost on a CPU: two replicas (MirroredStrategy over two logical
CPU devices) in mixed_float16, killed with SIGKILL after its first
checkpoint and restarted by the same command, which must resume at the saved
step; its model dir then serves the TensorBoard, --mode=eval and
incompatible-resume checks.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from effdet_tf.data import synthetic

# End to end in subprocesses: the fast loop (-m "not slow") leaves it out.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}

# Two logical CPU devices must exist before TensorFlow initialises them.
TWO_CPUS = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.argv = ["train.py"] + sys.argv[1:]
sys.path.insert(0, {repo!r})
import train
train.run()
"""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from effdet_tf.data import synthetic

    root = tmp_path_factory.mktemp("demo_data")
    return synthetic.make_demo_datasets(root, seed=1, num_train=16, num_val=8, image_size=96)


def tiny_flags(data, model_dir, *extra):
    return [
        f"--dataset=appliance={data['appliance']}", f"--dataset=food={data['food']}",
        f"--model_dir={model_dir}", "--image_size=128", "--width_multiplier=0.125",
        "--batch_size=2", "--eval_batch_size=8", "--optimizer=adam", "--learning_rate=0.004",
        "--ema_momentum=0.9", "--mosaic_prob=0", "--mixup_prob=0", "--tensorboard_images=2",
        "--verbose=2", *extra,
    ]


def _run_two_cpus(args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", TWO_CPUS.format(repo=str(REPO)), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _backups(model_dir):
    folder = Path(model_dir) / "backup"
    return sorted(p.name for p in folder.glob("ckpt-*")) if folder.exists() else []


@pytest.fixture(scope="module")
def resumed_run(demo_data, tmp_path_factory):
    """Mirrored x2 + mixed_float16; SIGKILL after the first backup; restart."""
    model_dir = tmp_path_factory.mktemp("run") / "model"
    args = tiny_flags(demo_data, model_dir, "--strategy=mirrored", "--precision=mixed_float16",
                      "--epochs=2", "--steps_per_epoch=2", "--checkpoint_every_steps=2", "--eval_every_epochs=2")
    first = _run_two_cpus(args)
    deadline = time.time() + 600
    while not _backups(model_dir) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first_log = first.communicate()[0]
    saved = _backups(model_dir)
    assert saved, "no backup before the kill:\n" + first_log[-3000:]
    saved_step = int(saved[-1].split("-")[1])
    second = _run_two_cpus(args)
    log = second.communicate(timeout=900)[0]
    assert second.returncode == 0, log[-5000:]
    return {"model_dir": model_dir, "saved_step": saved_step, "log": log, "first_log": first_log, "args": args}


def test_killed_run_resumes_at_saved_step(resumed_run):
    log = resumed_run["log"]
    match = re.search(r"Resuming at step (\d+)", log)
    assert match, log[-3000:]
    assert int(match.group(1)) == resumed_run["saved_step"] < 4
    assert "2 replica(s)" in log
    # Finished the 4 steps: last backup at step 4, best/last EMA weights.
    assert _backups(resumed_run["model_dir"])[-1] == "ckpt-0000000004"
    for name in ("config.json", "last.weights.h5", "best.weights.h5", "best.json"):
        assert (resumed_run["model_dir"] / name).exists(), name


def test_mixed_float16_losses_are_finite(resumed_run):
    losses = re.findall(r"(\w+_loss|loss): ([-+\w.]+)", resumed_run["log"])
    assert {"appliance_cls_loss", "food_box_loss", "loss"} <= {k for k, _ in losses}
    assert all(np.isfinite(float(v)) for _, v in losses), losses


def test_config_json_is_the_resolved_config(resumed_run):
    from effdet_tf import checkpoint

    config = checkpoint.read_config(str(resumed_run["model_dir"]))
    assert config.train.precision == "mixed_float16"
    assert config.heads == {"appliance": 5, "food": 10}
    assert [c.id for c in config.data.dataset("appliance").classes] == [78, 79, 80, 81, 82]
    raw = json.loads((resumed_run["model_dir"] / "config.json").read_text())
    assert raw["detector_kwargs"]["image_size"] == 128
    assert raw["label_maps"]["food"]["classes"][0]["id"] == config.data.dataset("food").classes[0].id
    # The converted data went to the model dir's cache, not the source.
    assert str(resumed_run["model_dir"]) in config.data.datasets[0].tfrecord_dir


def test_tensorboard_holds_the_tags(resumed_run):
    from tensorboard.backend.event_processing import event_accumulator

    def tags(folder):
        acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.TENSORS: 0})
        acc.Reload()
        return set(acc.Tags()["tensors"])

    model_dir = resumed_run["model_dir"]
    train = tags(model_dir / "train")
    for head in ("appliance", "food"):
        for part in ("cls_loss", "box_loss"):
            assert f"epoch_{head}_{part}" in train, sorted(train)
    assert {"epoch_loss", "learning_rate", "loss_scale", "images_per_second"} <= train, sorted(train)
    evals = tags(model_dir / "eval")
    for head in ("appliance", "food"):
        for metric in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"):
            assert f"{head}/{metric}" in evals, sorted(evals)
        assert f"{head}/detections" in evals
        assert any(t.startswith(f"{head}/per_class_AP/") for t in evals), sorted(evals)
        assert any(t.startswith(f"{head}/per_class_AP50/") for t in evals), sorted(evals)


def test_eval_mode_gives_coco_metrics(resumed_run):
    proc = subprocess.run([sys.executable, "train.py", *resumed_run["args"], "--mode=eval", "--strategy=one_device"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"appliance: AP [\d.]+ AP50 [\d.]+", proc.stderr), proc.stderr[-2000:]
    assert re.search(r"food: AP [\d.]+ AP50 [\d.]+", proc.stderr)
    # The per-class table of each dataset, one row per demo class.
    for head, classes in synthetic.DATASETS.items():
        table = proc.stdout.split(f"{head}: per class")[1].splitlines()[1:]
        assert table[0].split() == ["class", "id", "boxes", "AP", "AP50"], proc.stdout[-2000:]
        assert [row.split()[:2] for row in table[1:1 + len(classes)]] == [[n, str(i)] for i, n, *_ in classes]
    # Written at training start: the demo's two datasets share no class name.
    audit = json.loads((resumed_run["model_dir"] / "label_audit.json").read_text())
    assert audit == {"shared": [], "within_dataset": []}


def test_a_dataset_added_with_the_rest_frozen_leaves_the_old_heads_bit_identical(resumed_run, demo_data, tmp_path):
    """--init_from the two-dataset run, a third head (the food images under
    another name), trunk and old heads frozen and given no data: the old
    heads' outputs are the old model's, bit for bit, and the model dir's
    label maps (what export ships) hold all three."""
    from effdet_tf import checkpoint, compat

    model_dir = tmp_path / "grown"
    args = [a for a in tiny_flags(demo_data, model_dir) if not a.startswith("--dataset=")]
    args += [f"--dataset=snacks={demo_data['food']}", f"--init_from={resumed_run['model_dir']}",
             "--freeze=trunk,heads:appliance,food", "--epochs=1", "--steps_per_epoch=2",
             "--checkpoint_every_steps=2", "--strategy=one_device", "--precision=float32",
             "--precise_bn_batches=2"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trunk and heads appliance, food loaded; fresh heads: snacks" in proc.stderr
    old, _ = checkpoint.load_detector(str(resumed_run["model_dir"]), which="best")
    new, config = checkpoint.load_detector(str(model_dir), which="best")
    assert config.head_names == ("appliance", "food", "snacks")
    assert [d.trains for d in config.data.datasets] == [False, False, True]
    # The frozen trunk's and heads' statistics are not recomputed (the old
    # heads are checked bit for bit below): only the snacks head's are.
    refreshed = re.findall(r"BatchNorm statistics of (\d+) layers recomputed from 2 training batches", proc.stderr)
    snacks_bn = [layer for net in (new.class_nets["snacks"], new.box_nets["snacks"]) for layer in compat.sublayers(net)
                 if isinstance(layer, keras.layers.BatchNormalization)]
    assert refreshed and {int(n) for n in refreshed} == {len(snacks_bn)}, (refreshed, len(snacks_bn))
    images = tf.constant(np.random.default_rng(3).uniform(0, 255, [3, 128, 128, 3]), tf.float32)
    before, after = old(images, training=False), new(images, training=False)
    for head in ("appliance", "food"):
        for key in ("cls_logits", "box_deltas"):
            np.testing.assert_array_equal(after[head][key].numpy(), before[head][key].numpy(), err_msg=head)
    # Evaluated on all three: the carried heads on their earlier val splits.
    assert set(json.loads((model_dir / "best.json").read_text())["metrics"]) == {"appliance", "food", "snacks"}
    # export_lib writes config.label_maps() as the SavedModel's label map
    # (export_test checks that file against the config).
    maps = config.label_maps()
    assert list(maps) == ["appliance", "food", "snacks"]
    old_food = checkpoint.read_config(str(resumed_run["model_dir"])).label_maps()["food"]["classes"]
    assert maps["snacks"]["classes"] == maps["food"]["classes"] == old_food
    # snacks and food share every class name: the label audit says so.
    audit = json.loads((model_dir / "label_audit.json").read_text())
    assert len(audit["shared"]) == len(synthetic.FOOD_CLASSES)
    assert {m["dataset"] for m in audit["shared"][0]["classes"]} == {"food", "snacks"}


def test_precise_bn_changes_the_saved_statistics_and_nothing_else(demo_data, tmp_path):
    """Two runs with the same seed under MirroredStrategy, with and without
    --precise_bn_batches: the saved EMA weights are the same; the moving
    statistics differ, and the evaluation saw the recomputed ones (the run's
    best.json holds the metrics of the weights in best.weights.h5)."""
    from effdet_tf import checkpoint

    common = ["--epochs=2", "--steps_per_epoch=2", "--checkpoint_every_steps=2", "--strategy=mirrored",
              "--precision=float32", "--seed=5"]
    dirs = {}
    for name, extra in (("plain", []), ("precise", ["--precise_bn_batches=3"])):
        dirs[name] = tmp_path / name
        proc = subprocess.run([sys.executable, "train.py", *tiny_flags(demo_data, dirs[name], *common, *extra)],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
        # Once at the evaluation of step 2 and once at the last one (step 4).
        assert proc.stderr.count("recomputed from 3 training batches") == (2 if extra else 0), proc.stderr[-3000:]
    plain, _ = checkpoint.load_detector(str(dirs["plain"]), which="last")
    precise, _ = checkpoint.load_detector(str(dirs["precise"]), which="last")
    for a, b in zip(plain.trainable_variables, precise.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    moved = [a.path for a, b in zip(plain.non_trainable_variables, precise.non_trainable_variables)
             if "moving_" in a.path and not np.allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)]
    assert len(moved) > 0.9 * sum("moving_" in v.path for v in plain.non_trainable_variables), moved
    metrics = json.loads((dirs["precise"] / "best.json").read_text())["metrics"]
    images = tf.constant(np.random.default_rng(4).uniform(0, 255, [2, 128, 128, 3]), tf.float32)
    best, _ = checkpoint.load_detector(str(dirs["precise"]), which="best")
    assert set(metrics) == {"appliance", "food"}
    assert not np.allclose(best(images)["food"]["cls_logits"].numpy(), plain(images)["food"]["cls_logits"].numpy())


def test_incompatible_resume_is_refused(resumed_run, demo_data):
    args = [a for a in resumed_run["args"] if not a.startswith("--image_size")] + ["--image_size=256"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert "--image_size=128 in the model dir, --image_size=256 now" in proc.stderr, proc.stderr[-2000:]
    assert "--fresh_start" in proc.stderr
    one_dataset = [a for a in resumed_run["args"] if not a.startswith("--dataset=food")]
    proc = subprocess.run([sys.executable, "train.py", *one_dataset], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "datasets ['appliance', 'food'] in the model dir" in proc.stderr


# One BatchNorm layer on two logical CPUs: replica 0 sees only zeros,
# replica 1 only tens (momentum 0: the moving stats are this batch's).
SYNC_BN = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from effdet_tf import train_lib
from effdet_tf.modeling.layers import FusedBatchNormalization
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    inputs = keras.Input((4, 4, 1))
    bn = FusedBatchNormalization(momentum=0.0)
    model = keras.Model(inputs, bn(inputs))
    if sys.argv[1] == "sync":
        train_lib.set_sync_batchnorm(model)
x = np.concatenate([np.zeros((2, 4, 4, 1)), np.full((2, 4, 4, 1), 10.0)]).astype("float32")
dist = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(4))
step = tf.function(lambda batch: strategy.run(lambda b: model(b, training=True), args=(batch,)))
for batch in dist:
    out = step(batch)
print(json.dumps({"mean": float(bn.moving_mean.numpy()[0]), "var": float(bn.moving_variance.numpy()[0]),
                  "out": [float(tf.reduce_mean(v)) for v in strategy.experimental_local_results(out)]}))
"""


@pytest.mark.parametrize("mode", ["sync", "local"])
def test_sync_batchnorm_uses_the_global_batch(mode):
    done = subprocess.run([sys.executable, "-c", SYNC_BN, mode], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    if mode == "sync":
        # Statistics of the whole global batch: half zeros, half tens.
        np.testing.assert_allclose([stats["mean"], stats["var"]], [5.0, 25.0], rtol=1e-5)
        np.testing.assert_allclose(stats["out"], [-1.0, 1.0], atol=1e-3)
    else:
        # Each replica normalises its own constant half to zero.
        np.testing.assert_allclose(stats["out"], [0.0, 0.0], atol=1e-6)
