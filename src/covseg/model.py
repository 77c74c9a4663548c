"""The seed's plain U-Net (3x3 convs, 2x2 max-pool, transposed-conv upsampling, skips) and inference."""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covseg.atomic import atomic_output
from covseg.errors import CovsegError
from covseg.names import MAX_MEMBERS, NUM_CLASSES, SCORED
from covseg.params import ModelParams


def _norm(kind: str, channels: int) -> nn.Module:
    return {"batch": lambda: nn.BatchNorm2d(channels),
            "instance": lambda: nn.InstanceNorm2d(channels, affine=True),
            "none": nn.Identity}[kind]()


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES, base_channels: int = 16,
                 depth: int = 4, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "instance", "none"):
            raise ValueError(f"model.norm must be batch, instance or none, got {norm!r}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes,
                           base_channels=base_channels, depth=depth, norm=norm)
        widths = [base_channels * 2 ** i for i in range(depth + 1)]

        def block(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.ReLU(inplace=True))

        self.down = nn.ModuleList([block(cin, cout) for cin, cout in zip([in_channels] + widths[:-1], widths)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([block(2 * widths[i], widths[i]) for i in range(depth)])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) of any H, W: padded (edge values) to a multiple of 2**depth, cropped back."""
        h, w = x.shape[-2:]
        m = 2 ** len(self.up)
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for i, down in enumerate(self.down):
            x = down(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([skips.pop(), self.up[i](x)], dim=1))
        return self.head(x)[..., :h, :w]


def build_model(m: ModelParams) -> UNet:
    return UNet(base_channels=m.base_channels, depth=m.depth, norm=m.norm)


class Ensemble(nn.Module):
    """Networks of one config trained apart (train.members); their logits are averaged."""

    def __init__(self, nets: list[UNet]):
        super().__init__()
        if len({json.dumps(n.config, sort_keys=True) for n in nets}) != 1:
            raise ValueError("an ensemble's networks must share one config")
        self.nets, self.config = nn.ModuleList(nets), nets[0].config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.nets[0](x)
        for net in self.nets[1:]:
            out = out + net(x)
        return out / len(self.nets)


def members(net: UNet | Ensemble) -> list[UNet]:
    """The networks a model averages: one, or an ensemble's."""
    return list(net.nets) if isinstance(net, Ensemble) else [net]


def bf16_autocast(device: torch.device) -> bool:
    """Whether train.amp trains in bfloat16 autocast on `device`: CUDA, or a CPU with native bfloat16
    (AVX512-BF16 or AMX; elsewhere bfloat16 is emulated and slower than float32)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def pick_device(name: str = "auto") -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CovsegError(f"device {name!r}: this machine has no CUDA GPU that torch {torch.__version__} can use "
                          f"(a CPU machine: device auto or cpu, e.g. -S train.device=auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CovsegError("device 'mps': Apple's GPU is not available here (device auto or cpu)")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Segmenter(nn.Module):
    """The deployable model: full-size slices (N, 1, H, W) in [0, 1] -> full-size logits (N, 4, H, W).

    `unet` is one U-Net or an Ensemble of them (train.members: their logits averaged).
    The U-Net inside may work at a fraction `scale` of the slice size (train.scale); this wrapper
    resizes on the way in and out, so every consumer (evaluate, submit, the registry) sees full size.
    With `tta` the logits are the mean over the slice and its left-right mirror. `postprocess` turns
    logits into labels, dropping findings smaller than `min_island` pixels .
    `class_bias` is added to each class's logits: a class the training's weights make too rare or too
    common is called more or less often. Training saves these neutral (off); `covseg calibrate` chooses
    them on out-of-fold logits and covseg.calibration sets them where a model is used.
    """

    def __init__(self, unet: UNet | Ensemble, scale: float = 1.0, tta: bool = False, min_island: int = 0,
                 class_bias: list[float] | None = None):
        super().__init__()
        self.unet, self.scale, self.tta, self.min_island = unet, float(scale), bool(tta), int(min_island)
        self.class_bias = [float(b) for b in class_bias] if class_bias else [0.0] * unet.config["num_classes"]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.unet(resize(x, self.scale, "bilinear"))
        if self.scale != 1:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x) if not self.tta else (self._logits(x) + self._logits(x.flip(-1)).flip(-1)) / 2
        if any(self.class_bias):
            logits = logits + torch.tensor(self.class_bias, dtype=logits.dtype, device=logits.device)[:, None, None]
        return logits

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, 4, H, W) logits -> (N, H, W) uint8 labels; a connected finding (ground glass or
        consolidation) of fewer than `min_island` pixels takes the slice's next most likely class."""
        labels = class_index(logits)
        if self.min_island <= 0:
            return labels
        return torch.from_numpy(remove_islands(labels.numpy(), logits.numpy(), self.min_island))


def remove_islands(labels: np.ndarray, logits: np.ndarray, min_island: int) -> np.ndarray:
    """(N, H, W) labels with every connected finding (ground glass or consolidation) of fewer than
    `min_island` pixels given its pixels' next most likely class of the (N, C, H, W) `logits`."""
    from scipy import ndimage

    out = np.array(labels, dtype=np.uint8)
    if min_island <= 0:
        return out
    for lab, lg in zip(out, logits):
        for c in SCORED:
            comps, n = ndimage.label(lab == c)
            if n == 0:
                continue
            small = (np.bincount(comps.ravel()) < min_island)[comps] & (comps > 0)
            if small.any():
                rest = np.array(lg, dtype=np.float32)
                rest[c] = -np.inf
                lab[small] = rest.argmax(0)[small]
    return out


NETWORK_CONFIG = frozenset(inspect.signature(UNet).parameters)  # what a checkpoint's "config" may hold


def save_checkpoint(model: Segmenter, path: str | Path, **extra) -> None:
    """Weights, network config and `extra` facts (epoch, score, MLflow ids), written atomically."""
    with atomic_output(path) as tmp:
        torch.save({"config": model.unet.config, "scale": model.scale, "tta": model.tta,
                    "min_island": model.min_island, "class_bias": model.class_bias,
                    "members": len(members(model.unet)), "state_dict": model.unet.state_dict(), **extra}, tmp)


SAFE_TORCH = (2, 6)  # the first torch whose torch.load(weights_only=True) no crafted file gets around


def require_safe_torch_load() -> None:
    """Refuse (CovsegError) to load weights with a torch older than 2.6: with it a crafted file runs code
    through torch.load(weights_only=True) (CVE-2025-32434). Called before every torch.load of covseg."""
    found = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if found is None or tuple(map(int, found.groups())) < SAFE_TORCH:
        raise CovsegError(f"torch {torch.__version__} is older than 2.6, which fixed CVE-2025-32434 (weights_only "
                          f"bypass): covseg loads no weights with it; install torch>=2.6")


def valid_choices(class_bias, tta, min_island) -> bool:
    """Inference choices a Segmenter takes: NUM_CLASSES offsets in -10..10, a bool, whole pixels."""
    return (isinstance(class_bias, list) and len(class_bias) == NUM_CLASSES
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and abs(b) <= 10 for b in class_bias)
            and isinstance(tta, bool)
            and isinstance(min_island, int) and not isinstance(min_island, bool) and 0 <= min_island <= 1 << 20)


