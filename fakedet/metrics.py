"""Evaluation metrics, as the study reports them (section 3.2, tables 1-3, figure 5).

REAL is the positive class; an image is predicted REAL iff p_real >= threshold (the study's default
threshold is 0.5: "classification as 'real' being p >= 0.5"). Per-class precision/recall/F1 treat
each class in turn as the positive one, as the study's per-class rows in table 2 do; `f1` is the
binary F1 of REAL (the study's F1 column).

Scores are converted to float64 first everywhere, so that every function here draws the same
REAL/FAKE line for the same threshold, whatever dtype the scores arrive in.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import expit, log_expit
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from fakedet import FAKE, REAL
from fakedet.arrays import ImageSet

DEFAULT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
"""Figure 5's sweep of decision thresholds: 0.01 ... 0.99."""

# torch.nn.BCELoss clamps each log at -100, so a probability of exactly 0 or 1 gives a finite loss.
_LOG_FLOOR = -100.0


def _scores(p: np.ndarray) -> np.ndarray:
    return np.asarray(p, dtype=np.float64).reshape(-1)


def _bce_from_proba(labels: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities, with torch's BCELoss clamping."""
    with np.errstate(divide="ignore"):
        log_p = np.maximum(np.log(p), _LOG_FLOOR)
        log_q = np.maximum(np.log1p(-p), _LOG_FLOOR)
    return float(-np.mean(np.where(labels == REAL, log_p, log_q)))


def _bce_from_logits(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy with logits: log σ(x) for REAL, log σ(-x) for FAKE, exact for any x."""
    z = np.where(labels == REAL, logits, -logits)
    return float(-np.mean(log_expit(z)))


def labelled_metrics(
    labels: np.ndarray, p_real: np.ndarray, threshold: float = 0.5, *, logits: np.ndarray | None = None
) -> dict[str, float]:
    """Every scalar the study reports for a labelled binary set (table 2), plus AUC and AP.

    `loss` is the mean BCE; give `logits` (whose sigmoid is `p_real`) for the exact value when
    probabilities saturate at 0 or 1 in float32.
    """
    labels = np.asarray(labels).reshape(-1)
    p = _scores(p_real)
    if labels.shape != p.shape:
        raise ValueError(f"{len(labels)} labels but {len(p)} scores")
    if len(labels) == 0:
        raise ValueError("no items to score")
    pred = np.where(p >= threshold, REAL, FAKE)

    # REAL as the positive class; sklearn's layout is [[tn, fp], [fn, tp]]. (multilabel_confusion_matrix
    # is ~3x faster than confusion_matrix here, which matters at every evaluation point of training.)
    (tn, fp), (fn, tp) = multilabel_confusion_matrix(labels, pred, labels=[REAL])[0]
    prec, rec, f1, _ = precision_recall_fscore_support(labels, pred, labels=[REAL, FAKE], zero_division=0)
    both = tp + fn > 0 and fp + tn > 0
    if both:
        auc = float(roc_auc_score(labels == REAL, p))
        ap = float(average_precision_score(labels == REAL, p))
    else:  # undefined with one class only (sklearn would warn and return nonsense for AP)
        auc = ap = math.nan
    loss = _bce_from_proba(labels, p) if logits is None else _bce_from_logits(labels, _scores(logits))
    return {
        "acc": float(accuracy_score(labels, pred)),
        "f1": float(f1[0]),
        "f1_macro": float(f1.mean()),
        "precision_real": float(prec[0]),
        "recall_real": float(rec[0]),
        "f1_real": float(f1[0]),
        "precision_fake": float(prec[1]),
        "recall_fake": float(rec[1]),
        "f1_fake": float(f1[1]),
        "precision_macro": float(prec.mean()),
        "recall_macro": float(rec.mean()),
        "auc": auc,
        "ap": ap,
        "acc_real": float(rec[0]),
        "acc_fake": float(rec[1]),
        "loss": loss,
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "tn": int(tn),
        "n": int(len(labels)),
    }


def _class_recalls(pred_real: np.ndarray, class_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids present, count per id, fraction predicted REAL per id)."""
    ids, inverse, counts = np.unique(np.asarray(class_ids).reshape(-1), return_inverse=True, return_counts=True)
    hits = np.bincount(inverse, weights=pred_real, minlength=len(ids))
    return ids, counts, hits / counts


def real_only_metrics(
    p_real: np.ndarray,
    threshold: float = 0.5,
    *,
    fine: np.ndarray | None = None,
    coarse: np.ndarray | None = None,
    logits: np.ndarray | None = None,
) -> dict[str, float]:
    """Scores for a set of real images only (the study's CIFAR-100 evaluation, table 3).

    `real_recall` is the fraction predicted REAL (recall with every gold label REAL; the study's
    "accuracy"). With content labels, the lowest and highest per-class recall among the classes
    present.
    """
    p = _scores(p_real)
    if len(p) == 0:
        raise ValueError("no items to score")
    pred_real = (p >= threshold).astype(np.float64)
    all_real = np.full(len(p), REAL)
    loss = _bce_from_proba(all_real, p) if logits is None else _bce_from_logits(all_real, _scores(logits))
    out = {"real_recall": float(pred_real.mean()), "loss": loss, "n": int(len(p))}
    for name, ids in (("coarse", coarse), ("fine", fine)):
        if ids is None:
            continue
        if len(ids) != len(p):
            raise ValueError(f"{len(ids)} {name} labels but {len(p)} scores")
        _, _, recall = _class_recalls(pred_real, ids)
        out[f"real_recall_{name}_min"] = float(recall.min())
        out[f"real_recall_{name}_max"] = float(recall.max())
    return out


def score_logits(image_set: ImageSet, logits: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Scalars for one evaluation set from the model's logits: what training records at each evaluation point."""
    logits = _scores(logits)
    if len(logits) != len(image_set):
        raise ValueError(f"{len(logits)} logits for set {image_set.name!r} of {len(image_set)} images")
    p = expit(logits)
    if image_set.real_only:
        return real_only_metrics(p, threshold, fine=image_set.fine, coarse=image_set.coarse, logits=logits)
    return labelled_metrics(image_set.labels, p, threshold, logits=logits)


def per_class_recall(
    p_real: np.ndarray,
    class_ids: np.ndarray,
    class_names: tuple[str, ...] | list[str] | None = None,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Real recall per content class present: columns `class`, `n`, `real_recall`; best first.

    Ties keep the order of the class ids. Without names, the class column holds the ids.
    """
    p = _scores(p_real)
    if len(class_ids) != len(p):
        raise ValueError(f"{len(class_ids)} class labels but {len(p)} scores")
    ids, counts, recall = _class_recalls((p >= threshold).astype(np.float64), class_ids)
    names = list(ids) if class_names is None else [class_names[int(i)] for i in ids]
    table = pd.DataFrame({"class": names, "n": counts.astype(int), "real_recall": recall})
    return table.sort_values("real_recall", ascending=False, kind="stable").reset_index(drop=True)


def best_worst_classes(image_set: ImageSet, p_real: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    """The study's table 3 for one model: rows max/min; for coarse and fine labels, recall and class.

    Recall is a fraction (the study prints percent). Among tied classes the one with the lowest id
    is shown; the study, too, shows one of several perfect classes.
    """
    columns = {}
    for level in ("coarse", "fine"):
        ids = getattr(image_set, level)
        if ids is None:
            continue
        table = per_class_recall(p_real, ids, getattr(image_set, f"{level}_names"), threshold)
        best = table.iloc[0]  # stable sort: the lowest id among the best
        worst = table[table.real_recall == table.real_recall.iloc[-1]].iloc[0]
        columns[(level, "recall")] = [best.real_recall, worst.real_recall]
        columns[(level, "class")] = [best["class"], worst["class"]]
    if not columns:
        raise ValueError(f"set {image_set.name!r} has neither coarse nor fine content labels")
    return pd.DataFrame(columns, index=pd.Index(["max", "min"], name=image_set.name or None))


def threshold_table(labels: np.ndarray, p_real: np.ndarray, thresholds: np.ndarray = DEFAULT_THRESHOLDS) -> pd.DataFrame:
    """Metrics at each decision threshold (the study's figure 5), one row per threshold.

    Vectorised: the confusion counts at every threshold come from one sort of each class's scores
    (the number of REAL items with p >= t is n_real minus those below t); the formulas are
    sklearn's, with zero_division=0. tests/test_metrics.py checks the rows against
    `labelled_metrics`.
    """
    labels = np.asarray(labels).reshape(-1)
    p = _scores(p_real)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if labels.shape != p.shape:
        raise ValueError(f"{len(labels)} labels but {len(p)} scores")
    real_scores = np.sort(p[labels == REAL])
    fake_scores = np.sort(p[labels != REAL])
    n_real, n_fake = len(real_scores), len(fake_scores)
    tp = n_real - np.searchsorted(real_scores, t, side="left")
    fp = n_fake - np.searchsorted(fake_scores, t, side="left")
    fn, tn = n_real - tp, n_fake - fp

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros(len(t)), where=den > 0)

    table = pd.DataFrame(
        {
            "threshold": t,
            "acc": (tp + tn) / len(p),
            "precision_real": ratio(tp, tp + fp),
            "recall_real": ratio(tp, tp + fn),
            "f1_real": ratio(2 * tp, 2 * tp + fp + fn),
            "precision_fake": ratio(tn, tn + fn),
            "recall_fake": ratio(tn, tn + fp),
            "f1_fake": ratio(2 * tn, 2 * tn + fn + fp),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
        }
    )
    table.insert(2, "f1", table.f1_real)
    table.insert(3, "f1_macro", (table.f1_real + table.f1_fake) / 2)
    table["precision_macro"] = (table.precision_real + table.precision_fake) / 2
    table["recall_macro"] = (table.recall_real + table.recall_fake) / 2
    return table


def confusion(labels: np.ndarray, p_real: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    """2×2 counts: rows the gold label, columns the prediction, REAL first.

    The study's table 1 shows the same four cells (TP, FP, FN, TN) but with rows the prediction
    and columns the gold label; here the axes are named to avoid that ambiguity.
    """
    pred = np.where(_scores(p_real) >= threshold, REAL, FAKE)
    counts = confusion_matrix(np.asarray(labels).reshape(-1), pred, labels=[REAL, FAKE])
    names = ["REAL", "FAKE"]
    return pd.DataFrame(counts, index=pd.Index(names, name="gold"), columns=pd.Index(names, name="predicted"))


# The study's figure 5 curves: column of `threshold_table` → (label, line style, colour)
THRESHOLD_CURVES = {
    "acc": ("accuracy", "-", "black"),
    "f1_macro": ("F1 (macro)", "-", "tab:purple"),
    "precision_real": ("precision REAL", "-", "tab:blue"),
    "recall_real": ("recall REAL", "--", "tab:blue"),
    "precision_fake": ("precision FAKE", "-", "tab:red"),
    "recall_fake": ("recall FAKE", "--", "tab:red"),
}


def threshold_counts(table: pd.DataFrame) -> tuple[int, int]:
    """(REAL, FAKE) images behind a `threshold_table`: its confusion counts sum to them at every threshold."""
    first = table.iloc[0]
    return int(first.tp + first.fn), int(first.fp + first.tn)


def draw_threshold_curves(ax, table: pd.DataFrame) -> None:
    """Figure 5's curves on `ax`: every `THRESHOLD_CURVES` column against the threshold, the default 0.5 dotted."""
    for column, (label, line, colour) in THRESHOLD_CURVES.items():
        ax.plot(table.threshold, table[column], line, color=colour, label=label, linewidth=1.4)
    ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set(xlabel="decision threshold t (REAL iff p ≥ t)", ylabel="score (fraction)", xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)


def plot_threshold_curves(table: pd.DataFrame, title: str = ""):
    """Figure 5 for one model: metrics against the decision threshold, the test set's size in the title and
    the legend beside the axes, off the curves. Returns a matplotlib Figure (no display needed)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no global pyplot state

    fig = Figure(figsize=(7.6, 4.0), layout="constrained")
    ax = fig.add_subplot()
    draw_threshold_curves(ax, table)
    n_real, n_fake = threshold_counts(table)
    size = f"n = {n_real + n_fake} images ({n_real} REAL, {n_fake} FAKE); one model, no interval"
    ax.set_title(f"{title}\n{size}" if title else size, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
    return fig


__all__ = [
    "DEFAULT_THRESHOLDS",
    "labelled_metrics",
    "real_only_metrics",
    "score_logits",
    "per_class_recall",
    "best_worst_classes",
    "threshold_table",
    "confusion",
    "plot_threshold_curves",
    "draw_threshold_curves",
    "threshold_counts",
]
