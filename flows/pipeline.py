"""Prefect flows that orchestrate the one pipeline in dvc.yaml and the model registry.

They never re-implement a stage: each training is `dvc exp run -S ...` in a working copy of its own
(a git clone sharing the repository's DVC cache and remote), its metrics are read from the DVC metrics
file, the promotion gate is `covseg promote`, and results go back with `dvc exp push`. Overrides are the
`-S` strings of `dvc exp run` (["recipe=gpu", "train.epochs=3"]), checked as data and composed with the
repository's recipes (conf/) against the params schema before anything is cloned or run.

    train           one run (the `train/gpu` deployment; `train/nightly` retrains when the data changed)
    sweep           a list of override lists, each its own `train/gpu` run on the pool; best one promoted
    cross_validate  the folds of folds.json in parallel on the pool; mean and spread of kaggle_f1

With no PREFECT_API_URL the same flows run locally (sweep and cross_validate then run the trainings
one after another in this process).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import covseg  # noqa: F401  (first: it turns telemetry off before Prefect reads its settings)

# time for a local (ephemeral) server's first start on a small machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from covseg import registry, shell, tracking
from covseg.data import data_version
from covseg.errors import ParamsError
from covseg.names import ENV_DEPLOYMENT, ENV_FLOW_RUN, ENV_REPO, ENV_TRACKING_URI, KAGGLE_F1, PATHS
from covseg.params import Params, compose
from flows.pool import checked_deployment, launch

# ------------------------------------------------------------------------------- plain helpers


def resolve_repo(repo: str | None) -> Path:
    """The repository a flow runs on: COVSEG_REPO (the deployment's) or the current folder. A `repo`
    parameter may only name that same repository."""
    home = Path(os.environ.get(ENV_REPO) or Path.cwd()).resolve()
    if repo is not None and Path(repo).resolve() != home:
        raise ParamsError(f"repo {repo!r} is not allowed: this deployment runs on {home} only")
    return home


def checked_overrides(repo: Path, overrides: list[str] | None) -> tuple[list[str], Params]:
    """`-S` overrides (["recipe=gpu", "train.epochs=3"]) checked as data and composed with the recipes of
    the repository's HEAD (conf/, what a working copy runs) against the schema, before anything runs."""
    if overrides is None:
        overrides = []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ParamsError(f"overrides {overrides!r}: expected a list of 'KEY=VALUE' strings, as dvc exp run -S "
                          f"takes them, e.g. [\"recipe=gpu\", \"train.epochs=3\"]")
    with tempfile.TemporaryDirectory(prefix="covseg-conf-") as tmp:
        listed = shell.run(["git", "ls-tree", "-r", "--name-only", "HEAD", "--", PATHS.conf], repo, check=False)
        files = listed.stdout.split() if listed.returncode == 0 else []
        if not files:
            raise ParamsError(f"{repo}: HEAD has no {PATHS.conf}/ (the recipes params.yaml is composed from)")
        for name in files:
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(shell.run(["git", "show", f"HEAD:{name}"], repo).stdout)
        params = compose(overrides, Path(tmp) / PATHS.conf)[1]
    init = params.train.init
    if init and not init.startswith("models:/") and not (repo / init).resolve().is_relative_to(repo.resolve()):
        raise ParamsError(f"train.init = {init!r} is not allowed: a flow warm-starts only from a registry model "
                          f"(models:/NAME@ALIAS) or a checkpoint under the repository {repo}")
    return list(overrides), params


def override_args(overrides: list[str]) -> list[str]:
    """["recipe=gpu", "train.epochs=3"] -> ["-S", "recipe=gpu", "-S", "train.epochs=3"] (checked ones only)."""
    return [arg for item in overrides for arg in ("-S", item)]


def experiment_name(flow_run_name: str | None, t0: float) -> str:
    """A DVC experiment (git ref) name from the flow run's name: letters, digits and '-' only."""
    cleaned = re.sub(r"[^A-Za-z0-9-]+", "-", flow_run_name or "local").strip("-")[:60] or "run"
    return f"{cleaned}-{int(t0)}"


def results_table(rows: list[dict], metric: str = KAGGLE_F1):
    """One row per training, best first."""
    import pandas as pd

    return pd.DataFrame(rows).sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)


