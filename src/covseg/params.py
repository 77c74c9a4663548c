"""params.yaml, the one home of every tunable number, loaded once and checked against a schema.

params.yaml is what DVC composes (Hydra) from conf/config.yaml and a recipe of conf/recipe/ on every
`dvc exp run`; `compose` does the same composition for covseg's own commands and the flows, with the same
`-S` overrides (`recipe=gpu`, `train.epochs=3`), checked before any work starts.
`load_params` returns a typed `Params`; a wrong key or value is one `ParamsError` that names the key,
the value and what is allowed. Stages receive only the sections they read.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from covseg.errors import ParamsError
from covseg.names import HEADLINE_METRICS, MAX_MEMBERS, NUM_CLASSES, PATHS


def check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def greater_than(section: str, low: str):
    """A field validator: the value must exceed the section's field `low` (declared before it)."""

    def check(cls, value: float, info: ValidationInfo) -> float:
        if low in info.data and value <= info.data[low]:
            raise ValueError(f"must be greater than {section}.{low} ({info.data[low]})")
        return value

    return check


class Synth(Section):
    n_labelled: int = Field(ge=2)
    n_test: int = Field(ge=1)
    size: int = Field(ge=32, le=2048)
    seed: int = Field(ge=0)


class Window(Section):
    hu_min: float
    hu_max: float

    _not_empty = field_validator("hu_max")(greater_than("window", "hu_min"))


class Split(Section):
    folds: int = Field(ge=2, le=20)
    fold: int | str  # all: no slice held out (the shipped model); k: fold k held out (cross-validation)

    @field_validator("fold")
    @classmethod
    def _fold_in_range(cls, value: int | str, info: ValidationInfo) -> int | str:
        folds = info.data.get("folds", 0)
        if value != "all" and (isinstance(value, str) or not 0 <= value < folds):
            raise ValueError(f"must be all or in 0..{folds - 1} (split.folds is {folds})")
        return value


class ModelParams(Section):
    base_channels: int = Field(ge=1, le=256)
    depth: int = Field(ge=1, le=7)
    norm: Literal["batch", "instance", "none"]


Weight = Annotated[float, Field(ge=0)]
# what train.init may name: a registered model, or a checkpoint file (no interpolation, no shell characters)
MODEL_URI = re.compile(r"models:/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_-]+|/[1-9][0-9]*)")
CHECKPOINT_PATH = re.compile(r"[A-Za-z0-9_./-]+\.pt")


class Train(Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    optimizer: Literal["adam", "adamw"]
    lr: float = Field(ge=0)
    warmup_epochs: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    loss: Literal["ce", "dice_ce"]
    class_weights: list[Weight] = Field(min_length=NUM_CLASSES, max_length=NUM_CLASSES)
    crop: int = Field(ge=0)
    crops_per_slice: int = Field(ge=1)
    crop_ratios: list[Weight] = Field(min_length=NUM_CLASSES, max_length=NUM_CLASSES)
    augment: bool
    aug_rotate: float = Field(ge=0, le=3.15)
    aug_scale: float = Field(ge=0, lt=1)
    aug_gamma: float = Field(ge=0, lt=1)
    aug_intensity: float = Field(ge=0, lt=1)
    scale: float = Field(gt=0, le=1)
    select: Literal["last", "best"]
    val_every: int = Field(ge=1)
    members: int = Field(ge=1, le=MAX_MEMBERS)
    init: str
    device: str
    amp: bool

    @field_validator("crop")
    @classmethod
    def _crop_even(cls, value: int) -> int:
        if value and value < 16:
            raise ValueError("must be 0 (whole slices) or at least 16 pixels")
        return value

    @field_validator("members")
    @classmethod
    def _one_best_epoch(cls, value: int, info: ValidationInfo) -> int:
        if value > 1 and info.data.get("select") == "best":
            raise ValueError("must be 1 with train.select: best (each member would keep an epoch of its own); "
                             "use train.select: last")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("init")
    @classmethod
    def _init(cls, value: str) -> str:
        if value and not (MODEL_URI.fullmatch(value) or CHECKPOINT_PATH.fullmatch(value)):
            raise ValueError("must be empty, a registry model (models:/NAME@ALIAS or models:/NAME/VERSION) or a "
                             "checkpoint path of letters, digits and _ . / - only")
        return value


Offset = Annotated[float, Field(ge=-10, le=10)]


class Calibrate(Section):
    """What `covseg calibrate` may choose on the out-of-fold logits (covseg.calibration)."""
    offsets: list[Literal["ggo", "consolidation"]] = Field(max_length=2)
    offset_grid: list[Offset] = Field(min_length=1)
    tta: list[bool] = Field(min_length=1, max_length=2)
    min_island: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class Evaluate(Section):
    overlays: int = Field(ge=0)
    batch_size: int = Field(ge=1)


class Validate(Section):
    hu_min: float
    hu_max: float
    air_hu_max: float
    min_hu_range: float = Field(ge=0)
    max_lesion_fraction: float = Field(ge=0, le=1)
    min_background_fraction: float = Field(ge=0, le=1)
    max_lesion_outside_body: float = Field(ge=0, le=1)
    body_hu: float
    lung_hu_mean_max: float
    min_lung_fraction: float = Field(ge=0, le=1)
    min_consolidation_minus_ggo_hu: float
    min_finding_pixels: int = Field(ge=1)
    near_duplicate_hu: float = Field(ge=0)
    thumbnail_size: int = Field(ge=8)
    near_duplicate_shift_px: int = Field(ge=0, le=16)  # near-copies searched also moved by up to this
    min_mask_edge_fit: float = Field(ge=0)             # lung outline's gradient in place / best moved
    registration_search_px: int = Field(ge=1, le=64)   # ... moved by up to this
    min_mask_edge_contrast_hu: float                   # HU just outside the lung label minus just inside
    outside_air_hu_max: float                          # a file's median outside-air HU
    lung_parenchyma_hu_max: float                      # a file's median aerated-lung HU


class Tracking(Section):
    experiment: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)


