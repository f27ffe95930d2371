"""Classes that two datasets share by name are found and written down."""

import json

from effdet_tf import label_audit
from effdet_tf.config import ClassEntry, Config, DataConfig, DatasetConfig


def _dataset(name, classes):
    return DatasetConfig(name=name, path=f"/nonexistent/{name}",
                         classes=tuple(ClassEntry(index=i, id=cid, name=n) for i, (cid, n) in enumerate(classes)))


FOOD = _dataset("food", [(52, "banana"), (58, "Hot Dog"), (53, "apple")])
FRUIT = _dataset("fruit", [(3, "banana"), (9, "hot_dog"), (4, "pear"), (5, "Pear")])


def test_shared_names_ignore_case_spaces_dashes_and_underscores():
    result = label_audit.audit([FOOD, FRUIT])
    shared = {g["name"]: g for g in result["shared"]}
    assert set(shared) == {"banana", "hotdog"}  # apple and pear are in one dataset only
    assert [(m["dataset"], m["id"], m["index"]) for m in shared["banana"]["classes"]] == [
        ("food", 52, 0), ("fruit", 3, 0)]
    assert not shared["banana"]["spelled_differently"]
    assert shared["hotdog"]["spelled_differently"]
    assert [m["name"] for m in shared["hotdog"]["classes"]] == ["Hot Dog", "hot_dog"]
    # One dataset spelling a class twice is reported on its own.
    assert [(g["name"], [m["id"] for m in g["classes"]]) for g in result["within_dataset"]] == [("pear", [4, 5])]
    assert label_audit.describe(shared["hotdog"]) == 'hotdog: food 58 "Hot Dog", fruit 9 "hot_dog" (spelled differently)'


def test_written_to_the_model_dir(tmp_path):
    config = Config(data=DataConfig(datasets=(FOOD, FRUIT)))
    returned = label_audit.write_label_audit(config, str(tmp_path))
    with open(tmp_path / label_audit.LABEL_AUDIT) as f:
        assert json.load(f) == returned
    assert [g["name"] for g in returned["shared"]] == ["banana", "hotdog"]
    alone = label_audit.write_label_audit(Config(data=DataConfig(datasets=(FOOD,))), str(tmp_path / "one"))
    assert alone == {"shared": [], "within_dataset": []}


def test_equivalence_groups_from_names_and_their_tables():
    label_maps = Config(data=DataConfig(datasets=(FOOD, FRUIT))).label_maps()
    groups = label_audit.equivalence_from_names(label_maps)
    assert groups == [["food:52", "fruit:3"], ["food:58", "fruit:9"]]
    tables = label_audit.group_tables(groups, label_maps)
    # Equivalent classes share their group's id; every other class has its own.
    assert tables["food"][:2] == [0, 1] and tables["fruit"][:2] == [0, 1]
    others = tables["food"][2:] + tables["fruit"][2:]
    assert len(set(others)) == len(others) == 3 and not set(others) & {0, 1}
