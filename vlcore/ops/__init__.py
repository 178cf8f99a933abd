"""vlcore's ops: thin wrappers over ``torch.ops.vlcore.*``, one module per op family."""

from vlcore.ops.seq_pack import pack, scatter_image_embeds, unpack
from vlcore.ops.attention import attention  # noqa: E402

__all__ = ["pack", "unpack", "scatter_image_embeds"]
__all__ += ["attention"]
