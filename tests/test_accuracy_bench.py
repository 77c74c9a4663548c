"""benchmarks/accuracy.py writes docs/accuracy.md from result files alone: checked on small synthetic results
(the shipped recipe from a calibration file and its `covseg cv` folder, or what is missing; the history of the
old runner: paired differences fold by fold, the machine each table states, the same page from the same files,
one clear error naming a missing or garbled file)."""
import json
import re
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy

MEASURES = list(accuracy.MEASURES)
PARAMS = {"model.base_channels": 16, "model.class_bias": "[0.0, 0.0, 0.0, 0.0]", "train.epochs": 60,
          "train.class_weights": "[3.0, 3.0, 1.0, 0.5]", "train.amp": True}
# one CV path's params: no class offset any more, and a machine key (not the recipe) that differs
NEW_PARAMS = {k: v for k, v in PARAMS.items() if k != "model.class_bias"} | {"train.device": "cuda"}
KEY = "0123456789abcdef"


def scores(value: float, **extra) -> dict:
    return {m: value for m in MEASURES} | extra


def write_cv(results: Path, name: str, folds: dict[int, dict], params: dict | None = None, **summary) -> None:
    """A summary of the old runner (cv/NAME.json) with its fold files beside it."""
    cv = results / "cv"
    cv.mkdir(parents=True, exist_ok=True)
    per_fold = [{**s, "fold": k} for k, s in folds.items()]
    (cv / f"{name}.json").write_text(json.dumps({"folds": 3, "params": params or PARAMS, "per_fold": per_fold,
                                                 **summary}))
    for k, s in folds.items():
        (cv / f"{name}.fold{k}.json").write_text(json.dumps({"recipe": "r", "metrics": {**s, "fold": k}}))


def write_nested(results: Path, name: str, without: dict[int, float], with_: dict[int, float],
                 against: str | None = None) -> None:
    """A result of the retired benchmarks/class_bias.py (ground-glass Dice as given, the others 0)."""
    nested = {m: 0 for m in accuracy.NESTED}
    rows = [{"fold": k, "class_bias": [1.0, 0, 0, 0], "without": {**nested, "dice_ggo": without[k]},
             "with": {**nested, "dice_ggo": with_[k]}} for k in without]
    path = results / f"class_bias.{name}.ggo.json"
    path.write_text(json.dumps({"class_bias": [1.0, 0.0, 0.0, 0.0], "classes": ["ggo"], "per_fold": rows,
                                "cv": f"benchmarks/results/cv/{name}.json"}))
    if against:
        path.with_suffix(".md").write_text(f"# ...\n\nAgainst class_bias.{against}.ggo.json (each with its own ...\n")


def make_results(root: Path, reverse: bool = False) -> Path:
    """Under root/results the old runner's default (combo2, folds 0-2), `other` (folds 0-3), their nested
    offsets, a pair, a machine; root/params.yaml. With `reverse`, the files are written in the other order."""
    results = root / "results"
    steps = [
        lambda: write_cv(results, "combo2", {0: scores(0.4), 1: scores(0.7), 2: scores(0.1)}),
        lambda: write_cv(results, "other", {0: scores(0.5), 1: scores(0.6), 2: scores(0.4), 3: scores(0.9)},
                         PARAMS | {"train.epochs": 40}),
        lambda: write_nested(results, "combo2", {0: 0.4, 1: 0.7, 2: 0.1}, {0: 0.5, 1: 0.7, 2: 0.3}),
        lambda: write_nested(results, "other", {0: 0.5, 1: 0.6, 2: 0.4}, {0: 0.6, 1: 0.9, 2: 0.4}, against="combo2"),
        lambda: (results / "accuracy.json").write_text(json.dumps({"pairs": {"other:combo2": {}}})),
        lambda: (results / "machine.txt").write_text("x86_64, 2 cores, no GPU\n"),
        lambda: (root / "params.yaml").write_text(
            "model:\n  base_channels: 16\n  depth: 4\ntrain:\n  epochs: 60\n"
            "  class_weights: [3, 3, 1, 0.5]\n  amp: true\n  device: auto\n"),
    ]
    results.mkdir(parents=True, exist_ok=True)
    for step in reversed(steps) if reverse else steps:
        step()
    return results


