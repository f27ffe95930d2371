"""Config JSON round trip and the model-dir contract of checkpoint.py."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from effdet_tf import callbacks, checkpoint
from effdet_tf.config import (ClassEntry, Config, DataConfig, DatasetConfig, ModelConfig, TrainConfig,
                              classes_from_label_map)


def _config(model_dir="", image_size=128, food_classes=10):
    appliance = DatasetConfig(
        name="appliance", path="/data/appliance", tfrecord_dir="/cache/appliance",
        classes=tuple(ClassEntry(i, 78 + i, f"a{i}") for i in range(5)), batch_size=4)
    food = DatasetConfig(
        name="food", path="/data/food", tfrecord_dir="/cache/food",
        classes=tuple(ClassEntry(i, 52 + i, f"f{i}") for i in range(food_classes)), batch_size=2, loss_weight=2.0)
    return Config(
        model=ModelConfig(image_size=image_size, width_multiplier=0.125),
        data=DataConfig(datasets=(appliance, food)),
        train=TrainConfig(model_dir=str(model_dir)),
    )


def test_json_round_trip_is_exact():
    config = _config()
    again = Config.from_json(config.to_json())
    assert again == config
    assert isinstance(again.model.aspect_ratios, tuple)
    assert isinstance(again.data.datasets[0].classes[0], ClassEntry)


def test_json_holds_detector_kwargs_and_label_maps():
    d = json.loads(_config().to_json())
    assert d["detector_kwargs"]["heads"] == {"appliance": 5, "food": 10}
    assert d["detector_kwargs"]["image_size"] == 128
    assert d["detector_kwargs"]["head_loss_weights"] == {"appliance": 1.0, "food": 2.0}
    assert d["label_maps"]["food"]["classes"][0] == {"index": 0, "id": 52, "name": "f0"}


def test_config_is_frozen():
    config = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.image_size = 256


def test_unknown_key_in_json_is_an_error():
    d = _config().to_dict()
    d["train"]["learnig_rate"] = 1.0
    with pytest.raises(ValueError, match="learnig_rate"):
        Config.from_dict(d)


def test_label_map_must_be_contiguous():
    good = {"classes": [{"index": 1, "id": 9, "name": "b"}, {"index": 0, "id": 3, "name": "a"}]}
    assert [c.id for c in classes_from_label_map(good)] == [3, 9]
    with pytest.raises(ValueError):
        classes_from_label_map({"classes": [{"index": 1, "id": 9, "name": "b"}]})


def test_incompatible_model_dir_refused_unless_fresh_start(tmp_path):
    checkpoint.prepare_model_dir(_config(tmp_path))
    assert checkpoint.read_config(tmp_path) == _config(tmp_path)
    # Same architecture and label space: resumable.
    checkpoint.prepare_model_dir(_config(tmp_path))
    with pytest.raises(checkpoint.IncompatibleModelDirError, match="image_size"):
        checkpoint.prepare_model_dir(_config(tmp_path, image_size=256))
    with pytest.raises(checkpoint.IncompatibleModelDirError, match="'food' has 10 classes"):
        checkpoint.prepare_model_dir(_config(tmp_path, food_classes=7))
    fresh = _config(tmp_path, image_size=256)
    fresh = fresh.replace(train=dataclasses.replace(fresh.train, fresh_start=True))
    checkpoint.prepare_model_dir(fresh)
    assert checkpoint.read_config(tmp_path).model.image_size == 256


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="no config.json"):
        checkpoint.load_detector(str(tmp_path))
    checkpoint.write_config(str(tmp_path), _config(tmp_path))
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="no checkpoint"):
        checkpoint.load_detector(str(tmp_path))


def _tiny_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9, use_ema=True, ema_momentum=0.5), "mse")
    return model


def test_backup_is_atomic_and_restores_optimizer_state(tmp_path):
    model = _tiny_model()
    x, y = np.ones((8, 3), np.float32), np.ones((8, 2), np.float32)
    backup = callbacks.ResumableBackup(str(tmp_path), keep=2)
    model.fit(x, y, batch_size=4, epochs=3, callbacks=[backup], verbose=0)
    backups = checkpoint.list_backups(os.path.join(tmp_path, checkpoint.BACKUP_DIR))
    assert [os.path.basename(b) for b in backups] == ["ckpt-0000000006", "ckpt-0000000004"]
    # A half-written backup (no rename happened) is never picked up ...
    os.makedirs(os.path.join(tmp_path, checkpoint.BACKUP_DIR, ".tmp-dead"))
    # ... and a corrupt newest backup falls back to the previous one.
    with open(os.path.join(backups[0], "state.weights.h5"), "wb") as f:
        f.write(b"truncated")
    other = _tiny_model()
    meta = checkpoint.restore_training_state(other, str(tmp_path))
    assert meta["step"] == 4
    assert int(other.optimizer.iterations.numpy()) == 4


def test_postprocess_section_round_trips_through_config_json(tmp_path):
    from effdet_tf.config import PostprocessConfig

    post = PostprocessConfig(eval_score_threshold=0.002, score_threshold=0.3, nms_method="hard",
                             iou_threshold=0.6, soft_nms_sigma=0.25, pre_nms_topk=321, max_detections=42)
    config = _config(tmp_path).replace(postprocess=post)
    checkpoint.write_config(str(tmp_path), config)
    with open(os.path.join(tmp_path, checkpoint.CONFIG_FILE)) as f:
        written = json.load(f)
    assert written["postprocess"] == {
        "eval_score_threshold": 0.002, "score_threshold": 0.3, "nms_method": "hard", "iou_threshold": 0.6,
        "soft_nms_sigma": 0.25, "pre_nms_topk": 321, "max_detections": 42}
    again = checkpoint.read_config(str(tmp_path))
    assert again.postprocess == post
    # What evaluation and serving hand to ops.postprocess: the same but the threshold.
    assert again.postprocess.eval_kwargs()["score_threshold"] == 0.002
    assert again.postprocess.serving_kwargs()["score_threshold"] == 0.3
    assert {k: v for k, v in again.postprocess.eval_kwargs().items() if k != "score_threshold"} == {
        k: v for k, v in again.postprocess.serving_kwargs().items() if k != "score_threshold"}


def test_config_json_without_postprocess_section_still_loads():
    """Written before the section existed: evaluation's settings were in
    "train", the export's in "export"; those models used hard NMS."""
    d = _config().to_dict()
    del d["postprocess"]
    d["train"].update(eval_score_threshold=0.002, eval_iou_threshold=0.55, eval_max_detections=90)
    d["export"].update(score_threshold=0.2, iou_threshold=0.5, max_detections=100)
    post = Config.from_dict(d).postprocess
    assert (post.eval_score_threshold, post.score_threshold) == (0.002, 0.2)
    # One setting now: evaluation's (what the model's AP was measured with).
    assert (post.iou_threshold, post.max_detections) == (0.55, 90)
    assert post.nms_method == "hard"
    # No section and none of the old keys: the defaults, but the hard NMS
    # such a model was evaluated with (the default is now Soft-NMS).
    d = _config().to_dict()
    del d["postprocess"]
    assert Config.from_dict(d).postprocess.nms_method == "hard"
    assert Config().postprocess.nms_method == "gaussian"


