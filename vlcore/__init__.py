"""vlcore: fused kernels and models for vision-language pre-training.

Ops live in :mod:`vlcore.ops` (``torch.ops.vlcore.*`` with Python fakes and autograd), the packing
planner and batch builder in :mod:`vlcore.packing`.
"""

import torch  # noqa: F401  (first: _C's shared-library dependencies resolve to the torch already loaded)

from vlcore import _C

__version__ = "0.1.0"

#: True when this build compiled the CUDA kernels (see README, "Building with CUDA").
WITH_CUDA: bool = bool(_C.with_cuda)


def cuda_available() -> bool:
    """Whether this vlcore build has CUDA kernels. A GPU being present is ``torch.cuda.is_available()``."""
    return WITH_CUDA


from vlcore import ops, packing  # noqa: E402

__all__ = ["WITH_CUDA", "cuda_available", "ops", "packing", "__version__"]
