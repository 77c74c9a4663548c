"""Shared fixtures and helpers: params, tiny synthetic data, an MLflow store per test, a tiny project."""
import ast
import os
from pathlib import Path

import pytest
from projects import ROOT, TINY, make_project, run

from covseg.data import synthesize, write_raw
from covseg.names import ENV_ALLOW_PICKLE, ENV_TRACKING_URI, PATHS, STAGES
from covseg.params import Params, load_params

SRC = ROOT / "src"


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; keep it from leaking into later tests."""
    before = os.environ.get(ENV_TRACKING_URI)
    yield
    os.environ.pop(ENV_TRACKING_URI, None)
    if before is not None:
        os.environ[ENV_TRACKING_URI] = before


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(ROOT / PATHS.params)


@pytest.fixture
def tiny_params(params) -> Params:
    return params.override({**TINY, "train.epochs": 1})


@pytest.fixture(scope="session")
def tiny_arrays():
    """(images, masks, test_images) of 12 labelled and 3 test synthetic 64x64 slices."""
    return synthesize(n_labelled=12, n_test=3, size=64, seed=1)


@pytest.fixture
def tiny_raw(tmp_path, tiny_arrays) -> Path:
    return write_raw(tmp_path / "raw", *tiny_arrays)


@pytest.fixture
def pp(params):
    """The predict params (`covseg predict`)."""
    return params.predict


@pytest.fixture
def win(params):
    return params.window


@pytest.fixture
def tiny_folds(tmp_path, tiny_raw, params):
    """tiny_folds(k): the folds file of tiny_raw dealt into k folds, as `covseg folds` writes it."""
    from covseg.preprocessing import write_folds

    def make(k: int) -> Path:
        path = tmp_path / f"folds{k}.json"
        write_folds(tiny_raw, path, k, params.seed, force=True)
        return path

    return make


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """An embedded MLflow store of this test's own; MLflow may not unpickle anything while it is used."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(ENV_TRACKING_URI, uri)
    monkeypatch.setenv(ENV_ALLOW_PICKLE, "false")
    return uri


@pytest.fixture
def sh():
    """run(cmd, cwd, check=True): a shell line in a test project."""
    return run


@pytest.fixture
def new_project(tmp_path):
    """new_project(overrides={}, tiny=True): a fresh git + DVC project with `overrides` on top of TINY
    params (or of the project's own params, with tiny=False)."""
    return lambda overrides=None, tiny=True: make_project(tmp_path / "project",
                                                          {**(TINY if tiny else {}), **(overrides or {})})


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's test harness (a throw-away server) for the flow tests, started once per session. Without flow
    run heartbeats: their thread sleeps in 1 s steps and each flow run waits for it to end (1 s a run)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
        with (prefect_test_harness(server_startup_timeout=90),
              temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})):
            yield


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 for this test; yields its URI, stopped by PID afterwards."""
    from servers import mlflow_server as start

    with start(tmp_path) as uri:
        yield uri


# ----------------------------------------------------------------------------- what each stage runs


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "covseg"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "covseg":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def imported_modules(path: Path, only_function: str | None = None) -> set[str]:
    """covseg modules a file imports, at the top level and inside every function; with `only_function`,
    inside that one function alone (the command line imports each command's modules in its function)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if not is_def or only_function is None or node.name == only_function:
            found |= _imports(node)
    return found


def closure(*modules: str, entry: tuple[str, str] | None = None) -> set[str]:
    """Files (relative to the repository) of the modules and everything they import, packages included;
    `entry` = (module, function) adds a module of which only that function runs."""
    todo, seen = list(modules), set()
    if entry:
        path = module_file(entry[0])
        seen.add(path)
        todo += [entry[0].rpartition(".")[0], *imported_modules(path, only_function=entry[1])]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path and path not in seen:
                seen.add(path)
                todo += imported_modules(path)
    return {str(p.relative_to(ROOT)) for p in seen}


def stage_closure(stage: str) -> set[str]:
    """What `covseg <stage>` runs: the command line's top level and its cmd_<stage>, and all they import."""
    return closure(entry=("covseg.cli", f"cmd_{stage}"))


@pytest.fixture(scope="session")
def stage_modules() -> dict[str, set[str]]:
    """stage -> the files (relative to the repository) that `covseg <stage>` runs, derived from the imports."""
    return {stage: stage_closure(stage) for stage in STAGES}


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory):
    """A tiny project after `dvc repro`, shared by a module's tests (they run in order)."""
    root = make_project(tmp_path_factory.mktemp("e2e") / "project", TINY)
    run("dvc repro", root)
    return root


@pytest.fixture
def s3_endpoint(tmp_path, monkeypatch):
    """A real S3 endpoint (moto) on 127.0.0.1 holding the empty bucket servers.S3_BUCKET; yields its URL,
    stopped by PID afterwards. This test's environment keeps no AWS credentials or config (nothing can reach
    AWS; only a region is set): the test gives servers.S3_CREDENTIALS to the commands that need them."""
    from servers import S3_BUCKET, s3_client, s3_server

    for var in [v for v in os.environ if v.startswith("AWS_") or v == "MLFLOW_S3_ENDPOINT_URL"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with s3_server(tmp_path) as url:
        s3_client(url).create_bucket(Bucket=S3_BUCKET)
        yield url


@pytest.fixture
def prefect_env(tmp_path, mlflow_server):
    """A real Prefect server and MLflow server on 127.0.0.1; yields (the environment that points at them,
    workers) where `workers(pool, count, env)` starts process workers (a context manager)."""
    from functools import partial

    from servers import prefect_server, prefect_workers

    env = {ENV_TRACKING_URI: mlflow_server}
    with prefect_server(tmp_path, env):
        yield env, partial(prefect_workers, tmp_path)
