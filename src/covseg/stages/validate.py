"""Stage `validate`: the raw-data contract (Great Expectations) -> reports/validation.json."""
from __future__ import annotations

from pathlib import Path

from covseg.atomic import write_json
from covseg.data import fingerprint, load_raw
from covseg.params import Validate
from covseg.validation import ContractError, validate_raw


def run(raw: str | Path, report: str | Path, v: Validate) -> dict:
    """Check `raw`; write the report (also when the contract fails, then re-raise ContractError).
    The report records the data's fingerprint, so later stages know which data it speaks for."""
    data = load_raw(raw)
    try:
        result = validate_raw(data, v)
    except ContractError as exc:
        write_json({**exc.report, "fingerprint": fingerprint(raw)}, report)
        raise
    result["fingerprint"] = fingerprint(raw)
    write_json(result, report)
    return result
