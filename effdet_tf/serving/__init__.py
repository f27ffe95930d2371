"""Serving: what export writes (export_lib: signatures and the SavedModel;
tf_serving: warm-up requests, batching and model config) and the predict
CLI. Depends on ops/, data/preprocess, visualize and the model dir only."""
