"""Study statistics, validated against R's pROC and statsmodels (see docs/stats.md).

ROC/AUC, DeLong variance and CI (fast O(n log n) DeLong after Sun & Xu 2014), stratified bootstrap
CI, paired/unpaired DeLong tests, Obuchowski's clustered AUC and a cluster bootstrap, metrics at a
fixed threshold with Wilson CIs, exact McNemar against readers, Cohen's kappa, reader consensus,
calibration and decision curves; and the study-level helpers that build metrics.json
(:func:`set_metrics`, :func:`study_metrics`) and tidy tables for the dashboard (:func:`tidy_table`,
:func:`roc_table`). Plain numpy/scipy/pandas, no plotting.

Usage: ``from nhb_core import stats; stats.auc(y, score)``.
"""

from nhb_core.stats import mrmc  # the module, also callable: stats.mrmc(path) = stats.mrmc.mrmc(path)
from nhb_core.stats._binary import (
                                    METRICS,
                                    clopper_pearson_ci,
                                    cohens_kappa,
                                    compare_to_reader,
                                    confusion,
                                    fleiss_kappa,
                                    mcnemar_exact,
                                    mcnemar_table,
                                    precision_paired,
                                    proportion,
                                    reader_consensus,
                                    threshold_metrics,
                                    wilson_ci,
                                    youden_threshold,
)
from nhb_core.stats._calibration import DCA_THRESHOLDS, brier_score, calibration, decision_curve
from nhb_core.stats._roc import (
                                    FPR_GRID,
                                    ROCCurve,
                                    auc,
                                    auc_ci_bootstrap,
                                    auc_ci_delong,
                                    bootstrap_aucs,
                                    cluster_bootstrap_ci,
                                    clustered_auc,
                                    clustered_paired,
                                    delong_cov,
                                    delong_matrix,
                                    delong_paired,
                                    delong_placements,
                                    delong_unpaired,
                                    delong_var,
                                    roc_band,
                                    roc_curve,
)
from nhb_core.stats._study import (
                                    aggregate_subjects,
                                    analyze_predictions,
                                    load_predictions,
                                    roc_table,
                                    set_metrics,
                                    set_name_from_file,
                                    study_metrics,
                                    tidy_table,
)
from nhb_core.stats.mrmc import mrmc_arrays, mrmc_table, read_readings, readings_array

__all__ = [
    "roc_curve", "ROCCurve", "auc", "delong_placements", "delong_var", "delong_cov", "auc_ci_delong",
    "bootstrap_aucs", "auc_ci_bootstrap", "delong_paired", "delong_matrix", "delong_unpaired", "clustered_auc",
    "clustered_paired", "cluster_bootstrap_ci", "roc_band", "FPR_GRID",
    "threshold_metrics", "youden_threshold", "wilson_ci", "clopper_pearson_ci", "proportion", "confusion",
    "mcnemar_exact", "mcnemar_table", "compare_to_reader", "precision_paired", "cohens_kappa", "reader_consensus",
    "METRICS", "brier_score", "calibration", "decision_curve", "DCA_THRESHOLDS",
    "set_metrics", "study_metrics", "tidy_table", "roc_table", "aggregate_subjects", "load_predictions",
    "analyze_predictions", "set_name_from_file",
    "mrmc", "mrmc_arrays", "mrmc_table", "read_readings", "readings_array", "fleiss_kappa",
]
