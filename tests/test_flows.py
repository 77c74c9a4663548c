"""The Prefect flows, with Prefect's test harness: overrides checked before anything runs, orchestration of
the pipeline tasks (faked here; the slow tier runs them for real on a server and workers)."""
from contextlib import contextmanager
from pathlib import Path

import pytest

from covseg.errors import ParamsError
from covseg.names import ENV_REPO
from flows import pipeline

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def fake_pipeline(monkeypatch, tmp_path):
    """Replace the working copy and the tasks that run DVC / covseg with recorders."""
    monkeypatch.setenv(ENV_REPO, str(Path(__file__).resolve().parents[1]))
    calls = []

    @contextmanager
    def working_copy(repo):
        calls.append(("clone", str(repo)))
        yield tmp_path

    def run_pipeline(work, overrides, name, uri):
        calls.append(("dvc exp run", overrides))
        fold = int(next((o.split("=")[1] for o in overrides if o.startswith("split.fold=")), 0))
        return {"kaggle_f1": 0.5 + fold / 10, "model_version": 7, "pipeline_start": 0.0, "pipeline_end": 0.0}

    monkeypatch.setattr(pipeline, "working_copy", working_copy)
    monkeypatch.setattr(pipeline, "pull_data", lambda work: calls.append(("pull",)) or "md5-data")
    monkeypatch.setattr(pipeline, "run_pipeline", run_pipeline)
    monkeypatch.setattr(pipeline, "promotion_gate",
                        lambda work, version, uri, allow_data_change=False:
                        calls.append(("promote", version) + (("allow_data_change",) if allow_data_change else ()))
                        or {"reason": "promoted: test"})
    monkeypatch.setattr(pipeline, "push_results", lambda work, name: calls.append(("push", name)))
    monkeypatch.setattr(pipeline, "champion_data_version", lambda uri, name: "md5-data")
    return calls


def test_override_args_are_the_checked_strings_as_dvc_takes_them():
    assert pipeline.override_args(["recipe=gpu", "train.class_weights=[1, 2, 1, 1]"]) == [
        "-S", "recipe=gpu", "-S", "train.class_weights=[1, 2, 1, 1]"]


def test_results_table_best_first():
    table = pipeline.results_table([{"kaggle_f1": 0.2, "v": 1}, {"kaggle_f1": None, "v": 3},
                                    {"kaggle_f1": 0.5, "v": 2}])
    assert table["v"].tolist() == [2, 1, 3]


def test_fold_summary():
    s = pipeline.fold_summary([0.4, 0.5, 0.6])
    assert s == {"folds": 3, "kaggle_f1_mean": pytest.approx(0.5), "kaggle_f1_std": pytest.approx(0.1),
                 "kaggle_f1_min": 0.4, "kaggle_f1_max": 0.6}


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
    assert fake_pipeline == [], "nothing cloned or run"


def test_overrides_of_another_form_are_refused_before_cloning(fake_pipeline):
    with pytest.raises(Exception, match="valid list"):  # Prefect checks the parameter's type
        pipeline.train(overrides={"train.epochs": 3})
    with pytest.raises(ParamsError, match="expected a list of 'KEY=VALUE' strings"):
        pipeline.checked_overrides(ROOT, [["train.epochs=3"]])
    assert fake_pipeline == []


def test_train_refuses_another_repository(fake_pipeline, tmp_path):
    with pytest.raises(ParamsError, match="is not allowed: this deployment runs on"):
        pipeline.train(repo=str(tmp_path))
    assert fake_pipeline == []


def test_train_runs_pipeline_promotes_and_pushes(fake_pipeline):
    result = pipeline.train(overrides=["train.epochs=2"])
    assert [c[0] for c in fake_pipeline] == ["clone", "pull", "dvc exp run", "promote", "push"]
    assert fake_pipeline[2] == ("dvc exp run", ["train.epochs=2"]) and fake_pipeline[3] == ("promote", 7)
    assert result["kaggle_f1"] == 0.5 and result["promotion"]["reason"] == "promoted: test"


def test_nightly_skips_when_the_champion_has_this_data(fake_pipeline):
    result = pipeline.train(only_if_data_changed=True)
    assert result == {"skipped": True, "data_version": "md5-data"}
    assert "dvc exp run" not in [c[0] for c in fake_pipeline]


def test_nightly_retrains_on_new_data_and_lets_the_gate_compare_across_data_versions(fake_pipeline, monkeypatch):
    import yaml

    monkeypatch.setattr(pipeline, "champion_data_version", lambda uri, name: "md5-older")
    nightly = next(d for d in yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly")
    pipeline.train(**nightly["parameters"])
    assert ("promote", 7, "allow_data_change") in fake_pipeline
    pipeline.train()
    assert fake_pipeline[-2] == ("promote", 7), "other runs: the gate refuses a data change"


def test_cross_validate_runs_every_fold_and_summarises(fake_pipeline):
    summary = pipeline.cross_validate(overrides=["train.epochs=1"], deployment=None)
    runs = [c[1] for c in fake_pipeline if c[0] == "dvc exp run"]
    assert runs == [["train.epochs=1", f"split.fold={i}"] for i in range(5)], "every fold of folds.json"
    assert summary["folds"] == 5 and summary["kaggle_f1_mean"] == pytest.approx(0.7)
    assert "promote" not in [c[0] for c in fake_pipeline]


@pytest.mark.parametrize("deployment", ["sweep/control", "train/gpu; rm -rf /", "other/x"])
def test_fan_out_launches_train_deployments_only(fake_pipeline, deployment):
    with pytest.raises(ParamsError, match="is not allowed: sweeps and cross-validation launch"):
        pipeline.cross_validate(folds=[0, 1], deployment=deployment)
    assert fake_pipeline == []


@pytest.mark.parametrize("folds", [[5], [-1], [0, 0], []])
def test_cross_validate_refuses_folds_the_folds_file_does_not_have(fake_pipeline, folds):
    with pytest.raises(ParamsError, match=r"distinct fold numbers in 0\.\.4"):
        pipeline.cross_validate(folds=folds, deployment=None)
    assert fake_pipeline == []


def test_experiment_names_are_safe_git_refs():
    assert pipeline.experiment_name("-x; rm _y", 5) == "x-rm-y-5"
    assert pipeline.experiment_name(None, 5) == "local-5"
    assert pipeline.experiment_name("---", 5) == "run-5"


def test_sweep_refuses_every_set_before_running_any(fake_pipeline):
    with pytest.raises(ParamsError, match=r"train\.lr = -1"):
        pipeline.sweep([["train.lr=0.001"], ["train.lr=-1"]], deployment=None)
    assert fake_pipeline == []


def test_a_recipe_and_overrides_are_checked_against_the_committed_recipes(fake_pipeline, monkeypatch):
    seen = []
    real = pipeline.compose
    monkeypatch.setattr(pipeline, "compose", lambda overrides, conf: seen.append(real(overrides, conf)) or seen[-1])
    summary = pipeline.cross_validate(overrides=["recipe=seed", "train.epochs=3"], folds=[0, 3], deployment=None)
    runs = [c[1] for c in fake_pipeline if c[0] == "dvc exp run"]
    assert runs == [["recipe=seed", "train.epochs=3", f"split.fold={i}"] for i in (0, 3)]
    assert summary["folds"] == 2
    assert all(p.recipe == "seed" and p.train.lr == 0.0001 and p.train.epochs == 3 for _, p in seen)
