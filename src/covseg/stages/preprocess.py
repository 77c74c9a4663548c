"""Stage `preprocess`: HU window, class indices, burden-stratified folds -> data/processed/."""
from __future__ import annotations

from pathlib import Path

from covseg.atomic import atomic_output
from covseg.data import load_raw, one_hot_to_index
from covseg.params import Split, Window
from covseg.preprocessing import lesion_burden, preprocess
from covseg.validation import validate_processed


def run(raw: str | Path, out: str | Path, win: Window, split: Split, seed: int) -> dict:
    """Write the processed folder; its contract is checked before it replaces the old one.
    Returns {"split": the split summary, "contract": the processed-data report}."""
    data = load_raw(raw)
    n_consolidation = int((lesion_burden(one_hot_to_index(data.masks))[:, 1] > 0).sum())
    with atomic_output(out, directory=True) as staging:
        summary = preprocess(data, staging, win, split, seed)
        contract = validate_processed(staging, split.folds, len(data.images), n_consolidation)
    return {"split": summary, "contract": contract}
