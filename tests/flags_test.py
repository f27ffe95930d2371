"""Flags -> frozen Config; every bad flag is refused with its name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags as absl_flags

from effdet_tf import flags
from effdet_tf.config import ConfigError, check_replicas

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    return tmp_path


def parse(*args):
    return flags.config_from_argv(["train.py", *args])


def test_flags_become_config(data, tmp_path):
    config = parse(f"--model_dir={tmp_path}/run", f"--dataset=apple={data}/a", f"--dataset=pear={data}/b",
                   "--image_size=256", "--batch_size=4", "--dataset_batch_size=pear=2", "--loss_weight=pear=0.5",
                   "--aspect_ratios=1,2", "--precision=mixed_float16")
    assert config.head_names == ("apple", "pear")
    assert config.model.image_size == 256
    assert config.model.aspect_ratios == (1.0, 2.0)
    assert [d.batch_size for d in config.data.datasets] == [4, 2]
    assert config.data.dataset("pear").loss_weight == 0.5
    assert config.data.dataset("apple").path == str(data / "a")
    assert config.train.precision == "mixed_float16"
    assert config.train.model_dir == str(tmp_path / "run")


def test_flagfile(data, tmp_path):
    flagfile = tmp_path / "x.flags"
    flagfile.write_text(f"# comment\n--model_dir={tmp_path}/run\n--dataset=apple={data}/a\n--epochs=3\n")
    config = parse(f"--flagfile={flagfile}", "--epochs=5")
    assert config.train.epochs == 5 and config.head_names == ("apple",)


def test_command_line_datasets_replace_the_flagfiles(data, tmp_path):
    flagfile = tmp_path / "x.flags"
    flagfile.write_text(f"--model_dir={tmp_path}/run\n--dataset=apple={data}/a\n--dataset=pear={data}/b\n"
                        "--loss_weight=pear=0.5\n--dataset_batch_size=apple=2\n--epochs=3\n")
    config = parse(f"--flagfile={flagfile}", f"--dataset=plum={data}/b", "--loss_weight=plum=2")
    assert config.head_names == ("plum",)
    assert config.data.dataset("plum").path == str(data / "b")
    assert config.data.dataset("plum").loss_weight == 2.0
    assert config.train.epochs == 3  # the rest of the flagfile still holds
    # Without a command-line --dataset the flagfile's datasets stay, and a
    # name given twice on the command line is still an error.
    assert parse(f"--flagfile={flagfile}").head_names == ("apple", "pear")
    with pytest.raises(ConfigError, match="named twice"):
        parse(f"--flagfile={flagfile}", f"--dataset=plum={data}/a", f"--dataset=plum={data}/b")


@pytest.mark.parametrize("args, flag", [
    (["--dataset=apple={a}", "--dataset=apple={b}"], "--dataset: dataset 'apple' is named twice"),
    (["--dataset=apple={a}/nope"], "--dataset=apple="),
    (["--dataset={a}"], "--dataset="),
    (["--dataset=apple={a}", "--dataset_batch_size=pear=2"], "--dataset_batch_size=pear=2"),
    (["--dataset=apple={a}", "--image_size=100"], "--image_size=100"),
    (["--dataset=apple={a}", "--mosaic_prob=2"], "--mosaic_prob=2"),
    (["--dataset=apple={a}", "--ema_momentum=1.5"], "--ema_momentum"),
    (["--dataset=apple={a}", "--backbone_weights={a}/none.weights"], "--backbone_weights="),
    ([], "--dataset"),
])
def test_bad_flags_name_the_flag(data, tmp_path, args, flag):
    args = [a.format(a=data / "a", b=data / "b") for a in args]
    with pytest.raises(ConfigError) as e:
        parse(f"--model_dir={tmp_path}/run", *args)
    assert str(e.value).startswith(flag), str(e.value)


def test_model_dir_required(data):
    with pytest.raises(ConfigError, match="^--model_dir"):
        parse(f"--dataset=apple={data}/a")


def test_unknown_and_bad_enum_flags(data, tmp_path):
    with pytest.raises(absl_flags.Error, match="learnig_rate"):
        parse(f"--model_dir={tmp_path}", f"--dataset=a={data}/a", "--learnig_rate=1")
    with pytest.raises(absl_flags.Error, match="strategy"):
        parse(f"--model_dir={tmp_path}", f"--dataset=a={data}/a", "--strategy=tpu")


def test_batch_not_divisible_by_replicas(data, tmp_path):
    config = parse(f"--model_dir={tmp_path}", f"--dataset=a={data}/a", f"--dataset=b={data}/b",
                   "--batch_size=4", "--dataset_batch_size=b=3")
    check_replicas(config, 1)
    with pytest.raises(ConfigError, match=r"^--dataset_batch_size=b=3 is not divisible by the 2 replicas"):
        check_replicas(config, 2)
    config = parse(f"--model_dir={tmp_path}", f"--dataset=a={data}/a", "--batch_size=3")
    with pytest.raises(ConfigError, match=r"^--batch_size=3 is not divisible"):
        check_replicas(config, 2)


def test_demo_data_path_may_not_exist_yet(tmp_path):
    config = parse(f"--model_dir={tmp_path}/run", f"--generate_demo_data={tmp_path}/gen",
                   f"--dataset=appliance={tmp_path}/gen/appliance")
    assert config.data.datasets[0].path == str(tmp_path / "gen" / "appliance")


def test_train_py_reports_the_flag(tmp_path):
    """The entry point prints the message and exits non-zero, no traceback."""
    for extra, expected in ((["--dataset=a=/nonexistent/x"], "--dataset=a=/nonexistent/x"),
                            (["--no_such_flag=1"], "no_such_flag")):
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"--model_dir={tmp_path}", *extra],
                              capture_output=True, text=True, timeout=120, cwd=REPO,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert proc.returncode != 0
        assert expected in proc.stderr
        assert "Traceback" not in proc.stderr