def fold_summary(scores: list[float]) -> dict:
    import numpy as np

    values = np.asarray(scores, dtype=float)
    return {"folds": len(values), f"{KAGGLE_F1}_mean": float(values.mean()),
            f"{KAGGLE_F1}_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            f"{KAGGLE_F1}_min": float(values.min()), f"{KAGGLE_F1}_max": float(values.max())}


def _remote_url(repo: Path) -> tuple[str, str] | None:
    """The default DVC remote of the repository, with a local path made absolute."""
    name = shell.run(["dvc", "config", "core.remote"], repo, check=False).stdout.strip()
    if not name:
        return None
    url = shell.run(["dvc", "config", f"remote.{name}.url"], repo).stdout.strip()
    if "://" not in url and not os.path.isabs(url):
        url = str((repo / ".dvc" / url).resolve())
    return name, url


@contextmanager
def working_copy(repo: Path):
    """A git clone of the repository's HEAD that shares its DVC cache and remote; removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="covseg-run-"))
    work = folder / "work"
    try:
        shell.run(["git", "clone", "-q", "--shared", str(repo), str(work)], repo)
        shell.run(["dvc", "cache", "dir", "--local", str(repo / ".dvc" / "cache")], work)
        remote = _remote_url(repo)
        if remote:
            shell.run(["dvc", "remote", "modify", "--local", remote[0], "url", remote[1]], work)
        yield work
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------- tasks


@task(retries=2, retry_delay_seconds=10)
def pull_data(work: Path) -> str:
    """The data version that data.dvc records, from the shared cache or the remote."""
    shell.run(["dvc", "pull", "-q", PATHS.dvc_file], work)
    return data_version(work / PATHS.dvc_file)


@task
def run_pipeline(work: Path, overrides: list[str], name: str, uri: str) -> dict:
    """`dvc exp run` with checked overrides; returns the DVC metrics and the pipeline's wall time."""
    start = time.time()
    env = {ENV_TRACKING_URI: uri, ENV_FLOW_RUN: str(flow_run.get_id() or "")}
    out = shell.run(["dvc", "exp", "run", "-n", name, *override_args(overrides)], work, env).stdout
    get_run_logger().info("pipeline output (end):\n%s", out[-2000:])
    metrics = json.loads((work / PATHS.metrics).read_text())
    return {**metrics, "pipeline_seconds": time.time() - start, "pipeline_start": start, "pipeline_end": time.time()}


@task
def promotion_gate(work: Path, version: int, uri: str, allow_data_change: bool = False) -> dict:
    """`covseg promote --version N` against the champion, on this copy's validation data."""
    decision = work / ".promotion.json"
    shell.run(["covseg", "promote", "--version", str(int(version)), "--output", str(decision),
               *(["--allow-data-change"] if allow_data_change else [])], work, {ENV_TRACKING_URI: uri})
    return json.loads(decision.read_text())


@task(retries=2, retry_delay_seconds=10)
def push_results(work: Path, name: str) -> None:
    """The experiment (git ref and DVC outputs) back to the repository and its DVC remote."""
    shell.run(["dvc", "exp", "push", "origin", name], work)


@task
def champion_data_version(uri: str, model_name: str) -> str:
    return registry.champion_data_version(model_name, uri)


@task
def find_result(uri: str, experiment: str, run_id: str) -> dict:
    """The metrics of the MLflow run made under a Prefect flow run (tagged with its id)."""
    return tracking.find_flow_run_result(uri, experiment, run_id)


# ------------------------------------------------------------------------------- flows


@flow(name="train", log_prints=True)
def train(overrides: list[str] | None = None, repo: str | None = None, promote: bool = True,
          only_if_data_changed: bool = False, allow_data_change: bool = False) -> dict:
    """One training run of the DVC pipeline with `overrides` as `dvc exp run -S` takes them (e.g.
    ["recipe=gpu", "train.epochs=3"]); with `allow_data_change` the gate may compare it with a champion
    trained on another data version."""
    t0 = time.time()
    repo_path = resolve_repo(repo)
    overrides, params = checked_overrides(repo_path, overrides)
    uri = tracking.tracking_uri(repo_path)
    name = experiment_name(flow_run.get_name(), t0)
    with working_copy(repo_path) as work:
        data = pull_data(work)
        if only_if_data_changed and data == champion_data_version(uri, params.registry.model_name):
            print(f"data version {data} is the champion's: nothing to retrain")
            return {"skipped": True, "data_version": data}
        result = run_pipeline(work, overrides, name, uri)
        t_end = result.pop("pipeline_end")
        if promote:
            result["promotion"] = promotion_gate(work, result["model_version"], uri, allow_data_change)
        push_results(work, name)
    result.update(experiment=name, overrides=overrides,
                  overhead_before_pipeline_s=result.pop("pipeline_start") - t0,
                  overhead_after_pipeline_s=time.time() - t_end)
    print(f"{name}: {KAGGLE_F1} {result[KAGGLE_F1]:.4f}, {params.registry.model_name} v{result['model_version']}"
          + (f"; {result['promotion']['reason']}" if promote else ""))
    return result


def _fan_out(param_sets: list[list[str]], repo: Path, deployment: str | None) -> list[dict]:
    """Each list of overrides as its own train run: deployment runs on the pool at once, or local subflows."""
    checked = [checked_overrides(repo, ps) for ps in param_sets]  # all refused before any runs
    if not deployment:
        return [{**train(overrides=ps, repo=str(repo), promote=False), "params": ps} for ps, _ in checked]
    futures = [launch.submit(deployment, {"overrides": ps, "repo": str(repo), "promote": False})
               for ps, _ in checked]
    uri, experiment = tracking.tracking_uri(repo), checked[0][1].tracking.experiment if checked else ""
    return [{**find_result(uri, experiment, f.result()), "params": ps} for f, (ps, _) in zip(futures, checked)]


@flow(name="sweep", log_prints=True)
def sweep(param_sets: list[list[str]], repo: str | None = None, deployment: str | None = "train/gpu",
          promote: bool = True) -> list[dict]:
    """Train with every list of overrides (in parallel over the pool's workers), tabulate, promote the best."""
    repo_path = resolve_repo(repo)
    deployment = checked_deployment(deployment, "train", "sweeps and cross-validation")
    table = results_table(_fan_out(param_sets, repo_path, deployment))
    print(table.to_string())
    rows = table.to_dict(orient="records")
    if promote and rows and rows[0].get("model_version"):
        with working_copy(repo_path) as work:
            pull_data(work)
            shell.run(["dvc", "repro", "preprocess"], work)  # the validation data to compare on
            rows[0]["promotion"] = promotion_gate(work, int(rows[0]["model_version"]), tracking.tracking_uri(repo_path))
            print(rows[0]["promotion"]["reason"])
    return rows


@flow(name="cross_validate", log_prints=True)
def cross_validate(overrides: list[str] | None = None, folds: list[int] | None = None, repo: str | None = None,
                   deployment: str | None = "train/gpu") -> dict:
    """Cross-validation in the folds of the repository's folds file: each fold (`folds`, default all
    `split.folds`) as validation, all at once, of the recipe and keys `overrides` choose (the same as
    `covseg cv`, spread over the pool)."""
    repo_path = resolve_repo(repo)
    deployment = checked_deployment(deployment, "train", "sweeps and cross-validation")
    base, params = checked_overrides(repo_path, overrides)
    k = params.split.folds
    folds = list(range(k)) if folds is None else list(folds)
    if not folds or any(not isinstance(f, int) or not 0 <= f < k for f in folds) or len(set(folds)) < len(folds):
        raise ParamsError(f"folds {folds!r}: distinct fold numbers in 0..{k - 1} (split.folds is {k})")
    rows = _fan_out([[*base, f"split.fold={i}"] for i in folds], repo_path, deployment)
    summary = {**fold_summary([r[KAGGLE_F1] for r in rows]), "runs": rows}
    print(f"{len(folds)} of {k} folds: {KAGGLE_F1} {summary[f'{KAGGLE_F1}_mean']:.4f} "
          f"+- {summary[f'{KAGGLE_F1}_std']:.4f}")
    return summary


def main(argv: list[str]) -> None:
    """python -m flows.pipeline train '["train.epochs=3"]' | sweep '[["train.lr=0.002"], ["recipe=seed"]]'
    | cross_validate '["recipe=seed"]' ['[0, 1]']"""
    if not argv or argv[0] not in ("train", "sweep", "cross_validate"):
        raise SystemExit(main.__doc__)
    command, arg = argv[0], (argv[1] if len(argv) > 1 else None)
    deployment = os.environ.get(ENV_DEPLOYMENT)
    if command == "train":
        result = train(overrides=json.loads(arg) if arg else None)
    elif command == "sweep":
        result = sweep(json.loads(arg), deployment=deployment)
    else:
        result = cross_validate(json.loads(arg) if arg else None, json.loads(argv[2]) if len(argv) > 2 else None,
                                deployment=deployment)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
