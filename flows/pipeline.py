"""Prefect flows that orchestrate the one pipeline in dvc.yaml, cross-validation and the model registry.

They never re-implement a stage: a training is `dvc exp run -S ...` and a cross-validation fold is
`covseg cv --folds K -S ...`, each in a working copy of its own (a git clone of the repository's HEAD
sharing its DVC cache and remote); the calibration is `covseg calibrate`, the promotion gate `covseg
promote`, and trainings go back with `dvc exp push`. Overrides are the `-S` strings of `dvc exp run`
(["recipe=gpu", "train.epochs=3"]), checked as data and composed with the repository's recipes (conf/)
against the params schema before anything is cloned or run.

    train           one training on every labelled slice, then the gate (the `train/gpu` deployment;
                    `train/nightly` retrains when the data changed)
    cv_fold         one fold of `covseg cv` (the `cv_fold/gpu` deployment)
    cross_validate  the folds of folds.json as cv_fold runs, all at once on the pool; their logits collected
                    into reports/cv/<recipe>/ and, with every fold there, `covseg calibrate` (calibration.json)
    sweep           cross_validate of each list of overrides, all folds at once; a table of the calibrated
                    out-of-fold scores; the best list trained and sent to the gate

Every fold is found again through MLflow, where the Prefect flow run that made it tagged its training run
(prefect_flow_run_id) and logged its logits and record (artifacts cv/fold<k>.npz, cv/fold<k>.json): that
works whichever machine ran it. With no PREFECT_API_URL the same flows run locally (the folds then run
one after another in this process, as `covseg cv` runs them).
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

from covseg import calibration, registry, shell, tracking
from covseg.atomic import write_json
from covseg.calibration import FOLD_FILE
from covseg.data import data_version
from covseg.errors import ParamsError
from covseg.names import DICE, ENV_DEPLOYMENT, ENV_FLOW_RUN, ENV_REPO, ENV_TRACKING_URI, KAGGLE_F1, PATHS
from covseg.params import Params, compose
from flows.pool import checked_deployment, launch

FAN_OUT = "sweeps and cross-validation"  # who launches cv_fold deployments (in refusals)
MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")

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


def checked_folds(folds, k: int) -> list[int]:
    """`folds` (default: all `k`) when they are distinct fold numbers in 0..k-1; anything else is refused."""
    folds = list(range(k)) if folds is None else folds
    if (not isinstance(folds, list) or not folds or len(set(folds)) < len(folds)
            or any(not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < k for f in folds)):
        raise ParamsError(f"folds {folds!r}: distinct fold numbers in 0..{k - 1} (split.folds is {k})")
    return folds


def checked_run_ids(run_ids) -> list[str]:
    """MLflow run ids (32 hex digits), distinct; anything else is refused."""
    if (not isinstance(run_ids, list) or len(set(run_ids)) < len(run_ids)
            or not all(isinstance(r, str) and MLFLOW_RUN_ID.fullmatch(r) for r in run_ids)):
        raise ParamsError(f"cv_runs {run_ids!r}: distinct MLflow run ids (32 hex digits) of cross-validation folds")
    return run_ids


def override_args(overrides: list[str]) -> list[str]:
    """["recipe=gpu", "train.epochs=3"] -> ["-S", "recipe=gpu", "-S", "train.epochs=3"] (checked ones only)."""
    return [arg for item in overrides for arg in ("-S", item)]


def experiment_name(flow_run_name: str | None, t0: float) -> str:
    """A DVC experiment (git ref) name from the flow run's name: letters, digits and '-' only."""
    cleaned = re.sub(r"[^A-Za-z0-9-]+", "-", flow_run_name or "local").strip("-")[:60] or "run"
    return f"{cleaned}-{int(t0)}"


def cv_experiment(params: Params) -> str:
    """The MLflow experiment of the recipe's cross-validation trainings (covseg.crossval's)."""
    return f"{params.tracking.experiment}-cv"


def cv_dir(repo: Path, params: Params) -> Path:
    """Where cross_validate collects a recipe's folds: `covseg cv`'s own folder for it in the repository."""
    return repo / PATHS.cv / params.recipe


def results_table(rows: list[dict], metric: str = KAGGLE_F1):
    """One row per set of overrides, best first."""
    import pandas as pd

    return pd.DataFrame(rows).sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)


