"""Deprecated: the process-group helpers are :mod:`norm_det.utils.comm`."""

from norm_det.utils.deprecation import moved_module

moved_module(__name__, "norm_det.utils.comm")
