"""Two MultiWorkerMirroredStrategy workers on localhost (TF_CONFIG) train a
few steps of a tiny config and end with identical weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs train_lib like train.py does, then saves this worker's weights.
WORKER = """
import sys
import numpy as np
from effdet_tf import flags, train_lib
out = sys.argv[1]
config = flags.config_from_argv(["train.py"] + sys.argv[2:])
result = train_lib.run(config)
np.savez(out, *result["train"]["model"].get_weights())
print("STEP", result["train"]["step"])
"""


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# Known failure, issue 4 left open for it: under MultiWorkerMirroredStrategy,
# Keras fit on the per-dataset dict batches fails inside the step with
# "Attempt to convert a value ({'appliance': PerReplica...}) ... to a Tensor".
# Mirrored over two devices in one process works (train_lib_test).
@pytest.mark.xfail(reason="MultiWorkerMirroredStrategy + dict-of-dataset batches fails in fit (issue 4 open)")
def test_two_workers_end_with_identical_weights(tmp_path):
    from effdet_tf.data import synthetic

    data = synthetic.make_demo_datasets(tmp_path / "data", seed=2, num_train=8, num_val=4, image_size=96)
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    args = [f"--dataset=appliance={data['appliance']}", f"--model_dir={tmp_path / 'model'}",
            "--image_size=128", "--width_multiplier=0.125", "--batch_size=4", "--optimizer=sgd",
            "--learning_rate=0.05", "--ema_momentum=0.9", "--mosaic_prob=0", "--mixup_prob=0",
            "--epochs=1", "--steps_per_epoch=3", "--checkpoint_every_steps=3", "--mode=train",
            "--strategy=multi_worker", "--verbose=2"]
    procs = []
    for index in range(2):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"w{index}.npz"), *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
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
        assert "STEP 3" in log and "2 replica(s)" in log, log[-3000:]
    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(w0.files) == len(w1.files) > 100
    for key in w0.files:
        np.testing.assert_array_equal(w0[key], w1[key], err_msg=key)
    from effdet_tf import checkpoint

    assert (tmp_path / "model" / "last.weights.h5").exists()  # the chief wrote
    assert checkpoint.list_backups(str(tmp_path / "model" / "backup"))
