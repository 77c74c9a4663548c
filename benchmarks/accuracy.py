"""Writes docs/accuracy.md from the committed cross-validation results: nothing is trained or run here.

    python benchmarks/accuracy.py [--results benchmarks/results] [--calibration calibration.json]
                                  [--out docs/accuracy.md] [--params params.yaml]

First the shipped recipes, from the calibration file (calibration.json at the repo root, `covseg calibrate`):
each entry whose `cv.folder` (relative to the calibration file's folder, as `covseg calibrate --cv` was
given it) is a folder under the results folder in the layout of `covseg cv --out DIR`:
  **/cv/NAME/summary.json  the summary (params, per_fold, machine); each fold<k>.json beside it must hold the
                           same scores as its fold in per_fold, and its recipe_key must be the entry's key
The entry gives the nested cross-validation of the inference choices (neutral, offsets only, calibrated) and
the choices made on all folds. Then the history, from the files of the old runner:
  **/cv/NAME.json          summaries of `covseg cv --out .../cv/NAME.json` (params, per_fold); each
                           NAME.fold<k>.json beside one must hold the same scores as its fold in per_fold
  machine.txt              the machine the folds in the cv/ folder beside it ran on (a `machine` field in a
                           summary or its folds wins; neither: "not recorded")
  class_bias.*.json        nested class offsets of the retired benchmarks/class_bias.py (and the `Against` line
                           of the .md beside each: the run it was compared with)
  **/accuracy.json         its "pairs" ("A:B"): which runs were compared fold by fold (numbers recomputed here)
  first_network/*.json     one network of a recipe per fold, compared with the old default's first network
  pipeline*.json           benchmarks/pipeline.py: stage timings and the validation fold's scores
  levers/levers.json       the levers tried against the shipped default, each {"what", "command", "against",
                           "decision", "leak"?, "calibration"?}: its `covseg cv` folds in levers/NAME/fold<k>.json,
                           paired fold by fold with the default's folds (against "default"), with its first
                           network (against "first_network": the old default's `without_members`), or, for a
                           run of the old runner, its fold files ("folds": a pattern under the results), or, for a
                           choice of `covseg calibrate`, its nested entry (levers/<calibration>) with the shipped
                           entry's nested calibrated scores (against "calibrated")
and params.yaml, to say whether a run's model and train values are today's. Same files in, same page out.
To add a result: `covseg cv --out benchmarks/results/cv/NAME`, then `covseg calibrate --cv
benchmarks/results/cv/NAME`, commit its summary.json, fold<k>.json and per_slice.csv (not fold<k>.npz) and
calibration.json, then run this script.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from covseg.names import PATHS

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = "summary.json"  # `covseg cv --out DIR`: DIR/summary.json beside DIR/fold<k>.json
OLD_DEFAULT_RUN = "cv/combo2.json"  # the default by the old runner (trained and scored without the offset) ...
OLD_DEFAULT_OFFSET = "class_bias.combo2.ggo.json"  # ... and its nested ground-glass offset
FIRST_NETWORK = "first_network"  # one network per fold, paired with the default's first network
MEASURES = {"dice_ggo": "Dice ground glass", "dice_consolidation": "Dice consolidation",
            "f1_ggo": "F1 ground glass", "f1_consolidation": "F1 consolidation",
            "kaggle_f1": "kaggle_f1", "pooled_f1": "pooled_f1"}
NESTED = ("dice_ggo", "dice_consolidation", "f1_ggo", "f1_consolidation", "kaggle_f1")  # the nested tables' measures
PARTS = {"neutral": "neutral (no offset, no flip, no island removal)",
         "offsets_only": "offsets only, chosen on the other folds",
         "calibrated": "**calibrated**: all the choices, chosen on the other folds"}  # calibration.json's nested
LEVERS = {"members": "the ensemble, against its first network alone",
          "last_member": "its last network, against the others without it",
          "tta": "flip TTA", "min_island": "island removal", "tta_and_min_island": "flip TTA and island removal",
          "class_bias": "the class offset of its params"}
CALIBRATED = ("model.class_bias", "model.tta", "model.min_island")  # params once, calibration.json's choices now
MACHINE_KEYS = ("train.device", "train.amp")  # not the recipe (covseg.params.recipe_key leaves them out)
RECIPE_KEYS = ("model.base_channels", "model.depth", "model.norm", "train.members", "train.epochs",
               "train.optimizer", "train.lr", "train.loss", "train.class_weights", "train.scale", "train.amp")


class ResultsError(Exception):
    """A result file is missing or not what it should be; the message names it."""


def read(path: Path, parse, what: str):
    """`parse` of the file's text; one ResultsError naming the file when it is missing or not `what`."""
    try:
        return parse(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:  # JSONDecodeError is a ValueError
        raise ResultsError(f"{path}: not readable {what} ({exc})") from None


def read_json(path: Path) -> dict:
    data = read(path, json.loads, "JSON")
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: not a JSON object")
    return data


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """A key or value missing from `path`'s content becomes one error naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ResultsError(f"{path}: unexpected content ({type(exc).__name__}: {exc})") from None


def norm(value):
    """A params value comparable across params.yaml and a summary (which stores lists as strings)."""
    if isinstance(value, str) and value.startswith("["):
        value = yaml.safe_load(value)
    if isinstance(value, list):
        return tuple(norm(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def show(value) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def mean_std(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def delta(a: dict[int, dict], b: dict[int, dict], measure: str) -> str:
    """A's score less B's on each fold both have: mean ± std, and on how many folds A is higher."""
    folds = sorted(a.keys() & b.keys())
    if not all(measure in a[k] and measure in b[k] for k in folds):
        return "not scored"
    d = np.array([a[k][measure] - b[k][measure] for k in folds])
    spread = f" ± {d.std(ddof=1):.3f}" if len(d) > 1 else ""
    return f"{d.mean():+.3f}{spread} ({int((d > 0).sum())}/{len(d)})"


def folds_text(folds: list[int], total: int | None = None) -> str:
    if total is not None and folds == list(range(total)):
        return f"{total} of {total}"
    return f"{len(folds)}" + (f" of {total}" if total else "") + f" ({', '.join(map(str, folds))})"


def table(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n"


def load_run(path: Path, results: Path) -> dict:
    """One `covseg cv` summary, of either layout (cv/NAME.json beside NAME.fold<k>.json, or
    cv/NAME/summary.json beside fold<k>.json): its per-fold scores (checked against its fold files), params
    and machine."""
    summary = read_json(path)
    folder = path.name == SUMMARY  # the layout of one CV path
    with reading(path):
        per_fold = {int(f["fold"]): {m: float(v) for m, v in f.items()
                                     if m in MEASURES or m.startswith("without_")} for f in summary["per_fold"]}
        for k, f in per_fold.items():
            missing = [m for m in MEASURES if m not in f]
            if missing:
                raise KeyError(f"fold {k} has no {', '.join(missing)}")
        if not per_fold:
            raise ValueError("no folds in per_fold")
        bf16: dict[str, list[int]] = {}
        for f in summary["per_fold"]:
            bf16.setdefault({True: "yes", False: "no"}.get(f.get("bf16"), "not recorded"), []).append(int(f["fold"]))
        machines = sorted({str(f["machine"]) for f in summary["per_fold"] if f.get("machine")})
        seconds = [float(f["seconds"]) for f in summary["per_fold"] if f.get("seconds") is not None]
    for k, scores in per_fold.items():
        fold_file = path.with_name(f"fold{k}.json" if folder else f"{path.stem}.fold{k}.json")
        if fold_file.is_file():
            data = read_json(fold_file)
            with reading(fold_file):
                stale = [m for m in MEASURES if not math.isclose(float(data["metrics"][m]), scores[m], rel_tol=1e-9)]
            if stale:
                raise ResultsError(f"{fold_file}: {', '.join(stale)} differ from fold {k} of {path.name} "
                                   "(summarise its folds again with covseg cv)")
    cv_dir = path.parent.parent if folder else path.parent
    machine_txt = cv_dir.parent / "machine.txt"
    if summary.get("machine"):
        machine = str(summary["machine"])
    elif machines:
        machine = "; ".join(machines)
    elif cv_dir.name == "cv" and machine_txt.is_file() and machine_txt.read_text().strip():
        machine = machine_txt.read_text().strip().splitlines()[0]
    else:
        machine = "not recorded"
    rel = (path.parent if folder else path).relative_to(results)
    return {"name": "/".join(p for p in (rel if folder else rel.with_suffix("")).parts if p != "cv"),
            "path": rel.as_posix(),
            "file": path, "per_fold": per_fold, "total": summary.get("folds"), "params": summary.get("params") or {},
            "recipe_key": summary.get("recipe_key"),
            "seconds": f"{np.mean(seconds):.0f}" if len(seconds) == len(per_fold) else "not recorded",
            "machine": machine, "bf16": next(iter(bf16)) if len(bf16) == 1 else "; ".join(
                f"{v} (folds {', '.join(map(str, sorted(ks)))})" for v, ks in sorted(bf16.items()))}


def load_nested(path: Path, runs: dict[str, dict]) -> dict:
    """One result of the retired benchmarks/class_bias.py, tied to the run whose logits it used (its `cv` path,
    longest match)."""
    result = read_json(path)
    with reading(path):
        cv = Path(result["cv"]).parts
        matches = [r for r in runs.values() if cv[-len(Path(r["path"]).parts):] == Path(r["path"]).parts]
        if not matches:
            raise ResultsError(f"{path}: its cv {result['cv']!r} is none of the runs here")
        run = max(matches, key=lambda r: len(Path(r["path"]).parts))
        rows = {int(f["fold"]): f for f in result["per_fold"]}
        nested = {"file": path, "run": run["name"], "classes": "+".join(result["classes"]),
                  "class_bias": [float(b) for b in result["class_bias"]],
                  "offsets": {k: [float(b) for b in f["class_bias"]] for k, f in rows.items()},
                  "without": {k: {m: float(f["without"][m]) for m in NESTED} for k, f in rows.items()},
                  "with": {k: {m: float(f["with"][m]) for m in NESTED} for k, f in rows.items()}}
    against = path.with_suffix(".md")
    found = re.search(r"^Against (\S+\.json) ", against.read_text(), re.M) if against.is_file() else None
    nested["against"] = path.parent / found.group(1) if found else None
    return nested


def params_values(params_file: Path) -> dict:
    """params.yaml's model and train values today, by flat key ("train.epochs")."""
    tree = read(params_file, yaml.safe_load, "YAML")
    with reading(params_file):
        return {f"{section}.{k}": v for section in ("model", "train") for k, v in tree[section].items()}


def recipe_text(params: dict) -> str:
    return ", ".join(f"`{k}={show(params[k])}`" for k in RECIPE_KEYS if k in params) or "params not recorded"


def versus_params(params: dict, today: dict) -> str:
    """Whether a run's model and train values are params.yaml's today (but for the machine's: the machine and
    bfloat16 are stated on their own): which differ, which it does not record."""
    if not params:
        return "not known (the run records no params)"
    differ = [f"`{k}` (run {show(params[k])}, params.yaml {show(v)})" for k, v in today.items()
              if k in params and k not in MACHINE_KEYS and norm(params[k]) != norm(v)]
    missing = [k for k in today if k not in params]
    return (f"all but {'; '.join(differ)}" if differ else "yes") + (
        f" (params.yaml keys the run does not record: {', '.join(missing)})" if missing else "")


def pairs_of(results: Path, runs: dict[str, dict], nested: dict[Path, dict]) -> list[tuple[str, str]]:
    """accuracy.json's "pairs" (A:B of its cv/ folder), then the runs class_bias.py compared (`--against`)."""
    by_path = {r["path"]: r["name"] for r in runs.values()}
    pairs = []
    for file in sorted(results.rglob("accuracy.json")):
        data = read_json(file)
        with reading(file):
            for pair in data.get("pairs", {}):
                a, b = pair.split(":")
                names = []
                for name in (a, b):
                    rel = (file.parent / "cv" / f"{name}.json").relative_to(results).as_posix()
                    if rel not in by_path:
                        raise ResultsError(f"{file}: pair {pair}: {results / rel} is missing")
                    names.append(by_path[rel])
                pairs.append(tuple(names))
    for n in nested.values():
        if n["against"] is not None:
            if n["against"] not in nested:
                raise ResultsError(f"{n['file'].with_suffix('.md')}: compared with {n['against']}, which is missing")
            pairs.append((n["run"], nested[n["against"]]["run"]))
    return list(dict.fromkeys(pairs))


def render(results: Path, params_file: Path, calibration_file: Path, source: str) -> str:
    runs, folders = {}, {}
    for path in sorted(results.glob("**/cv/*.json")):
        if not re.search(r"\.fold\d+$", path.stem):
            run = load_run(path, results)
            runs[run["name"]] = run
    for path in sorted(results.glob(f"**/cv/*/{SUMMARY}")):
        folders[path.parent.resolve()] = load_run(path, results)
    if not (results / OLD_DEFAULT_RUN).is_file():
        raise ResultsError(f"{results / OLD_DEFAULT_RUN}: missing (the old default's cross-validation)")
    default = next(r for r in runs.values() if r["path"] == OLD_DEFAULT_RUN)
    nested = {p: load_nested(p, runs) for p in sorted(results.glob("**/class_bias.*.json"))}
    if results / OLD_DEFAULT_OFFSET not in nested:
        raise ResultsError(f"{results / OLD_DEFAULT_OFFSET}: missing (the old default's nested class offset)")
    offset = nested[results / OLD_DEFAULT_OFFSET]
    if offset["run"] != default["name"]:
        raise ResultsError(f"{results / OLD_DEFAULT_OFFSET}: of {offset['run']}, not of the old default's run "
                           f"{OLD_DEFAULT_RUN}")
    today = params_values(params_file)
    order = [default["name"], *(n for n in runs if n != default["name"])]

    def label(name: str) -> str:
        return f"**default** ({name})" if name == default["name"] else name

    out = [f"# Cross-validated accuracy\n\n_Generated by `benchmarks/accuracy.py` from `{source}` and "
           f"`{calibration_file.name}` — do not edit; run `python benchmarks/accuracy.py` again after adding "
           "results._\n",
           "Every figure is k-fold cross-validation on the labelled slices (the same burden-stratified folds as "
           "`split`), never the test slices: mean ± standard deviation over the folds (sample standard deviation). "
           "The withheld test slices are scored outside the project. Dice is per-slice Dice averaged over the "
           "held-out slices that have the class; F1 is pixel F1 over all of a fold's held-out pixels; kaggle_f1 "
           "is the mean of the two classes' F1 (the competition's score, covseg's promotion metric); pooled_f1 "
           "is one F1 over both classes' pixels together. A machine is what the result files record: a summary's "
           "`machine` field, else the `machine.txt` beside its `cv/` folder (one line for the whole folder, "
           "written by the last run that added folds to it: the CPU model of each run is not recorded).\n",
           "The shipped recipes come first: `covseg cv` then `covseg calibrate`, one cross-validation path for "
           "training and for the inference choices. The sections after them are the history: the runs of the "
           "old runner (`cv/NAME.json` summaries, the class offsets of the retired `benchmarks/class_bias.py`), "
           "the record of the decisions in [decisions.md](decisions.md); **default** there is the old "
           f"runner's default, `{OLD_DEFAULT_RUN}`.\n"]
    out += shipped_section(calibration_file, folders, today, default, offset)
    out += default_section(default, offset, today)
    out += runs_section([runs[n] for n in order], default["params"], label, set(today))
    out += levers_section([runs[n] for n in order], label)
    out += pairs_section(pairs_of(results, runs, nested), runs, nested, label)
    out += nested_section(sorted(nested.values(), key=lambda n: (order.index(n["run"]), n["classes"])), label)
    out += levers_tried(results, folders, calibration_file, default)
    out += first_network(results, default, label)
    out += pipeline(results)
    return "\n".join(out)


def shipped_section(calibration_file: Path, folders: dict[Path, dict], today: dict, old: dict,
                    old_offset: dict) -> list[str]:
    """One table per calibration.json entry whose `covseg cv` folder is among `folders` (the results'
    cv/NAME/ folders); says what is missing instead when there are none."""
    head = ["## The shipped recipe\n"]
    how = ("Make one: `covseg cv --out benchmarks/results/cv/NAME`, then `covseg calibrate --cv "
           "benchmarks/results/cv/NAME`; commit the folder's summary.json, fold<k>.json and per_slice.csv (not "
           "fold<k>.npz) and calibration.json, and run `python benchmarks/accuracy.py` again.")
    entries = read_json(calibration_file) if calibration_file.is_file() else {}
    shown, elsewhere = [], []
    with reading(calibration_file):
        for key, entry in sorted(entries.items()):
            folder = Path(entry["cv"]["folder"])
            run = folders.get((folder if folder.is_absolute() else calibration_file.parent / folder).resolve())
            if run is None:
                elsewhere.append(f"`{key}` ({entry['recipe'] or 'no recipe name'}, `{entry['cv']['folder']}`)")
            elif run["recipe_key"] != key:
                raise ResultsError(f"{calibration_file}: entry {key} is not of the folds in {run['file'].parent} "
                                   f"(recipe key {run['recipe_key']}): run `covseg calibrate --cv "
                                   f"{entry['cv']['folder']}` again")
            else:
                shown.append((key, entry, run))
    calibrated = {run["file"] for _, _, run in shown}
    notes = ([f"Entries of `{calibration_file.name}` whose cross-validation is not a folder of the results here "
              f"(not shown): {'; '.join(elsewhere)}.\n"] if elsewhere else [])
    notes += [f"`covseg cv` folders here without an entry in `{calibration_file.name}` (not shown): "
              + ", ".join(f"`{r['path']}/`" for r in folders.values() if r["file"] not in calibrated)
              + ".\n"] if len(calibrated) < len(folders) else []
    if not shown:
        why = (f"no entry of `{calibration_file.name}` has its `covseg cv` folder under the results (a cv/NAME/ "
               f"folder with {SUMMARY})" if calibration_file.is_file() else f"there is no `{calibration_file.name}`")
        return head + [f"Not measured yet: {why}. {how}\n", *notes]
    intro = (f"Each entry of `{calibration_file.name}` (`covseg calibrate`) whose `covseg cv` folder is committed "
             "here. The folds were trained and scored without inference choices (neutral); the choices (class "
             "offsets, flip TTA, island removal) are measured by nested cross-validation: each fold is scored with "
             "the choices made on the other folds only. Offsets are for (ground glass, consolidation, lungs "
             "other, background).\n")
    out = head + [intro]
    with reading(calibration_file):
        for key, entry, run in shown:
            out += shipped_entry(key, entry, run, today, old, old_offset)
    return out + notes


def choices_text(choices: dict) -> str:
    island = f"{choices['min_island']} px" if choices["min_island"] else "none"
    return f"offsets {choices['class_bias']}, flip TTA {show(choices['tta'])}, island removal {island}"


def shipped_entry(key: str, entry: dict, run: dict, today: dict, old: dict, old_offset: dict) -> list[str]:
    """The table of one calibration.json entry, its choices, and its reproduction of the old runner's default."""
    n, oof = entry["nested"], entry["oof"]
    per_fold = {int(f["fold"]): f for f in n["per_fold"]}
    parts = {part: {k: f[part] for k, f in per_fold.items()} for part in PARTS}
    rows = [{"": text, "folds": len(per_fold),
             **{MEASURES[m]: f"{n[part][m + '_mean']:.3f} ± {n[part][m + '_std']:.3f}" for m in NESTED}}
            for part, text in PARTS.items()]
    rows.append({"": "what the choices add, fold by fold (folds where they score higher)", "folds": len(per_fold),
                 **{MEASURES[m]: delta(parts["calibrated"], parts["neutral"], m) for m in NESTED}})
    folds = [{"fold": k, "held-out slices": f["slices"], "choices made on the other folds": choices_text(f["choices"])}
             for k, f in sorted(per_fold.items())]
    searched = entry.get("searched") or {}
    common = parts["neutral"].keys() & run["per_fold"].keys()
    rescored = max((abs(parts["neutral"][k][m] - run["per_fold"][k][m]) for k in common for m in NESTED),
                   default=None)
    text = [f"### {entry['recipe'] or 'recipe'} (`{run['path']}/`)\n",
            f"Recipe key `{key}`, made {entry.get('made', 'on a date not recorded')} by "
            f"{entry.get('by', 'not recorded')}: {recipe_text(run['params'])}. params.yaml's model and train "
            f"values today: {versus_params(run['params'], today)}. Data key `{entry['data']}`. Folds: "
            f"{folds_text(sorted(run['per_fold']), run['total'])}, {oof['slices']} held-out slices. Machine: "
            f"{run['machine']}. Trained in bfloat16: {run['bf16']}. Training seconds per fold: {run['seconds']} "
            "(wall time as run).\n",
            table(rows),
            f"Chosen on all folds (what evaluate, submit and predict apply): {choices_text(entry['choices'])}. "
            + (f"Searched: offsets of {', '.join(searched.get('offsets', []))} on {searched.get('offset_grid')}, "
               f"flip TTA {json.dumps(searched.get('tta'))}, island removal {searched.get('min_island')} px. "
               if searched else "")
            + f"A constant prediction scores kaggle_f1 {oof['trivial_kaggle_f1']:.3f} on these "
            "slices." + (f" The neutral rescoring of the saved held-out logits differs from `covseg cv`'s fold "
                         f"scores by at most {rescored:.5f}." if rescored is not None else "") + "\n",
            "The choices made on the other folds, fold by fold:\n", table(folds)]
    return text + reproduction(run, n, old, old_offset)


def reproduction(run: dict, n: dict, old: dict, old_offset: dict) -> list[str]:
    """A line comparing an entry with the old runner's default, when both trained the same model and train
    values (the keys both record): its offsets-only nested Dice less the old nested Dice (both searched
    offsets only; the old runner the ground-glass offset alone)."""
    shared = [k for k in run["params"].keys() & old["params"].keys()
              if k.split(".")[0] in ("model", "train") and k not in MACHINE_KEYS]
    if not shared or any(norm(run["params"][k]) != norm(old["params"][k]) for k in shared):
        return []
    dice = [m for m in NESTED if m.startswith("dice_")]
    was = {m: [f[m] for f in old_offset["with"].values()] for m in dice}

    def new(part: str) -> str:
        return " / ".join(f"{n[part][m + '_mean']:.3f} ± {n[part][m + '_std']:.3f}" for m in dice)

    return [f"Reproduction: old runner vs one CV path ({' / '.join(MEASURES[m] for m in dice)}). The same model "
            f"and train values as `{OLD_DEFAULT_RUN}`, whose nested ground-glass offset (`{OLD_DEFAULT_OFFSET}`, "
            "the old runner: it searched the ground-glass offset only) gave "
            + " / ".join(mean_std(was[m]) for m in dice) + f"; offsets only here: {new('offsets_only')}, "
            "difference of means (offsets only less the old runner) "
            + " / ".join(f"{n['offsets_only'][m + '_mean'] - np.mean(was[m]):+.3f}" for m in dice)
            + f"; with all the choices (calibrated): {new('calibrated')}.\n"]


def default_section(default: dict, offset: dict, today: dict) -> list[str]:
    p = default["params"]
    common = offset["without"].keys() & default["per_fold"].keys()
    rescored = max(abs(offset["without"][k][m] - default["per_fold"][k][m]) for k in common for m in NESTED)
    return ["## The default recipe of the old runner\n",
            f"`{OLD_DEFAULT_RUN}`: {recipe_text(p)}. params.yaml's model and train values today: "
            f"{versus_params(p, today)}. Its folds were trained and scored without a class offset; "
            f"`{OLD_DEFAULT_OFFSET}` adds the ground-glass offset by nested cross-validation: each fold is scored "
            "with the offset chosen on the other folds only. Folds: "
            f"{folds_text(sorted(default['per_fold']), default['total'])}. Machine: "
            f"{default['machine']}. Trained in bfloat16: {default['bf16']}.\n",
            table([{"": "**default**, with the nested ground-glass offset", "folds": len(offset["with"]),
                    **{MEASURES[m]: mean_std([f[m] for f in offset["with"].values()]) for m in NESTED},
                    MEASURES["pooled_f1"]: "not scored"},
                   {"": "without the offset (the same models, as `covseg cv` scored them)",
                    "folds": len(default["per_fold"]),
                    **{MEASURES[m]: mean_std([f[m] for f in default["per_fold"].values()]) for m in MEASURES}},
                   {"": "what the nested offset adds, fold by fold (folds where it is higher)",
                    "folds": len(offset["with"]), **{MEASURES[m]: delta(offset["with"], offset["without"], m)
                                                     for m in NESTED},
                    MEASURES["pooled_f1"]: "not scored"}]),
            "Offsets (ground glass, consolidation, lungs other, background) chosen on the other folds: "
            + "; ".join(f"fold {k} {v}" for k, v in sorted(offset["offsets"].items()))
            + f". Chosen on all folds: {offset['class_bias']} (then params.yaml's `model.class_bias`, since replaced "
            "by calibration.json's choices). The nested result rescores the saved held-out logits; its scores "
            f"without the offset differ from `covseg cv`'s by at most {rescored:.5f}.\n"]


def runs_section(runs: list[dict], base: dict, label, current: set[str]) -> list[str]:
    return ["## Every cross-validated run\n",
            "Each summary under `cv/` folders, as `covseg cv` scored it (no nested offset; a run whose params hold "
            "an offset is scored with it). Names: the file's path without `cv/`. Training seconds per fold are wall "
            "time as run (several folds side by side, other work beside them): not a speed figure.\n",
            table([{"run": label(r["name"]), "folds": folds_text(sorted(r["per_fold"]), r["total"]),
                    **{MEASURES[m]: mean_std([f[m] for f in r["per_fold"].values()]) for m in MEASURES},
                    "bfloat16": r["bf16"], "training s / fold": r["seconds"], "machine": r["machine"]}
                   for r in runs]),
            "Their recipes: the model and train values in which each run's params differ from the default run's "
            f"(`{OLD_DEFAULT_RUN}`); keys not in a run's params did not exist when it ran; a key marked (removed) "
            "left the code with its lever (the code is at git tag `research-levers-2026-12`); one marked "
            "(calibrated) is now an inference choice of `covseg calibrate` (calibration.json), no longer a param.\n",
            table([{"run": label(r["name"]), "file": f"`{r['path']}`",
                    "differs from the default run in": recipe_diff(r["params"], base, current)} for r in runs])]


def levers_section(runs: list[dict], label) -> list[str]:
    rows = []
    for r in runs:
        levers = sorted({m.split(".")[0].removeprefix("without_") for f in r["per_fold"].values() for m in f
                         if m.startswith("without_")})
        for lever in levers:
            without = {k: {m.split(".", 1)[1]: v for m, v in f.items() if m.startswith(f"without_{lever}.")}
                       for k, f in r["per_fold"].items()}
            rows.append({"run": label(r["name"]), "what it adds": LEVERS.get(lever, lever.replace("_", " ")),
                         "folds": len(r["per_fold"]),
                         **{MEASURES[m]: delta(r["per_fold"], without, m) for m in MEASURES}})
    if not rows:
        return []
    return ["## Inference-time levers (the same trained models)\n",
            "Each run as scored, less the same fold models with one lever left out, fold by fold: mean ± std of the "
            "difference (folds where the lever scores higher).\n", table(rows)]


def pairs_section(pairs: list[tuple[str, str]], runs: dict[str, dict], nested: dict[Path, dict], label) -> list[str]:
    rows = []
    for a, b in pairs:
        ra, rb = runs[a], runs[b]
        if not ra["per_fold"].keys() & rb["per_fold"].keys():
            raise ResultsError(f"{ra['file']} and {rb['file']}: no fold in common to pair")
        machines = ra["machine"] if ra["machine"] == rb["machine"] else f"{ra['machine']} / {rb['machine']}"
        rows.append({"A against B": f"{label(a)} against {label(b)}", "offsets": "as scored by covseg cv",
                     "folds": len(ra["per_fold"].keys() & rb["per_fold"].keys()),
                     **{MEASURES[m]: delta(ra["per_fold"], rb["per_fold"], m) for m in MEASURES},
                     "machines": machines})
        for na in (x for x in nested.values() if x["run"] == a):
            for nb in (x for x in nested.values() if x["run"] == b and x["classes"] == na["classes"]):
                rows.append({"A against B": f"{label(a)} against {label(b)}",
                             "offsets": f"each its own nested {na['classes']} offset",
                             "folds": len(na["with"].keys() & nb["with"].keys()),
                             **{MEASURES[m]: delta(na["with"], nb["with"], m) for m in NESTED},
                             MEASURES["pooled_f1"]: "not scored", "machines": machines})
    if not rows:
        return []
    return ["## Paired comparisons\n",
            "Run A's score less run B's on the same held-out slices, fold by fold: mean ± std of the difference "
            "(folds where A is higher). The pairs are those of `accuracy.json` (\"pairs\") and those the "
            "retired `benchmarks/class_bias.py --against` compared (the `Against` line of `class_bias.*.md`); the "
            "numbers are computed here from the folds. A pair run on two machines also differs by the machine.\n",
            table(rows)]


def nested_section(nested: list[dict], label) -> list[str]:
    def cell(n: dict, m: str) -> str:
        higher = delta(n["with"], n["without"], m).rsplit("(", 1)[1]
        return (f"{np.mean([f[m] for f in n['without'].values()]):.3f} → "
                f"{np.mean([f[m] for f in n['with'].values()]):.3f} ({higher}")

    return ["## Nested class offsets\n",
            "The retired `benchmarks/class_bias.py` (now `covseg calibrate`) on each run's saved held-out logits: "
            "each fold scored with the offsets chosen on the other folds only (without → with, means over folds, "
            "and on how many folds the offset scores higher). Offsets are for (ground glass, consolidation, lungs "
            "other, background). The runs' folds and machines are those of the table above.\n",
            table([{"run": label(n["run"]), "classes": n["classes"], "file": f"`{n['file'].name}`",
                    "offset chosen on all folds": str(n["class_bias"]),
                    "chosen on the other folds": ", ".join(sorted({str(b) for b in n["offsets"].values()})),
                    **{MEASURES[m]: cell(n, m) for m in NESTED}} for n in nested]),
            "With the offset, mean ± std over folds:\n",
            table([{"run": label(n["run"]), "classes": n["classes"], "folds": len(n["with"]),
                    **{MEASURES[m]: mean_std([f[m] for f in n["with"].values()]) for m in NESTED}} for n in nested])]


def recipe_diff(params: dict, base: dict, current: set[str]) -> str:
    """The model and train values of `params` that differ from `base`'s; a key params.yaml no longer has is
    marked (removed), or (calibrated) when it became a calibration choice; keys params.yaml has that the run
    did not record are listed."""
    if not params:
        return "not recorded"
    keys = sorted(k for k in set(params) | set(base) if k.split(".")[0] in ("model", "train"))

    def mark(k: str) -> str:
        return "" if k in current else " (calibrated)" if k in CALIBRATED else " (removed)"

    changed = [f"`{k}={show(params[k])}`{mark(k)}" for k in keys
               if k in params and norm(params[k]) != norm(base.get(k))]
    missing = [k for k in keys if k not in params and k in current]
    return (", ".join(changed) or "nothing") + (f" (not in its params: {', '.join(missing)})" if missing else "")


def first_network(results: Path, default: dict, label) -> list[str]:
    """first_network/*.json: one network per fold, against the default's first network (`without_members`)."""
    files = sorted((results / FIRST_NETWORK).glob("*.json"))
    if not files:
        return []
    base = {k: {m.split(".", 1)[1]: v for m, v in f.items() if m.startswith("without_members.")}
            for k, f in default["per_fold"].items()}
    if not all(base.values()):
        raise ResultsError(f"{default['file']}: no first-network scores (without_members) to pair "
                           f"{results / FIRST_NETWORK} with")
    rows = []
    for file in files:
        data = read_json(file)
        with reading(file):
            folds = {int(f["fold"]): {m: float(f[m]) for m in MEASURES} for f in data.values()}
        name = f"{FIRST_NETWORK}/{file.stem}"
        rows += [{"": name, "folds": folds_text(sorted(folds)),
                  **{MEASURES[m]: mean_std([f[m] for f in folds.values()]) for m in MEASURES}},
                 {"": f"{name} against the default's first network", "folds": len(folds.keys() & base.keys()),
                  **{MEASURES[m]: delta(folds, base, m) for m in MEASURES}}]
    return ["## One network\n",
            f"`{FIRST_NETWORK}/`: the scores of one network per fold, the recipe change in the file's name (these "
            "files record no params), paired with the first network of the default's folds "
            f"({label(default['name'])} without its second network). Machine: not recorded.\n", table(rows)]


LEVERS_DIR = "levers"
AGAINST = {"default": "the shipped default, fold by fold (both as `covseg cv` scored them: no inference choices)",
           "first_network": "the default's first network (one network each; as `covseg cv` scored them)",
           "calibrated": "the shipped default's nested calibrated scores (the same trained folds)"}


def fold_scores(folder: Path, pattern: str = "fold[0-9]*.json") -> dict[int, dict]:
    """{fold: metrics} of the fold files of a `covseg cv` folder (or those `pattern` names under `folder`)."""
    out = {}
    for file in sorted(folder.glob(pattern)):
        data = read_json(file)
        with reading(file):
            out[int(data["metrics"]["fold"])] = {m: float(data["metrics"][m]) for m in MEASURES}
    if not out:
        raise ResultsError(f"{folder}: no {pattern}")
    return out


def levers_tried(results: Path, folders: dict[Path, dict], calibration_file: Path, old: dict) -> list[str]:
    """levers/levers.json: each lever against its baseline, fold by fold."""
    index_file = results / LEVERS_DIR / "levers.json"
    if not index_file.is_file():
        return []
    index = read_json(index_file)
    entries = json.loads(calibration_file.read_text()) if calibration_file.is_file() else {}
    shipped = next(((key, e) for key, e in entries.items()
                    if (calibration_file.parent / e["cv"]["folder"]).resolve() in folders), None)
    if shipped is None:
        raise ResultsError(f"{index_file}: no entry of {calibration_file.name} has its folds among the results "
                           f"(the default the levers are compared with)")
    key, entry = shipped
    default_folds = fold_scores((calibration_file.parent / entry["cv"]["folder"]).resolve())
    calibrated = {f["fold"]: f["calibrated"] for f in entry["nested"]["per_fold"]}
    first = {k: {m.split(".", 1)[1]: v for m, v in f.items() if m.startswith("without_members.")}
             for k, f in old["per_fold"].items()}
    rows, means = [], []
    for name, lever in index.items():
        with reading(index_file):
            against, what, decision = lever["against"], lever["what"], lever["decision"]
            base = {"default": default_folds, "first_network": first, "calibrated": calibrated}[against]
        if against == "calibrated":
            file = results / LEVERS_DIR / lever["calibration"]
            with reading(file):
                (lever_entry,) = read_json(file).values()  # a calibration file of one entry
                folds = {f["fold"]: f["calibrated"] for f in lever_entry["nested"]["per_fold"]}
        elif "folds" in lever:  # an older run's fold files
            folds = fold_scores(results, lever["folds"])
        else:
            folds = fold_scores(results / LEVERS_DIR / name)
        label = f"{name}{' (leaks: optimistic)' if lever.get('leak') else ''}"
        rows.append({"lever": label, "against": against, "folds": len(folds.keys() & base.keys()),
                     **{MEASURES[m]: delta(folds, base, m) for m in NESTED}, "kept": decision})
        means.append({"lever": label, "what": what, "command": f"`{lever['command']}`",
                      **{MEASURES[m]: mean_std([f[m] for f in folds.values()]) for m in NESTED}})
    return ["## Levers for consolidation and unlabelled scans\n",
            "Each lever cross-validated on the same 5 folds of the 51 labelled MedSeg slices, against: "
            + "; ".join(f"**{k}**, {v}" for k, v in AGAINST.items())
            + f". The shipped default is `{key}`. A cell is the lever's score less its baseline's, mean ± std over "
            "the folds (on how many folds the lever is higher). A lever is kept only when it wins beyond the fold "
            "spread. A lever marked *leaks* learns from labels that another model made after training on these "
            "same labelled slices (Inf-Net's pseudo-labels of COVID-SemiSeg): in cross-validation they carry each "
            "held-out fold's labels, so its gain is optimistic; the honest figure for unlabelled scans is the "
            "one that uses their images alone.\n", table(rows),
            "The levers' own scores, mean ± std over the folds:\n", table(means)]


def pipeline(results: Path) -> list[str]:
    """pipeline*.json: benchmarks/pipeline.py on the real data, one column per file."""
    files = sorted(results.glob("pipeline*.json"))
    if not files:
        return []
    columns = {}
    for file in files:
        data = read_json(file)
        with reading(file):
            column = {"machine": data["machine"], "date": data.get("date", "not recorded"),
                      "`-S` overrides": ", ".join(f"`{o}`" for o in data.get("overrides", [])) or "none"}
            for stage in data["stages"]:
                rss = stage.get("peak_rss_mb")
                column[f"{stage['stage']}, s"] = f"{stage['seconds']:.0f}" + (f" ({rss} MB)" if rss else "")
            column["**whole pipeline**, s"] = f"**{data['total_seconds']:.0f}**"
            for m, v in data["metrics"].items():
                column[m] = f"{v:.3f}" if isinstance(v, float) else str(v)
        columns[f"`{file.name}`"] = column
    frame = pd.DataFrame(columns).fillna("")
    frame.index.name = ""
    return ["## The pipeline on the real data\n",
            "`python benchmarks/pipeline.py --data ...`: every stage of the DVC pipeline (wall time, peak memory) "
            "and the metrics evaluate reported, one run each. A run with `calibrated` true is the shipped model "
            "(trained on every labelled slice, `split.fold: all`) and its metrics are its recipe's nested "
            "out-of-fold scores from `calibration.json` (the table above); older runs, with `val_slices`, trained "
            "on 41 slices and were scored on the 10 of `split.fold` 0.\n",
            frame.reset_index().to_markdown(index=False, disable_numparse=True) + "\n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                        help="the committed result files (default: benchmarks/results)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "accuracy.md", help="default: docs/accuracy.md")
    parser.add_argument("--calibration", type=Path, default=ROOT / PATHS.calibration,
                        help="covseg calibrate's choices and nested scores (default: calibration.json)")
    parser.add_argument("--params", type=Path, default=ROOT / PATHS.params,
                        help="the params the runs are compared with (default: params.yaml)")
    args = parser.parse_args()
    results = args.results.resolve()
    source = results.relative_to(ROOT).as_posix() if results.is_relative_to(ROOT) else str(args.results)
    try:
        text = render(results, args.params, args.calibration, source)
    except ResultsError as exc:
        raise SystemExit(f"error: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
