"""Import TensorFlow without its start-up notices on machines without a GPU.

TensorFlow 2.21's native code prints, straight to file descriptor 2 and
before Python's logging exists, the same notices on every CPU-only start:
"Could not find cuda drivers" (twice, with "All log messages before
absl::InitializeLog() ..."), "failed call to cuInit" and the CPU-feature
note; TF_CPP_MIN_LOG_LEVEL does not reach the first ones. They say nothing
the user can act on, and they precede every command's useful output.

`import_tensorflow()` imports TensorFlow and initialises its devices with
descriptor 2 pointing at a temporary file, then replays every captured line
but those notices. Only that window is captured: a warning or traceback
later in the run reaches stderr as it happens. TF_CPP_MIN_LOG_LEVEL=1 (no
INFO lines from native code) is the default unless the user set it.
"""

import os
import re
import sys
import tempfile

_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|cuda_platform\.cc.*failed call to cuInit"
    r"|cuda_executor\.cc.*(kernel driver does not appear|no NVIDIA GPU)"
    r"|cpu_feature_guard\.cc.*This TensorFlow binary is optimized"
    # CPUs with oneDNN's custom ops (AVX-512 machines) print this at import.
    r"|port\.cc.*oneDNN custom operations are on"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)


def import_tensorflow():
    """Imports TensorFlow, lists its devices (which is when CUDA is probed)
    and returns the module; start-up notices of a CPU-only machine are
    dropped, anything else TensorFlow printed meanwhile is shown."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not _NOTICES.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)
    return tf
