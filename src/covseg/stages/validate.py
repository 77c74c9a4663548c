"""Stage `validate`: the raw-data contract (Great Expectations) -> reports/validation.json."""
from __future__ import annotations

from pathlib import Path

from covseg.atomic import write_json
from covseg.data import load_raw
from covseg.params import Validate
from covseg.validation import ContractError, validate_raw


def run(raw: str | Path, report: str | Path, v: Validate) -> dict:
    """Check `raw`; write the report (also when the contract fails, then re-raise ContractError)."""
    try:
        result = validate_raw(load_raw(raw), v)
    except ContractError as exc:
        write_json(exc.report, report)
        raise
    write_json(result, report)
    return result