def oof_line(scores: dict) -> str:
    """'kaggle_f1 0.61 +- 0.04, dice_ggo ...' of a calibration entry's out-of-fold means and spreads."""
    return ", ".join(f"{m} {scores[f'{m}_mean']:.4f} +- {scores[f'{m}_std']:.4f}" for m in (KAGGLE_F1, *DICE))


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


def _env(uri: str) -> dict:
    """The team's MLflow store, and this flow run's id for the runs a command tracks (their prefect_flow_run_id)."""
    return {ENV_TRACKING_URI: uri, ENV_FLOW_RUN: str(flow_run.get_id() or "")}


@task
def run_pipeline(work: Path, overrides: list[str], name: str, uri: str) -> dict:
    """`dvc exp run` with checked overrides; returns the DVC metrics and the pipeline's wall time."""
    start = time.time()
    out = shell.run(["dvc", "exp", "run", "-n", name, *override_args(overrides)], work, _env(uri)).stdout
    get_run_logger().info("pipeline output (end):\n%s", out[-2000:])
    metrics = json.loads((work / PATHS.metrics).read_text())
    return {**metrics, "pipeline_seconds": time.time() - start, "pipeline_start": start, "pipeline_end": time.time()}


@task(retries=2, retry_delay_seconds=10)
def register_model(work: Path, uri: str) -> dict:
    """`covseg register` after the pipeline, as a user types it: the version it registered (model_version,
    mlflow_run_id, new, calibrated)."""
    out = work.parent / "registration.json"
    shell.run(["covseg", "register", "--output", str(out)], work, _env(uri))
    return json.loads(out.read_text())


@task
def run_cv(work: Path, overrides: list[str], fold: int, uri: str) -> Path:
    """`covseg cv` of one fold in the working copy; returns the fold's record file (fold<k>.json)."""
    out = work / PATHS.cv / "fold"
    log = shell.run(["covseg", "cv", "--raw", PATHS.raw, *override_args(overrides), "--folds", str(int(fold)),
                     "--out", str(out)], work, _env(uri)).stdout
    get_run_logger().info("covseg cv output (end):\n%s", log[-2000:])
    return out / f"fold{int(fold)}.json"


@task(retries=2, retry_delay_seconds=10)
def publish_record(uri: str, record_file: Path) -> dict:
    """The fold's record, logged beside its logits as the artifact cv/fold<k>.json of its MLflow run (where
    cross_validate collects both, whichever machine ran the fold); returns the record."""
    from mlflow import MlflowClient

    record = json.loads(record_file.read_text())
    MlflowClient(uri).log_artifact(record["metrics"]["mlflow_run_id"], str(record_file), "cv")
    return record


@task
def fold_run(uri: str, experiment: str, flow_run_id: str) -> str:
    """The MLflow run of the fold a cv_fold flow run trained (tagged with its flow run's id)."""
    found = tracking.find_flow_run_result(uri, experiment, flow_run_id)
    if not found.get("mlflow_run_id"):
        raise RuntimeError(f"cv_fold flow run {flow_run_id} completed, but no MLflow run of experiment "
                           f"{experiment} in {uri} is tagged with it")
    return found["mlflow_run_id"]


@task(retries=2, retry_delay_seconds=10)
def collect_fold(uri: str, run_id: str, dest: Path) -> dict:
    """A fold's artifacts cv/fold<k>.npz and cv/fold<k>.json from its MLflow run into `dest`, the logits
    first (a record there always has its logits, as `covseg cv` leaves them); returns the record."""
    import mlflow.artifacts

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".partial-fold-", dir=dest) as tmp:  # same disk: a rename
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="cv", dst_path=tmp,
                                                       tracking_uri=uri))
        found = sorted(got.glob("fold*.json"))
        record = json.loads(found[0].read_text()) if len(found) == 1 else {}
        k = record.get("fold")
        if (not isinstance(k, int) or record.get("metrics", {}).get("mlflow_run_id") != run_id
                or not (got / FOLD_FILE.format(k=k)).is_file()):
            raise RuntimeError(f"MLflow run {run_id}: its artifacts cv/ are not one fold's logits and record of a "
                               f"cv_fold flow run ({sorted(p.name for p in got.iterdir())})")
        os.replace(got / FOLD_FILE.format(k=k), dest / FOLD_FILE.format(k=k))
        os.replace(found[0], dest / f"fold{k}.json")
    return record


