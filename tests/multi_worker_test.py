"""Two MultiWorkerMirroredStrategy workers on localhost (TF_CONFIG).

One run of a tiny config checks what several machines must do:
- each worker decodes only its own share of the training records (the
  decoder is wrapped to log the image ids it decodes, per process);
- the two workers end with identical weights, and with the weights of one
  process trained on the same global batch (augmentation and shuffling
  off, so both see the same images per step; the losses are normalised by
  the global batch's positives);
- only the chief runs the network over the evaluation images, each once,
  and its metrics are those of `--mode=eval` on the saved weights;
- started again, both resume at the saved step from the backup.

Identical up to float rounding: the all-reduced gradients agree to ~1e-8
relative on the two workers here (CPU collectives), so the weights are
compared with a tight tolerance, not bit for bit. Synchronised BatchNorm
keeps the moving statistics identical too (without it each worker's
statistics come from its own half of the batch). Against one process the
comparison is after one step: this tiny model at initialisation, with
BatchNorm over 4 images, amplifies rounding. Measured with these flags
(momentum, EMA and clipping off): two replicas against one process, 2e-4
apart on the stem kernel after one step, 9e-4 after two, 1.1e-2 after
three; one process with synchronised against plain BatchNorm, a change of
rounding only, 8.7e-3 after three. Later steps test the rounding, not the
code."""

import json
import re
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# End to end in subprocesses: the fast loop (-m "not slow") leaves it out.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# Runs train_lib like train.py does, then saves this process's weights and
# the ids of the records it decoded for training and for evaluation.
WORKER = """
import json, sys
import numpy as np
import tensorflow as tf
from effdet_tf import flags, train_lib
from effdet_tf.data import decoder

out = sys.argv[1]
decoded = {"train": [], "eval": []}
plain = decoder.decode_example

def logged(record, min_size=None):
    example = plain(record, min_size=min_size)
    kind = "eval" if min_size is None else "train"  # evaluation decodes full size
    log = tf.py_function(lambda i: decoded[kind].append(int(i)) or 0, [example["image_id"]], tf.int32)
    with tf.control_dependencies([log]):
        example["image"] = tf.identity(example["image"])
    return example

decoder.decode_example = logged
build_model = train_lib.build_model

def build_and_keep(*args, **kwargs):  # the initial weights, for the update
    model = build_model(*args, **kwargs)
    np.savez(out + "_init.npz", *model.get_weights())
    return model

train_lib.build_model = build_and_keep
config = flags.config_from_argv(["train.py"] + sys.argv[2:])
result = train_lib.run(config)
np.savez(out + ".npz", *result["train"]["model"].get_weights())
with open(out + ".json", "w") as f:
    json.dump({"decoded": decoded, "eval": result["train"]["eval"]}, f)
print("STEP", result["train"]["step"], "REPLICAS", result["train"]["replicas"])
"""


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run(out, args, tf_config=None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if tf_config:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, "-c", WORKER, str(out), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs):
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


def _norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))


def _train_ids(root):
    """The training images' ids in the json's order (the converter's)."""
    with open(root / "annotations" / "instances_train2017.json") as f:
        return [im["id"] for im in json.load(f)["images"]]


