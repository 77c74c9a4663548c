import numpy as np
import pandas as pd
import pytest

from covseg.submission import read_submission, submission_table, write_submission


def test_id_layout_matches_the_competition(tmp_path):
    m, h, w = 3, 8, 6
    preds = np.full((m, h, w), 3, np.uint8)
    preds[1, 2, 5] = 0  # ground glass at image 1, row 2, col 5
    preds[2, 7, 0] = 1  # consolidation at image 2, row 7, col 0
    path = write_submission(submission_table(preds), tmp_path / "sub.csv", preds.shape)
    table = pd.read_csv(path)
    assert path.read_text().startswith("Id,Predicted\n0,0\n")
    assert len(table) == m * h * w * 2
    assert table["Id"].tolist() == list(range(len(table)))
    ones = table.loc[table["Predicted"] == 1, "Id"].tolist()
    assert ones == [((1 * h + 2) * w + 5) * 2 + 0, ((2 * h + 7) * w + 0) * 2 + 1]
    back = read_submission(path, preds.shape)
    assert np.array_equal(back[..., 0], preds == 0) and np.array_equal(back[..., 1], preds == 1)


def test_row_count_checked_before_writing(tmp_path):
    preds = np.zeros((2, 4, 4), np.uint8)
    table = submission_table(preds).iloc[:-1]
    with pytest.raises(ValueError, match="63 rows, expected 2\\*4\\*4\\*2 = 64"):
        write_submission(table, tmp_path / "sub.csv", preds.shape)
    assert not (tmp_path / "sub.csv").exists()
