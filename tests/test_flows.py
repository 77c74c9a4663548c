"""The Prefect flows, with Prefect's test harness: overrides, folds and deployments checked before anything
runs, orchestration of the pipeline (the commands, MLflow and the pool faked here; the slow tier runs them
for real on a server and workers)."""
import json
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from covseg import shell
from covseg.calibration import NEUTRAL
from covseg.errors import ParamsError
from covseg.names import CV_METRICS, ENV_FLOW_RUN, ENV_REPO, ENV_TRACKING_URI, KAGGLE_F1, PATHS
from flows import pipeline

ROOT = Path(__file__).resolve().parents[1]
FOLDS = 5  # split.folds of the recipes


pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git repository whose HEAD holds this checkout's recipes (conf/), as COVSEG_REPO."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / PATHS.conf, root / PATHS.conf)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "recipes"]):
        shell.run(cmd, root)
    monkeypatch.setenv(ENV_REPO, str(root))
    return root


def _key(overrides: list[str]) -> str:
    return "key:" + ",".join(o for o in overrides if not o.startswith("calibrate."))


def _score(overrides: list[str], fold: int) -> float:
    """A fake fold's kaggle_f1: better with a larger train.lr."""
    lr = next((float(o.split("=")[1]) for o in overrides if o.startswith("train.lr=")), 0.0)
    return 0.5 + fold / 100 + lr * 10


class Fakes:
    """Recorders for the working copy, the commands (`covseg ...`; git runs for real), MLflow and the pool."""

    def __init__(self, work: Path):
        self.calls, self.work, self.runs, self.flow_runs = [], work, {}, {}

    def record(self, overrides: list[str], fold: int) -> dict:
        """What `covseg cv` writes for a fold; kept as the fake MLflow run's artifact."""
        run_id = f"{len(self.runs):032x}"
        rec = {"fold": fold, "recipe": _key(overrides), "data": "data-key", "per_slice": {},
               "metrics": {**{m: 0.4 for m in CV_METRICS}, KAGGLE_F1: _score(overrides, fold), "fold": fold,
                           "seconds": 1.0, "bf16": False, "mlflow_run_id": run_id}}
        self.runs[run_id] = rec
        return rec

    def shell_run(self, real):
        def run(cmd, cwd, env=None, check=True, timeout=None):
            if cmd[0] != "covseg":
                return real(cmd, cwd, env, check, timeout)
            args = [str(c) for c in cmd[1:]]
            overrides = [args[i + 1] for i, a in enumerate(args) if a == "-S"]
            self.calls.append(("covseg", args, Path(cwd), env))
            if args[0] == "cv":
                fold, out = int(args[args.index("--folds") + 1]), Path(args[args.index("--out") + 1])
                out.mkdir(parents=True, exist_ok=True)
                (out / f"fold{fold}.json").write_text(json.dumps(self.record(overrides, fold)))
            elif args[0] == "calibrate":  # an entry from the folds' records, as covseg calibrate makes one
                folds = [json.loads(f.read_text()) for f in sorted((Path(cwd) / args[2]).glob("fold*.json"))]
                assert sorted(f["fold"] for f in folds) == list(range(FOLDS)), "calibrate runs with every fold"
                mean = sum(f["metrics"][KAGGLE_F1] for f in folds) / len(folds)
                oof = {"folds": len(folds), "slices": 40, "trivial_kaggle_f1": 0.1,
                       **{f"{m}_mean": 0.4 for m in CV_METRICS}, **{f"{m}_std": 0.01 for m in CV_METRICS},
                       f"{KAGGLE_F1}_mean": mean}
                path = Path(cwd) / PATHS.calibration
                entries = json.loads(path.read_text()) if path.is_file() else {}
                entries[folds[0]["recipe"]] = {"recipe": "r", "choices": dict(NEUTRAL), "oof": oof}
                path.write_text(json.dumps(entries))
            return subprocess.CompletedProcess(cmd, 0, "done\n", "")
        return run

    @contextmanager
    def working_copy(self, repo):
        self.calls.append(("clone", str(repo)))
        self.work.mkdir(exist_ok=True)
        yield self.work

    def publish_record(self, uri, record_file):
        rec = json.loads(Path(record_file).read_text())
        self.calls.append(("publish", rec["fold"]))
        return rec

    def collect_fold(self, uri, run_id, dest):
        rec = self.runs[run_id]
        self.calls.append(("collect", rec["fold"], Path(dest)))
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"fold{rec['fold']}.npz").write_bytes(b"logits")
        (dest / f"fold{rec['fold']}.json").write_text(json.dumps(rec))
        return rec

    def launch_submit(self, deployment, parameters):
        """A deployment run on the pool: a cv_fold run makes its fold's MLflow run, tagged with its id."""
        flow_run_id = f"flow-run-{len(self.flow_runs)}"
        self.calls.append(("launch", deployment, parameters))
        if deployment.startswith("cv_fold/"):
            self.flow_runs[flow_run_id] = self.record(parameters["overrides"], parameters["fold"])
        fakes = self

        class Future:
            def result(self):
                fakes.calls.append(("wait", flow_run_id))
                return flow_run_id
        return Future()

    def fold_run(self, uri, experiment, flow_run_id):
        self.calls.append(("find fold", experiment, flow_run_id))
        return self.flow_runs[flow_run_id]["metrics"]["mlflow_run_id"]

    def kinds(self, kind):
        return [c for c in self.calls if c[0] == kind]

    def commands(self, name):
        return [c for c in self.kinds("covseg") if c[1][0] == name]


