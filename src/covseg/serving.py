"""The registry model as MLflow serves it (pyfunc): weights-only checkpoint in, network rebuilt from code.

`covseg/mlflow_model.py` is the file MLflow logs as the model's code (models-from-code): it only
hands MLflow a `SegmenterModel`, whose code is the installed covseg's. The model's one artifact is a
checkpoint written by `covseg.model.save_checkpoint` and read back with `load_checkpoint` (weights
only): nothing is pickled when the model is logged, nothing is unpickled when it is loaded or served.

Contract: input float32 (N, 1, H, W), slices windowed to [0, 1] (any N, H, W); output float32 logits
(N, 4, H, W) in the class order of `covseg.names.CLASSES` (argmax over axis 1 = the class index).
Request param `batch_size` (default 4): how many slices go through the network at once.
"""
from __future__ import annotations

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from covseg.names import MODEL_CHECKPOINT, NUM_CLASSES

DEFAULT_BATCH_SIZE = 4


def signature() -> ModelSignature:
    """float32 (N, 1, H, W) -> float32 (N, 4, H, W), any N, H, W; param batch_size."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES, -1, -1))]),
        params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]))


def as_batch(model_input) -> np.ndarray:
    """The input as a float32 (N, 1, H, W) array of finite values in [0, 1]; one clear error otherwise."""
    if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": ...} or one named tensor
        model_input = next(iter(model_input.values()))
    x = np.asarray(model_input, dtype=np.float32)
    if x.ndim == 3:  # (N, H, W): add the channel
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1 or 0 in x.shape:
        raise MlflowException.invalid_parameter_value(
            f"covseg model input must be slices of shape (N, 1, H, W), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise MlflowException.invalid_parameter_value(
            "covseg model input must be slices windowed to [0, 1], got NaN or inf values")
    if x.min() < 0 or x.max() > 1:
        raise MlflowException.invalid_parameter_value(
            "covseg model input must be slices windowed to [0, 1] (as covseg preprocess makes them), "
            f"got values in [{x.min():.4g}, {x.max():.4g}]")
    return x


class SegmenterModel(PythonModel):
    """The pyfunc model: `load_context` rebuilds the Segmenter from the checkpoint artifact
    (model_config `device`: auto by default), `predict` returns its logits."""

    def load_context(self, context) -> None:
        from covseg.model import load_checkpoint, pick_device

        self.device = pick_device((context.model_config or {}).get("device", "auto"))
        self.model, _ = load_checkpoint(context.artifacts[MODEL_CHECKPOINT], self.device)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        from covseg.model import predict_logits

        batch_size = int((params or {}).get("batch_size", DEFAULT_BATCH_SIZE))
        if batch_size < 1:
            raise MlflowException.invalid_parameter_value(f"batch_size must be at least 1, got {batch_size}")
        return predict_logits(self.model, as_batch(model_input)[:, 0], batch_size, self.device)
