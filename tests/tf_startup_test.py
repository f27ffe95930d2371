"""Commands start without TensorFlow's CPU-only CUDA notices, and nothing
else TensorFlow prints is hidden."""

import io
import os
import subprocess
import sys
from pathlib import Path

from effdet_tf import tf_startup, train_lib

REPO = Path(__file__).resolve().parents[1]

# As TensorFlow 2.21 printed them on the build machines (no GPU; the
# oneDNN line on an AVX-512 one).
NOTICES = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796171708.758255   16950 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796114024.878718    3196 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1796114025.044528    3196 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1796114028.469245    3196 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"""


def test_notices_are_recognised_and_other_lines_are_not():
    assert all(tf_startup._NOTICES.search(line) for line in NOTICES.splitlines())
    others = ["E0000 00:00:1.0 3196 op_kernel.cc:1] OUT_OF_RANGE: End of sequence",
              "W0000 00:00:1.0 3196 cuda_driver.cc:1] out of GPU memory", "Traceback (most recent call last):"]
    assert not any(tf_startup._NOTICES.search(line) for line in others)


def test_import_prints_no_notice_and_keeps_later_stderr():
    code = ("import sys; from effdet_tf.tf_startup import import_tensorflow; tf = import_tensorflow(); "
            "print('after', file=sys.stderr); print(tf.__version__)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("2.")
    assert done.stderr.strip().splitlines() == ["after"], done.stderr


def test_fit_prints_a_line_per_interval_into_files_and_a_bar_on_terminals():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert train_lib.fit_verbosity(-1, io.StringIO()) == 2
    assert train_lib.fit_verbosity(-1, Terminal()) == 1
    assert train_lib.fit_verbosity(0, Terminal()) == 0 and train_lib.fit_verbosity(1, io.StringIO()) == 1