@task
def run_calibrate(cwd: Path, cv: Path, overrides: list[str], key: str) -> dict:
    """`covseg calibrate --cv CV -S ...` in `cwd`, as a user types it (it writes cwd/calibration.json);
    returns the entry it made for recipe key `key`."""
    shell.run(["covseg", "calibrate", "--cv", str(cv), *override_args(overrides)], cwd)
    entry = calibration.lookup(cwd / PATHS.calibration, key)
    if entry is None:
        raise RuntimeError(f"covseg calibrate --cv {cv} wrote no entry for recipe key {key} in "
                           f"{cwd / PATHS.calibration}")
    return entry


@task
def promotion_gate(work: Path, version: int, uri: str, allow_data_change: bool = False) -> dict:
    """`covseg promote --version N`: its out-of-fold scores against the champion's."""
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
          only_if_data_changed: bool = False, allow_data_change: bool = False,
          cv_runs: list[str] | None = None) -> dict:
    """One training run of the DVC pipeline on every labelled slice, with `overrides` as `dvc exp run -S`
    takes them (e.g. ["recipe=gpu", "train.epochs=3"]), registered with the out-of-fold scores that the
    committed calibration.json holds for its recipe, then the gate; with `allow_data_change` the gate may
    compare it with a champion trained on another data version. `cv_runs` (a sweep passes them): the MLflow
    runs of these overrides' cross-validation folds, calibrated in the working copy first (`covseg
    calibrate`), so the version is registered calibrated before calibration.json is committed."""
    t0 = time.time()
    repo_path = resolve_repo(repo)
    overrides, params = checked_overrides(repo_path, overrides)
    cv_runs = checked_run_ids(cv_runs or [])
    uri = tracking.tracking_uri(repo_path)
    name = experiment_name(flow_run.get_name(), t0)
    with working_copy(repo_path) as work:
        data = pull_data(work)
        if only_if_data_changed and data == champion_data_version(uri, params.registry.model_name):
            print(f"data version {data} is the champion's: nothing to retrain")
            return {"skipped": True, "data_version": data}
        if cv_runs:
            folds = [collect_fold(uri, run_id, work.parent / "cv") for run_id in cv_runs]
            run_calibrate(work, work.parent / "cv", overrides, folds[0]["recipe"])
        result = run_pipeline(work, overrides, name, uri)
        t_end = result.pop("pipeline_end")
        push_results(work, name)  # the experiment is kept whatever happens to its registration
        result.update(register_model(work, uri))
        if promote and result.get("calibrated"):
            result["promotion"] = promotion_gate(work, result["model_version"], uri, allow_data_change)
        elif promote:  # the gate refuses a version without out-of-fold scores: say how to get them
            result["promotion"] = {"promoted": False, "reason": (
                f"not sent to the gate: calibration.json has no entry for recipe key {result.get('recipe_key')}, "
                f"so the version has no out-of-fold scores; run the cross_validate flow with these overrides, "
                f"commit calibration.json, then train again")}
    result.update(experiment=name, overrides=overrides,
                  overhead_before_pipeline_s=result.pop("pipeline_start") - t0,
                  overhead_after_pipeline_s=time.time() - t_end)
    scores = (f"out-of-fold {KAGGLE_F1} {result[KAGGLE_F1]:.4f} +- {result[f'{KAGGLE_F1}_std']:.4f} "
              f"({result['oof_folds']} folds, {result['oof_slices']} slices)" if result.get("calibrated")
              else "not calibrated")
    print(f"{name}: {scores}; {params.registry.model_name} v{result.get('model_version')}"
          + (f"; {result['promotion']['reason']}" if promote else ""))
    return result


