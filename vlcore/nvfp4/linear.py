"""NVFP4Linear: the training recipe of "Pretraining Large Language Models with NVFP4" on vlcore's ops
(docs/nvfp4.md, 'Training recipe').

Per linear layer ``Y = X W^T (+ b)`` with ``X [T, K]``, ``W [N, K]``:

| GEMM | operands |
|---|---|
| forward ``Y = X · W^T`` | X 1x16 RNE; W 16x16 RNE |
| input gradient ``dX = dY · W`` | dY 1x16 stochastic rounding; W^T the same 16x16 codes |
| weight gradient ``dW = dY^T · X`` | dY^T 1x16 RHT + SR; X^T 1x16 RHT + RNE |

Each GEMM runs on NVFP4 operands with FP32 accumulation (:func:`vlcore.ops.nvfp4_gemm`). Forward saves only
the quantized columnwise copies of X and W for the backward pass. Master weights and weight gradients stay
in the parameter dtype. Stochastic rounding draws from (layer seed, step offset): the offset advances on
every forward call, so each step gets fresh, reproducible randomness. Token counts that are not a multiple
of 16 are padded with zero rows internally (zero rows change neither Y nor dW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.ops.nvfp4 import NVFP4Tensor, nvfp4_gemm, nvfp4_quantize

__all__ = ["NVFP4Recipe", "StabilityGuard", "NVFP4Linear", "nvfp4_linear"]


@dataclass(frozen=True)
class NVFP4Recipe:
    """Switches of the recipe, each on by default (the paper's recipe); turn one off for an ablation."""

    rht: bool = True                  #: random Hadamard transform on the weight-gradient GEMM inputs
    stochastic_rounding: bool = True  #: stochastic rounding of the output gradient (both its copies)
    block_2d_weights: bool = True     #: 16x16 weight blocks (W and W^T share codes); else 1x16 per orientation


class StabilityGuard:
    """Counts backward passes whose quantized output gradient is all zero or not finite.

    An all-zero quantized gradient (every code zero, or a zero amax) silently stops learning; it is what
    stochastic rounding produced on some GPUs in other implementations. A non-finite amax, or a NaN in the
    gradient (the amax reduction drops NaN), makes the step's update meaningless. The counts live on the
    gradient's device and are updated without a host synchronisation; reading them syncs.
    """

    def __init__(self) -> None:
        self._events: Optional[torch.Tensor] = None  # [zero, nonfinite, checked]

    def record(self, grad: torch.Tensor, quantized: NVFP4Tensor) -> None:
        with torch.no_grad():
            codes_zero = ~((quantized.codes & 0x77) != 0).any()
            zero = codes_zero | (quantized.amax == 0)
            nonfinite = ~torch.isfinite(quantized.amax) | torch.isnan(grad).any()
            events = torch.stack([zero, nonfinite, torch.ones_like(zero)]).long()
            if self._events is None or self._events.device != events.device:
                self._events = torch.zeros(3, dtype=torch.long, device=events.device)
            self._events += events

    def _count(self, i: int) -> int:
        return 0 if self._events is None else int(self._events[i])

    @property
    def zero_steps(self) -> int:
        return self._count(0)

    @property
    def nonfinite_steps(self) -> int:
        return self._count(1)

    @property
    def checked(self) -> int:
        return self._count(2)

    @property
    def tripped(self) -> bool:
        """True once any checked gradient was all-zero or non-finite."""
        return self.zero_steps > 0 or self.nonfinite_steps > 0

    def reset(self) -> None:
        self._events = None

    def __repr__(self) -> str:
        return f"StabilityGuard(zero_steps={self.zero_steps}, nonfinite_steps={self.nonfinite_steps}, checked={self.checked})"


_GEMM_DTYPES = (torch.float32, torch.bfloat16)


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[0]) % 16
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _quantizable(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in _GEMM_DTYPES else t.float()


class _NVFP4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe: NVFP4Recipe, seed: int, offset: int, guard: Optional[StabilityGuard]):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = _pad_rows(_quantizable(x.reshape(-1, k)))
        tokens = math.prod(lead)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        xq = nvfp4_quantize(x2, rowwise=True, columnwise=need_dw, rht_columnwise=need_dw and recipe.rht)
        wq = nvfp4_quantize(_quantizable(weight), rowwise=True, columnwise=need_dx, block_2d=recipe.block_2d_weights)
        out_dtype = x.dtype if x.dtype in _GEMM_DTYPES else torch.float32
        y = nvfp4_gemm(xq.rowwise, wq.rowwise, out_dtype=out_dtype)[:tokens].to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        saved = []
        saved += [xq.columnwise.codes, xq.columnwise.scales, xq.columnwise.amax] if need_dw else [None] * 3
        saved += [wq.columnwise.codes, wq.columnwise.scales, wq.columnwise.amax] if need_dx else [None] * 3
        ctx.save_for_backward(*saved)
        ctx.recipe, ctx.seed, ctx.offset, ctx.guard = recipe, seed, offset, guard
        ctx.tokens, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = tokens, x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        xt_codes, xt_scales, xt_amax, wt_codes, wt_scales, wt_amax = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        recipe = ctx.recipe
        n = grad_out.shape[-1]
        g2 = grad_out.reshape(-1, n)
        dy = _pad_rows(_quantizable(g2))
        dyq = nvfp4_quantize(dy, rowwise=True, columnwise=need_dw, rht_columnwise=need_dw and recipe.rht,
                             stochastic=recipe.stochastic_rounding, seed=ctx.seed, offset=ctx.offset)
        if ctx.guard is not None:
            ctx.guard.record(g2, dyq.rowwise)
        dx = dw = db = None
        if need_dx:
            gemm_dtype = ctx.x_dtype if ctx.x_dtype in _GEMM_DTYPES else torch.float32
            dx = nvfp4_gemm(dyq.rowwise, NVFP4Tensor(wt_codes, wt_scales, wt_amax), out_dtype=gemm_dtype)
            dx = dx[: ctx.tokens].to(ctx.x_dtype).reshape(ctx.x_shape)
        if need_dw:
            gemm_dtype = ctx.w_dtype if ctx.w_dtype in _GEMM_DTYPES else torch.float32
            dw = nvfp4_gemm(dyq.columnwise, NVFP4Tensor(xt_codes, xt_scales, xt_amax), out_dtype=gemm_dtype)
            dw = dw.to(ctx.w_dtype)
        if need_db and ctx.has_bias:
            db = g2.sum(0)
        return dx, dw, db, None, None, None, None


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 recipe: NVFP4Recipe = NVFP4Recipe(), seed: int = 0, offset: int = 0,
                 guard: Optional[StabilityGuard] = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T + bias`` with the NVFP4 recipe. K and N must be multiples of 16."""
    k, n = weight.shape[1], weight.shape[0]
    if k % 16 or n % 16:
        raise ValueError(f"nvfp4_linear: in_features and out_features must be multiples of 16, got weight of shape {tuple(weight.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"nvfp4_linear: x must have last dim {k} (weight is {tuple(weight.shape)}), got shape {tuple(x.shape)}")
    return _NVFP4LinearFunction.apply(x, weight, bias, recipe, seed, offset, guard)


class NVFP4Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose three GEMMs run in NVFP4 with the paper's recipe.

    It is an ``nn.Linear`` (same parameters and init), so optimizers and code that inspects ``in_features`` keep
    working. ``enabled = False`` runs the plain high-precision layer.

    The state dict adds one int64 buffer, ``sr_state = [seed, step]``, so that a run resumed from a checkpoint
    draws the same stochastic-rounding bits as the uninterrupted run. A state dict without it (a plain
    ``nn.Linear`` checkpoint) loads, strictly too, and leaves seed and step as they are; loading an NVFP4Linear
    state dict into a plain ``nn.Linear`` needs ``strict=False`` (or dropping the ``sr_state`` keys).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recipe: NVFP4Recipe = NVFP4Recipe(),
                 guard: Optional[StabilityGuard] = None, seed: Optional[int] = None, device=None, dtype=None) -> None:
        if in_features % 16 or out_features % 16:
            raise ValueError(f"NVFP4Linear: in_features and out_features must be multiples of 16, got "
                             f"{in_features} and {out_features}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe
        self.guard = guard
        # One Philox key per layer (from torch's generator: reproducible under torch.manual_seed).
        seed = int(torch.randint(0, 2**62, ())) if seed is None else int(seed)
        # Checkpointed copy of (seed, step). The live values are Python ints: reading a CUDA buffer every
        # forward would synchronise with the host; writing it (fill_ of a scalar) does not.
        self.register_buffer("sr_state", torch.tensor([seed, 0], dtype=torch.int64, device=device))
        self._seed = seed
        self._step = 0  # SR offset: advances every forward, so every step draws fresh bits
        self.enabled = True

    @property
    def seed(self) -> int:
        """Philox key of this layer's stochastic rounding."""
        return self._seed

    @property
    def step(self) -> int:
        """SR offset of the next forward call (the number of NVFP4 forward calls so far)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)
        self.sr_state[1].fill_(self._step)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "sr_state"
        given = state_dict.get(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if given is None:  # a plain nn.Linear checkpoint: keep this layer's seed and step
            if key in missing_keys:
                missing_keys.remove(key)
            return
        if isinstance(given, torch.Tensor) and given.shape == (2,) and not given.is_meta:
            # Read from the checkpoint's tensor (usually on the CPU), not from the freshly copied buffer.
            self._seed, self._step = (int(v) for v in given.tolist())

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, recipe: NVFP4Recipe = NVFP4Recipe(),
                    guard: Optional[StabilityGuard] = None, seed: Optional[int] = None) -> "NVFP4Linear":
        """An NVFP4Linear that shares ``linear``'s parameter objects (optimizer state stays attached)."""
        seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        with torch.device("meta"):  # no throw-away initialisation: the parameters are replaced below
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe=recipe, guard=guard,
                      seed=seed)
        new.weight = linear.weight
        new.bias = linear.bias
        new.sr_state = torch.tensor([seed, 0], dtype=torch.int64, device=linear.weight.device)
        return new

    # torch.compile runs this layer eagerly (a graph break per layer): the step counter is a Python int
    # that changes every call, which would otherwise force a recompilation every step.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        offset = self.step
        self.step = offset + 1
        return nvfp4_linear(x, self.weight, self.bias, recipe=self.recipe, seed=self.seed, offset=offset,
                            guard=self.guard)

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"{super().extra_repr()}, rht={r.rht}, stochastic_rounding={r.stochastic_rounding}, "
                f"block_2d_weights={r.block_2d_weights}")
