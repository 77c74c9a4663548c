import numpy as np
import pytest

from covseg.evaluation import (
    class_scores,
    confusion_matrix,
    per_slice_table,
    pooled_f1,
    summary_metrics,
    trivial_kaggle_f1,
)

# 10 pixels; label / prediction per pixel
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
PREDS = np.array([0, 0, 1, 1, 3, 2, 0, 3, 3, 3])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(LABELS, PREDS)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 0, 3]]


@pytest.mark.parametrize("bad", [4, 64, 255, -1])
def test_confusion_matrix_refuses_a_class_index_out_of_range(bad):
    labels = np.array(LABELS, dtype=np.int64)
    labels.flat[0] = bad  # 64 * 4 and 255 * 4 wrap around in uint8 arithmetic; -1 becomes 255
    with pytest.raises(ValueError, match="class index"):
        confusion_matrix(labels, PREDS)


def test_scores_by_hand():
    scores = class_scores(confusion_matrix(LABELS, PREDS))
    # ground glass: tp 2, fp 1 (a lung pixel), fn 1 -> P 2/3, R 2/3, F1 2/3, IoU 2/4
    assert scores.loc["ggo"].tolist()[:4] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 0.5])
    # consolidation: tp 1, fp 1, fn 1 -> F1 1/2, IoU 1/3
    assert scores.loc["consolidation", "f1"] == pytest.approx(0.5)
    assert scores.loc["consolidation", "iou"] == pytest.approx(1 / 3)
    # background: tp 3, fp 1, fn 0 -> P 3/4, R 1, F1 6/7
    assert scores.loc["background", "f1"] == pytest.approx(6 / 7)


def test_kaggle_and_pooled_f1_by_hand():
    m = summary_metrics(confusion_matrix(LABELS, PREDS))
    assert m["kaggle_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # both scored channels pooled: tp 3, fp 2, fn 2 -> 6 / 10
    assert m["pooled_f1"] == pytest.approx(0.6)
    assert pooled_f1(confusion_matrix(LABELS, LABELS)) == 1.0


def test_absent_class_not_predicted_scores_one():
    y = np.array([2, 3, 3])
    m = summary_metrics(confusion_matrix(y, y))
    assert m["f1_ggo"] == 1.0 and m["kaggle_f1"] == 1.0
    m = summary_metrics(confusion_matrix(y, np.array([0, 3, 3])))
    assert m["f1_ggo"] == 0.0


def test_per_slice_table_and_trivial_floor():
    labels = np.stack([LABELS.reshape(2, 5), LABELS.reshape(2, 5)])
    preds = np.stack([PREDS.reshape(2, 5), LABELS.reshape(2, 5)])
    table = per_slice_table(labels, preds, [7, 9])
    assert table["slice_id"].tolist() == [7, 9]
    assert table["kaggle_f1"].tolist() == pytest.approx([(2 / 3 + 1 / 2) / 2, 1.0])
    assert table["pixels_ggo"].tolist() == [3, 3]
    # predicting ground glass everywhere: F1 = 2*3/(3+10) for ggo, 0 for consolidation
    assert trivial_kaggle_f1(LABELS) == pytest.approx((6 / 13) / 2)
