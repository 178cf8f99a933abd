"""vlcore's ops: thin wrappers over ``torch.ops.vlcore.*``, one module per op family."""

from vlcore.ops.seq_pack import pack, scatter_image_embeds, unpack
from vlcore.ops.tome import tome_match, tome_match_varlen, tome_merge, tome_source, tome_track, tome_unmerge
from vlcore.ops.token_grid import patch_merge_2x2, patch_merge_2x2_varlen, token_pool_2d, token_pool_2d_varlen
from vlcore.ops.nvfp4 import hadamard_transform, nvfp4_dequantize, nvfp4_gemm, nvfp4_quantize
from vlcore.ops.attention import attention

__all__ = [
    "pack", "unpack", "scatter_image_embeds",
    "attention",
    "tome_match", "tome_match_varlen", "tome_merge", "tome_unmerge", "tome_source", "tome_track",
    "token_pool_2d", "token_pool_2d_varlen", "patch_merge_2x2", "patch_merge_2x2_varlen",
    "nvfp4_quantize", "nvfp4_dequantize", "nvfp4_gemm", "hadamard_transform",
]
