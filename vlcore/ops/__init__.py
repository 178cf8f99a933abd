"""vlcore's ops: thin wrappers over ``torch.ops.vlcore.*``, one module per op family."""

from vlcore.ops.seq_pack import pack, scatter_image_embeds, unpack
from vlcore.ops.nvfp4 import hadamard_transform, nvfp4_dequantize, nvfp4_gemm, nvfp4_quantize  # noqa: F401,E501

__all__ = ["pack", "unpack", "scatter_image_embeds"]
