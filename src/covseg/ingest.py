"""Bring data in: import a Kaggle-layout folder (contract first), or write the embedded synthetic default;
either way the new version is recorded with DVC."""
from __future__ import annotations

from pathlib import Path

from covseg import shell
from covseg.data import data_version, record_with_dvc, staged_copy, synthesize, write_raw
from covseg.params import Predict, Synth, Validate
from covseg.unlabelled import import_unlabelled
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


def import_unlabelled_scans(sources, out: str | Path, raw: str | Path, pp: Predict, v: Validate,
                            weak_labels: str | Path | None, rotate: int, intensity: str, record: bool) -> dict:
    """Unlabelled scans into `out` (covseg.unlabelled: checked before anything lands); with `record`, recorded
    with DVC in `<out>.dvc` (`dvc add` the first time). Returns {"report", "slices", "groups", "data_version"}."""
    result = import_unlabelled(sources, out, raw, pp, v, weak_labels, rotate, intensity)
    version = None
    if record:
        out = Path(out)
        dvc_file = out.with_name(f"{out.name}.dvc")
        if dvc_file.is_file():
            version = record_with_dvc(dvc_file)
        else:
            shell.run(["dvc", "add", "--quiet", out.name], cwd=out.parent)
            version = data_version(dvc_file)
    return {**result, "data_version": version}