class Registry(Section):
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    promotion_metric: Literal[HEADLINE_METRICS]  # type: ignore[valid-type]
    promotion_margin: float = Field(ge=0, le=1)
    min_score: float = Field(ge=0, le=1)
    min_eval_slices: int = Field(ge=1)
    lock_lease_s: float = Field(ge=60, le=86400)  # Prefect's shortest and longest lease of a slot
    lock_wait_s: float = Field(ge=0)


Percent = Annotated[float, Field(gt=0, le=100)]


class Predict(Section):
    batch_size: int = Field(ge=1)
    device: str
    threads: int = Field(ge=0)            # 0: torch's default (one per physical core)
    png_hu_min: float                     # the HU window a PNG / JPG slice was exported with:
    png_hu_max: float                     # grey 0 -> png_hu_min, 255 -> png_hu_max
    colour_tolerance: float = Field(ge=0)  # mean |R-G|, |G-B| (grey levels) above which an image is colour
    min_hu_range: float = Field(ge=0)     # max - min HU of a scan must reach this (0..1 or 0..255 data fails)
    air_hu_max: float                     # the darkest voxel must be air-like (below this) in a CT
    dicom_tolerance_mm: float = Field(gt=0)  # DICOM slice positions / spacings that agree within this
    max_voxels: int = Field(ge=1)         # a scan claiming more voxels is refused before its data is read
    max_slice_pixels: int = Field(ge=1)   # ... or more pixels in one slice
    overlays: int = Field(ge=0)           # overlay PNGs per scan: the slices with most findings
    severity_thresholds: list[Percent] = Field(min_length=1)
    chunk_size: int = Field(ge=1)         # scans per task of the predict flow (flows/predict.py)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)

    _png_window = field_validator("png_hu_max")(greater_than("predict", "png_hu_min"))

    @field_validator("severity_thresholds")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError("must be strictly increasing percentages in (0, 100]")
        return value


NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class Params(Section):
    recipe: str = Field(pattern=NAME, max_length=100)  # the conf/recipe/ file composed on top of conf/config.yaml
    seed: int = Field(ge=0)
    synth: Synth
    window: Window
    split: Split
    model: ModelParams
    train: Train
    calibrate: Calibrate
    evaluate: Evaluate
    validate_: Validate = Field(alias="validate")  # `validate` is a BaseModel method
    tracking: Tracking
    registry: Registry
    predict: Predict

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, populate_by_name=True)

    def tree(self) -> dict:
        """The params as plain data, keyed as in params.yaml."""
        return self.model_dump(by_alias=True, mode="json")

    def override(self, overrides: dict, source: str = "overrides") -> Params:
        """A checked copy with `{"section.key": value}` overrides applied."""
        return apply_overrides(self.tree(), overrides, source)[1]

    def flat(self) -> dict[str, Any]:
        """{'train.lr': 0.001, ...}: every value by its dotted key (lists as text), for MLflow."""
        return flatten(self.tree())


