"""fakedet.metrics against hand-worked cases (REAL = 1 is the positive class; REAL iff p >= threshold)."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, precision_score, recall_score

from fakedet import FAKE, REAL
from fakedet.arrays import ImageSet
from fakedet.metrics import (
    best_worst_classes,
    confusion,
    labelled_metrics,
    per_class_recall,
    plot_threshold_curves,
    real_only_metrics,
    score_logits,
    threshold_table,
)

# The worked case: 5 real, 3 fake.
#   item   0     1    2    3     4    | 5    6    7
#   gold   R     R    R    R     R    | F    F    F
#   p      0.95  0.7  0.5  0.45  0.2  | 0.8  0.3  0.05
# At t = 0.5 (p = 0.5 counts as REAL): predicted REAL are items 0, 1, 2 and 5.
#   TP = 3 (0, 1, 2)   FN = 2 (3, 4)   FP = 1 (5)   TN = 2 (6, 7)
LABELS = np.array([REAL] * 5 + [FAKE] * 3, dtype=np.uint8)
P = np.array([0.95, 0.7, 0.5, 0.45, 0.2, 0.8, 0.3, 0.05])


def images(n: int) -> np.ndarray:
    return np.zeros((n, 32, 32, 3), dtype=np.uint8)


def test_worked_case_by_hand():
    m = labelled_metrics(LABELS, P)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (3, 2, 1, 2, 8)
    expected = {
        "acc": 5 / 8,  # (TP + TN) / n
        "precision_real": 3 / 4,  # TP / (TP + FP)
        "recall_real": 3 / 5,  # TP / (TP + FN)
        "f1_real": 2 / 3,  # 2TP / (2TP + FP + FN) = 6 / 9
        "f1": 2 / 3,  # binary F1 of REAL: the study's F1
        "precision_fake": 2 / 4,  # TN / (TN + FN)
        "recall_fake": 2 / 3,  # TN / (TN + FP)
        "f1_fake": 4 / 7,  # 2TN / (2TN + FN + FP) = 4 / 7
        "f1_macro": (2 / 3 + 4 / 7) / 2,
        "precision_macro": (3 / 4 + 2 / 4) / 2,
        "recall_macro": (3 / 5 + 2 / 3) / 2,
        "acc_real": 3 / 5,
        "acc_fake": 2 / 3,
        # 15 (real, fake) pairs; the real score is higher in 3 + 2 + 2 + 2 + 1 = 10 of them
        "auc": 10 / 15,
        # ranked: R F R R R F R F; precision at each real: 1/1, 2/3, 3/4, 4/5, 5/7
        "ap": (1 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 7) / 5,
        "loss": -np.mean(np.log([0.95, 0.7, 0.5, 0.45, 0.2, 1 - 0.8, 1 - 0.3, 1 - 0.05])),
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_keys_are_the_documented_ones():
    assert set(labelled_metrics(LABELS, P)) == {
        "acc", "f1", "f1_macro", "precision_real", "recall_real", "f1_real", "precision_fake", "recall_fake",
        "f1_fake", "precision_macro", "recall_macro", "auc", "ap", "acc_real", "acc_fake", "loss",
        "tp", "fp", "fn", "tn", "n",
    }  # fmt: skip


def test_threshold_is_inclusive_and_moves_items():
    # at t = 0.46 item 3 (p = 0.45) stays FAKE and item 2 (p = 0.5) stays REAL; at t = 0.45 item 3 turns REAL
    assert labelled_metrics(LABELS, P, threshold=0.46)["tp"] == 3
    m = labelled_metrics(LABELS, P, threshold=0.45)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (4, 1, 1, 2)
    # t = 0.81: only item 0 (p = 0.95) is REAL; the fake at 0.8 turns FAKE
    m = labelled_metrics(LABELS, P, threshold=0.81)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 4, 0, 3)


def test_agrees_with_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    p = rng.random(500)
    m = labelled_metrics(labels, p, threshold=0.3)
    pred = (p >= 0.3).astype(int)
    assert m["precision_real"] == pytest.approx(precision_score(labels, pred, pos_label=REAL))
    assert m["recall_fake"] == pytest.approx(recall_score(labels, pred, pos_label=FAKE))
    assert m["f1_macro"] == pytest.approx(f1_score(labels, pred, average="macro"))


def test_nothing_predicted_real_gives_zeros_without_warnings():
    # gold R R F F, all p < 0.5: TP = FP = 0, so precision_real = 0/0 -> 0 (sklearn's zero_division=0)
    labels = np.array([REAL, REAL, FAKE, FAKE])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = labelled_metrics(labels, p)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (0, 2, 0, 2)
    assert m["precision_real"] == 0.0 and m["recall_real"] == 0.0 and m["f1"] == 0.0
    assert m["precision_fake"] == pytest.approx(2 / 4)  # TN / (TN + FN)
    assert m["recall_fake"] == 1.0
    assert m["f1_fake"] == pytest.approx(2 / 3)  # 2*2 / (2*2 + 2 + 0)
    assert m["acc"] == 0.5


def test_auc_when_reals_score_lower():
    labels = np.array([REAL, REAL, FAKE, FAKE])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert labelled_metrics(labels, p)["auc"] == 0.0  # every real below every fake
    # one tie between a real and a fake counts a half: pairs (0.3 vs 0.3) = 0.5, (0.3 vs 0.1) = 1,
    # (0.2 vs 0.3) = 0, (0.2 vs 0.1) = 1 -> 2.5 / 4
    p = np.array([0.3, 0.2, 0.3, 0.1])
    assert labelled_metrics(labels, p)["auc"] == pytest.approx(2.5 / 4)


def test_one_class_only_has_nan_auc_and_ap_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = labelled_metrics(np.array([FAKE, FAKE, FAKE]), np.array([0.2, 0.6, 0.9]))
    assert math.isnan(m["auc"]) and math.isnan(m["ap"])
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (0, 0, 2, 1)
    assert m["recall_real"] == 0.0 and m["precision_real"] == 0.0


def test_loss_from_logits_is_exact_where_probabilities_saturate():
    logits = np.array([2.0, -1.0, 0.5, 60.0])
    labels = np.array([REAL, FAKE, FAKE, FAKE])
    p = 1 / (1 + np.exp(-logits))
    # BCE by its definition: -log σ(x) for REAL, -log(1 - σ(x)) = softplus(x) for FAKE
    direct = np.array([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0)), np.log1p(np.exp(0.5)), 60.0 + np.log1p(np.exp(-60.0))])
    assert labelled_metrics(labels, p, logits=logits)["loss"] == pytest.approx(direct.mean(), rel=1e-12)
    torch_loss = F.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(labels, dtype=torch.float64))
    assert labelled_metrics(labels, p, logits=logits)["loss"] == pytest.approx(float(torch_loss), rel=1e-12)
    # from probabilities, σ(60) == 1.0 in float64; like torch's BCELoss, the log is clamped at -100
    assert labelled_metrics(labels, p)["loss"] == pytest.approx((direct[:3].sum() + 100) / 4, rel=1e-9)


def test_score_logits_dispatches_on_the_set():
    logits = np.log(P / (1 - P))  # σ(logit(p)) = p
    labelled = ImageSet(images(8), LABELS)
    m = score_logits(labelled, logits.astype(np.float32))
    assert m["tp"] == 3 and m["fn"] == 2 and m["auc"] == pytest.approx(10 / 15)
    assert m["loss"] == pytest.approx(labelled_metrics(LABELS, P)["loss"], rel=1e-6)
    assert all(isinstance(v, (int, float)) for v in m.values())

    real = ImageSet(images(8), np.full(8, REAL, dtype=np.uint8), fine=np.arange(8) % 2, coarse=np.zeros(8, int))
    m = score_logits(real, logits)
    assert m["real_recall"] == pytest.approx(4 / 8)  # p >= 0.5 at items 0, 1, 2, 5
    # fine class 0 = items 0, 2, 4, 6 -> R R F F = 1/2; class 1 = items 1, 3, 5, 7 -> R F R F = 1/2
    assert m["real_recall_fine_min"] == m["real_recall_fine_max"] == pytest.approx(0.5)
    assert m["loss"] == pytest.approx(-np.mean(np.log(P)), rel=1e-9)  # BCE against all-REAL
    assert "acc" not in m
    with pytest.raises(ValueError, match="7 logits"):
        score_logits(labelled, logits[:7])


# Per-class recall: 9 real images, predictions R R F | F F | R R R F for fine classes 0 | 1 | 2
P_CLASSES = np.array([0.9, 0.6, 0.1, 0.4, 0.2, 0.7, 0.5, 0.99, 0.3])
FINE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
COARSE = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])  # coarse 0: R R F F F = 2/5; coarse 1: R R R F = 3/4


def test_per_class_recall_by_hand():
    table = per_class_recall(P_CLASSES, FINE, ("cat", "dog", "eel", "fox"))  # fox has no images: not listed
    assert list(table.columns) == ["class", "n", "real_recall"]
    assert table["class"].tolist() == ["eel", "cat", "dog"]
    assert table["n"].tolist() == [4, 3, 2]
    assert table["real_recall"].tolist() == pytest.approx([3 / 4, 2 / 3, 0.0])
    # without names the ids stand in; a lower threshold moves item 3 (p = 0.4) of class 1 to REAL
    table = per_class_recall(P_CLASSES, FINE, None, threshold=0.35)
    assert dict(zip(table["class"], table["real_recall"])) == pytest.approx({0: 2 / 3, 1: 1 / 2, 2: 3 / 4})


def test_real_only_min_max_by_hand():
    m = real_only_metrics(P_CLASSES, fine=FINE, coarse=COARSE)
    assert m["n"] == 9
    assert m["real_recall"] == pytest.approx(5 / 9)
    assert m["real_recall_fine_min"] == 0.0 and m["real_recall_fine_max"] == pytest.approx(3 / 4)
    assert m["real_recall_coarse_min"] == pytest.approx(2 / 5) and m["real_recall_coarse_max"] == pytest.approx(3 / 4)
    assert set(real_only_metrics(P_CLASSES)) == {"real_recall", "loss", "n"}


def test_best_worst_classes_is_table_3():
    s = ImageSet(
        images(9), np.full(9, REAL, dtype=np.uint8), name="cifar100_test", fine=FINE, coarse=COARSE,
        fine_names=("cat", "dog", "eel"), coarse_names=("pets", "others"),
    )  # fmt: skip
    table = best_worst_classes(s, P_CLASSES)
    assert table.index.tolist() == ["max", "min"]
    assert table.columns.tolist() == [("coarse", "recall"), ("coarse", "class"), ("fine", "recall"), ("fine", "class")]
    assert table[("coarse", "class")].tolist() == ["others", "pets"]
    assert table[("coarse", "recall")].tolist() == pytest.approx([3 / 4, 2 / 5])
    assert table[("fine", "class")].tolist() == ["eel", "dog"]
    assert table[("fine", "recall")].tolist() == pytest.approx([3 / 4, 0.0])


def test_best_worst_classes_ties_show_the_lowest_id():
    # fine classes 0..3 with recall 1, 0, 1, 0: max and min are both tied; ids 0 and 1 are shown
    p = np.array([0.9, 0.1, 0.9, 0.1])
    s = ImageSet(images(4), np.full(4, REAL, dtype=np.uint8), fine=np.arange(4), fine_names=("a", "b", "c", "d"))
    table = best_worst_classes(s, p)
    assert table[("fine", "class")].tolist() == ["a", "b"]
    assert ("coarse", "class") not in table.columns
    with pytest.raises(ValueError, match="content labels"):
        best_worst_classes(ImageSet(images(4), np.full(4, REAL, dtype=np.uint8)), p)


def test_confusion_by_hand():
    table = confusion(LABELS, P)
    assert table.index.tolist() == ["REAL", "FAKE"] and table.columns.tolist() == ["REAL", "FAKE"]
    assert (table.index.name, table.columns.name) == ("gold", "predicted")
    # gold REAL: 3 predicted REAL (TP), 2 FAKE (FN); gold FAKE: 1 predicted REAL (FP), 2 FAKE (TN)
    assert table.to_numpy().tolist() == [[3, 2], [1, 2]]


def test_threshold_table_agrees_with_labelled_metrics():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 3000)
    # scores on a 0.01 grid, so many items sit exactly on a threshold (the >= boundary is exercised),
    # plus exact 0s and 1s
    p = np.clip(np.round(rng.beta(2, 2, 3000) + 0.15 * (labels - 0.5), 2), 0, 1)
    table = threshold_table(labels, p)
    assert len(table) == 99 and table.threshold.iloc[0] == 0.01 and table.threshold.iloc[-1] == 0.99
    keys = [c for c in table.columns if c != "threshold"]
    for t in (0.01, 0.2, 0.37, 0.5, 0.73, 0.99):
        row = table[np.isclose(table.threshold, t)].iloc[0]
        m = labelled_metrics(labels, p, threshold=row.threshold)
        for key in keys:
            assert row[key] == pytest.approx(m[key], abs=1e-12), (t, key)
    row = table[table.threshold == 0.5].iloc[0]
    assert row["acc"] == pytest.approx(labelled_metrics(labels, p)["acc"])


def test_threshold_table_float32_scores_match_labelled_metrics():
    # float32 0.29 is below float64 0.29; both functions must draw the line in the same place
    p = np.array([0.29, 0.3, 0.28, 0.29], dtype=np.float32)
    labels = np.array([REAL, REAL, FAKE, FAKE])
    row = threshold_table(labels, p, thresholds=np.array([0.29])).iloc[0]
    m = labelled_metrics(labels, p, threshold=0.29)
    assert (row.tp, row.fp, row.fn, row.tn) == (m["tp"], m["fp"], m["fn"], m["tn"])


def test_threshold_table_zero_division_and_extremes():
    labels = np.array([REAL, REAL, FAKE])
    p = np.array([0.2, 0.4, 0.3])
    table = threshold_table(labels, p, thresholds=np.array([0.1, 0.9]))
    # t = 0.1: all REAL -> TP 2, FP 1; precision_fake = 0/0 -> 0
    # t = 0.9: all FAKE -> TN 1, FN 2; precision_real = 0/0 -> 0
    assert table[["tp", "fp", "fn", "tn"]].to_numpy().tolist() == [[2, 1, 0, 0], [0, 0, 2, 1]]
    assert table.precision_fake.tolist() == [0.0, pytest.approx(1 / 3)]
    assert table.precision_real.tolist() == [pytest.approx(2 / 3), 0.0]
    assert table.f1_real.tolist() == [pytest.approx(4 / 5), 0.0]


def test_plot_threshold_curves_renders():
    fig = plot_threshold_curves(threshold_table(LABELS, P), "worked case")
    (ax,) = fig.axes
    assert ax.get_title() == "worked case\nn = 8 images (5 REAL, 3 FAKE); one model, no interval"
    assert len(ax.get_legend().get_texts()) == 6
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mismatched_or_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="labels"):
        labelled_metrics(LABELS, P[:-1])
    with pytest.raises(ValueError, match="no items"):
        labelled_metrics(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="fine"):
        real_only_metrics(P, fine=FINE)
    assert isinstance(per_class_recall(P_CLASSES, FINE), pd.DataFrame)
