"""vlcore's ops: thin wrappers over ``torch.ops.vlcore.*``, one module per op family."""

from vlcore.ops.seq_pack import pack, scatter_image_embeds, unpack
from vlcore.ops.token_merge import (patch_merge_2x2, patch_merge_2x2_varlen, token_pool_2d, token_pool_2d_varlen,  # noqa: F401
                                    tome_match, tome_match_varlen, tome_merge, tome_source, tome_track, tome_unmerge)

__all__ = ["pack", "unpack", "scatter_image_embeds"]
