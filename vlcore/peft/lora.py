"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) on ``nn.Linear``.

``y = W x + b + (alpha / r) * B A dropout(x)`` with ``A [r, in]`` (Kaiming-uniform, as the paper's code) and
``B [out, r]`` zero-initialised, so a freshly adapted model computes exactly what the base model does. The
low-rank pair lives in a child module ``lora`` of the adapted linear and enters through a forward hook: the
base weights keep their names in the state dict (a base checkpoint still loads), and merging writes
``W + (alpha / r) B A`` into the weight and removes both, leaving a plain ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraDelta(nn.Module):
    """The low-rank update ``(alpha / r) * up(down(dropout(x)))`` of one ``in -> out`` linear map."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA: rank must be positive, got {rank}")
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``, ``[out, in]``, in float32 or wider."""
        up, down = self.up.weight, self.down.weight
        dtype = torch.promote_types(up.dtype, torch.float32)
        return (up.to(dtype) @ down.to(dtype)) * self.scaling


def _lora_hook(module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
    return output + module.lora(args[0]).to(output.dtype)


def add_lora(linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoraDelta:
    """Attach a zero-initialised LoRA update to ``linear`` (in place); returns it."""
    if hasattr(linear, "lora"):
        raise ValueError("add_lora: this linear layer already carries a LoRA update")
    delta = LoraDelta(linear.in_features, linear.out_features, rank, alpha, dropout)
    delta.to(device=linear.weight.device, dtype=linear.weight.dtype)
    linear.add_module("lora", delta)
    linear.register_forward_hook(_lora_hook)
    return delta


def remove_hook(module: nn.Module, hook) -> None:
    """Drop every registration of ``hook`` from ``module``'s forward hooks (the handle may not survive a
    deepcopy of the model; the dictionaries do)."""
    for key, fn in list(module._forward_hooks.items()):
        if fn is hook:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)


@torch.no_grad()
def merge_lora_linear(linear: nn.Linear) -> None:
    """Write the update into ``linear.weight`` and remove the LoRA module and its hook."""
    delta = linear.lora.delta_weight()
    linear.weight.copy_((linear.weight.to(delta.dtype) + delta).to(linear.weight.dtype))
    remove_hook(linear, _lora_hook)
    del linear.lora


__all__ = ["LoraDelta", "add_lora", "merge_lora_linear", "remove_hook"]
