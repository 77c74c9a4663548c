"""benchmarks/accuracy.py writes docs/accuracy.md from result files alone: checked on small synthetic results
(paired differences fold by fold, the machine each table states, the default checked against params, the same
page from the same files, one clear error naming a missing or garbled file)."""
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy

MEASURES = list(accuracy.MEASURES)
PARAMS = {"model.base_channels": 16, "model.class_bias": "[0.0, 0.0, 0.0, 0.0]", "train.epochs": 60,
          "train.class_weights": "[3.0, 3.0, 1.0, 0.5]", "train.amp": True}


def scores(value: float, **extra) -> dict:
    return {m: value for m in MEASURES} | extra


def write_cv(results: Path, name: str, folds: dict[int, dict], params: dict | None = None, **summary) -> None:
    """A `covseg cv` summary with its fold files beside it."""
    cv = results / "cv"
    cv.mkdir(parents=True, exist_ok=True)
    per_fold = [{**s, "fold": k} for k, s in folds.items()]
    (cv / f"{name}.json").write_text(json.dumps({"folds": 3, "params": params or PARAMS, "per_fold": per_fold,
                                                 **summary}))
    for k, s in folds.items():
        (cv / f"{name}.fold{k}.json").write_text(json.dumps({"recipe": "r", "metrics": {**s, "fold": k}}))


def write_nested(results: Path, name: str, without: dict[int, float], with_: dict[int, float],
                 against: str | None = None) -> None:
    nested = {m: 0 for m in accuracy.NESTED}
    rows = [{"fold": k, "class_bias": [1.0, 0, 0, 0], "without": {**nested, "dice_ggo": without[k]},
             "with": {**nested, "dice_ggo": with_[k]}} for k in without]
    path = results / f"class_bias.{name}.ggo.json"
    path.write_text(json.dumps({"class_bias": [1.0, 0.0, 0.0, 0.0], "classes": ["ggo"], "per_fold": rows,
                                "cv": f"benchmarks/results/cv/{name}.json"}))
    if against:
        path.with_suffix(".md").write_text(f"# ...\n\nAgainst class_bias.{against}.ggo.json (each with its own ...\n")


def make_results(results: Path, reverse: bool = False) -> Path:
    """The default (combo2, folds 0-2), `other` (folds 0-3), their nested offsets, a pair, a machine; params.yaml.
    With `reverse`, the files are written in the other order."""
    steps = [
        lambda: write_cv(results, "combo2", {0: scores(0.4), 1: scores(0.7), 2: scores(0.1)}),
        lambda: write_cv(results, "other", {0: scores(0.5), 1: scores(0.6), 2: scores(0.4), 3: scores(0.9)},
                         PARAMS | {"train.epochs": 40}),
        lambda: write_nested(results, "combo2", {0: 0.4, 1: 0.7, 2: 0.1}, {0: 0.5, 1: 0.7, 2: 0.3}),
        lambda: write_nested(results, "other", {0: 0.5, 1: 0.6, 2: 0.4}, {0: 0.6, 1: 0.9, 2: 0.4}, against="combo2"),
        lambda: (results / "accuracy.json").write_text(json.dumps({"pairs": {"other:combo2": {}}})),
        lambda: (results / "machine.txt").write_text("x86_64, 2 cores, no GPU\n"),
        lambda: (results / "params.yaml").write_text(
            "model:\n  base_channels: 16\n  class_bias: [1.0, 0, 0, 0]\ntrain:\n  epochs: 60\n"
            "  class_weights: [3, 3, 1, 0.5]\n  amp: true\n"),
    ]
    results.mkdir(parents=True, exist_ok=True)
    for step in reversed(steps) if reverse else steps:
        step()
    return results


def page(results: Path) -> str:
    return accuracy.render(results, results / "params.yaml", "results")


def row(text: str, start: str) -> list[str]:
    """The cells of the first table row whose first cell is `start`."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]
    found = [cells for cells in rows if cells[0] == start]
    assert found, f"no row {start!r}"
    return found[0]


def test_a_pair_is_the_difference_fold_by_fold_on_the_folds_both_ran(tmp_path):
    text = page(make_results(tmp_path))
    # other less combo2 on folds 0-2 (other's fold 3 has no partner): 0.1, -0.1, 0.3
    cells = row(text, "other against **default** (combo2)")
    assert cells[1:4] == ["as scored by covseg cv", "3", "+0.100 ± 0.200 (2/3)"]
    assert cells[3:9] == ["+0.100 ± 0.200 (2/3)"] * 6
    # each with its own nested offset (from class_bias.*.json's `with`): 0.1, 0.2, 0.1
    nested = [line for line in text.splitlines() if "each its own nested ggo offset" in line]
    assert len(nested) == 1 and "| +0.133 ± 0.058 (3/3) |" in nested[0]
    assert accuracy.delta({0: {"m": 1.0}, 1: {"m": 0.0}}, {0: {"m": 0.5}, 1: {"m": 0.5}, 2: {"m": 9.0}}, "m") \
        == "+0.000 ± 0.707 (1/2)"


def test_the_default_table_has_its_nested_offset_and_every_run_its_folds_and_machine(tmp_path):
    results = make_results(tmp_path)
    (results / "cv" / "other.json").write_text(json.dumps(
        json.loads((results / "cv" / "other.json").read_text()) | {"machine": "an H200"}))
    text = page(results)
    assert "Folds: 3 of 3. Machine: x86_64, 2 cores, no GPU." in text
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
    assert row(page(results), "**default** (combo2)")[-1] == "not recorded"


def generate(monkeypatch, results: Path, out: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--results", str(results), "--out", str(out),
                                      "--params", str(results / "params.yaml")])
    accuracy.main()


def test_the_same_files_give_the_same_page(tmp_path, monkeypatch):
    one, two = make_results(tmp_path / "one"), make_results(tmp_path / "two", reverse=True)
    assert page(one) == page(two), "whatever order the files were written in"
    out = tmp_path / "docs" / "accuracy.md"
    generate(monkeypatch, one, out)
    first = out.read_bytes()
    generate(monkeypatch, one, out)
    assert out.read_bytes() == first and b"do not edit" in first


@pytest.mark.parametrize("damage, named", [
    (lambda r: (r / "cv" / "other.fold1.json").write_text("{not json"), "cv/other.fold1.json: not readable JSON"),
    (lambda r: (r / "class_bias.combo2.ggo.json").unlink(), "class_bias.combo2.ggo.json: missing"),
    (lambda r: (r / "cv" / "other.fold2.json").write_text(json.dumps({"metrics": scores(0.41)})),
     "cv/other.fold2.json: dice_ggo"),
    (lambda r: (r / "cv" / "combo2.json").write_text(json.dumps({"per_fold": [{"fold": 0}]})),
     "cv/combo2.json: unexpected content"),
    (lambda r: (r / "accuracy.json").write_text(json.dumps({"pairs": {"gone:combo2": {}}})), "cv/gone.json is missing"),
    (lambda r: (r / "params.yaml").write_text("model:\n  class_bias: [1.0, 0, 0, 0]\ntrain:\n  epochs: 80\n"),
     "train.epochs (run 60, params.yaml 80)"),
])
def test_a_missing_or_garbled_file_is_one_error_naming_it(tmp_path, monkeypatch, damage, named):
    results = make_results(tmp_path)
    damage(results)
    with pytest.raises(SystemExit, match="error: .*" + re.escape(named)):
        generate(monkeypatch, results, tmp_path / "out.md")
    assert not (tmp_path / "out.md").exists()
