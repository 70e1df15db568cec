"""Domain baselines that every network of a study is compared with.

A baseline is a small, transparent model on measured features of the prepared
dataset (no image learning). The first, and the one a reviewer asks for first,
is the **signal-intensity ratio** (``si_ratio``): the mean T1 signal of the
globus pallidus over the mean signal of its surroundings, per side and for
both sides together (``nhb_core.slices.si_ratios``, columns ``si_left``,
``si_right``, ``si_both`` of ``index.csv``), combined by a scikit-learn logistic
regression fitted on the training set only. A radiologist measures the same
ratio with two ROIs on a workstation; a network that does not beat it has not
learned more than that.

The baseline plays the part of a model everywhere downstream: one probability
column ``si_ratio`` per slice in the predictions files (subject = mean of its
slices, as for the networks), a threshold chosen on the validation set (Youden,
subject level), ROC curves, DeLong comparisons with each network, metrics.json,
report and dashboard. Its fitted parameters are written to
``RUN/baselines/<name>.json`` (schema in ``docs/runs.md``).

Baselines are looked up in :data:`BASELINES` (name -> class); a new one
implements ``fit(index, train_rows, val_rows)``, ``predict(index, rows)`` and
``to_dict()`` / ``from_dict()``.

>>> import numpy as np, pandas as pd
>>> rng = np.random.default_rng(0)
>>> y = np.repeat([0, 1], 50)
>>> ratio = 1.1 + 0.1 * y + rng.normal(0, 0.05, 100)
>>> idx = pd.DataFrame({"subject_id": [f"S{i}" for i in range(100)], "label": y,
...                     "si_left": ratio, "si_right": ratio, "si_both": ratio})
>>> b = SIRatioBaseline().fit(idx, np.arange(0, 100, 2), np.arange(1, 100, 2))
>>> p = b.predict(idx, np.arange(1, 100, 2))
>>> bool(p[y[1::2] == 1].mean() > p[y[1::2] == 0].mean())
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nhb_core.errors import DatasetError

#: Feature columns of index.csv the SI-ratio baseline reads (``nhb_core.slices.SI_COLUMNS``).
SI_FEATURES = ("si_left", "si_right", "si_both")


def si_feature_matrix(index, rows: np.ndarray) -> np.ndarray:
    """The SI-ratio features of ``rows`` of an index table: ``log`` of (left, right, both).

    A side that is absent on a slice (the rater drew one GP only there, or the ROI
    has no left/right labels) takes the both-sides ratio.

    Returns
    -------
    np.ndarray float64 [len(rows), 3]
    """
    missing = [c for c in SI_FEATURES if c not in index.columns]
    if missing:
        raise DatasetError("index.csv", f"the dataset has no signal-intensity columns ({', '.join(missing)})",
                           "Prepare the dataset again with this version (python -m nhb_core prepare)")
    x = index.iloc[np.asarray(rows, dtype=np.int64)][list(SI_FEATURES)].to_numpy(dtype=np.float64)
    both = x[:, 2:3]
    x = np.where(np.isfinite(x), x, both)
    if not np.isfinite(x).all() or (x <= 0).any():
        bad = int((~np.isfinite(x) | (x <= 0)).any(axis=1).sum())
        raise DatasetError("index.csv", f"{bad} slice(s) have no usable signal-intensity ratio",
                           "Check the ROI masks of those subjects (the ROI must lie inside the brain)")
    return np.log(x)


class SIRatioBaseline:
    """GP / surroundings signal-intensity ratio with a logistic regression on top.

    Parameters
    ----------
    C : float
        Inverse L2 regularisation strength of ``sklearn.linear_model.LogisticRegression``.
    balanced : bool
        ``class_weight="balanced"`` (as the networks' class-balanced loss).

    Attributes (after :meth:`fit`)
    ------------------------------
    coef_ : list of 3 floats, intercept_ : float, mean_ / scale_ : feature standardisation,
    threshold : float or None (Youden on the validation set, subject level), val_auc : float.
    """

    name = "si_ratio"

    def __init__(self, C: float = 1.0, balanced: bool = True) -> None:
        self.C = float(C)
        self.balanced = bool(balanced)
        self.coef_: list[float] | None = None
        self.intercept_: float | None = None
        self.mean_: list[float] | None = None
        self.scale_: list[float] | None = None
        self.threshold: float | None = None
        self.val_auc: float | None = None
        self.n_train: int = 0

    def fit(self, index, train_rows: np.ndarray, val_rows: np.ndarray | None = None,
            aggregate: str = "mean") -> SIRatioBaseline:
        """Fit on ``train_rows`` (slices) of ``index``; threshold and AUC on ``val_rows``."""
        from sklearn.linear_model import LogisticRegression

        train_rows = np.asarray(train_rows, dtype=np.int64)
        y = index["label"].to_numpy().astype(int)[train_rows]
        if len(np.unique(y)) < 2:
            raise DatasetError("split", "the train set needs slices of both labels for the si_ratio baseline",
                               "Check the split and the labels")
        x = si_feature_matrix(index, train_rows)
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale <= 0] = 1.0
        lr = LogisticRegression(C=self.C, class_weight="balanced" if self.balanced else None, max_iter=1000)
        lr.fit((x - mean) / scale, y)
        self.coef_ = [float(v) for v in lr.coef_[0]]
        self.intercept_ = float(lr.intercept_[0])
        self.mean_, self.scale_ = mean.tolist(), scale.tolist()
        self.n_train = int(len(train_rows))
        if val_rows is not None and len(val_rows):
            from nhb_core.train import validation_metrics, youden_thresholds

            val_rows = np.asarray(val_rows, dtype=np.int64)
            p = self.predict(index, val_rows)
            sids = index["subject_id"].astype(str).to_numpy()[val_rows]
            labels = index["label"].to_numpy().astype(int)[val_rows]
            self.threshold = youden_thresholds(sids, labels, p, aggregate)["threshold"]
            auc = validation_metrics(sids, labels, p, aggregate)["val_auc"]
            self.val_auc = float(auc) if math.isfinite(auc) else None
        return self

    def predict(self, index, rows: np.ndarray) -> np.ndarray:
        """Probability of label 1 for ``rows`` (slices) of ``index``: float64 [len(rows)]."""
        if self.coef_ is None:
            raise DatasetError("si_ratio", "the baseline has not been fitted", "Call fit() first")
        x = (si_feature_matrix(index, rows) - np.asarray(self.mean_)) / np.asarray(self.scale_)
        z = x @ np.asarray(self.coef_) + float(self.intercept_ or 0.0)  # set with coef_ by fit()
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "baseline", "features": list(SI_FEATURES),
                "feature_transform": "log; a missing side takes the both-sides ratio; standardised",
                "model": "sklearn LogisticRegression", "C": self.C,
                "class_weight": "balanced" if self.balanced else None,
                "coef": self.coef_, "intercept": self.intercept_, "mean": self.mean_, "scale": self.scale_,
                "threshold": self.threshold, "threshold_level": "subject", "threshold_rule": "youden",
                "val_auc": self.val_auc, "n_train_slices": self.n_train}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SIRatioBaseline:
        b = cls(C=float(d.get("C", 1.0)), balanced=d.get("class_weight") == "balanced")
        b.coef_, b.intercept_ = list(d["coef"]), float(d["intercept"])
        b.mean_, b.scale_ = list(d["mean"]), list(d["scale"])
        b.threshold, b.val_auc = d.get("threshold"), d.get("val_auc")
        b.n_train = int(d.get("n_train_slices", 0))
        return b


#: name -> baseline class (the extension point: add a class here).
BASELINES: dict[str, type[SIRatioBaseline]] = {"si_ratio": SIRatioBaseline}


def check_baseline_name(name: str) -> str:
    """``name`` when it is a known baseline, else :class:`~nhb_core.errors.ConfigError`."""
    from nhb_core.errors import ConfigError

    if name not in BASELINES:
        raise ConfigError("config", f"unknown baseline {name!r}", f"Use one of: {', '.join(BASELINES)}")
    return name


def load_baseline(d: dict[str, Any]):
    """A fitted baseline from its JSON dict (``RUN/baselines/<name>.json``)."""
    return BASELINES[check_baseline_name(str(d.get("name")))].from_dict(d)
