"""Image AUROC, pixel AUROC, AUPRO and F1-max: the numbers MVTec AD papers report.

ROC and PR curves come from scikit-learn; AUPRO follows the MVTec AD reference evaluation
(Bergmann et al., IJCV 2021): per-region overlap averaged over every ground-truth connected
component, integrated over false-positive rates up to a limit and normalised by it.
"""

from __future__ import annotations

import numpy as np

# scikit-learn and scipy.ndimage are imported where a metric is computed: importing them
# costs about a second, which every batch job and service process paid without evaluating.


def _two_classes(labels: np.ndarray) -> bool:
    return np.unique(labels).size == 2


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """None when the test set has only one class (AUROC is undefined there)."""
    labels = np.asarray(labels)
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if _two_classes(labels) else None


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Best F1 over all thresholds of the precision-recall curve."""
    labels = np.asarray(labels)
    if not _two_classes(labels):
        return None
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f1.max())


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    masks = np.asarray(masks, dtype=bool).ravel()
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(masks, np.asarray(maps).ravel())) if _two_classes(masks) else None


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit]; 1.0 is perfect.

    Sorting all pixels once by score and accumulating each pixel's share of the FPR and of
    the PRO (1 / (region size * number of regions)) gives the exact curve at every distinct
    threshold, as the MVTec reference code does.
    """
    from scipy.ndimage import label as label_components

    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    normal_pixels = int((~masks).sum())
    if normal_pixels == 0 or not masks.any():
        return None
    fpr_step = np.where(masks, 0.0, 1.0 / normal_pixels)
    pro_step = np.zeros_like(maps)
    regions: list[np.ndarray] = []
    for index in range(masks.shape[0]):
        labelled, count = label_components(masks[index])
        regions.extend((index, labelled == region) for region in range(1, count + 1))
    for index, region in regions:
        pro_step[index][region] = 1.0 / (region.sum() * len(regions))

    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fpr_step.ravel()[order])
    pros = np.cumsum(pro_step.ravel()[order])
    # One point per distinct threshold: the last pixel of each run of equal scores.
    last_of_run = np.r_[scores[1:] != scores[:-1], True]
    fprs = np.r_[0.0, fprs[last_of_run]]
    pros = np.r_[0.0, pros[last_of_run]]
    fprs = np.minimum(fprs, 1.0)

    inside = fprs <= fpr_limit
    curve_fpr, curve_pro = fprs[inside], pros[inside]
    if curve_fpr[-1] < fpr_limit:
        after = np.searchsorted(fprs, fpr_limit, side="right")
        after = min(after, fprs.size - 1)
        before = after - 1
        span = fprs[after] - fprs[before]
        weight = (fpr_limit - fprs[before]) / span if span > 0 else 0.0
        curve_fpr = np.r_[curve_fpr, fpr_limit]
        curve_pro = np.r_[curve_pro, pros[before] + weight * (pros[after] - pros[before])]
    return float(np.trapezoid(curve_pro, curve_fpr) / fpr_limit)


def all_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    fpr_limit: float = 0.3,
) -> dict[str, float | None]:
    results = {"image_auroc": image_auroc(labels, scores), "image_f1_max": f1_max(labels, scores)}
    if masks is not None and maps is not None:
        results["pixel_auroc"] = pixel_auroc(masks, maps)
        results["aupro"] = aupro(masks, maps, fpr_limit)
    return results
