"""Every use of a Keras, keras-cv or TensorFlow internal, in one place.

Each function or hook below reaches past a public API because none does the
job (each says why). All were checked against the versions in CHECKED;
pyproject.toml pins Keras to that range. tests/compat_test.py calls
`missing()` and fails with the names below when an upgrade moves one of
them, and exercises each use on a tiny model.
"""

import keras
import tensorflow as tf

CHECKED = {"keras": "3.15", "keras_cv": "0.9", "tensorflow": "2.21"}

# (what, owner, attribute): the internals this module reaches. `owner` is
# imported lazily by `_owner` so that importing compat stays cheap.
INTERNALS = (
    ("nested layer walk", "keras.Model", "_flatten_layers"),
    ("symbolic build before fit", "keras.Model", "_maybe_symbolic_build"),
    ("per-replica log reduction", "keras.src.backend.tensorflow.trainer", "reduce_per_replica"),
    ("weights without the optimizer", "keras.src.saving.saving_lib", "save_weights_only"),
    ("the SavedModel root of an ExportArchive", "keras.export.ExportArchive", "_tf_trackable"),
    ("optimizer update after the all-reduce", "keras.optimizers.Optimizer", "_backend_update_step"),
    ("optimizer apply hook", "keras.optimizers.Optimizer", "_backend_apply_gradients"),
    ("optimizer gradient all-reduce", "keras.optimizers.Optimizer", "_all_reduce_sum_gradients"),
    ("optimizer per-variable update", "keras.optimizers.Optimizer", "_distributed_tf_update_step"),
    ("merge call from a replica context", "tf.__internal__.distribute.interim", "maybe_merge_call"),
    ("keras-cv MixUp's box rule", "keras_cv.layers.MixUp", "_update_bounding_boxes"),
)


def _owner(dotted):
    import importlib

    if dotted == "keras.export.ExportArchive":
        return keras.export.ExportArchive()  # _tf_trackable is set in __init__
    if dotted.startswith("tf."):
        obj = tf
        for part in dotted.split(".")[1:]:
            obj = getattr(obj, part)
        return obj
    module, _, name = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ImportError:
        return getattr(importlib.import_module(module), name)


def missing():
    """-> ["what: owner.attribute", ...] for every internal that the
    installed versions no longer have (empty when all are there)."""
    out = []
    for what, owner, attribute in INTERNALS:
        try:
            present = hasattr(_owner(owner), attribute)
        except (ImportError, AttributeError):
            present = False
        if not present:
            out.append(f"{what}: {owner}.{attribute} (checked against {CHECKED})")
    return out


# ---------------------------------------------------------------- Keras model
def sublayers(model):
    """Every layer inside `model`, nested ones included. Keras has no public
    recursive walk (`model.layers` is the top level only)."""
    return model._flatten_layers(include_self=False, recursive=True)  # noqa: SLF001


def skip_symbolic_build(model):
    """Keras 3.15's TF trainer all-reduces the first batch to build the model
    symbolically before fit; with MultiWorkerMirroredStrategy and dict inputs
    that reduce fails ("Attempt to convert a value ({'appliance':
    PerReplica...}) to a Tensor"; keras-team/keras#20329, #20585). Call only
    once model and optimizer are built, so the build has nothing to do."""
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None  # noqa: SLF001


def patch_multi_worker_logs():
    """Keras 3.15's TF trainer reduces each step's logs across workers with
    strategy.reduce("MEAN", v, axis=0), which fails on scalar logs (every
    loss) under MultiWorkerMirroredStrategy: "Invalid reduction dimension 0
    for input with 0 dimensions" (keras-team/keras#20585). Logs only are
    affected (gradients are all-reduced by the optimizer), so they are taken
    from the worker's first replica instead, as Keras does on TPUs.
    Idempotent."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_effdet_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction == "auto" and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            reduction = "first"
        return original(values, strategy, reduction)

    reduce_per_replica._effdet_patched = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def save_weights_without(model, path, objects):
    """`model.save_weights(path)` leaving out `objects` (the optimizer: export
    needs the weights only, a third of the size with momentum + EMA).
    Keras's public save_weights has no such option."""
    from keras.src.saving import saving_lib

    saving_lib.save_weights_only(model, path, objects_to_skip=list(objects) or None)


def attach_asset(archive, name, path):
    """Puts the file at `path` on an ExportArchive's SavedModel root as
    `name`: saving copies it into assets/ and lists it in the MetaGraph's
    asset_file_def, as TF Serving's session loader expects.
    ExportArchive.track() keeps only variables and lookup tables."""
    setattr(archive._tf_trackable, name, tf.saved_model.Asset(path))  # noqa: SLF001


# ---------------------------------------------------------------- optimizer
def tf_variable(v):
    """The tf.Variable behind a keras.Variable (the distribution strategy's
    update functions take those)."""
    return v.value if isinstance(v, keras.Variable) else v


def merge_call(fn, strategy, *args):
    """Runs fn(strategy, *args) once in cross-replica context from inside a
    replica function, as Keras's own TF optimizer does."""
    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)


class OptimizerHooks:
    """Mixed into a Keras optimizer (TF backend, Keras 3.15's
    keras/src/backend/tensorflow/optimizer.py) in front of the base class.
    Two hooks Keras has no public place for:

      reduced_gradients(grads) -> grads: runs on the gradients after the
        cross-replica all-reduce and before the variables are updated (a
        clip there clips the global gradient, where Keras's clipnorm clips
        each replica's share); called only where the instance sets
        `transforms_reduced_gradients`, else Keras's own update runs;
      after_apply(): runs in replica context after every update, before
        `iterations` is incremented.
    """

    transforms_reduced_gradients = False

    def reduced_gradients(self, grads):
        return grads

    def after_apply(self):
        pass

    def distribution(self):
        """The strategy the optimizer was built under."""
        return self._distribution_strategy  # noqa: SLF001

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self.transforms_reduced_gradients:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        variables = [tf_variable(v) for v in trainable_variables]
        reduced = self._all_reduce_sum_gradients(list(zip(grads, variables)))
        changed = self.reduced_gradients([g for g, _ in reduced])
        merge_call(self._distributed_tf_update_step, self.distribution(), list(zip(changed, variables)),
                   learning_rate)

    def _backend_apply_gradients(self, grads, trainable_variables):
        super()._backend_apply_gradients(grads, trainable_variables)
        self.after_apply()


# ---------------------------------------------------------------- keras-cv
def mixup_boxes(mixup, boxes, partner):
    """keras-cv MixUp's box rule on dense {"boxes" [B, N, 4], "classes"
    [B, N]}: image i keeps its own boxes and gets image partner[i]'s ([B]
    int) at full weight, -> [B, 2N, ...]. Its image blend is not used
    (augment.py draws it statelessly). `mixup` is the keras_cv MixUp layer:
    keras_cv itself is imported in augment.py only."""
    return mixup._update_bounding_boxes(boxes, partner)  # noqa: SLF001