def write_folder(results: Path, name: str, folds: dict[int, float], key: str = KEY) -> Path:
    """One CV path's `covseg cv --out results/cv/NAME`: summary.json and fold<k>.json (every score `value`)."""
    folder = results / "cv" / name
    folder.mkdir(parents=True, exist_ok=True)
    per_fold = [scores(v, fold=k, bf16=True, seconds=100.0 + 10 * k) for k, v in folds.items()]
    (folder / "summary.json").write_text(json.dumps({
        "recipe": "default", "recipe_key": key, "data_key": "d", "data": "data/raw", "folds": len(folds),
        "folds_run": sorted(folds), "bf16": True, "machine": "an H200, torch 2", "per_fold": per_fold,
        "params": NEW_PARAMS}))
    for k, f in zip(folds, per_fold):
        (folder / f"fold{k}.json").write_text(json.dumps({"fold": k, "recipe": key, "data": "d", "metrics": f}))
    return folder


def part(values: dict[int, float], dice_ggo: dict[int, float] | None = None) -> dict[int, dict]:
    return {k: scores(v) | ({"dice_ggo": dice_ggo[k]} if dice_ggo else {}) for k, v in values.items()}


def summarise(per_fold: dict[int, dict]) -> dict:
    return {f"{m}_{stat}": fn([f[m] for f in per_fold.values()]) for m in MEASURES
            for stat, fn in (("mean", statistics.mean), ("std", statistics.stdev))}


def write_calibration(root: Path, folder: str = "results/cv/medseg-default", key: str = KEY) -> Path:
    """A calibration.json entry like `covseg calibrate --cv folder`'s: neutral scores those of the folder's
    folds (0.4, 0.7, 0.1); ground-glass Dice with offsets only 0.55, 0.85, 0.25; calibrated 0.6, 0.8, 0.4."""
    neutral = {0: 0.4, 1: 0.7, 2: 0.1}
    parts = {"neutral": part(neutral), "offsets_only": part(neutral, {0: 0.55, 1: 0.85, 2: 0.25}),
             "calibrated": part(neutral, {0: 0.6, 1: 0.8, 2: 0.4})}
    choices = [{"class_bias": [b, 0.0, 0.0, 0.0], "tta": k != 1, "min_island": 50 * k} for k, b in
               enumerate((1.0, 1.25, 1.0))]
    entry = {"recipe": "default", "data": "d",
             "choices": {"class_bias": [1.0, 0.0, 0.0, 0.0], "tta": True, "min_island": 0},
             "oof": {"folds": 3, "slices": 31, "trivial_kaggle_f1": 0.123, **summarise(parts["calibrated"])},
             "nested": {"per_fold": [{"fold": k, "slices": 10 + (k == 0), "choices": choices[k],
                                      **{p: parts[p][k] for p in parts}} for k in neutral],
                        **{p: summarise(parts[p]) for p in parts}},
             "searched": {"offsets": ["ggo"], "offset_grid": [0.0, 1.0], "tta": [False, True], "min_island": [0, 50]},
             "cv": {"folder": folder, "machine": "an H200, torch 2", "bf16": True, "train_seconds_mean": 110.0},
             "made": "2027-01-05", "by": "covseg calibrate on x86_64"}
    path = root / "calibration.json"
    path.write_text(json.dumps({key: entry}))
    return path


def make_all(root: Path, reverse: bool = False) -> Path:
    """Both layouts: the history and the shipped recipe (results/cv/medseg-default/, calibrated)."""
    results = make_results(root, reverse)
    write_folder(results, "medseg-default", {0: 0.4, 1: 0.7, 2: 0.1})
    write_calibration(root)
    return results


def page(root: Path) -> str:
    return accuracy.render(root / "results", root / "params.yaml", root / "calibration.json", "results")


