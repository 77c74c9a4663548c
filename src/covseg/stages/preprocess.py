"""Stage `preprocess`: HU window, class indices, the validation fold of the folds file -> data/processed/."""
from __future__ import annotations

import json
from pathlib import Path

from covseg.atomic import atomic_output
from covseg.data import fingerprint, load_raw, one_hot_to_index
from covseg.errors import DataError
from covseg.params import Split, Window
from covseg.preprocessing import data_key, lesion_burden, preprocess, read_folds
from covseg.validation import validate_processed


def require_passed(report: str | Path, raw: str | Path) -> None:
    """Refuse data whose contract was never checked, failed, or was checked on other data."""
    report = Path(report)
    if not report.is_file():
        raise DataError(f"{report}: no validation report for {raw}; run `covseg validate` (or `dvc repro`) first")
    checked = json.loads(report.read_text())
    if not checked.get("success"):
        raise DataError(f"{raw} failed the data contract ({report}); fix the data, then run `covseg validate`")
    if checked.get("fingerprint") != fingerprint(raw):
        raise DataError(f"{report} was made for other data than {raw} now holds; run `covseg validate` again")


def run(raw: str | Path, out: str | Path, win: Window, split: Split, folds: str | Path, report: str | Path) -> dict:
    """Write the processed folder from `raw`, which `report` (the validate stage's) must have passed, with
    fold `split.fold` of the folds file `folds` as validation; the processed contract is checked before the
    folder replaces the old one.
    Returns {"split": the split summary, "contract": the processed-data report}."""
    require_passed(report, raw)
    data = load_raw(raw)
    n_consolidation = int((lesion_burden(one_hot_to_index(data.masks))[:, 1] > 0).sum())
    with atomic_output(out, directory=True) as staging:
        fold_of = read_folds(folds, data)
        summary = preprocess(data, staging, win, split, fold_of, data_key(fingerprint(raw), fold_of, win))
        contract = validate_processed(staging, split.folds, len(data.images), n_consolidation)
    return {"split": summary, "contract": contract}
