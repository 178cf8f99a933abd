"""Modules for the VLP models (layer two of ops -> nn -> models). Each takes ``impl="vlcore"|"torch"``;
the kernel calls are all in :mod:`vlcore.nn.backend`."""

from vlcore.nn.attention import CrossAttention, KVCache, SelfAttention
from vlcore.nn.transformer import Block, Mlp, QuickGELU

__all__ = ["SelfAttention", "CrossAttention", "KVCache", "Block", "Mlp", "QuickGELU"]