@pytest.fixture
def fake_pipeline(monkeypatch, tmp_path, repo):
    """Replace the working copy, the tasks that run DVC and the `covseg` commands with recorders."""
    fakes = Fakes(tmp_path / "work")
    calls = fakes.calls

    def run_pipeline(work, overrides, name, uri):
        calls.append(("dvc exp run", overrides))
        return {"kaggle_f1": 0.5, "kaggle_f1_std": 0.1, "oof_folds": 5, "oof_slices": 40, "calibrated": True,
                "pipeline_start": 0.0, "pipeline_end": 0.0}

    def register_model(work, uri):
        calls.append(("register",))
        return {"model_version": 7, "mlflow_run_id": "0" * 32, "new": True}

    monkeypatch.setattr(shell, "run", fakes.shell_run(shell.run))
    monkeypatch.setattr(pipeline, "working_copy", fakes.working_copy)
    monkeypatch.setattr(pipeline, "pull_data", lambda work: calls.append(("pull",)) or "md5-data")
    monkeypatch.setattr(pipeline, "run_pipeline", run_pipeline)
    monkeypatch.setattr(pipeline, "register_model", register_model)
    monkeypatch.setattr(pipeline, "promotion_gate",
                        lambda work, version, uri, allow_data_change=False:
                        calls.append(("promote", version) + (("allow_data_change",) if allow_data_change else ()))
                        or {"reason": "promoted: test"})
    monkeypatch.setattr(pipeline, "push_results", lambda work, name: calls.append(("push", name)))
    monkeypatch.setattr(pipeline, "champion_data_version", lambda uri, name: "md5-data")
    monkeypatch.setattr(pipeline, "publish_record", fakes.publish_record)
    monkeypatch.setattr(pipeline, "collect_fold", fakes.collect_fold)
    monkeypatch.setattr(pipeline, "fold_run", fakes.fold_run)
    monkeypatch.setattr(pipeline, "find_result", lambda uri, experiment, run_id:
                        calls.append(("find train", experiment, run_id)) or {"kaggle_f1": 0.6, "model_version": 9})
    monkeypatch.setattr(pipeline.launch, "submit", fakes.launch_submit)
    return fakes


def test_override_args_are_the_checked_strings_as_dvc_takes_them():
    assert pipeline.override_args(["recipe=gpu", "train.class_weights=[1, 2, 1, 1]"]) == [
        "-S", "recipe=gpu", "-S", "train.class_weights=[1, 2, 1, 1]"]


