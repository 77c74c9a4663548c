"""params.yaml: the one home of every tunable number."""
from __future__ import annotations

from pathlib import Path

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