def _config_problem(config) -> str | None:
    """What is wrong with a checkpoint's network config (data from the file), or None."""
    if not isinstance(config, dict) or not set(config) <= NETWORK_CONFIG:
        extra = sorted(map(str, set(config) - NETWORK_CONFIG)) if isinstance(config, dict) else type(config).__name__
        return (f"a network config this version of covseg does not build ({extra}; it builds "
                f"{', '.join(sorted(NETWORK_CONFIG))}): retrain it, or load it with the covseg that wrote it")
    bounds = {"in_channels": (1, 1), "num_classes": (NUM_CLASSES, NUM_CLASSES), "base_channels": (1, 256),
              "depth": (1, 7)}
    for key, (low, high) in bounds.items():
        value = config.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"config {key} = {value!r:.40} is not a whole number in {low}..{high}"
    if config.get("norm", "batch") not in ("batch", "instance", "none"):
        return f"config norm = {config.get('norm')!r:.40} is not batch, instance or none"
    return None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Segmenter, dict]:
    """A checkpoint written by save_checkpoint; weights only, nothing is unpickled. Its facts are data, checked
    before use; the network is built without memory (meta tensors) and takes the file's tensors, so the memory
    a checkpoint can claim is bounded by its size."""
    require_safe_torch_load()
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict):
        raise CovsegError(f"{path}: not a covseg checkpoint (a {type(ckpt).__name__}, not a dict of facts)")
    n, config, scale = ckpt.get("members", 1), ckpt.get("config"), ckpt.get("scale")
    tta, min_island = ckpt.get("tta", False), ckpt.get("min_island", 0)
    class_bias = ckpt.get("class_bias") or [0.0] * NUM_CLASSES
    problem = _config_problem(config)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_MEMBERS:
        problem = f"'members' = {n!r:.40} is not an ensemble size (1..{MAX_MEMBERS})"
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        problem = f"'scale' = {scale!r:.40} is not in (0, 1]"
    elif not valid_choices(class_bias, tta, min_island):
        problem = (f"inference choices (class_bias {class_bias!r:.80}, tta {tta!r:.10}, min_island {min_island!r:.20}) "
                   f"are not {NUM_CLASSES} offsets in -10..10, true|false and whole pixels")
    if problem:
        raise CovsegError(f"{path}: {problem}")
    with torch.device("meta"):
        unet = UNet(**config) if n == 1 else Ensemble([UNet(**config) for _ in range(n)])
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CovsegError(f"{path}: no state_dict of weights")
    try:
        unet.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CovsegError(f"{path}: its weights do not fit its network config ({str(e).splitlines()[0][:200]}; "
                          f"{str(e).splitlines()[-1].strip()[:200]})") from None
    model = Segmenter(unet, float(scale), tta, min_island, class_bias)
    return model.to(device).eval(), ckpt


def class_index(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logits -> (N, H, W) uint8 index of each pixel's largest class, as `argmax(1)` (ties to the
    lower index); through a channels-last copy, which on a CPU is about 10x faster than argmax over dim 1."""
    return logits.movedim(1, -1).contiguous().argmax(-1).to(torch.uint8)


def resize(x: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    """Scale a (N, C, H, W) batch; identity for scale 1."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 4,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Images (N, H, W) in [0, 1] -> logits (N, 4, H, W) float32, with a full-size model (Segmenter)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32))
        out.append(model(x[:, None].to(device)).float().cpu().numpy())
    return np.concatenate(out)


def predict_labels(model: nn.Module, images: np.ndarray, batch_size: int = 4,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Images (N, H, W) in [0, 1] -> class index (N, H, W) uint8, post-processed as the model says."""
    logits = torch.from_numpy(predict_logits(model, images, batch_size, device))
    if isinstance(model, Segmenter):
        return model.postprocess(logits).numpy()
    return class_index(logits).numpy()
