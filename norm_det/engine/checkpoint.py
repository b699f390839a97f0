"""Deprecated: the training checkpointer is :mod:`norm_det.engine.checkpointer`."""

from norm_det.utils.deprecation import moved_module

moved_module(__name__, "norm_det.engine.checkpointer")
