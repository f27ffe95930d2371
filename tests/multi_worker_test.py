"""Two MultiWorkerMirroredStrategy workers on localhost (TF_CONFIG) train a
few steps of a tiny config and end with identical weights.

Identical up to float rounding: the all-reduced gradients agree to ~1e-8
relative on the two workers here (CPU collectives), so the weights are
compared with a tight tolerance, not bit for bit. Synchronised BatchNorm
keeps the moving statistics identical too (without it each worker's
statistics come from its own half of the batch)."""

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

# Runs train_lib like train.py does, then saves this worker's weights.
WORKER = """
import sys
import numpy as np
from effdet_tf import flags, train_lib
out = sys.argv[1]
config = flags.config_from_argv(["train.py"] + sys.argv[2:])
result = train_lib.run(config)
np.savez(out, *result["train"]["model"].get_weights())
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


def test_two_workers_end_with_identical_weights(tmp_path):
    from effdet_tf.data import synthetic

    data = synthetic.make_demo_datasets(tmp_path / "data", seed=2, num_train=8, num_val=4, image_size=96)
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    args = [f"--dataset=appliance={data['appliance']}", f"--model_dir={tmp_path / 'model'}",
            "--image_size=128", "--width_multiplier=0.125", "--batch_size=4", "--optimizer=sgd",
            "--learning_rate=0.05", "--ema_momentum=0.9", "--mosaic_prob=0", "--mixup_prob=0",
            "--epochs=1", "--steps_per_epoch=3", "--checkpoint_every_steps=3", "--mode=train",
            "--strategy=multi_worker", "--sync_batchnorm", "--verbose=2"]
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
        assert "STEP 3 REPLICAS 2" in log, log[-3000:]
    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(w0.files) == len(w1.files) > 100
    for key in w0.files:
        np.testing.assert_allclose(w0[key], w1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Both workers logged the same (all-reduced) losses.
    final = [re.findall(r"3/3 - .*? - (appliance_box_loss.*)", log)[-1] for log in logs]
    assert final[0] == final[1], final
    from effdet_tf import checkpoint

    assert (tmp_path / "model" / "last.weights.h5").exists()  # the chief wrote
    assert checkpoint.list_backups(str(tmp_path / "model" / "backup"))