@flow(name="cv_fold", log_prints=True)
def cv_fold(overrides: list[str] | None, fold: int, repo: str | None = None) -> dict:
    """Fold `fold` of the cross-validation of `overrides`: `covseg cv --folds K` in a working copy (the
    pipeline's validate, preprocess and train stages, a tracked run in the experiment
    `<tracking.experiment>-cv`); returns the fold's record, also logged to that run with its logits."""
    repo_path = resolve_repo(repo)
    overrides, params = checked_overrides(repo_path, overrides)
    fold = checked_folds([fold], params.split.folds)[0]
    uri = tracking.tracking_uri(repo_path)
    with working_copy(repo_path) as work:
        pull_data(work)
        record = publish_record(uri, run_cv(work, overrides, fold, uri))
    print(f"fold {fold} of recipe {params.recipe} ({record['recipe']}), no inference-time choices: "
          f"{KAGGLE_F1} {record['metrics'][KAGGLE_F1]:.4f} (MLflow run {record['metrics']['mlflow_run_id']})")
    return record


def _fan_out(run_here, deployment: str | None, runs: list[dict], find) -> list:
    """Each parameter dict of `runs` as a flow run: with `deployment`, all at once on its pool (each one's
    result is `find(flow run id, parameters)`); without, `run_here(parameters)` in this process, in turn."""
    if not deployment:
        return [run_here(p) for p in runs]
    futures = [launch.submit(deployment, p) for p in runs]
    return [find(f.result(), p) for f, p in zip(futures, runs)]


def _cross_validate(repo: Path, sets: list[tuple[list[str], Params]], folds: list[int] | None,
                    deployment: str | None) -> list[dict]:
    """`folds` (None: all) of each checked set of overrides as cv_fold runs, all at once; then, set by set,
    their folds collected into the recipe's folder and, when every fold of the recipe is there, calibrated."""
    uri = tracking.tracking_uri(repo)
    fold_lists = [checked_folds(folds, params.split.folds) for _, params in sets]
    jobs = [{"overrides": o, "fold": k, "repo": str(repo)} for (o, _), ks in zip(sets, fold_lists) for k in ks]
    experiment = {tuple(o): cv_experiment(params) for o, params in sets}
    run_ids = iter(_fan_out(lambda job: cv_fold(**job)["metrics"]["mlflow_run_id"], deployment, jobs,
                            lambda flow_run_id, job: fold_run(uri, experiment[tuple(job["overrides"])], flow_run_id)))
    return [_collect(repo, o, params, [next(run_ids) for _ in ks], uri, deployment)
            for (o, params), ks in zip(sets, fold_lists)]


def _collect(repo: Path, overrides: list[str], params: Params, run_ids: list[str], uri: str,
             deployment: str | None) -> dict:
    """The folds of one set into its recipe's folder (a summary.json of those there of its recipe key) and,
    when all are there, `covseg calibrate` in the repository. Returns the set's result."""
    from covseg.crossval import summarise

    dest, k = cv_dir(repo, params), params.split.folds
    records = [collect_fold(uri, run_id, dest) for run_id in run_ids]
    key = records[0]["recipe"]
    if any(r["recipe"] != key for r in records):
        raise RuntimeError(f"the folds of {overrides} were trained as different recipes or data "
                           f"({sorted({r['recipe'] for r in records})}): the workers' checkouts or data differ")
    present = {}  # this run's folds and those an earlier run left there, of the same recipe key
    for i in range(k):
        record_file = dest / f"fold{i}.json"
        if record_file.is_file() and (dest / FOLD_FILE.format(k=i)).is_file():
            record = json.loads(record_file.read_text())
            if record.get("recipe") == key:
                present[i] = record["metrics"]
    rows = list(present.values())
    write_json({"recipe": params.recipe, "recipe_key": key, "data_key": records[0]["data"], "folds": k,
                "folds_run": sorted(present), **summarise(rows), "bf16": all(r["bf16"] for r in rows),
                "machine": f"cv_fold flow runs ({deployment or 'in one process'})", "per_fold": rows},
               dest / "summary.json")
    result = {"recipe": params.recipe, "recipe_key": key, "overrides": overrides, "folds": k,
              "folds_present": sorted(present), "cv": str(dest), "per_fold": rows,
              "cv_runs": [r["mlflow_run_id"] for r in rows]}
    for row in rows:
        print(f"fold {row['fold']}: {KAGGLE_F1} {row[KAGGLE_F1]:.4f}, " + ", ".join(f"{m} {row[m]:.4f}" for m in DICE)
              + " (no inference-time choices)")
    cv = dest.relative_to(repo)
    if len(present) < k:
        missing = sorted(set(range(k)) - set(present))
        print(f"{len(present)} of {k} folds of recipe {params.recipe} ({key}) in {cv}: calibration needs all "
              f"folds; cross-validate folds {missing} too, then it runs")
        return {**result, "calibrated": False,
                "message": f"calibration needs all {k} folds: folds {missing} of recipe key {key} are missing"}
    entry = run_calibrate(repo, cv, overrides, key)
    print(f"recipe {params.recipe} ({key}), nested out-of-fold over {entry['oof']['folds']} folds: "
          f"{oof_line(entry['oof'])}; choices {entry['choices']}")
    print(f"-> {repo / PATHS.calibration}: commit it (evaluate, submit, predict and the promotion gate read it)")
    return {**result, "calibrated": True, "choices": entry["choices"], "oof": entry["oof"],
            "calibration": str(repo / PATHS.calibration)}


