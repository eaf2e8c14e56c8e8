"""Post-hoc audit: can a confounder still be read off the fused embedding?

A cross-validated linear probe (scikit-learn) predicts each confounder from
the embedding: logistic regression for categorical confounders, reported as
ROC AUC (one-vs-rest macro average for more than two classes; 0.5 = no
information), ridge regression for continuous ones, reported as R^2
(0 = no information).  Inputs are standardised inside each CV fold.
"""
from __future__ import annotations

import numpy as np


def confounder_probe(embedding: np.ndarray, values, *, continuous: bool = False, cv: int = 5,
                     seed: int = 0) -> float | None:
    """Out-of-fold probe score of ``values`` from ``embedding`` (N, D).

    Returns ``None`` when it cannot be computed (a single class, or a class
    with fewer members than folds after reducing ``cv``).
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import r2_score, roc_auc_score
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(embedding, dtype=float)
    if continuous:
        y = np.asarray(values, dtype=float)
        if len(y) < 2 * cv or np.std(y) == 0:
            return None
        pred = cross_val_predict(make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))), X, y,
                                 cv=KFold(cv, shuffle=True, random_state=seed))
        return float(r2_score(y, pred))
    y = np.asarray(values).astype(str)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        return None
    k = int(min(cv, counts.min()))
    if k < 2:
        return None
    proba = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)), X, y,
                              cv=StratifiedKFold(k, shuffle=True, random_state=seed), method="predict_proba")
    if len(classes) == 2:
        return float(roc_auc_score(y == classes[1], proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes))
