"""Old import paths kept working: a module that re-exports names which now live elsewhere, with a warning.

``vlcore.train.main`` (now :mod:`vlcore.train.cli` and :mod:`vlcore.train.builders`) and
``vlcore.train.evaluate`` (now :mod:`vlcore.train.cli` and :mod:`vlcore.train.metrics`) use this through a
module-level ``__getattr__`` (PEP 562), so the warning names the import that should change.
"""

from __future__ import annotations

import importlib
import warnings


def moved_getattr(old_module: str, new_homes: dict[str, str]):
    """A module ``__getattr__`` that resolves ``name`` at ``new_homes[name]`` (``"module"`` or, for a renamed
    object, ``"module:new_name"``) and warns on every access."""

    def __getattr__(name: str):
        home = new_homes.get(name)
        if home is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module, _, new_name = home.partition(":")
        new_name = new_name or name
        warnings.warn(f"{old_module}.{name} moved to {module}.{new_name}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), new_name)

    return __getattr__
