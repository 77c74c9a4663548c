"""params.yaml (the one home of every tunable number), and writing small JSON outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file is missing (run from the repository root or pass --params)")
    return yaml.safe_load(path.read_text())


def flatten(params: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}; lists become strings."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value) if isinstance(value, (list, tuple)) else value
    return out


def jsonable(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def write_json(obj, path: str | Path) -> Path:
    """Write JSON atomically (temporary file, then rename); numpy scalars become plain numbers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=jsonable) + "\n")
    tmp.replace(path)
    return path
