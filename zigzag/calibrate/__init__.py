"""Offline calibration: statistics measured once per model, saved to a file, read by methods later.

* :func:`measure_sensitivity` (``python -m zigzag.calibrate sensitivity``): each layer's sensitivity
  to compression, the profile of :class:`zigzag.budget.Sensitivity` budgets.
* :func:`stdlib_docstrings`: calibration text that ships with every Python and that no evaluation
  haystack uses.
"""

from zigzag.calibrate.sensitivity import SensitivityConfig, copy_samples, measure_sensitivity, save_profile
from zigzag.calibrate.texts import stdlib_docstrings

__all__ = ["SensitivityConfig", "copy_samples", "measure_sensitivity", "save_profile", "stdlib_docstrings"]
