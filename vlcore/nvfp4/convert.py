"""``convert(model, policy)``: swap the eligible ``nn.Linear`` layers of a model for :class:`NVFP4Linear`.

What is eligible follows the paper (docs/nvfp4.md, 'Training recipe'): the linear layers inside transformer
blocks, except the last ~15 % of the blocks of each tower (the most sensitive to 4-bit) and optionally the
first few. Embeddings, heads, norms and the attention score / value products are never touched: vlcore's
models keep every transformer block in a ``blocks`` ``nn.ModuleList`` and every matrix in a plain
``nn.Linear``, and only linears inside those blocks are candidates. A candidate whose dimensions are not multiples of 16 stays
high precision and is listed in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from vlcore.nvfp4.linear import NVFP4Linear, NVFP4Recipe, StabilityGuard

__all__ = ["NVFP4Policy", "ConversionReport", "convert"]


@dataclass(frozen=True)
class NVFP4Policy:
    """Which layers to convert, and the recipe they run."""

    keep_last_fraction: float = 0.15  #: fraction of each tower's blocks (rounded up) kept high precision, at the end
    keep_first_blocks: int = 0        #: blocks kept high precision at the start of each tower
    recipe: NVFP4Recipe = NVFP4Recipe()
    blocks_name: str = "blocks"       #: a tower is an nn.ModuleList whose attribute name is this


@dataclass
class ConversionReport:
    """What :func:`convert` did. Names are ``model.named_modules()`` names."""

    converted: list[str] = field(default_factory=list)
    kept_by_policy: list[str] = field(default_factory=list)   #: linears of first / last blocks, high precision
    skipped_shape: list[tuple[str, int, int]] = field(default_factory=list)  #: (name, in, out): not multiples of 16
    outside_blocks: list[str] = field(default_factory=list)   #: linears outside transformer blocks (heads, projections)
    towers: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  #: tower -> (blocks, converted block ids)
    converted_params: int = 0
    linear_params: int = 0
    guard: Optional[StabilityGuard] = None

    @property
    def fraction_converted(self) -> float:
        """Fraction of all linear-layer weights that now run in NVFP4."""
        return self.converted_params / self.linear_params if self.linear_params else 0.0

    def __str__(self) -> str:
        lines = [f"NVFP4 convert: {len(self.converted)} linear layers converted "
                 f"({100 * self.fraction_converted:.1f} % of linear weights)"]
        for tower, (n, ids) in self.towers.items():
            lines.append(f"  {tower}: {n} blocks, NVFP4 in blocks {ids}")
        lines.append(f"  kept high precision by policy: {len(self.kept_by_policy)}; outside blocks: {len(self.outside_blocks)}")
        for name, i, o in self.skipped_shape:
            lines.append(f"  skipped (not multiples of 16): {name} ({i} -> {o})")
        return "\n".join(lines)


def _find_towers(model: nn.Module, blocks_name: str) -> list[tuple[str, nn.ModuleList]]:
    towers = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList) and leaf == blocks_name and len(module) > 0:
            if not any(name.startswith(t + ".") for t, _ in towers):  # the outermost list only
                towers.append((name, module))
    return towers


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def convert(model: nn.Module, policy: Optional[NVFP4Policy] = None, *,
            guard: Optional[StabilityGuard] = None) -> ConversionReport:
    """Replace, in place, the eligible ``nn.Linear`` layers of ``model`` with :class:`NVFP4Linear` (sharing
    their parameters), and return a :class:`ConversionReport`. One :class:`StabilityGuard` (``guard``, or a
    new one, in ``report.guard``) watches every converted layer's output gradient."""
    policy = policy or NVFP4Policy()
    if not 0.0 <= policy.keep_last_fraction <= 1.0 or policy.keep_first_blocks < 0:
        raise ValueError(f"convert: keep_last_fraction must be in [0, 1] and keep_first_blocks >= 0, got {policy}")
    report = ConversionReport(guard=guard or StabilityGuard())
    in_blocks: set[str] = set()
    for tower_name, blocks in _find_towers(model, policy.blocks_name):
        n = len(blocks)
        keep_last = math.ceil(policy.keep_last_fraction * n - 1e-9)
        eligible = [i for i in range(n) if policy.keep_first_blocks <= i < n - keep_last]
        report.towers[tower_name] = (n, eligible)
        for i, block in enumerate(blocks):
            for sub_name, module in list(block.named_modules()):
                if type(module) is not nn.Linear:
                    continue
                full = f"{tower_name}.{i}.{sub_name}" if sub_name else f"{tower_name}.{i}"
                in_blocks.add(full)
                report.linear_params += module.weight.numel()
                if i not in eligible:
                    report.kept_by_policy.append(full)
                elif module.in_features % 16 or module.out_features % 16:
                    report.skipped_shape.append((full, module.in_features, module.out_features))
                else:
                    new = NVFP4Linear.from_linear(module, recipe=policy.recipe, guard=report.guard)
                    _set_submodule(model, full, new)
                    report.converted.append(full)
                    report.converted_params += module.weight.numel()
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name not in in_blocks:
            report.outside_blocks.append(name)
            report.linear_params += module.weight.numel()
    return report