def test_two_workers_share_the_input_match_one_process_and_evaluate_once(tmp_path):
    from effdet_tf import checkpoint
    from effdet_tf.data import synthetic

    data = synthetic.make_demo_datasets(tmp_path / "data", seed=2, num_train=8, num_val=4, image_size=96)
    common = [f"--dataset=appliance={data['appliance']}", "--image_size=128", "--width_multiplier=0.125",
              "--batch_size=4", "--optimizer=sgd", "--learning_rate=0.05", "--ema_momentum=0.9",
              # Every image the same in both runs: no augmentation, no shuffle.
              "--mosaic_prob=0", "--mixup_prob=0", "--hsv_prob=0", "--flip_prob=0", "--scale_min=1",
              "--scale_max=1", "--translate=0", "--shuffle_buffer=1", "--cache_images=no",
              "--epochs=1", "--steps_per_epoch=1", "--checkpoint_every_steps=1", "--sync_batchnorm", "--verbose=2"]
    two = tmp_path / "two"
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs = [_run(tmp_path / f"w{i}", common + [f"--model_dir={two}", "--mode=train_and_eval",
                                                "--strategy=multi_worker"],
                  {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}) for i in range(2)]
    logs = _wait(procs)
    # The same step of 4 images in one process, from the shards the
    # workers read: each step holds the next two records of each shard.
    converted, = (two / "data_cache").glob("appliance-*")
    assert len(list(converted.glob("train-*.tfrecord"))) == 2  # a shard per worker
    one = _wait([_run(tmp_path / "one", [*common[1:], f"--dataset=appliance={converted}",
                                         f"--model_dir={tmp_path / 'one_model'}", "--mode=train",
                                         "--strategy=one_device"])])[0]
    assert "STEP 1 REPLICAS 1" in one, one[-3000:]
    for log in logs:
        assert "STEP 1 REPLICAS 2" in log, log[-3000:]

    # Each worker decoded only records of its own shard (image k of the
    # json is in shard k % 2), at least its 2 images of the step.
    runs = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    ids = _train_ids(data["appliance"])
    for i, r in enumerate(runs):
        seen = set(r["decoded"]["train"])
        assert len(seen) >= 2 and seen <= set(ids[i::2]), (i, seen, ids)

    # Identical weights on the two workers; the update of one process.
    w0, w1, w, init = (np.load(tmp_path / f"{n}.npz") for n in ("w0", "w1", "one", "one_init"))
    assert len(w0.files) == len(w1.files) == len(w.files) == len(init.files) > 100
    for key in w0.files:
        np.testing.assert_allclose(w0[key], w1[key], rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_array_equal(np.load(tmp_path / "w0_init.npz")[key], init[key], err_msg=key)
    update = [w[k].astype(np.float64) - init[k] for k in w.files]
    apart = [w0[k] - w[k] for k in w.files]
    # Rounding (module docstring); tests/optimization_test.py checks the
    # global positive count with a half that holds no object.
    assert _norm(apart) < 1e-2 * _norm(update), (_norm(apart), _norm(update))
    # Both workers logged the same (all-reduced) losses.
    final = [re.findall(r"1/1 - .*? - (appliance_box_loss.*)", log)[-1] for log in logs]
    assert final[0] == final[1], final

    # The chief evaluated each of the 4 val images once; the other worker none.
    assert sorted(runs[0]["decoded"]["eval"]) == sorted(set(runs[0]["decoded"]["eval"]))
    assert len(runs[0]["decoded"]["eval"]) == 4 and runs[1]["decoded"]["eval"] == []
    assert [r["step"] for r in runs[0]["eval"]] == [1] and runs[1]["eval"] == []
    # One process evaluating the saved weights gets the same metrics.
    report = two / "eval" / "report.json"
    during = json.loads(report.read_text())
    assert during["step"] == 1 and during["metrics"] == runs[0]["eval"][0]["metrics"]
    evaluated = subprocess.run(
        [sys.executable, "train.py", *common, f"--model_dir={two}", "--mode=eval", "--strategy=one_device"],
        cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    after = json.loads(report.read_text())
    assert after["metrics"] == during["metrics"] and after["mean_ap"] == during["mean_ap"], (after, during)

    assert (two / "last.weights.h5").exists()  # the chief wrote
    assert checkpoint.list_backups(str(two / "backup"))

    # Started again for one more epoch, both workers resume at step 1 from
    # the backup, still reading their own shards, and stay identical.
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs = [_run(tmp_path / f"r{i}", [*common, "--epochs=2", f"--model_dir={two}", "--mode=train",
                                       "--strategy=multi_worker"],
                  {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}) for i in range(2)]
    logs = _wait(procs)
    for log in logs:
        assert "Epoch 2/2" in log and "Epoch 1/2" not in log and "STEP 2 REPLICAS 2" in log, log[-3000:]
    for i in range(2):
        seen = set(json.loads((tmp_path / f"r{i}.json").read_text())["decoded"]["train"])
        assert len(seen) >= 2 and seen <= set(ids[i::2]), (i, seen, ids)
    r0, r1 = np.load(tmp_path / "r0.npz"), np.load(tmp_path / "r1.npz")
    for key in r0.files:
        np.testing.assert_allclose(r0[key], r1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert any(not np.allclose(r0[key], w0[key]) for key in r0.files)  # it trained on