def test_results_table_best_first():
    table = pipeline.results_table([{"kaggle_f1": 0.2, "v": 1}, {"kaggle_f1": None, "v": 3},
                                    {"kaggle_f1": 0.5, "v": 2}])
    assert table["v"].tolist() == [2, 1, 3]


@pytest.mark.parametrize("overrides,message", [
    (["dvc.yaml:stages.train.cmd=touch /tmp/pwned"], "no \\+, ~ or FILE: prefixes"),
    (["train.loss=foo"], r"train\.loss = 'foo' is not allowed"),
    (["split.fold=7"], r"split\.fold = 7 is not allowed"),
    (["recipe=nope"], "no such recipe"),
    (["train.init=${oc.env:MLFLOW_TRACKING_PASSWORD}"], "may not hold"),
    (["train.init=/root/.aws/credentials.pt"], "a flow warm-starts only from a registry model .* or a checkpoint "
                                                "under the repository"),
    (["train.init=../../outside.pt"], "a checkpoint under the repository"),
])
def test_train_refuses_bad_overrides_before_cloning(fake_pipeline, overrides, message):
    with pytest.raises(ParamsError, match=message):
        pipeline.train(overrides=overrides)
    assert fake_pipeline.calls == [], "nothing cloned or run"


def test_overrides_of_another_form_are_refused_before_cloning(fake_pipeline, repo):
    with pytest.raises(Exception, match="valid list"):  # Prefect checks the parameter's type
        pipeline.train(overrides={"train.epochs": 3})
    with pytest.raises(ParamsError, match="expected a list of 'KEY=VALUE' strings"):
        pipeline.checked_overrides(repo, [["train.epochs=3"]])
    with pytest.raises(ParamsError, match="cv_runs .* MLflow run ids"):
        pipeline.train(cv_runs=["../../etc"])
    assert fake_pipeline.calls == []


def test_train_refuses_another_repository(fake_pipeline, tmp_path):
    with pytest.raises(ParamsError, match="is not allowed: this deployment runs on"):
        pipeline.train(repo=str(tmp_path))
    assert fake_pipeline.calls == []


def test_train_runs_pipeline_promotes_and_pushes(fake_pipeline):
    result = pipeline.train(overrides=["train.epochs=2"])
    calls = fake_pipeline.calls
    assert [c[0] for c in calls] == ["clone", "pull", "dvc exp run", "push", "register", "promote"]
    assert calls[2] == ("dvc exp run", ["train.epochs=2"]) and calls[5] == ("promote", 7)
    assert result["kaggle_f1"] == 0.5 and result["promotion"]["reason"] == "promoted: test"


def test_an_uncalibrated_version_is_not_sent_to_the_gate_and_still_pushed(fake_pipeline, monkeypatch):
    monkeypatch.setattr(pipeline, "run_pipeline", lambda work, overrides, name, uri: {
        "calibrated": False, "recipe_key": "abc", "pipeline_start": 0.0, "pipeline_end": 0.0})
    result = pipeline.train()
    assert "promote" not in [c[0] for c in fake_pipeline.calls] and fake_pipeline.kinds("push")
    assert not result["promotion"]["promoted"] and "recipe key abc" in result["promotion"]["reason"]


def test_nightly_skips_when_the_champion_has_this_data(fake_pipeline):
    result = pipeline.train(only_if_data_changed=True)
    assert result == {"skipped": True, "data_version": "md5-data"}
    assert "dvc exp run" not in [c[0] for c in fake_pipeline.calls]


