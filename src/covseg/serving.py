"""The registry model as it is served: a weights-only checkpoint in, the network rebuilt by the installed covseg.

A covseg model is an MLflow pyfunc whose `loader_module` is this module (covseg.modelstore logs it): MLflow
imports it from the environment, never from the artifact, and `_load_pyfunc` reads the checkpoint written by
`covseg.model.save_checkpoint` weights only. `covseg serve` (`app`, `serve`) runs MLflow's scoring server on a
model that covseg.modelstore loaded after checking its form, so a registry entry decides no code that runs.

Contract: input float32 (N, 1, H, W), slices windowed to [0, 1]; output float32 logits (N, 4, H, W)
in the class order of `covseg.names.CLASSES` (argmax over axis 1 = the class index). A request holds
at most MAX_SLICES slices of at most MAX_SIDE x MAX_SIDE pixels and MAX_PIXELS pixels in all (checked
on the shape, before the network runs); any slice down to 1x1 is segmented (a slice too small for the
network is padded for it and its logits cropped back). Request param `batch_size` (default 4,
1..MAX_SLICES): how many slices go through the network at once. Every refusal is an MlflowException
that the scoring server answers with HTTP 400 and its message only; a failure inside the network is
logged here and answered with a 500 that holds no stack trace and no path.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from covseg.model import load_checkpoint, pick_device, predict_logits
from covseg.names import NUM_CLASSES

LOADER_MODULE = __name__  # what a covseg model's MLmodel names: MLflow imports it from the installed covseg
DEFAULT_BATCH_SIZE = 4
# One request's caps (docs/registry.md, "Serving from the registry"). The CT slices covseg is made for are
# 512x512 (a few scanners write 768 or 1024). The pixel budget bounds the largest request (8 slices of
# 512x512: 42 MB of JSON in, 184 MB out; the default model took 15-21 s in process on a loaded 2-core
# CPU, about 1 s a slice when idle, and 1.1 GB for the process) inside the scoring server's 60 s request
# timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT). Whole scans go through `covseg predict`, not REST.
MAX_SLICES = 16
MAX_SIDE = 1024
MAX_PIXELS = 8 * 512 * 512
# A request body is parsed whole before its shape can be checked: this bounds it (MAX_PIXELS numbers of up to
# about 40 characters of JSON each).
MAX_REQUEST_BYTES = 96 * 1024 * 1024

_log = logging.getLogger(__name__)


def signature() -> ModelSignature:
    """float32 (N, 1, H, W) -> float32 (N, 4, H, W), any N, H, W up to the caps; param batch_size."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES, -1, -1))]),
        params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]))


