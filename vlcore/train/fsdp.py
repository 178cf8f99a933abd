"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for large models: parameters, gradients and optimizer state
sharded over the ranks, one all-gather per transformer block.

FSDP2 cannot shard 0-dim parameters (the logit scale and bias, FIBER's cross-attention gates), so modules that
hold one stay replicated: their gradients are averaged here with one all-reduce each, which is exactly what
DDP would do for them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _has_scalar_parameter(module: nn.Module) -> bool:
    return any(p.dim() == 0 for p in module.parameters())


def shard_model(model: nn.Module) -> nn.Module:
    """Shard every transformer block, then every top-level child, that holds no 0-dim parameter."""
    from torch.distributed.fsdp import fully_shard

    from vlcore.nn.transformer import Block

    for block in model.modules():
        if isinstance(block, Block) and not _has_scalar_parameter(block):
            fully_shard(block)
    for child in model.children():
        if any(True for _ in child.parameters()) and not _has_scalar_parameter(child):
            fully_shard(child)
    return model


def all_reduce_replicated_grads(model: nn.Module, world_size: int) -> None:
    """Average the gradients of the parameters FSDP left replicated (plain tensors, not DTensors)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce(p.grad)
            p.grad /= world_size


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on CPU (a collective: every rank calls it; rank 0 gets them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
