"""benchmarks/accuracy.py's fold pool: set specs, longest first, a failed fold that stops nothing else,
and a deadline that stops what still runs (stand-in commands instead of trainings)."""
import json
import os
import sys
import time

import pytest
from projects import ROOT

from covseg.names import ENV_REAL_DATA

sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy


def test_a_spec_is_a_set_with_overrides():
    assert accuracy.parse_spec("gpu") == ("gpu", "gpu", [])
    assert accuracy.parse_spec("w=default+train.class_weights=[3,5,1,0.5]+train.epochs=60") == (
        "w", "default", ["train.class_weights=[3,5,1,0.5]", "train.epochs=60"])
    cmd = accuracy.cv_command("raw", "w=seed+train.epochs=2", [3], ROOT / "out")
    assert cmd[cmd.index("--set") + 1] == "seed" and cmd[cmd.index("-S") + 1] == "train.epochs=2"
    assert cmd[cmd.index("--folds") + 1] == "3" and cmd[cmd.index("--out") + 1].endswith("w.json")


def test_a_pair_is_the_per_fold_difference_on_the_folds_both_ran():
    def result(scores: dict[int, float]) -> dict:
        return {"per_fold": [{"fold": k, **{m: v for m in accuracy.CV_METRICS}} for k, v in scores.items()]}

    results = {"new": result({0: 0.5, 1: 0.6, 2: 0.4, 4: 0.9}), "old": result({0: 0.4, 1: 0.7, 2: 0.1, 3: 0.5})}
    d = accuracy.paired(results, "new:old")
    assert d["folds"] == [0, 1, 2] and d["kaggle_f1"]["higher"] == 2
    assert d["dice_ggo"]["mean"] == pytest.approx(0.1) and d["dice_ggo"]["std"] == pytest.approx(0.2)
    assert "| new against old (0, 1, 2) | +0.100 ± 0.200 (2/3) |" in accuracy.pairs_table({"new:old": d})
    with pytest.raises(SystemExit, match="new:gone"):
        accuracy.paired(results, "new:gone")


def done(out_dir, spec: str, folds: int) -> list[int]:
    return accuracy.finished_folds(out_dir, accuracy.parse_spec(spec)[0], folds, accuracy.recipe_of("raw", spec))


def fake_folds(monkeypatch, tmp_path, behaviour: dict[str, str]):
    """Each (set, fold) runs a stand-in: 'ok' writes its fold file, 'fail' exits 1, 'hang' sleeps."""
    started = []

    def command(data, spec, folds, out_dir):
        name = accuracy.parse_spec(spec)[0]
        started.append((name, folds[0]))
        fold_file = out_dir / "cv" / f"{name}.fold{folds[0]}.json"
        done = json.dumps({"recipe": accuracy.recipe_of(data, spec)})
        code = {"ok": f"import pathlib; pathlib.Path({str(fold_file)!r}).write_text({done!r})",
                "fail": "raise SystemExit(1)", "hang": "import time; time.sleep(60)"}[behaviour[name]]
        return [sys.executable, "-c", code]

    (tmp_path / "cv").mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(accuracy, "cv_command", command)
    return started


def test_longest_recipe_first_and_a_failed_fold_stops_nothing_else(monkeypatch, tmp_path):
    started = fake_folds(monkeypatch, tmp_path, {"seed": "ok", "bad": "fail", "default": "ok"})
    with pytest.raises(SystemExit, match=r"bad fold \d"):  # the largest recipe, so it fails first
        accuracy.run_all("raw", ["default", "bad=seed+train.epochs=500", "seed"], 2, 2, tmp_path, None)
    assert [name for name, _ in started] == ["bad", "bad", "seed", "seed", "default", "default"], "longest first"
    assert done(tmp_path, "seed", 2) == [0, 1], "the sets after the failure still ran"
    assert done(tmp_path, "default", 2) == [0, 1]


def test_the_deadline_stops_running_folds_and_finished_folds_are_not_run_again(monkeypatch, tmp_path):
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "default.fold0.json").write_text(json.dumps({"recipe": accuracy.recipe_of("raw", "default")}))
    (tmp_path / "cv" / "default.fold1.json").write_text(json.dumps({"recipe": "of other params"}))
    started = fake_folds(monkeypatch, tmp_path, {"default": "hang"})
    begin = time.monotonic()
    accuracy.run_all("raw", ["default"], 3, 2, tmp_path, deadline=2)
    assert time.monotonic() - begin < 30, "hanging folds were stopped at the deadline"
    assert started == [("default", 1), ("default", 2)], "fold 0 is done; fold 1 holds another recipe's results"
    assert done(tmp_path, "default", 3) == [0]


@pytest.mark.skipif(not os.environ.get(ENV_REAL_DATA), reason=f"{ENV_REAL_DATA} is not set (the data they were run on)")
def test_the_committed_cv_results_are_still_those_of_their_specs():
    """A change of params.yaml or of the recipe key that made the committed folds look stale would have
    the README's commands train them all again (hours): every set of accuracy.json finds its folds done."""
    summary = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    for spec in summary["sets"]:
        name = accuracy.parse_spec(spec)[0]
        found = accuracy.finished_folds(ROOT / "benchmarks" / "results", name, summary["folds"],
                                        accuracy.recipe_of(os.environ[ENV_REAL_DATA], spec))
        assert found == summary["results"][name]["folds_run"], spec
