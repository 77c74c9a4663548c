"""dvc.yaml tells the truth: each stage's deps list every covseg module the stage runs, and its paths
are the ones the code uses by default."""
import subprocess
from pathlib import Path

import pytest
import yaml

from covseg.names import PATHS, STAGES

ROOT = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_closure_finds_imports_inside_functions(stage_modules):
    train = stage_modules["train"]
    assert "src/covseg/tracking.py" in stage_modules["submit"]  # modelstore imports it (load_calibrated)
    assert "src/covseg/__init__.py" in train and "src/covseg/names.py" in train
    assert {"src/covseg/cli.py", "src/covseg/stages/train.py", "src/covseg/training.py"} <= train
    assert "src/covseg/stages/submit.py" not in train and "src/covseg/ingest.py" not in train


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_list_every_module_it_runs(stage, stage_modules):
    deps = set(dvc_stages()[stage]["deps"])
    missing = stage_modules[stage] - deps
    assert not missing, f"dvc.yaml stage {stage!r} misses deps {sorted(missing)}"
    listed_modules = {d for d in deps if d.startswith("src/")}
    extra = listed_modules - stage_modules[stage]
    assert not extra, f"dvc.yaml stage {stage!r} lists modules it does not run: {sorted(extra)}"


def test_stage_commands_use_the_default_paths():
    stages = dvc_stages()
    outs = {stage: [next(iter(o)) if isinstance(o, dict) else o
                    for o in s.get("outs", []) + s.get("metrics", []) + s.get("plots", [])]
            for stage, s in stages.items()}
    assert outs["validate"] == [PATHS.validation]
    assert outs["preprocess"] == [PATHS.processed]
    assert set(outs["train"]) == {PATHS.model, PATHS.history}
    assert set(outs["evaluate"]) == {PATHS.evaluation, PATHS.metrics}
    assert set(outs["submit"]) == {f"{PATHS.submission}/submission.csv", f"{PATHS.submission}/test_masks.npy"}
    assert tuple(stages) == STAGES
    for stage in STAGES:
        assert stages[stage]["cmd"].split()[:2] == ["covseg", stage]


def test_the_training_state_is_left_in_place_by_dvc():
    """DVC deletes a stage's outputs before it runs it, so the state a killed training resumes from is
    passed to the command but is not an output."""
    train = dvc_stages()["train"]
    assert f"--state {PATHS.train_state}" in train["cmd"]
    assert all(PATHS.train_state not in (o if isinstance(o, str) else next(iter(o))) for o in train["outs"])


def test_every_output_reaches_a_clone():
    """An output DVC does not cache (`cache: false`) reaches a clone only through git, so git must not
    ignore it (else a `git clone` + `dvc pull` never gets it back)."""
    uncached = [path for s in dvc_stages().values() for o in s.get("outs", []) + s.get("metrics", [])
                + s.get("plots", []) if isinstance(o, dict) for path, opts in o.items() if opts.get("cache") is False]
    assert PATHS.metrics in uncached
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *uncached], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert not ignored, f"dvc.yaml outputs with cache: false that .gitignore ignores: {ignored}"
