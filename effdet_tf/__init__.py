"""effdet_tf: one detector, several datasets, one SavedModel."""

__version__ = "0.1.0"