def _refuse(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def check_shape(shape: tuple[int, ...]) -> None:
    """A (N, 1, H, W) request within the caps; one clear error naming the limit otherwise."""
    if len(shape) != 4 or shape[1] != 1 or 0 in shape:
        raise _refuse(f"covseg model input must be slices of shape (N, 1, H, W), got shape {tuple(shape)}")
    n, _, h, w = shape
    if n > MAX_SLICES:
        raise _refuse(f"covseg model takes at most {MAX_SLICES} slices per request, got {n}: "
                      "send them in several requests (whole scans: covseg predict)")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise _refuse(f"covseg model takes slices of at most {MAX_SIDE}x{MAX_SIDE} pixels, got {h}x{w}")
    if n * h * w > MAX_PIXELS:
        raise _refuse(f"covseg model takes at most {MAX_PIXELS} pixels per request ({MAX_PIXELS // 512 ** 2} "
                      f"slices of 512x512), got {n} slices of {h}x{w} = {n * h * w}: send fewer slices per request")


def as_batch(model_input) -> np.ndarray:
    """The input as a float32 (N, 1, H, W) array of finite values in [0, 1] within the caps; one clear
    error otherwise. The shape is checked before the values are converted or read."""
    if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": ...} or one named tensor
        model_input = next(iter(model_input.values()))
    try:
        x = np.asarray(model_input)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise _refuse(f"covseg model input must be slices of shape (N, 1, H, W): {e}") from None
    if x.ndim == 3:  # (N, H, W): add the channel
        x = x[:, None]
    check_shape(x.shape)
    if x.dtype.kind not in "biuf":
        raise _refuse(f"covseg model input must be numbers (float32 slices windowed to [0, 1]), got {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise _refuse("covseg model input must be slices windowed to [0, 1], got NaN or inf values")
    if x.min() < 0 or x.max() > 1:
        raise _refuse("covseg model input must be slices windowed to [0, 1] (as covseg preprocess makes them), "
                      f"got values in [{x.min():.4g}, {x.max():.4g}]")
    return x


def network_size(model, h: int, w: int) -> tuple[int, int]:
    """The (H, W) >= (h, w) that `model` (a Segmenter) can segment a h x w slice at. Its U-Net works at
    floor(side * scale) pixels a side (train.scale), which must be at least 1; with instance norm it
    also needs more than one value per channel at the bottleneck, where the U-Net's own padding to a
    multiple of 2**depth leaves ceil(scaled side / 2**depth) pixels a side."""
    scale, config = model.scale, model.unet.config

    def at_least(side: int, scaled: int) -> int:  # the smallest size >= side that scales to >= scaled pixels
        side = max(side, math.ceil(scaled / scale) - 1)
        while math.floor(side * scale) < scaled:
            side += 1
        return side

    h, w = at_least(h, 1), at_least(w, 1)
    m = 2 ** config["depth"]
    bottleneck = math.ceil(math.floor(h * scale) / m) * math.ceil(math.floor(w * scale) / m)
    if config["norm"] == "instance" and bottleneck == 1:
        h = at_least(h, m + 1)
    return h, w


class ServedModel:
    """What MLflow's scoring server calls: `predict` returns the logits of `model` (a Segmenter) on `device`."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def predict(self, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        batch_size = (params or {}).get("batch_size", DEFAULT_BATCH_SIZE)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or not 1 <= batch_size <= MAX_SLICES:
            raise _refuse(f"batch_size must be 1..{MAX_SLICES} (slices through the network at once), "
                          f"got {batch_size!r}")
        x = as_batch(model_input)[:, 0]
        n, h, w = x.shape
        size = network_size(self.model, h, w)
        if size != (h, w):  # too small for the network: edge values around it (as the U-Net pads), cropped back
            x = np.pad(x, ((0, 0), (0, size[0] - h), (0, size[1] - w)), mode="edge")
        try:
            logits = predict_logits(self.model, x, int(batch_size), self.device)
        except Exception:
            _log.exception("covseg model failed on %d slice(s) of %dx%d (batch_size %d)", n, h, w, batch_size)
            raise MlflowException(f"covseg model could not segment {n} slice(s) of {h}x{w}: an error inside the "
                                  "model, logged by the server", error_code=INTERNAL_ERROR) from None
        return np.ascontiguousarray(logits[..., :h, :w])


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> ServedModel:
    """MLflow's loader_module entry (`mlflow.pyfunc.load_model` of a covseg version): the checkpoint at
    `data_path`, weights only, on model_config `device` (auto by default)."""
    device = pick_device((model_config or {}).get("device", "auto"))
    return ServedModel(load_checkpoint(data_path, device)[0], device)


def app(model, device):
    """MLflow's scoring server (FastAPI: /invocations, /ping, /health, /version) for `model` on `device`, with
    covseg's signature; nothing of a registry entry is read here."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from mlflow.models import Model
    from mlflow.pyfunc import PyFuncModel
    from mlflow.pyfunc.scoring_server import init

    served = init(PyFuncModel(model_meta=Model(signature=signature()), model_impl=ServedModel(model, device)))

    @served.middleware("http")
    async def bounded_body(request: Request, call_next):
        """Refuse a body without a length (411) or longer than MAX_REQUEST_BYTES (413) before it is read."""
        if request.method == "POST":
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return JSONResponse({"error_code": "BAD_REQUEST", "message": "a request needs a Content-Length"},
                                    status_code=411)
            if int(length) > MAX_REQUEST_BYTES:
                return JSONResponse({"error_code": "BAD_REQUEST", "message": (
                    f"a request body may hold at most {MAX_REQUEST_BYTES} bytes, got {length}: send fewer slices "
                    f"per request (whole scans: covseg predict)")}, status_code=413)
        return await call_next(request)

    return served


def serve(model, device, host: str, port: int) -> None:
    """Answer REST requests for `model` on host:port until stopped (one process, requests in threads)."""
    import uvicorn

    uvicorn.run(app(model, device), host=host, port=port, log_level="info")
