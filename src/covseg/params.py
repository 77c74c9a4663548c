"""params.yaml, the one home of every tunable number, loaded once and checked against a schema.

`load_params` returns a typed `Params`; a wrong key or value is one `ParamsError` that names the key,
the value and what is allowed, before any work starts. Stages receive only the sections they read.
`apply_overrides` checks `{"train.epochs": 3}`-style overrides (the flows' and `dvc exp run -S`'s
form) against the same schema.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from covseg.errors import ParamsError
from covseg.names import HEADLINE_METRICS, NUM_CLASSES, PATHS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Synth(Section):
    n_labelled: int = Field(ge=2)
    n_test: int = Field(ge=1)
    size: int = Field(ge=32, le=2048)
    seed: int = Field(ge=0)


class Window(Section):
    hu_min: float
    hu_max: float

    @field_validator("hu_max")
    @classmethod
    def _not_empty(cls, value: float, info: ValidationInfo) -> float:
        if "hu_min" in info.data and value <= info.data["hu_min"]:
            raise ValueError(f"must be greater than window.hu_min ({info.data['hu_min']})")
        return value


class Split(Section):
    folds: int = Field(ge=2, le=20)
    fold: int = Field(ge=0)

    @field_validator("fold")
    @classmethod
    def _fold_in_range(cls, value: int, info: ValidationInfo) -> int:
        folds = info.data.get("folds")
        if folds is not None and value >= folds:
            raise ValueError(f"must be in 0..{folds - 1} (split.folds is {folds})")
        return value


class ModelParams(Section):
    base_channels: int = Field(ge=1, le=256)
    depth: int = Field(ge=1, le=7)
    norm: Literal["batch", "instance", "none"]


Weight = Annotated[float, Field(ge=0)]


class Train(Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    loss: Literal["ce", "dice_ce"]
    class_weights: list[Weight] = Field(min_length=NUM_CLASSES, max_length=NUM_CLASSES)
    augment: bool
    scale: float = Field(gt=0, le=1)
    device: str

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value


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


class Tracking(Section):
    experiment: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)


class Registry(Section):
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    promotion_metric: Literal[HEADLINE_METRICS]  # type: ignore[valid-type]
    promotion_margin: float = Field(ge=0, le=1)
    min_score: float = Field(ge=0, le=1)
    min_eval_slices: int = Field(ge=1)
    lock_lease_s: float = Field(gt=0)
    lock_wait_s: float = Field(ge=0)
    lock_settle_s: float = Field(gt=0)


class Params(Section):
    seed: int = Field(ge=0)
    synth: Synth
    window: Window
    split: Split
    model: ModelParams
    train: Train
    evaluate: Evaluate
    validate_: Validate = Field(alias="validate")  # `validate` is a BaseModel method
    tracking: Tracking
    registry: Registry

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
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ParamsError("\n".join(_describe(e, source) for e in exc.errors())) from None


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
