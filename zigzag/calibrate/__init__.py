"""Offline calibration: statistics measured once per model, saved to a file, read by methods later.

* :func:`measure_sensitivity` (``python -m zigzag.calibrate sensitivity``): each layer's sensitivity
  to compression, the profile of :class:`zigzag.budget.Sensitivity` budgets.
* :func:`fit_qfilters` (``python -m zigzag.calibrate qfilters``): each attention head's main query
  direction, the filters of :class:`zigzag.scorers.qfilters.QFilters`; :func:`save_qfilters` / :func:`load_qfilters`.
* :func:`measure_head_patterns` (``python -m zigzag.calibrate duo``): each KV head's deviation when it
  only sees the sinks and the recent tokens, the profile of :class:`zigzag.budget.DuoAttention`.
* :func:`stdlib_docstrings`: calibration text that ships with every Python and that no evaluation
  haystack uses.
"""

from zigzag.calibrate.duo import DuoConfig, calibrate_duo, measure_head_patterns, pattern_summary
from zigzag.calibrate.qfilters import QFilterConfig, QFilterProfile, fit_qfilters, load_qfilters, save_qfilters
from zigzag.calibrate.sensitivity import SensitivityConfig, copy_samples, measure_sensitivity, save_profile
from zigzag.calibrate.texts import stdlib_docstrings

__all__ = [
    "DuoConfig",
    "QFilterConfig",
    "QFilterProfile",
    "SensitivityConfig",
    "calibrate_duo",
    "copy_samples",
    "fit_qfilters",
    "load_qfilters",
    "measure_head_patterns",
    "measure_sensitivity",
    "pattern_summary",
    "save_profile",
    "save_qfilters",
    "stdlib_docstrings",
]
