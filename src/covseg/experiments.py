"""DVC experiments of a named params set: `covseg exp run seed` = `dvc exp run -n seed -S key=value ...`."""
from __future__ import annotations

import json
import re
import subprocess

from covseg.errors import CovsegError, ParamsError
from covseg.params import Params


def override_args(overrides: dict) -> list[str]:
    """{'train.epochs': 3} -> ['-S', 'train.epochs=3'] for `dvc exp run`; call on checked overrides only.
    Values are written as JSON, which DVC reads back as YAML of the same type."""
    args = []
    for key, value in sorted(overrides.items()):
        args += ["-S", f"{key}={json.dumps(value)}"]
    return args


def set_arguments(params: Params, name: str) -> list[str]:
    """`-S key=value` arguments of the set, checked first."""
    params.with_set(name)  # raises ParamsError naming the key if the set does not give valid params
    return override_args(params.sets[name])


def run_set(params: Params, name: str, exp_name: str | None = None, queue: bool = False) -> None:
    """Run (or queue) a DVC experiment of params.yaml with the set `name` applied."""
    exp_name = exp_name or name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", exp_name):
        raise ParamsError(f"experiment name {exp_name!r} is not allowed: letters, digits, '-' and '_' only")
    cmd = ["dvc", "exp", "run", "-n", exp_name, *(["--queue"] if queue else []), *set_arguments(params, name)]
    print(" ".join(cmd), flush=True)
    code = subprocess.run(cmd, check=False).returncode  # a list, never a shell; DVC's output shown as it runs
    if code != 0:
        raise CovsegError(f"{' '.join(cmd[:5])} ... failed with exit code {code}")
