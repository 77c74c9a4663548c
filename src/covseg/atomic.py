"""Outputs written whole or not at all: stage into a hidden sibling, then one rename.

A crashed or killed run leaves at most a `.partial-<name>` sibling, which the next write to the same
target clears before it starts; the previous output stays in place until the new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def staging_path(target: str | Path) -> Path:
    target = Path(target)
    return target.with_name(f".partial-{target.name}")  # keeps the suffix: np.save, torch.save, to_csv


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(target: str | Path, directory: bool = False):
    """Yield a staging path (an empty folder if `directory`) that replaces `target` when the block ends
    without error; on error the staging path is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    _remove(staging)  # a leftover of a crashed run
    if directory:
        staging.mkdir()
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    if directory:
        old = target.with_name(f".old-{target.name}")
        _remove(old)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        _remove(old)
    else:
        os.replace(staging, target)


def _jsonable(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def to_jsonable(obj):
    """numpy scalars (and anything else JSON lacks) -> plain JSON values, recursively."""
    return json.loads(json.dumps(obj, default=_jsonable))


def write_json(obj, path: str | Path) -> Path:
    """Write JSON atomically; numpy scalars become plain numbers."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")
    return Path(path)
