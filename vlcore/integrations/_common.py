"""What every patcher shares: the report, the attention call, ToMe's merge step and the NVFP4 step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import vlcore
from vlcore.nn.tome import parse_r


@dataclass
class PatchReport:
    """What a patcher changed in a model, and what it left alone and why (module names are
    ``model.named_modules()`` names)."""

    library: str
    attention: list[str] = field(default_factory=list)  #: attention modules now running vlcore.ops.attention
    tome: dict[str, list[int]] = field(default_factory=dict)  #: tower -> tokens merged per block
    nvfp4: Optional[object] = None  #: vlcore.nvfp4.ConversionReport when NVFP4 was asked for
    left_alone: list[tuple[str, str]] = field(default_factory=list)  #: (module, why)

    def leave(self, name: str, why: str) -> None:
        self.left_alone.append((name, why))

    def __str__(self) -> str:
        lines = [f"vlcore patch of a {self.library} model: vlcore attention in {len(self.attention)} modules"]
        for tower, schedule in self.tome.items():
            lines.append(f"  ToMe in {tower}: r per block {schedule}")
        if self.nvfp4 is not None:
            lines.extend("  " + line for line in str(self.nvfp4).splitlines())
        for name, why in self.left_alone:
            lines.append(f"  left alone: {name or '<model>'}: {why}")
        return "\n".join(lines)


def check_attention_op() -> None:
    if not hasattr(vlcore.ops, "attention"):
        raise RuntimeError("vlcore.integrations: this vlcore build has no vlcore.ops.attention")


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``q``/``k``/``v`` ``[B, L, H, D]`` -> ``[B, L, H, D]`` through ``vlcore.ops.attention``'s dense form;
    ``key_bias [B, L_k]`` is added to every query's logit for that key."""
    return vlcore.ops.attention(q, k, v, causal=causal, scale=scale, key_bias=key_bias)


def size_bias(size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """ToMe's proportional attention: ``log(size)`` on every key's logit (``size [B, N, 1]``)."""
    return None if size is None else size.log()[..., 0]


def tome_merge_step(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor], r: int, *,
                    class_token: bool, distill_token: bool = False):
    """One ToMe merge between attention and MLP: bipartite soft matching on ``metric`` (keys averaged over
    heads), size-weighted average of the merged tokens; the protected tokens stay first."""
    if r <= 0:
        return x, size
    match = vlcore.ops.tome_match(metric, r, class_token=class_token, distill_token=distill_token)
    return vlcore.ops.tome_merge(x, match, size=size, mode="wavg")


def run_tome_blocks(blocks, x: torch.Tensor, schedule: list[int], class_token: bool, checkpointing: bool):
    """Every block's ``forward_tome`` in turn, threading the token sizes; ``checkpointing`` recomputes each
    block in backward (the library's gradient checkpointing switch)."""
    size = None
    for block, r in zip(blocks, schedule):
        if checkpointing and torch.is_grad_enabled():
            x, size = checkpoint(block.forward_tome, x, size, r, class_token, use_reentrant=False)
        else:
            x, size = block.forward_tome(x, size, r, class_token)
    return x


def tome_schedule(num_blocks: int, r, num_tokens: int, protected: int, where: str) -> list[int]:
    """``parse_r`` of ToMe's schedule, checked against the tokens each block has (ToMe's own cap of half the
    mergeable tokens would silently merge fewer; asking for more is a mistake worth an error)."""
    schedule = parse_r(num_blocks, r)
    if len(schedule) > num_blocks:
        raise ValueError(f"{where}: tome_r lists {len(schedule)} blocks, the tower has {num_blocks}")
    for block, value in enumerate(schedule):
        limit = (num_tokens - protected) // 2
        if value < 0 or value > limit:
            raise ValueError(f"{where}: tome_r = {value} at block {block} must be in [0, {limit}] "
                             f"(half of the {num_tokens - protected} mergeable tokens)")
        num_tokens -= value
    return schedule


def swap_class(module: nn.Module, patched: type) -> None:
    """Give ``module`` the behaviour of ``patched`` (a subclass of its class built for it) in place: its
    parameters, buffers and state-dict keys stay exactly as they are (ToMe's ``tome.patch`` does the same)."""
    module.__class__ = patched


def patched_subclass(cls: type, mixin: type) -> type:
    """``mixin`` over ``cls``, one class per (cls, mixin) so that repeated patches reuse it."""
    if issubclass(cls, mixin):
        return cls
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Vlcore{cls.__name__}", (mixin, cls), {})
    return _SUBCLASSES[key]


_SUBCLASSES: dict = {}


def apply_nvfp4(model: nn.Module, nvfp4, blocks_name: str):
    """``vlcore.nvfp4.convert`` over the towers whose blocks live in ``<tower>.<blocks_name>``; ``nvfp4`` is
    True (the default policy) or an ``NVFP4Policy`` whose ``blocks_name`` is replaced by the library's.

    ``convert`` recognises a tower by an ``nn.ModuleList`` of blocks; a library that keeps its blocks in an
    ``nn.Sequential`` (timm) is shown to it through a stand-in root holding the same block objects under a
    ``ModuleList`` of the same name, so the conversions land in the model and the report's names are the
    model's."""
    import dataclasses

    from vlcore.nvfp4 import NVFP4Policy, convert

    policy = NVFP4Policy() if nvfp4 is True else nvfp4
    if not isinstance(policy, NVFP4Policy):
        raise ValueError(f"nvfp4 must be None, True or a vlcore.nvfp4.NVFP4Policy, got {nvfp4!r}")
    policy = dataclasses.replace(policy, blocks_name=blocks_name)
    blocks = getattr(model, blocks_name, None)
    if not isinstance(blocks, nn.Sequential):
        return convert(model, policy)
    root = nn.Module()
    setattr(root, blocks_name, nn.ModuleList(list(blocks)))
    report = convert(root, policy)
    in_blocks = set(report.converted) | set(report.kept_by_policy) | {name for name, _, _ in report.skipped_shape}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name not in in_blocks:
            report.outside_blocks.append(name)
            report.linear_params += module.weight.numel()
    return report
