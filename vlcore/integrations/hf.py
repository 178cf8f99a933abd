"""``patch_hf``: vlcore's attention (and optionally NVFP4) inside Hugging Face ``CLIPModel`` / ``SiglipModel``.

No class is replaced: transformers dispatches every attention call through its attention-implementation
registry (``AttentionInterface``), keyed by ``config._attn_implementation``. The patcher registers
``"vlcore"`` there (and in ``AttentionMaskInterface``, with the boolean masks of ``"sdpa"``) and switches the
model to it, so both towers' attention modules call :func:`vlcore_attention_forward`.

The masks these models build are causal and/or key padding: the last query row of such a mask holds exactly
the keys any row may see besides causality, so it becomes the op's ``key_bias`` (0 or -inf per key) and
causality the op's ``causal``. Calls the op does not cover (attention dropout while training) go to
transformers' own ``"sdpa"`` function.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlcore.integrations._common import PatchReport, apply_nvfp4, check_attention_op, dense_attention

IMPLEMENTATION = "vlcore"


def vlcore_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: ``query``/``key``/``value`` ``[B, H, L, D]``, a 4D mask
    ``[B, 1, Lq, Lk]`` (bool: True attends; float: additive) or None; returns ``([B, Lq, H, D], None)``."""
    if dropout > 0.0:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    key_bias = None
    if attention_mask is not None:
        last_row = attention_mask[:, 0, -1, :]
        if last_row.dtype == torch.bool:
            key_bias = torch.zeros(last_row.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~last_row, float("-inf"))
        else:
            key_bias = last_row.to(query.dtype)
        key_bias = key_bias.expand(query.shape[0], -1)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = dense_attention(q, k, v, causal=causal and query.shape[2] > 1, scale=scaling, key_bias=key_bias)
    return out, None


def register() -> bool:
    """Register ``"vlcore"`` in transformers' attention registries; False when this transformers has none."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(IMPLEMENTATION, vlcore_attention_forward)
    try:  # releases that build masks per implementation (masking_utils); older ones build additive float masks
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return True
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return True


def _attention_modules(model: nn.Module):
    for name, module in model.named_modules():
        if all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj")) and hasattr(module, "config"):
            yield name, module


def patch_hf(model: nn.Module, *, tome_r=None, nvfp4=None) -> PatchReport:
    """Switch a transformers ``CLIPModel`` / ``SiglipModel`` (or one of their towers) to vlcore's attention
    in place; returns a :class:`PatchReport`. ``nvfp4`` (True or a ``vlcore.nvfp4.NVFP4Policy``) converts the
    encoder layers' linear layers. ToMe is not offered here: it changes the token count inside the encoder
    layer, which transformers' registry does not reach."""
    check_attention_op()
    if tome_r is not None:
        raise ValueError("patch_hf: ToMe is not supported for transformers models (it needs the encoder layers' "
                         "forward, not only the attention function); use patch_open_clip / patch_timm")
    if not register():
        raise RuntimeError("patch_hf: this transformers has no AttentionInterface registry (transformers >= 4.48 has)")
    report = PatchReport("transformers")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(IMPLEMENTATION)
    else:
        model.config._attn_implementation = IMPLEMENTATION
    for name, module in _attention_modules(model):
        if getattr(module.config, "_attn_implementation", None) == IMPLEMENTATION:
            report.attention.append(name)
        else:
            report.leave(name, f"its config kept attn_implementation {module.config._attn_implementation!r}")
    if not report.attention:
        raise ValueError(f"patch_hf: no attention module of {type(model).__name__} uses the attention registry")
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            report.leave(name, "nn.MultiheadAttention (SigLIP's attention-pooling head), outside the registry")
    if nvfp4:
        report.nvfp4 = apply_nvfp4(model, nvfp4, "layers")
    return report
