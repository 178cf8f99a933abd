"""Bottleneck adapters (VL-Adapter) and VL-PET's granularity-controlled modifications.

**VL-Adapter** (Sung et al., "VL-Adapter: Parameter-Efficient Transfer Learning for Vision-and-Language
Tasks", CVPR 2022): after each sub-layer (attention, MLP) of a block, ``h <- h + up(GELU(down(h)))`` with a
bottleneck of ``width / reduction`` channels. With several tasks an adapter is either *shared* by all of them
(one set, the paper's best trade-off), *per task*, or *half-shared* (one down-projection for all tasks, an
up-projection per task). ``up`` starts at zero, so the adapted model starts as the base model.

**VL-PET** (Hu et al., "VL-PET: Vision-and-Language Parameter-Efficient Tuning via Granularity Control",
ICCV 2023) controls such a modification with a matrix ``G``: for a sub-layer with input ``u`` (the normalised
block state it reads) and output ``h``, the encoder design computes ``h' = h + Adapter(h)`` and returns
``G * h'``, where ``G`` has one of four granularities:

========== ============== ========================================================================
name        shape           generated as
========== ============== ========================================================================
large       ``[N, d]``      ``sigmoid(up(GELU(down(u))))``, a low-rank bottleneck on the input
middle_x    ``[N, 1]``      ``sigmoid(w . (u + h') + b)``: one weight per token
middle_y    ``[1, d]``      ``1 + g``, a learned vector ``g`` (N(0, 0.02)): one weight per channel
small       ``[1, 1]``      ``mean over tokens of sigmoid(w . [u; h'] + b)``: one weight per sequence
========== ============== ========================================================================

(The paper names the two middle granularities VL-PET-middle_X and VL-PET-middle_Y; there is no finer
"x-small" one.) ``small`` averages over every position of a dense row, padding included, as the authors'
code does; it refuses packed ``[T, C]`` inputs, where a row mean would mix samples. The **decoder design**
keeps text generation intact with a lighter touch: no gate and no sequential adapter, only a parallel
adapter on the attention's value projection, ``V = W_v x + up(GELU(down(x)))`` (the authors put it on the
decoder's encoder-attention; vlcore's causal LMs have only self-attention, so it goes there).

Every modification attaches as a child module of the sub-layer it changes and enters through a forward
hook, so base parameter names do not change.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

GRANULARITIES = ("large", "middle_x", "middle_y", "small")
SHARING = ("shared", "per_task", "half")
SHARED_KEY = "shared"


class TaskAdapter(nn.Module):
    """A bottleneck adapter with VL-Adapter's sharing across ``tasks``: ``shared`` (one down/up pair),
    ``per_task`` (a pair per task) or ``half`` (shared down, an up per task). ``active_task`` selects the
    task whose weights run (see :func:`vlcore.peft.set_active_task`)."""

    def __init__(self, width: int, bottleneck: int, tasks: Sequence[str] = (), sharing: str = "shared",
                 out_width: Optional[int] = None):
        super().__init__()
        if sharing not in SHARING:
            raise ValueError(f"adapter sharing must be one of {SHARING}, got {sharing!r}")
        if sharing != "shared" and not tasks:
            raise ValueError(f"adapter sharing {sharing!r} needs the task names (tasks=...)")
        if bottleneck <= 0:
            raise ValueError(f"adapter bottleneck must be positive, got {bottleneck}")
        self.sharing, self.tasks = sharing, list(tasks)
        self.active_task = self.tasks[0] if self.tasks else SHARED_KEY
        out_width = width if out_width is None else out_width
        down_keys = [SHARED_KEY] if sharing in ("shared", "half") else self.tasks
        up_keys = [SHARED_KEY] if sharing == "shared" else self.tasks
        self.down = nn.ModuleDict({k: nn.Linear(width, bottleneck) for k in down_keys})
        self.up = nn.ModuleDict({k: nn.Linear(bottleneck, out_width) for k in up_keys})
        for up in self.up.values():
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def _key(self, table: nn.ModuleDict) -> str:
        if SHARED_KEY in table:
            return SHARED_KEY
        if self.active_task not in table:
            raise ValueError(f"adapter: unknown task {self.active_task!r}; tasks are {self.tasks}")
        return self.active_task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up[self._key(self.up)](F.gelu(self.down[self._key(self.down)](x)))


class GranularityGate(nn.Module):
    """VL-PET's control matrix ``G(u, h')`` at one granularity (table in the module docstring)."""

    def __init__(self, width: int, granularity: str, bottleneck: int):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"VL-PET granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        if granularity == "large":
            self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        elif granularity == "middle_x":
            self.proj = nn.Linear(width, 1)
        elif granularity == "middle_y":
            self.scale = nn.Parameter(0.02 * torch.randn(width))
        else:
            self.proj = nn.Linear(2 * width, 1)

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        g = self.granularity
        if g == "large":
            return torch.sigmoid(self.up(F.gelu(self.down(u))))
        if g == "middle_x":
            return torch.sigmoid(self.proj(u + h))
        if g == "middle_y":
            return 1.0 + self.scale.to(h.dtype)
        if h.dim() < 3:
            raise ValueError("VL-PET granularity 'small' averages over each sequence and needs dense [B, L, C] "
                             "states, not packed [T, C] ones")
        return torch.sigmoid(self.proj(torch.cat([u, h], dim=-1))).mean(dim=-2, keepdim=True)


class SublayerModification(nn.Module):
    """What a hooked sub-layer's output becomes: ``h + Adapter(h)`` (VL-Adapter) or, with a ``gate``,
    ``G(u, h') * h'`` with ``h' = h + Adapter(h)`` (VL-PET's encoder design)."""

    def __init__(self, adapter: TaskAdapter, gate: Optional[GranularityGate] = None):
        super().__init__()
        self.adapter, self.gate = adapter, gate

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h = h + self.adapter(h).to(h.dtype)
        return h if self.gate is None else self.gate(u, h).to(h.dtype) * h


def _sublayer_hook(module: nn.Module, args, kwargs, output):
    u = args[0] if args else kwargs["x"]
    if isinstance(output, tuple):  # SelfAttention(return_keys=True): (output, keys)
        return (module.peft_modification(u, output[0]),) + tuple(output[1:])
    return module.peft_modification(u, output)


def modify_sublayer(sublayer: nn.Module, modification: SublayerModification) -> None:
    """Attach ``modification`` to an attention or MLP module (in place)."""
    if hasattr(sublayer, "peft_modification"):
        raise ValueError("modify_sublayer: this sub-layer is already modified")
    sublayer.add_module("peft_modification", modification)
    sublayer.register_forward_hook(_sublayer_hook, with_kwargs=True)


def _value_hook(module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
    value = module.value_adapter(args[0]).to(output.dtype)
    width = value.shape[-1]
    return torch.cat([output[..., :-width], output[..., -width:] + value], dim=-1)


def add_value_adapter(qkv: nn.Linear, value_width: int, bottleneck: int, tasks: Sequence[str] = (),
                      sharing: str = "shared") -> TaskAdapter:
    """VL-PET's decoder design on a fused ``[q; k; v]`` projection: a parallel adapter from the projection's
    input onto its last ``value_width`` output channels (the values)."""
    if hasattr(qkv, "value_adapter"):
        raise ValueError("add_value_adapter: this projection already carries a value adapter")
    adapter = TaskAdapter(qkv.in_features, bottleneck, tasks, sharing, out_width=value_width)
    adapter.to(device=qkv.weight.device, dtype=qkv.weight.dtype)
    qkv.add_module("value_adapter", adapter)
    qkv.register_forward_hook(_value_hook)
    return adapter


__all__ = ["TaskAdapter", "GranularityGate", "SublayerModification", "modify_sublayer",
           "add_value_adapter", "GRANULARITIES", "SHARING"]
