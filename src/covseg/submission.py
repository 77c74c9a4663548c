"""The competition's CSV: `Id,Predicted`, one row per image, row, column and scored class, in C order.

Id = ((image * H + row) * W + col) * 2 + class, class 0 = ground glass, 1 = consolidation; values 0/1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from covseg.atomic import atomic_output
from covseg.names import SCORED

HEADER = "Id,Predicted\n"


def submission_values(pred_labels: np.ndarray) -> np.ndarray:
    """Class-index predictions (M, H, W) -> the Predicted column, uint8 0/1, in Id order."""
    labels = np.asarray(pred_labels)
    return np.stack([labels == c for c in SCORED], axis=-1).astype(np.uint8).ravel()


def submission_table(pred_labels: np.ndarray) -> pd.DataFrame:
    values = submission_values(pred_labels)
    return pd.DataFrame({"Id": np.arange(len(values), dtype=np.int64), "Predicted": values})


def write_submission(table: pd.DataFrame, path: str | Path, shape: tuple[int, int, int]) -> Path:
    """Write the CSV for predictions of `shape` (M, H, W); the row count is checked first."""
    m, h, w = shape
    expected = m * h * w * len(SCORED)
    if len(table) != expected:
        raise ValueError(f"{path}: submission has {len(table)} rows, expected {m}*{h}*{w}*{len(SCORED)} = {expected}")
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(HEADER.encode())
        pacsv.write_csv(pa.Table.from_pandas(table, preserve_index=False), f,
                        pacsv.WriteOptions(include_header=False))
    return Path(path)


def read_submission(path: str | Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Read a submission back as (M, H, W, 2) uint8 masks for the scored classes."""
    table = pd.read_csv(path, engine="pyarrow")
    if list(table.columns) != ["Id", "Predicted"]:
        raise ValueError(f"{path}: columns are {list(table.columns)}, expected ['Id', 'Predicted']")
    out = np.zeros(int(np.prod(shape)) * len(SCORED), dtype=np.uint8)
    out[table["Id"].to_numpy()] = table["Predicted"].to_numpy()
    return out.reshape(*shape, len(SCORED))