def row(text: str, start: str) -> list[str]:
    """The cells of the first table row whose first cell is `start`."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]
    found = [cells for cells in rows if cells[0] == start]
    assert found, f"no row {start!r}"
    return found[0]


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_shipped_recipe_comes_first_with_its_nested_scores_choices_and_machine(tmp_path):
    make_all(tmp_path)
    text = page(tmp_path)
    assert text.index("## The shipped recipe") < text.index("## The default recipe of the old runner")
    shipped = section(text, "The shipped recipe")
    assert "### default (`cv/medseg-default/`)" in shipped
    neutral = row(shipped, accuracy.PARTS["neutral"])
    assert neutral[1:] == ["3"] + ["0.400 ± 0.300"] * 5, "the five nested measures, mean ± std"
    assert row(shipped, accuracy.PARTS["offsets_only"])[1:4] == ["3", "0.550 ± 0.300", "0.400 ± 0.300"]
    assert row(shipped, accuracy.PARTS["calibrated"])[2] == "0.600 ± 0.200"
    # calibrated less neutral, fold by fold: 0.2, 0.1, 0.3
    assert row(shipped, "what the choices add, fold by fold (folds where they score higher)")[2:4] \
        == ["+0.200 ± 0.100 (3/3)", "+0.000 ± 0.000 (0/3)"]
    assert "Chosen on all folds (what evaluate, submit and predict apply): offsets [1.0, 0.0, 0.0, 0.0], " \
           "flip TTA true, island removal none." in shipped
    assert row(shipped, "1") == ["1", "10", "offsets [1.25, 0.0, 0.0, 0.0], flip TTA false, island removal 50 px"]
    assert row(shipped, "0")[1] == "11"
    assert "Folds: 3 of 3, 31 held-out slices. Machine: an H200, torch 2. Trained in bfloat16: yes. " \
           "Training seconds per fold: 110" in shipped
    assert f"Recipe key `{KEY}`" in shipped and "A constant prediction scores kaggle_f1 0.123" in shipped
    assert "differs from `covseg cv`'s fold scores by at most 0.00000" in shipped
    assert "params.yaml's model and train values today: yes (params.yaml keys the run does not record: " \
           "model.depth). Data key `d`." in shipped, "train.device is the machine's, not the recipe's"
    # the history is still there, and the new folder is not one of its runs
    assert "medseg-default" not in section(text, "Every cross-validated run")


def test_the_reproduction_line_compares_offsets_only_with_the_old_runners_nested_dice(tmp_path):
    make_all(tmp_path)
    line = [x for x in page(tmp_path).splitlines() if x.startswith("Reproduction: old runner vs one CV path")]
    assert len(line) == 1
    # the old nested Dice: ground glass 0.5, 0.7, 0.3 and consolidation 0 (write_nested); offsets only here
    # 0.55 ± 0.3 and 0.4 ± 0.3
    assert "(Dice ground glass / Dice consolidation)" in line[0]
    assert "gave 0.500 ± 0.200 / 0.000 ± 0.000; offsets only here: 0.550 ± 0.300 / 0.400 ± 0.300, " \
           "difference of means (offsets only less the old runner) +0.050 / +0.400" in line[0]
    assert "(calibrated): 0.600 ± 0.200 / 0.400 ± 0.300." in line[0]
    summary = tmp_path / "results" / "cv" / "medseg-default" / "summary.json"
    other = json.loads(summary.read_text())
    other["params"]["train.epochs"] = 40
    summary.write_text(json.dumps(other))
    assert "Reproduction:" not in page(tmp_path), "only for the old default's model and train values"


@pytest.mark.parametrize("setup, says", [
    (lambda root: None, "Not measured yet: there is no `calibration.json`."),
    (lambda root: write_calibration(root, folder="reports/cv/medseg-default"),
     "Not measured yet: no entry of `calibration.json` has its `covseg cv` folder under the results"),
    (lambda root: write_folder(root / "results", "medseg-default", {0: 0.4, 1: 0.7, 2: 0.1}),
     "`covseg cv` folders here without an entry in `calibration.json` (not shown): `cv/medseg-default/`."),
])
def test_the_shipped_recipe_says_what_is_missing_instead_of_failing(tmp_path, setup, says):
    make_results(tmp_path)
    setup(tmp_path)
    shipped = section(page(tmp_path), "The shipped recipe")
    assert says in shipped and "covseg calibrate --cv benchmarks/results/cv/NAME" in shipped
    assert "|" not in shipped, "no table"


def test_an_entry_elsewhere_is_listed_beside_the_shipped_ones(tmp_path):
    make_all(tmp_path)
    entries = json.loads((tmp_path / "calibration.json").read_text())
    entries["fedcba9876543210"] = entries[KEY] | {"recipe": "fast", "cv": {"folder": "reports/cv/fast"}}
    (tmp_path / "calibration.json").write_text(json.dumps(entries))
    shipped = section(page(tmp_path), "The shipped recipe")
    assert "### default (`cv/medseg-default/`)" in shipped
    assert "(not shown): `fedcba9876543210` (fast, `reports/cv/fast`)." in shipped


def test_the_old_default_and_every_old_run_keep_their_folds_and_machine(tmp_path):
    results = make_results(tmp_path)
    (results / "cv" / "other.json").write_text(json.dumps(
        json.loads((results / "cv" / "other.json").read_text()) | {"machine": "an H200"}))
    text = page(tmp_path)
    assert "Folds: 3 of 3. Machine: x86_64, 2 cores, no GPU." in text
    assert "params.yaml's model and train values today: yes (params.yaml keys the run does not record: " \
           "model.depth, train.device)" in text
    assert row(text, "**default**, with the nested ground-glass offset")[1:3] == ["3", "0.500 ± 0.200"]
    assert row(text, "**default**, with the nested ground-glass offset")[-1] == "not scored"
    without = row(text, "without the offset (the same models, as `covseg cv` scored them)")
    assert without[1:3] == ["3", "0.400 ± 0.300"] and without[-1] == "0.400 ± 0.300", "pooled_f1 from covseg cv"
    gain = row(text, "what the nested offset adds, fold by fold (folds where it is higher)")
    assert gain[2] == "+0.100 ± 0.100 (2/3)"
    default = row(text, "**default** (combo2)")
    assert default[1] == "3 of 3" and default[-1] == "x86_64, 2 cores, no GPU"
    other = row(text, "other")
    assert other[1] == "4 of 3 (0, 1, 2, 3)" and other[2] == "0.600 ± 0.216" and other[-1] == "an H200"
    assert "`train.epochs=40`" in text
    (results / "machine.txt").unlink()
    assert row(page(tmp_path), "**default** (combo2)")[-1] == "not recorded"


def test_a_key_that_became_a_calibration_choice_is_marked_so(tmp_path):
    results = make_results(tmp_path)
    write_cv(results, "biased", {0: scores(0.5)}, PARAMS | {"model.class_bias": "[1.25, 0, 0, 0]",
                                                             "train.gone": 3})
    recipes = next(line for line in page(tmp_path).splitlines() if "`cv/biased.json`" in line)
    assert recipes.strip(" |").split("|")[2].strip() \
        == "`model.class_bias=[1.25, 0, 0, 0]` (calibrated), `train.gone=3` (removed)"
    (tmp_path / "params.yaml").write_text("model:\n  base_channels: 16\ntrain:\n  epochs: 80\n")
    assert "today: all but `train.epochs` (run 60, params.yaml 80)" in page(tmp_path), "stated, not an error"


def test_a_pair_is_the_difference_fold_by_fold_on_the_folds_both_ran(tmp_path):
    text = page(make_results(tmp_path).parent)
    # other less combo2 on folds 0-2 (other's fold 3 has no partner): 0.1, -0.1, 0.3
    cells = row(text, "other against **default** (combo2)")
    assert cells[1:4] == ["as scored by covseg cv", "3", "+0.100 ± 0.200 (2/3)"]
    assert cells[3:9] == ["+0.100 ± 0.200 (2/3)"] * 6
    # each with its own nested offset (from class_bias.*.json's `with`): 0.1, 0.2, 0.1
    nested = [line for line in text.splitlines() if "each its own nested ggo offset" in line]
    assert len(nested) == 1 and "| +0.133 ± 0.058 (3/3) |" in nested[0]
    assert accuracy.delta({0: {"m": 1.0}, 1: {"m": 0.0}}, {0: {"m": 0.5}, 1: {"m": 0.5}, 2: {"m": 9.0}}, "m") \
        == "+0.000 ± 0.707 (1/2)"


def generate(monkeypatch, root: Path, out: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--results", str(root / "results"), "--out", str(out),
                                      "--params", str(root / "params.yaml"),
                                      "--calibration", str(root / "calibration.json")])
    accuracy.main()


def test_the_same_files_give_the_same_page(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    make_all(one), make_all(two, reverse=True)
    assert page(one) == page(two), "whatever order the files were written in"
    out = tmp_path / "docs" / "accuracy.md"
    generate(monkeypatch, one, out)
    first = out.read_bytes()
    generate(monkeypatch, one, out)
    assert out.read_bytes() == first and b"do not edit" in first and b"### default" in first


@pytest.mark.parametrize("damage, named", [
    (lambda r: (r / "results" / "cv" / "other.fold1.json").write_text("{not json"),
     "cv/other.fold1.json: not readable JSON"),
    (lambda r: (r / "results" / "class_bias.combo2.ggo.json").unlink(), "class_bias.combo2.ggo.json: missing"),
    (lambda r: (r / "results" / "cv" / "other.fold2.json").write_text(json.dumps({"metrics": scores(0.41)})),
     "cv/other.fold2.json: dice_ggo"),
    (lambda r: (r / "results" / "cv" / "combo2.json").write_text(json.dumps({"per_fold": [{"fold": 0}]})),
     "cv/combo2.json: unexpected content"),
    (lambda r: (r / "results" / "accuracy.json").write_text(json.dumps({"pairs": {"gone:combo2": {}}})),
     "cv/gone.json is missing"),
    (lambda r: (r / "calibration.json").write_text("{not json"), "calibration.json: not readable JSON"),
    (lambda r: (r / "calibration.json").write_text(json.dumps({KEY: {"recipe": "default"}})),
     "calibration.json: unexpected content"),
    (lambda r: write_folder(r / "results", "medseg-default", {0: 0.4, 1: 0.7, 2: 0.1}, key="another"),
     f"calibration.json: entry {KEY} is not of the folds in"),
    (lambda r: (r / "results" / "cv" / "medseg-default" / "fold1.json").write_text(
        json.dumps({"metrics": scores(0.71)})), "cv/medseg-default/fold1.json: dice_ggo"),
])
def test_a_missing_or_garbled_file_is_one_error_naming_it(tmp_path, monkeypatch, damage, named):
    make_all(tmp_path)
    damage(tmp_path)
    with pytest.raises(SystemExit, match="error: .*" + re.escape(named)):
        generate(monkeypatch, tmp_path, tmp_path / "out.md")
    assert not (tmp_path / "out.md").exists()


def test_a_lever_is_its_score_less_its_baselines_fold_by_fold(tmp_path):
    results = make_all(tmp_path)
    (results / "levers").mkdir()
    # against the shipped default's folds (0.4, 0.7, 0.1): a lever scoring 0.5, 0.6, 0.4
    lever = write_folder(results, "self", {0: 0.5, 1: 0.6, 2: 0.4}, key="another")
    lever.rename(results / "levers" / "self")
    # against the shipped entry's nested calibrated ground-glass Dice (0.6, 0.8, 0.4): a calibration of one entry
    entry = json.loads(write_calibration(tmp_path).read_text())[KEY]
    for f, dice in zip(entry["nested"]["per_fold"], (0.7, 0.8, 0.1)):
        f["calibrated"]["dice_ggo"] = dice
    (results / "levers" / "offset.json").write_text(json.dumps({"k2": entry}))
    (results / "levers" / "levers.json").write_text(json.dumps({
        "self": {"what": "w", "command": "covseg cv", "against": "default", "decision": "no", "leak": True},
        "offset": {"what": "o", "command": "covseg calibrate", "against": "calibrated", "calibration": "offset.json",
                   "decision": "no"}}))
    levers = section(page(tmp_path), "Levers for consolidation and unlabelled scans")
    assert row(levers, "self (leaks: optimistic)")[1:4] == ["default", "3", "+0.100 ± 0.200 (2/3)"]
    assert row(levers, "offset")[1:4] == ["calibrated", "3", "-0.067 ± 0.208 (1/3)"]
    (results / "levers" / "self" / "fold0.json").unlink()
    levers = section(page(tmp_path), "Levers for consolidation and unlabelled scans")
    assert row(levers, "self (leaks: optimistic)")[2] == "2", "only the folds both have"