def recipe_key(seed: int, m: ModelParams, t: Train, data_key: str) -> str:
    """What a trained model's out-of-fold scores and calibration are keyed by: the params its training
    reads (not the machine: train.device, train.amp) and the data it was trained on (`data_key`: the raw
    data, its HU window and its folds). A cross-validation fold and the model trained on every slice of the
    same recipe and data share it."""
    read = {"seed": seed, "model": m.model_dump(mode="json"),
            "train": {k: v for k, v in t.model_dump(mode="json").items() if k not in ("device", "amp")}}
    return hashlib.sha256(json.dumps([read, data_key], sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(list(value)) if isinstance(value, (list, tuple)) else value
    return out


def _describe(error: dict, source: str) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{source}: unknown key {key} (a typo, or a key this version of covseg does not have)"
    if error["type"] == "missing":
        return f"{source}: {key} is missing"
    return f"{source}: {key} = {error.get('input')!r} is not allowed: {message}"


def check(tree: Any, source: str = PATHS.params) -> Params:
    """Validate a params tree; one ParamsError naming every bad key, its value and what is allowed."""
    if not isinstance(tree, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, found {type(tree).__name__}")
    try:
        params = Params.model_validate(tree)
    except ValidationError as exc:
        raise ParamsError("\n".join(_describe(e, source) for e in exc.errors())) from None
    return params


def read_tree(path: str | Path = PATHS.params) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file is missing (run from the repository root or pass --params)")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from None


def load_params(path: str | Path = PATHS.params) -> Params:
    """Read and check params.yaml."""
    return check(read_tree(path), str(path))


OVERRIDE = re.compile(r"(?P<key>[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)=(?P<value>.*)", re.DOTALL)


def check_override_syntax(item: str, known: set[str]) -> None:
    """One `-S` override as data: `KEY=VALUE` of a key params.yaml has (or `recipe=NAME`), nothing more.

    Refused: Hydra's `+key` / `~key` / `++key` (new or deleted keys), `FILE:key` (DVC would edit that file,
    dvc.yaml's commands included), and in a value `$` or `\\` (an interpolation, `${oc.env:SECRET}` say, or
    Hydra's escaped `$\\{...\\}`, that composition would resolve into params.yaml) and `(` (Hydra's functions:
    `shuffle(...)` draws again when DVC composes)."""
    match = OVERRIDE.fullmatch(item) if isinstance(item, str) else None
    if match is None:
        raise ParamsError(f"-S {item!r}: expected KEY=VALUE with KEY a key of {PATHS.params} (for example "
                          f"train.epochs=3) or recipe=NAME; no +, ~ or FILE: prefixes")
    key, value = match["key"], match["value"]
    if key != "recipe" and key not in known:
        raise ParamsError(f"-S {item!r}: unknown key {key!r}: overrides may set only keys of {PATHS.params} "
                          f"(for example train.epochs)")
    if bad := sorted(set(value) & set("$\\()\n")):
        raise ParamsError(f"-S {key}=...: a value may not hold {' '.join(map(repr, bad))} (no interpolation, "
                          f"escape or function: an override is plain data)")


def recipes(conf: str | Path = PATHS.conf) -> list[str]:
    """The recipes under conf/recipe/, by name."""
    return sorted(p.stem for p in (Path(conf) / "recipe").glob("*.yaml"))


def compose(overrides: list[str] | None = None, conf: str | Path = PATHS.conf) -> tuple[dict, Params]:
    """The params `dvc exp run -S ...` would run with: conf/config.yaml, the recipe chosen (`recipe=gpu`;
    default: conf/recipe/default.yaml) and the other overrides on top, composed by Hydra as DVC does, then
    checked. Every override is checked as data first (`check_override_syntax`). Returns (tree, Params)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf = Path(conf).resolve()
    if not (conf / "config.yaml").is_file():
        raise ParamsError(f"{conf / 'config.yaml'}: missing (run from the repository root)")
    overrides = list(overrides or [])
    known = set(flatten(read_tree(conf / "config.yaml"))) - {"defaults"}
    for item in overrides:
        check_override_syntax(item, known)
    keys = [item.split("=", 1)[0] for item in overrides]
    if twice := sorted({k for k in keys if keys.count(k) > 1}):
        raise ParamsError(f"-S: {', '.join(twice)} given twice (one value each)")
    choice = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("recipe=")), "default")
    if choice not in recipes(conf):
        raise ParamsError(f"-S recipe={choice}: no such recipe in {conf / 'recipe'} (there are: "
                          f"{', '.join(recipes(conf))})")
    try:
        with initialize_config_dir(str(conf), version_base=None):
            cfg = hydra_compose("config", overrides=overrides)
        if interpolated := [k for k, v in flatten(OmegaConf.to_container(cfg, resolve=False)).items()
                            if "${" in str(v)]:
            raise ParamsError(f"-S: {', '.join(interpolated)} would be an interpolation: params are plain data")
        tree = OmegaConf.to_container(cfg, resolve=False)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ParamsError(f"-S {' '.join(overrides)}: {str(exc).splitlines()[0]}") from None
    return tree, check(tree, f"{conf.name}/ with -S {' '.join(overrides)}" if overrides else f"{conf.name}/")


def apply_overrides(tree: dict, overrides: dict | None, source: str = "overrides") -> tuple[dict, Params]:
    """Set `{"section.key": value}` overrides on a params tree and check the result.

    Only keys that params.yaml already has are accepted (no other file, no new keys): an override is
    data, never a way to edit dvc.yaml. Returns the new tree and its checked Params.
    """
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise ParamsError(f"{source}: expected a mapping of 'section.key' to value, found {type(overrides).__name__}")
    known = flatten(tree)
    new = copy.deepcopy(tree)
    for key, value in overrides.items():
        if not isinstance(key, str) or key not in known:
            raise ParamsError(f"{source}: unknown key {key!r}: overrides may set only keys of {PATHS.params}"
                              f" (for example train.epochs)")
        node = new
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return new, check(new, f"{source} on {PATHS.params}")
