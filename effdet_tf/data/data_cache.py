"""--dataset=NAME=PATH -> a folder of TFRecords, converted once into the data cache.

train.py names datasets by the folder users have: a dataset root in any
layout of effdet_tf.data.layouts, or TFRecords the converter made. A root is
converted (effdet_tf.data.coco_tfrecord.convert_root) into
`<cache>/<name>-<fingerprint>`, the fingerprint covering everything the
output depends on, so a second run reuses it and changed data or options
get a folder of their own; the source folder is never written to.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from effdet_tf.data import layouts
from effdet_tf.data.coco_checks import ConversionError
from effdet_tf.data.coco_tfrecord import (CONVERTER_VERSION, SPLITS_FILE, convert_root,
                                          print_reports)


def read_splits(path):
    """splits.json of a converted folder: the layout and which source split
    each written one came from (None for a folder converted split by split)."""
    f = Path(path) / SPLITS_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def describe_conversion(path):
    """One line for train.py's log: which split trains and which evaluates."""
    path = Path(path)
    info = read_splits(path)
    if info:
        source = {s["written_as"]: n for n, s in info["splits"].items() if s["written_as"]}
    else:
        source = {w: w for w in ("train", "val") if (path / f"{w}_annotations.json").is_file()}

    def images(written):
        report = path / f"report_{written}.json"
        n = json.loads(report.read_text())["images"]["written"] if report.is_file() else "?"
        return f"{n} images"

    text = f"trains on {source.get('train', 'train')!r} ({images('train')})"
    text += (f", evaluates on {source['val']!r} ({images('val')}, as val)" if "val" in source
             else ", no evaluation split")
    others = [f"{n!r} ({images(w)})" for w, n in source.items() if w not in ("train", "val")]
    return text + (f"; also converted: {', '.join(others)}" if others else "") + f" [{path}]"


def _fingerprint(layout, options):
    """Hash of the converted splits' json bytes and image folder listings
    (name, size, mtime), their roles (so --val_split, once resolved) and the
    options: changes whenever a conversion's output could."""
    h = hashlib.sha256(f"{CONVERTER_VERSION}{sorted(options.items())}{layout.kind}".encode())
    for s, written in layout.converted:
        h.update(f"|{s.name}>{written}|".encode())
        h.update(s.annotations.read_bytes())
        for e in sorted(os.scandir(s.image_dir), key=lambda e: e.name):
            st = e.stat()
            h.update(f"{s.name}/{e.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def is_converted(path):
    path = Path(path)
    return (path / "label_map.json").is_file() and any(path.glob("*.tfrecord"))


def _check_val_split(path, val_split):
    """A converted folder evaluates on its val-* files: --val_split can only
    name the split they were made from."""
    info = read_splits(path)
    chosen = info["eval"] if info else "val"
    if val_split and val_split != chosen and layouts.split_name(val_split) != chosen:
        made = f"with {chosen!r} as the evaluation split" if chosen else "without one"
        raise ConversionError(
            f"--val_split={val_split}: {path} holds TFRecords converted {made}"
            " (written as val-*.tfrecord); give the dataset root to evaluate on another split")


def ensure_tfrecords(path, cache_dir, name=None, val_split="", **kwargs):
    """Returns a folder of TFRecords for `path` (train.py's --dataset=NAME=PATH).

    An already converted folder (label_map.json + *.tfrecord) is used as is.
    A dataset root (a layout of effdet_tf.data.layouts) is converted, every
    split, into cache_dir/<name>-<fingerprint> unless that folder already
    exists, i.e. was made from the same jsons, image listings, evaluation
    split (`val_split`: "" = val, else valid, else test) and options; the
    source is only read.
    """
    path = Path(path)
    if is_converted(path):
        _check_val_split(path, val_split)
        return path
    try:
        layouts.find_splits(path)
    except ConversionError as e:
        raise ConversionError(f"{e} (nor is it converted TFRecords: label_map.json +"
                              " *.tfrecord)") from None
    layout = layouts.find_layout(path, val_split)
    name = name or path.name
    options = {k: v for k, v in kwargs.items() if k in ("num_shards", "min_shards", "strict", "keep_unusable")}
    target = Path(cache_dir) / f"{name}-{_fingerprint(layout, options)}"
    if not is_converted(target):
        _convert_into(layout, target, name, kwargs)
    _report_stale(target, name)
    return target


def stale_conversions(target, name):
    """Other converted <name>-<fingerprint> folders beside `target`: made
    from earlier versions of the data or other options."""
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{16}")
    return sorted(p for p in Path(target).parent.iterdir()
                  if p != Path(target) and pattern.fullmatch(p.name)
                  and is_converted(p))


def _report_stale(target, name):
    """Says which older conversions of this dataset take disk space. They
    are not deleted: another run may still read them (other options)."""
    stale = stale_conversions(target, name)
    if stale:
        size = sum(f.stat().st_size for p in stale for f in p.iterdir() if f.is_file())
        print(f"note: {len(stale)} older conversion(s) of {name!r} beside {target} "
              f"({size / 2**20:.1f} MiB), from earlier data or options; delete "
              f"them when no run needs them: {', '.join(p.name for p in stale)}")


def _convert_into(layout, target, name, kwargs):
    """Converts `layout` into `target` (created whole or not at all).

    Reports are printed once they are where they stay: in `target` after the
    rename, or, when the conversion fails, in `<target>.failed/` (the error
    names it), which keeps only the reports until a conversion of this
    dataset succeeds.
    """
    # Convert next to the target, then rename: a crash or a concurrent worker
    # never leaves a half-written folder under the final name.
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    failed = target.parent / f"{target.name}.failed"
    kwargs = dict(kwargs)
    verbose = kwargs.pop("verbose", True)
    written = [w for _, w in layout.converted]
    shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"[{name}] {layout.describe()}")
    try:
        convert_root(layout.root, tmp, name=name, layout=layout, verbose=False, **kwargs)
        os.replace(tmp, target)
    except ConversionError as e:
        reports = sorted(tmp.glob("report_*.json"))
        if not reports:
            raise
        shutil.rmtree(failed, ignore_errors=True)
        failed.mkdir(parents=True)
        for r in reports:
            os.replace(r, failed / r.name)
        if verbose:
            print_reports(failed, written)
        raise ConversionError(str(e).replace(str(tmp), str(failed))) from None
    except OSError:
        if not is_converted(target):  # not a concurrent twin that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{16}\.failed")
    for old in target.parent.iterdir():
        if pattern.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)
    if verbose:
        print_reports(target, written)
