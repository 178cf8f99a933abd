"""vlcore's kernels inside models built with other libraries, patched in place, one call per library:

- :func:`patch_open_clip` for open_clip's ``CLIP`` (both towers),
- :func:`patch_timm` for timm's ``VisionTransformer`` (with ToMe as ``tome.patch.timm`` applies it),
- :func:`patch_hf` for transformers' ``CLIPModel`` / ``SiglipModel`` (through its attention registry).

Each returns a :class:`PatchReport`. The libraries are imported only when their patcher runs.
"""

from vlcore.integrations._common import PatchReport
from vlcore.integrations.hf import patch_hf
from vlcore.integrations.open_clip import patch_open_clip
from vlcore.integrations.timm import patch_timm

__all__ = ["PatchReport", "patch_hf", "patch_open_clip", "patch_timm"]