@flow(name="cross_validate", log_prints=True)
def cross_validate(overrides: list[str] | None = None, folds: list[int] | None = None, repo: str | None = None,
                   deployment: str | None = "cv_fold/gpu") -> dict:
    """Cross-validation of the recipe and keys `overrides` choose in the folds of the repository's folds
    file: each fold (`folds`, default all `split.folds`) a cv_fold run, all at once on the pool (or in turn
    here without a deployment: the same as `covseg cv`). The folds' logits and records are collected into
    reports/cv/<recipe>/; once every fold is there, `covseg calibrate` writes the recipe's entry into
    calibration.json (commit it). Returns the per-fold rows and, when calibrated, the choices and the
    nested out-of-fold means and spreads."""
    repo_path = resolve_repo(repo)
    deployment = checked_deployment(deployment, "cv_fold", FAN_OUT)
    return _cross_validate(repo_path, [checked_overrides(repo_path, overrides)], folds, deployment)[0]


@flow(name="sweep", log_prints=True)
def sweep(param_sets: list[list[str]], repo: str | None = None, deployment: str | None = "cv_fold/gpu",
          promote: bool = True) -> list[dict]:
    """Cross-validate and calibrate every list of overrides (all folds of all lists at once over the pool's
    workers), tabulate their calibrated out-of-fold scores, best first; with `promote`, train the best on
    every labelled slice (a run of `train/<name>` when the folds ran on `cv_fold/<name>`, else here), which
    calibrates it from its folds first and sends it to the gate."""
    repo_path = resolve_repo(repo)
    deployment = checked_deployment(deployment, "cv_fold", FAN_OUT)
    sets = [checked_overrides(repo_path, ps) for ps in param_sets]  # all refused before any runs
    results = _cross_validate(repo_path, sets, None, deployment)
    table = results_table([{"params": r["overrides"], **{m: r["oof"][f"{m}_mean"] for m in (KAGGLE_F1, *DICE)},
                            f"{KAGGLE_F1}_std": r["oof"][f"{KAGGLE_F1}_std"], "recipe_key": r["recipe_key"],
                            "choices": r["choices"], "cv_runs": r["cv_runs"]} for r in results])
    print("calibrated out-of-fold scores, best first:\n"
          + table[["params", KAGGLE_F1, f"{KAGGLE_F1}_std", *DICE]].to_string())
    rows = table.to_dict(orient="records")
    if promote and rows:
        best = rows[0]
        job = {"overrides": best["params"], "repo": str(repo_path), "promote": True, "cv_runs": best["cv_runs"]}
        params = {tuple(o): p for o, p in sets}[tuple(best["params"])]
        uri, experiment = tracking.tracking_uri(repo_path), params.tracking.experiment
        trainer = f"train/{deployment.split('/', 1)[1]}" if deployment else None
        best["trained"] = _fan_out(lambda p: train(**p), trainer, [job],
                                   lambda flow_run_id, _: find_result(uri, experiment, flow_run_id))[0]
        print(f"best {best['params']} trained on every slice: {params.registry.model_name} "
              f"v{best['trained'].get('model_version')}" + (f" ({trainer})" if trainer else ""))
    return rows


def main(argv: list[str]) -> None:
    """python -m flows.pipeline train '["train.epochs=3"]' | sweep '[["train.lr=0.002"], ["recipe=seed"]]'
    | cross_validate '["recipe=seed"]' ['[0, 1]']   (COVSEG_DEPLOYMENT=cv_fold/gpu: the folds on the pool)"""
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
