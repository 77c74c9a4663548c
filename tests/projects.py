"""Tiny covseg projects (a git + DVC repository with the pipeline files) for tests and benchmarks."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from covseg import shell
from covseg.names import PATHS

ROOT = Path(__file__).resolve().parents[1]

# Params of a fast CPU run on 64x64 slices, as overrides of params.yaml (one network: ensembles are tested apart).
TINY = {"synth.n_labelled": 10, "synth.n_test": 2, "synth.size": 64, "model.base_channels": 4, "model.depth": 2,
        "train.epochs": 2, "train.scale": 1.0, "train.members": 1, "evaluate.overlays": 2,
        "registry.min_eval_slices": 2}  # 10 slices in 5 folds of 2 (held out by `covseg cv` or split.fold)


def run(cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """A shell line in `cwd` with this environment's tools first on PATH (tests and benchmarks: fixed strings only)."""
    proc = shell.run(["bash", "-c", cmd], cwd, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(root: Path, overrides: dict) -> Path:
    """A fresh git + DVC repository with the project's pipeline files, its recipes (conf/) with `overrides`
    applied to conf/config.yaml, params.yaml composed from them, the synthetic data they describe
    recorded in data.dvc, and a calibration file with no entry yet (evaluate and submit read it: `dvc repro`
    runs uncalibrated until `covseg cv` and `covseg calibrate` make the recipe's entry)."""
    from covseg.params import apply_overrides, compose, read_tree

    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    (root / PATHS.dvc_file).write_text("outs:\n- path: data/raw\n")
    for folder in ("src", "flows", "infra"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(ROOT / ".dvc" / name, root / ".dvc" / name)
    shutil.copytree(ROOT / PATHS.conf, root / PATHS.conf)
    config = read_tree(ROOT / PATHS.conf / "config.yaml")
    defaults = config.pop("defaults")
    tree, _ = apply_overrides(config, overrides)
    (root / PATHS.conf / "config.yaml").write_text(yaml.safe_dump({"defaults": defaults, **tree}, sort_keys=False))
    (root / PATHS.params).write_text(yaml.safe_dump(compose([], root / PATHS.conf)[0], sort_keys=False))
    (root / PATHS.calibration).write_text("{}\n")
    run("git init -q && git config user.email t@t && git config user.name t", root)
    run("covseg data synth", root)
    run("git add -A && git commit -qm init", root)
    return root
