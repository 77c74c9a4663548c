"""Bring data in: import a Kaggle-layout folder (contract first), or write the embedded synthetic default;
either way the new version is recorded with DVC."""
from __future__ import annotations

from pathlib import Path

from covseg.data import record_with_dvc, staged_copy, synthesize, write_raw
from covseg.params import Synth, Validate
from covseg.validation import validate_raw


def import_folder(source: str | Path, raw: str | Path, v: Validate, dvc_file: str | Path | None) -> dict:
    """Copy `source` into a staging folder (each file read once), check that copy against the raw-data
    contract, and only then move it to `raw` in one rename (on failure `raw` stays as it was): what lands,
    and what a `dvc_file` records as the new version, is exactly what was checked, even if `source`
    changes meanwhile. Returns {"report", "data_version"}."""
    with staged_copy(source, raw) as staged:
        report = validate_raw(staged, v)
    return {"report": report, "data_version": record_with_dvc(dvc_file) if dvc_file else None}


def write_synthetic(raw: str | Path, s: Synth, dvc_file: str | Path | None) -> dict:
    """The embedded default (deterministic for `s`) into `raw`; with a `dvc_file`, recorded with DVC."""
    write_raw(raw, *synthesize(s.n_labelled, s.n_test, s.size, s.seed))
    return {"data_version": record_with_dvc(dvc_file) if dvc_file else None}
