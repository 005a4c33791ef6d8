"""The analysis of a sweep's results, as a library: pure functions over result tables (pandas), which
import only numpy, pandas, scipy and statsmodels. The report calls them with their defaults; a
notebook can call them on any table with the documented columns.

- `correlation_table` (correlations.py): does transfer move with intrinsic skill, per question
  (along training, across models at equal length, across seeds within a condition), each row with
  an estimate, an interval and the test of the same null, n and unit; primary rows Holm-adjusted,
  exploratory ones Benjamini–Hochberg.
- `cutoff_table`, `rule_comparison`, `cutoff_summary`, `patience_stop` (cutoffs.py): where to stop.
- `variance_decomposition` (variance.py): each factor's share of a metric's variance.
- `cells_summary`, `adjust`, `headline` (summary.py): seeds per condition, multiplicity, headlines.
- `correlate`, `fisher_z`, `t_mean` (resampling.py): the engines.
- `transfer_matrix` (transfer.py): every training set against every test set, over seeds.
- `roles` (roles.py): `intrinsic_val/...`, `transfer_test/...` resolved per trajectory from its train_on.
- `simulate` (simulate.py): result tables whose truth is known, to check a method's calibration.
"""

from fakedet.analysis.correlations import correlation_table, primary_rows
from fakedet.analysis.cutoffs import (
    comparison_headline,
    cutoff_summary,
    cutoff_table,
    paired_t,
    patience_stop,
    rule_comparison,
)
from fakedet.analysis.resampling import METHODS, correlate, fisher_z, t_mean
from fakedet.analysis.summary import adjust, cells_summary, headline
from fakedet.analysis.transfer import transfer_matrix
from fakedet.analysis.variance import variance_decomposition

__all__ = [
    "METHODS", "adjust", "cells_summary", "comparison_headline", "correlate", "correlation_table", "cutoff_summary",
    "cutoff_table", "fisher_z", "headline", "paired_t", "patience_stop", "primary_rows", "rule_comparison", "t_mean",
    "transfer_matrix", "variance_decomposition",
]  # fmt: skip
