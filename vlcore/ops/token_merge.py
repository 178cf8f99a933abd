"""Deprecated alias: the ToMe ops moved to :mod:`vlcore.ops.tome`, the pooling ops and the 2x2 merger to
:mod:`vlcore.ops.token_grid`. Import from there (or from :mod:`vlcore.ops`); this module goes in a later
release."""

import warnings

from vlcore.ops.tome import *  # noqa: F401,F403
from vlcore.ops.tome import __all__ as _tome_all
from vlcore.ops.token_grid import *  # noqa: F401,F403
from vlcore.ops.token_grid import __all__ as _grid_all

__all__ = list(_tome_all) + list(_grid_all)

warnings.warn("vlcore.ops.token_merge is deprecated: use vlcore.ops.tome and vlcore.ops.token_grid",
              DeprecationWarning, stacklevel=2)
