"""benchmarks/real_data.py runs end to end (ours, the keras-cv YOLOv8 peer,
the SavedModel evaluation, the table, plot and JSON line) on a tiny budget
and one generated dataset, so the benchmark cannot rot; each run gets only
its own datasets' --val_split; --merge puts runs together. The joint run is
the same code (run_ours on several datasets) and is skipped with one
dataset, as documented. The end-to-end numbers are not asserted: a few
steps learn nothing. (It left the suite once, when the CI machine was ~4x
slower and the run took 4 of the 31 minutes; here it takes about one.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
TINY_OURS = ("--width_multiplier=0.125 --batch_size=2 --eval_batch_size=8 --checkpoint_every_steps=2 "
             "--ema_momentum=0.9 --tensorboard_images=0")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from effdet_tf.data import synthetic

    data = synthetic.make_demo_datasets(tmp_path_factory.mktemp("data"), seed=3, num_train=8, num_val=4,
                                        image_size=96)
    work = tmp_path_factory.mktemp("work")
    cmd = [sys.executable, "benchmarks/real_data.py", f"--dataset=food={data['food']}", "--minutes=0.01",
           "--eval_every_minutes=0", "--image_size=128", "--models=ours,ours_joint,peer", "--peer_size=xs",
           "--peer_batch_size=2", f"--work_dir={work}", f"--train_flags={TINY_OURS}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"work": work, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.mark.slow
def test_ends_with_one_json_line_of_every_model_and_dataset(run):
    summary = json.loads(run["stdout"].strip().splitlines()[-1])
    assert set(summary) == {"ours", "ours_joint", "peer"}
    assert summary["ours_joint"] == {}  # one dataset: no joint run
    for model in ("ours", "peer"):
        assert set(summary[model]) == {"food"}
        for metrics in summary[model].values():
            assert set(metrics) == {"AP", "AP50", "AP75", "images_per_s"}
            assert all(0.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50", "AP75"))
            assert metrics["images_per_s"] > 0


@pytest.mark.slow
def test_writes_the_history_plot_and_logs(run):
    work = run["work"]
    results = json.loads((work / "results.json").read_text())
    assert results["meta"]["image_size"] == 128
    for model in ("ours", "peer"):
        history = results[model]["food"]["history"]
        assert history and all(h["minutes"] >= 0 and "AP50" in h for h in history)
    # train.py got the budget and exported with evaluation's score threshold.
    config = json.loads((work / "ours_food" / "config.json").read_text())
    assert config["train"]["train_minutes"] == pytest.approx(0.01)
    assert config["postprocess"]["score_threshold"] == pytest.approx(0.001)
    # The plot needs the bench extra's matplotlib; the test extra alone gets the logged notice.
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in run["stdout"] + run["stderr"]
        assert not (work / "ap50_vs_minutes.png").exists()
    else:
        assert (work / "ap50_vs_minutes.png").stat().st_size > 1000
    assert (work / "logs" / "ours_food.log").exists() and (work / "logs" / "peer_food.log").exists()
    assert "| ours | food |" in run["stdout"] and "| peer | food |" in run["stdout"]


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_data", REPO / "benchmarks" / "real_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_run_gets_only_its_datasets_val_split():
    real_data = _benchmark_module()
    # A run on raccoon alone must not be told bccd=test (train.py refuses it).
    assert real_data.run_val_split("bccd=test", ["raccoon"]) == ""
    assert real_data.run_val_split("bccd=test", ["bccd"]) == "bccd=test"
    assert real_data.run_val_split("bccd=test, raccoon=valid", ["bccd", "raccoon"]) == "bccd=test,raccoon=valid"
    assert real_data.run_val_split("test", ["raccoon"]) == "test"  # one split for every dataset
    assert real_data.run_val_split(None, ["raccoon"]) is None


def test_merge_puts_several_runs_in_one_results_file_later_runs_replacing_earlier(tmp_path):
    import json

    real_data = _benchmark_module()
    row = {"AP": 0.1, "AP50": 0.2, "AP75": 0.05, "images_per_s": 3.0, "history": []}
    first = {"meta": {"minutes": 15}, "ours": {"a": row, "b": row}, "peer": {"a": {**row, "AP": 0.3}}}
    second = {"meta": {"minutes": 15}, "ours": {"a": {**row, "AP": 0.4}}, "ours_joint": {"a": row, "b": row}}
    paths = []
    for i, run in enumerate((first, second)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(run))
    merged = real_data.merge_runs([str(p) for p in paths], str(tmp_path / "merged"))
    written = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert written["ours"]["a"]["AP"] == 0.4 and written["ours"]["b"]["AP"] == 0.1  # a replaced, b kept
    assert written["peer"]["a"]["AP"] == 0.3 and set(written["ours_joint"]) == {"a", "b"}
    assert [m["from"] for m in written["meta"]["merged"]] == [str(p) for p in paths]
    assert merged["ours"] == written["ours"]
