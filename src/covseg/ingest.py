"""Bring data in: import a Kaggle-layout folder (contract first), or write the embedded synthetic default;
either way the new version is recorded with DVC."""
from __future__ import annotations

from pathlib import Path

from covseg.data import copy_raw, load_raw, record_with_dvc, synthesize, write_raw
from covseg.params import Synth, Validate
from covseg.validation import validate_raw


def import_folder(source: str | Path, raw: str | Path, v: Validate, dvc_file: str | Path | None) -> dict:
    """Check `source` against the raw-data contract (raises before anything is written), copy it to
    `raw` and, with a `dvc_file`, record the new version. Returns {"report", "data_version"}."""
    report = validate_raw(load_raw(source), v)
    copy_raw(source, raw)
    return {"report": report, "data_version": record_with_dvc(dvc_file) if dvc_file else None}


def write_synthetic(raw: str | Path, s: Synth, dvc_file: str | Path | None) -> dict:
    """The embedded default (deterministic for `s`) into `raw`; with a `dvc_file`, recorded with DVC."""
    write_raw(raw, *synthesize(s.n_labelled, s.n_test, s.size, s.seed))
    return {"data_version": record_with_dvc(dvc_file) if dvc_file else None}