def test_nightly_retrains_on_new_data_and_lets_the_gate_compare_across_data_versions(fake_pipeline, monkeypatch):
    import yaml

    monkeypatch.setattr(pipeline, "champion_data_version", lambda uri, name: "md5-older")
    nightly = next(d for d in yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly")
    pipeline.train(**nightly["parameters"])
    assert ("promote", 7, "allow_data_change") in fake_pipeline.calls
    pipeline.train()
    assert fake_pipeline.calls[-1] == ("promote", 7), "other runs: the gate refuses a data change"


def test_cv_fold_runs_covseg_cv_in_a_working_copy_and_publishes_its_record(fake_pipeline, monkeypatch):
    monkeypatch.setenv(ENV_TRACKING_URI, "http://mlflow.team:5000")
    record = pipeline.cv_fold(overrides=["recipe=fast"], fold=3)
    assert [c[0] for c in fake_pipeline.calls] == ["clone", "pull", "covseg", "publish"]
    _, args, cwd, env = fake_pipeline.commands("cv")[0]
    work = fake_pipeline.work
    assert args == ["cv", "--raw", "data/raw", "-S", "recipe=fast", "--folds", "3", "--out",
                    str(work / "reports/cv/fold")]
    assert cwd == work and env[ENV_TRACKING_URI] == "http://mlflow.team:5000" and env[ENV_FLOW_RUN]
    assert record["fold"] == 3 and record["recipe"] == "key:recipe=fast"


@pytest.mark.parametrize("fold", [5, -1])
def test_cv_fold_refuses_a_fold_the_folds_file_does_not_have(fake_pipeline, fold):
    with pytest.raises(ParamsError, match=r"distinct fold numbers in 0\.\.4"):
        pipeline.cv_fold(overrides=None, fold=fold)
    assert fake_pipeline.calls == []


def test_cross_validate_fans_out_every_fold_collects_them_and_calibrates(fake_pipeline, repo):
    result = pipeline.cross_validate(overrides=["train.epochs=1"])  # the deployment cv_fold/gpu
    calls = fake_pipeline.calls
    launched = fake_pipeline.kinds("launch")
    assert [(d, p["fold"]) for _, d, p in launched] == [("cv_fold/gpu", k) for k in range(FOLDS)]
    assert all(p == {"overrides": ["train.epochs=1"], "fold": p["fold"], "repo": str(repo)} for _, _, p in launched)
    assert max(calls.index(c) for c in launched) < calls.index(fake_pipeline.kinds("wait")[0]), "all at once"
    assert {c[1] for c in fake_pipeline.kinds("find fold")} == {"covseg-cv"}, "each fold's run, by its flow run id"

    cv = repo / "reports/cv/default"
    assert [(k, d) for _, k, d in fake_pipeline.kinds("collect")] == [(k, cv) for k in range(FOLDS)]
    assert sorted(p.name for p in cv.glob("fold*")) == sorted(f"fold{k}.{e}" for k in range(FOLDS)
                                                              for e in ("json", "npz"))
    (_, args, cwd, _), = fake_pipeline.commands("calibrate")
    assert args == ["calibrate", "--cv", "reports/cv/default", "-S", "train.epochs=1"], "as a user types it"
    assert cwd == repo
    assert calls.index(fake_pipeline.kinds("covseg")[0]) > calls.index(fake_pipeline.kinds("collect")[-1])

    assert result["calibrated"] and result["choices"] == NEUTRAL
    assert result["oof"][f"{KAGGLE_F1}_mean"] == pytest.approx(0.52)
    assert [r["fold"] for r in result["per_fold"]] == list(range(FOLDS)) and len(result["cv_runs"]) == FOLDS
    assert json.loads((cv / "summary.json").read_text())["folds_run"] == list(range(FOLDS))
    assert json.loads((repo / PATHS.calibration).read_text()).keys() == {result["recipe_key"]}


def test_cross_validate_in_this_process_runs_the_folds_as_cv_fold_subflows(fake_pipeline, repo):
    result = pipeline.cross_validate(overrides=["recipe=seed", "train.epochs=3"], folds=[0, 3], deployment=None)
    assert fake_pipeline.kinds("launch") == []
    runs = fake_pipeline.commands("cv")
    assert [a[a.index("--folds") + 1] for _, a, _, _ in runs] == ["0", "3"]
    assert all(a[1:7] == ["--raw", "data/raw", "-S", "recipe=seed", "-S", "train.epochs=3"] for _, a, _, _ in runs)
    assert [c[1] for c in fake_pipeline.kinds("collect")] == [0, 3]
    assert [r["fold"] for r in result["per_fold"]] == [0, 3]


def test_partial_folds_are_collected_but_not_calibrated_until_all_are_there(fake_pipeline, repo):
    first = pipeline.cross_validate(folds=[0, 1], deployment=None)
    assert not first["calibrated"] and "needs all 5 folds" in first["message"] and "[2, 3, 4]" in first["message"]
    assert fake_pipeline.commands("calibrate") == [] and not (repo / PATHS.calibration).exists()
    assert [r["fold"] for r in first["per_fold"]] == [0, 1]

    pipeline.cross_validate(overrides=["train.lr=0.01"], folds=[2, 3, 4], deployment=None)
    assert fake_pipeline.commands("calibrate") == [], "folds of another recipe key do not complete it"
    last = pipeline.cross_validate(folds=[2, 3, 4], deployment=None)
    assert last["calibrated"] and last["folds_present"] == list(range(FOLDS)), "the folds of an earlier run count"
    assert len(fake_pipeline.commands("calibrate")) == 1


@pytest.mark.parametrize("deployment", ["sweep/control", "train/gpu", "cv_fold/gpu; rm -rf /", "other/x"])
def test_fan_out_launches_cv_fold_deployments_only(fake_pipeline, deployment):
    with pytest.raises(ParamsError, match="is not allowed: sweeps and cross-validation launch cv_fold/<name>"):
        pipeline.cross_validate(folds=[0, 1], deployment=deployment)
    with pytest.raises(ParamsError, match="is not allowed: sweeps and cross-validation launch cv_fold/<name>"):
        pipeline.sweep([["train.lr=0.001"]], deployment=deployment)
    assert fake_pipeline.calls == []


@pytest.mark.parametrize("folds", [[5], [-1], [0, 0], []])
def test_cross_validate_refuses_folds_the_folds_file_does_not_have(fake_pipeline, folds):
    with pytest.raises(ParamsError, match=r"distinct fold numbers in 0\.\.4"):
        pipeline.cross_validate(folds=folds, deployment=None)
    assert fake_pipeline.calls == []


def test_cross_validate_refuses_bad_overrides_before_anything_runs(fake_pipeline):
    with pytest.raises(ParamsError, match=r"train\.loss = 'foo' is not allowed"):
        pipeline.cross_validate(overrides=["train.loss=foo"])
    assert fake_pipeline.calls == []


def test_a_fold_is_found_and_collected_through_mlflow(mlflow_store, tmp_path):
    """The MLflow side for real (an embedded store): the fold's run found by its flow run's tag, its record
    published beside the logits `covseg cv` logged, both collected."""
    import mlflow
    import numpy as np

    from covseg import tracking

    flow_run_id = "0b7a3f5e-8d4c-4c8e-9a51-2f0f7d3c1e11"
    tracking.configure("covseg-cv", mlflow_store)  # artifacts beside the store, in this test's folder
    with mlflow.start_run(tags={"prefect_flow_run_id": flow_run_id}) as run:
        np.savez(tmp_path / "fold2.npz", logits=np.zeros((1, 4, 2, 2)))
        mlflow.log_artifact(str(tmp_path / "fold2.npz"), "cv")
    record = {"fold": 2, "recipe": "k", "metrics": {"mlflow_run_id": run.info.run_id}}
    (tmp_path / "fold2.json").write_text(json.dumps(record))
    assert pipeline.publish_record.fn(mlflow_store, tmp_path / "fold2.json") == record
    assert pipeline.fold_run.fn(mlflow_store, "covseg-cv", flow_run_id) == run.info.run_id
    with pytest.raises(RuntimeError, match="no MLflow run of experiment covseg-cv"):
        pipeline.fold_run.fn(mlflow_store, "covseg-cv", "1b7a3f5e-8d4c-4c8e-9a51-2f0f7d3c1e11")
    dest = tmp_path / "repo" / "reports/cv/default"
    assert pipeline.collect_fold.fn(mlflow_store, run.info.run_id, dest) == record
    assert sorted(p.name for p in dest.iterdir()) == ["fold2.json", "fold2.npz"], "no staging left behind"
    assert np.load(dest / "fold2.npz")["logits"].shape == (1, 4, 2, 2)


def test_experiment_names_are_safe_git_refs():
    assert pipeline.experiment_name("-x; rm _y", 5) == "x-rm-y-5"
    assert pipeline.experiment_name(None, 5) == "local-5"
    assert pipeline.experiment_name("---", 5) == "run-5"


def test_sweep_refuses_every_set_before_running_any(fake_pipeline):
    with pytest.raises(ParamsError, match=r"train\.lr = -1"):
        pipeline.sweep([["train.lr=0.001"], ["train.lr=-1"]], deployment=None)
    assert fake_pipeline.calls == []


def test_sweep_cross_validates_every_set_at_once_then_trains_the_best(fake_pipeline, repo):
    sets = [["train.lr=0.001"], ["train.lr=0.004"], ["recipe=fast", "train.lr=0.002"]]
    rows = pipeline.sweep(sets)
    calls = fake_pipeline.calls
    folds = [c for c in fake_pipeline.kinds("launch") if c[1] == "cv_fold/gpu"]
    assert [(p["overrides"], p["fold"]) for _, _, p in folds] == [(s, k) for s in sets for k in range(FOLDS)]
    assert max(calls.index(c) for c in folds) < calls.index(fake_pipeline.kinds("wait")[0]), "all folds at once"
    calibrated = fake_pipeline.commands("calibrate")
    assert [a[3:] for _, a, _, _ in calibrated] == [pipeline.override_args(s) for s in sets], "the same overrides"
    assert [a[2] for _, a, _, _ in calibrated] == ["reports/cv/default", "reports/cv/default", "reports/cv/fast"]
    assert len(json.loads((repo / PATHS.calibration).read_text())) == 3, "an entry per set"

    assert [r["params"] for r in rows] == [sets[1], sets[2], sets[0]], "best calibrated out-of-fold score first"
    assert rows[0][KAGGLE_F1] == pytest.approx(0.5 + 0.02 + 0.04)
    (_, deployment, job), = [c for c in fake_pipeline.kinds("launch") if c[1] == "train/gpu"]
    assert job == {"overrides": sets[1], "repo": str(repo), "promote": True, "cv_runs": rows[0]["cv_runs"]}
    assert len(set(job["cv_runs"])) == FOLDS and rows[0]["trained"]["model_version"] == 9


def test_sweep_in_this_process_trains_the_best_calibrated_from_its_folds(fake_pipeline, repo):
    rows = pipeline.sweep([["train.lr=0.001"], ["train.lr=0.002"]], deployment=None)
    assert fake_pipeline.kinds("launch") == []
    assert rows[0]["params"] == ["train.lr=0.002"] and rows[0]["trained"]["promotion"]["reason"] == "promoted: test"
    # the training's working copy gets the best set's folds from MLflow and calibrates them before the pipeline
    collected = fake_pipeline.kinds("collect")[-FOLDS:]
    assert {d for _, _, d in collected} == {fake_pipeline.work.parent / "cv"}
    (_, args, cwd, _) = fake_pipeline.commands("calibrate")[-1]
    assert args == ["calibrate", "--cv", str(fake_pipeline.work.parent / "cv"), "-S", "train.lr=0.002"]
    assert cwd == fake_pipeline.work
    assert [c[0] for c in fake_pipeline.calls[-12:]] == ["clone", "pull", *["collect"] * FOLDS, "covseg",
                                                         "dvc exp run", "push", "register", "promote"]
    assert fake_pipeline.kinds("dvc exp run") == [("dvc exp run", ["train.lr=0.002"])]


def test_a_recipe_and_overrides_are_checked_against_the_committed_recipes(fake_pipeline, monkeypatch):
    seen = []
    real = pipeline.compose
    monkeypatch.setattr(pipeline, "compose", lambda overrides, conf: seen.append(real(overrides, conf)) or seen[-1])
    pipeline.cross_validate(overrides=["recipe=seed", "train.epochs=3"], folds=[0, 3], deployment=None)
    assert all(p.recipe == "seed" and p.train.lr == 0.0001 and p.train.epochs == 3 for _, p in seen)
    assert len(seen) == 3, "by cross_validate, then by each fold's run"
