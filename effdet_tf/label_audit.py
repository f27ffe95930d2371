"""Classes that several datasets share by name (MODEL_DIR/label_audit.json),
and the class-equivalence table the `all` signatures merge with.

Datasets trained together often hold the same class under the same name (a
food set and a fruit set both have "banana"; COCO subsets share "person"),
or under names that differ only in case, spaces, '-' or '_' ("Hot Dog",
"hot_dog"). Each dataset keeps its own head and its own ids, so nothing
is merged here: the audit only says, at training start, which classes
match, with their ids in each dataset, so a user sees what the model
will detect twice under two heads.

Export turns the same matches into the equivalence table of the `all`
signatures (assets/class_equivalence.json): groups of "dataset:category_id"
that mean one thing, so one object seen by two heads is returned once. A
JSON file (export.py --class_equivalence=FILE) replaces the table built
from names; an empty list turns merging off.
"""

import json
import os
import types
from typing import Dict, List, Mapping, Sequence

from absl import logging

from effdet_tf.checkpoint import atomic_write_text

LABEL_AUDIT = "label_audit.json"
_IGNORED = " -_"


def normalised(name: str) -> str:
    """The name compared: case folded, spaces, '-' and '_' dropped."""
    return "".join(ch for ch in name.casefold() if ch not in _IGNORED)


def audit(datasets) -> Dict[str, List[dict]]:
    """Groups of classes whose names match once normalised.

    `datasets`: DatasetConfig-like objects (name, classes of ClassEntry).
    Returns {"shared": [...], "within_dataset": [...]}: each group is
    {"name": the normalised name, "spelled_differently": bool, "classes":
    [{"dataset", "id", "index", "name"}]}. "shared" holds the groups that
    span two or more datasets; "within_dataset" the names one dataset
    spells twice (two of its classes a reader would take for one)."""
    groups: Dict[str, List[dict]] = {}
    for ds in datasets:
        for c in ds.classes:
            groups.setdefault(normalised(c.name), []).append(
                {"dataset": ds.name, "id": int(c.id), "index": int(c.index), "name": c.name})
    out = {"shared": [], "within_dataset": []}
    for key in sorted(groups):
        members = groups[key]
        if len(members) < 2:
            continue
        group = {"name": key, "spelled_differently": len({m["name"] for m in members}) > 1, "classes": members}
        names = [m["dataset"] for m in members]
        if len(set(names)) > 1:
            out["shared"].append(group)
        if len(set(names)) < len(names):
            out["within_dataset"].append(group)
    return out


def describe(group) -> str:
    """One line: 'banana: food 52 "banana", fruit 3 "Banana" (spelled differently)'."""
    members = ", ".join(f'{m["dataset"]} {m["id"]} "{m["name"]}"' for m in group["classes"])
    return f"{group['name']}: {members}" + (" (spelled differently)" if group["spelled_differently"] else "")


def write_label_audit(config, model_dir) -> dict:
    """Logs the shared classes and writes MODEL_DIR/label_audit.json (always,
    with empty lists when nothing matches). Returns the audit."""
    result = audit(config.data.datasets)
    for group in result["shared"]:
        logging.info("Class in several datasets (one head each, detected by each): %s", describe(group))
    for group in result["within_dataset"]:
        logging.warning("One dataset has two classes of the same name: %s", describe(group))
    atomic_write_text(os.path.join(model_dir, LABEL_AUDIT), json.dumps(result, indent=1) + "\n")
    return result


# ---------------------------------------------------------------- equivalence
def _label_map_datasets(label_maps):
    """{head: label_map.json-style dict} -> objects audit() reads."""
    return [types.SimpleNamespace(name=name, classes=[types.SimpleNamespace(**c) for c in lm["classes"]])
            for name, lm in label_maps.items()]


def equivalence_from_names(label_maps) -> List[List[str]]:
    """The classes audit() finds shared across datasets, as equivalence
    groups of "dataset:category_id"."""
    return [[f"{m['dataset']}:{m['id']}" for m in g["classes"]]
            for g in audit(_label_map_datasets(label_maps))["shared"]]


def read_class_equivalence(path, label_maps) -> List[List[str]]:
    """Equivalence groups from a JSON file: a list of lists of
    "dataset:category_id" strings ([] turns merging off). Every entry must
    name a dataset of the export and one of its category ids, and appear
    in one group only; errors name the file and the entry."""
    try:
        with open(path) as f:
            groups = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--class_equivalence={path}: cannot read it as JSON ({e}).") from None
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise ValueError(f"--class_equivalence={path}: expected a list of lists of \"dataset:category_id\".")
    ids = {name: {int(c["id"]) for c in lm["classes"]} for name, lm in label_maps.items()}
    seen = {}
    for i, group in enumerate(groups):
        for entry in group:
            dataset, _, category = str(entry).rpartition(":")
            if dataset not in ids or not category.lstrip("-").isdigit() or int(category) not in ids[dataset]:
                raise ValueError(f"--class_equivalence={path}: group {i}, entry {entry!r}: not a dataset:category_id "
                                 f"of this export (datasets: {', '.join(ids)}).")
            if entry in seen:
                raise ValueError(f"--class_equivalence={path}: {entry!r} is in groups {seen[entry]} and {i}.")
            seen[entry] = i
    return [[str(e) for e in g] for g in groups]


def group_tables(groups: Sequence[Sequence[str]], label_maps: Mapping[str, dict]) -> Dict[str, List[int]]:
    """{head: [equivalence group id of each class, by contiguous index]}:
    the classes of one group share its id, every other class has its own."""
    group_of = {entry: g for g, group in enumerate(groups) for entry in group}
    tables, next_id = {}, len(groups)
    for name, lm in label_maps.items():
        table = []
        for c in sorted(lm["classes"], key=lambda c: int(c["index"])):
            key = f"{name}:{int(c['id'])}"
            if key in group_of:
                table.append(group_of[key])
            else:
                table.append(next_id)
                next_id += 1
        tables[name] = table
    return tables