def test_postprocess_settings_are_checked():
    from effdet_tf.config import ConfigError, PostprocessConfig, check

    for bad, flag in ((dict(score_threshold=1.5), "--score_threshold"), (dict(soft_nms_sigma=0.0), "--soft_nms_sigma"),
                      (dict(max_detections=0), "--max_detections"), (dict(nms_method="linear"), "--nms_method")):
        with pytest.raises(ConfigError, match=flag):
            check(_config().replace(postprocess=PostprocessConfig(**bad)))


def test_postprocess_flags_reach_the_config(tmp_path):
    from effdet_tf import flags

    config = flags.config_from_argv([
        "train.py", f"--dataset=a={tmp_path}", f"--model_dir={tmp_path / 'm'}", "--nms_method=hard",
        "--soft_nms_sigma=0.3", "--eval_score_threshold=0.01", "--score_threshold=0.2", "--pre_nms_topk=500"])
    post = config.postprocess
    assert (post.nms_method, post.soft_nms_sigma, post.eval_score_threshold, post.score_threshold,
            post.pre_nms_topk) == ("hard", 0.3, 0.01, 0.2, 500)


def test_config_json_with_augmentation_in_data_still_loads():
    """Written before the augment section existed, the seven augmentation
    settings sat in "data"; they are read into "augment"."""
    d = _config().to_dict()
    del d["augment"]
    d["data"].update(mosaic_prob=0.0, mixup_prob=0.05, hsv_prob=0.5, flip_prob=0.25, scale_min=0.75,
                     scale_max=1.25, translate=0.5)
    aug = Config.from_dict(d).augment
    assert (aug.mosaic_prob, aug.mixup_prob, aug.hsv_prob, aug.flip_prob, aug.scale_min, aug.scale_max,
            aug.translate) == (0.0, 0.05, 0.5, 0.25, 0.75, 1.25, 0.5)
    assert aug.mixup_alpha == 32.0 and aug.hsv_gains == (0.015, 0.7, 0.4)  # not in such files: defaults


def test_augmentation_flags_reach_the_config_and_are_checked(tmp_path):
    from effdet_tf import flags
    from effdet_tf.config import ConfigError

    base = ["train.py", f"--dataset=a={tmp_path}", f"--model_dir={tmp_path / 'm'}"]
    aug = flags.config_from_argv(base + ["--hsv_gains=0.02,0.5,0.3", "--mosaic_offset=0.3,0.7", "--mixup_alpha=8",
                                         "--min_box_size=3", "--translate=0.25"]).augment
    assert (aug.hsv_gains, aug.mosaic_offset, aug.mixup_alpha, aug.min_box_size, aug.translate) == (
        (0.02, 0.5, 0.3), (0.3, 0.7), 8.0, 3.0, 0.25)
    for bad in ("--hsv_gains=0.1,0.2", "--mosaic_offset=0.8,0.2", "--mixup_alpha=0", "--min_box_area_ratio=1.5",
                "--scale_min=2"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            flags.config_from_argv(base + [bad])


def test_precise_bn_is_checked(tmp_path):
    from effdet_tf import flags
    from effdet_tf.config import ConfigError

    base = ["train.py", f"--dataset=a={tmp_path}", f"--model_dir={tmp_path / 'm'}"]
    assert flags.config_from_argv(base + ["--precise_bn_batches=20"]).train.precise_bn_batches == 20
    for bad, match in ((["--precise_bn_batches=-1"], "must be >= 0"),
                       (["--precise_bn_batches=5", "--strategy=multi_worker"], "multi_worker.*--precise_bn_batches=0"),
                       (["--precise_bn_batches=5", "--sync_batchnorm"], "sync_batchnorm")):
        with pytest.raises(ConfigError, match=match):
            flags.config_from_argv(base + bad)
