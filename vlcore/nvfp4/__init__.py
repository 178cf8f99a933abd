"""NVFP4 training: :class:`NVFP4Linear` (the paper's recipe on vlcore's NVFP4 ops), :func:`convert` for whole
models, and the :class:`StabilityGuard`. The ops themselves are in :mod:`vlcore.ops.nvfp4`."""

from vlcore.nvfp4.convert import ConversionReport, NVFP4Policy, convert
from vlcore.nvfp4.linear import NVFP4Linear, NVFP4Recipe, StabilityGuard, nvfp4_linear

__all__ = ["NVFP4Linear", "NVFP4Recipe", "StabilityGuard", "nvfp4_linear", "convert", "NVFP4Policy",
           "ConversionReport"]
