"""Old module paths that keep working for one release."""

from __future__ import annotations

import importlib
import sys
import warnings


def moved_module(old: str, new: str) -> None:
    """Make ``import old`` give the module ``new``, with a DeprecationWarning.

    Called at the top of the old module's file: it replaces itself in ``sys.modules``, so the
    two names are one module object (monkeypatching either reaches both).
    """
    warnings.warn(
        f"{old} is deprecated: import {new} (the same module)", DeprecationWarning, stacklevel=3
    )
    sys.modules[old] = importlib.import_module(new)
