"""Fused softmax attention over varlen segments: cross- and self-attention, forward and backward.

Packed layout (flash-attn varlen; docs/attention.md):

- ``q [total_q, Hq, D]``, ``k``/``v`` ``[total_k, Hkv, D]``, ``Hq`` a multiple of ``Hkv`` (GQA / MQA);
- ``cu_seqlens_q [Sq + 1]`` / ``cu_seqlens_k [Sk + 1]``: int32 with a leading 0, on q's device;
  query segment ``i`` is rows ``cu_seqlens_q[i] .. cu_seqlens_q[i+1] - 1`` and attends to key segment
  ``kv_segment[i]`` (default ``i``, then ``Sq == Sk``); q and k segments have independent lengths;
- ``max_seqlen_q`` / ``max_seqlen_k``: Python ints bounding the segment lengths (they size the CUDA grid).
  They must be true upper bounds, as in flash-attn: the CPU kernel checks them and raises a ValueError
  naming the argument. The CUDA kernels cannot check without a host sync; their CTAs loop over the tiles a
  segment really has, so an understated bound still gives every output (just fewer CTAs in parallel). Pass
  ``validate=True`` to check every value on the host (ValueError naming the argument) while debugging a
  data pipeline.

Semantics:

- ``causal`` aligns the mask bottom-right like flash-attn: row ``r`` of a segment with ``nq`` queries and
  ``nk`` keys sees keys ``j <= r + nk - nq``.
- ``key_bias`` ``[total_k]`` or ``[total_k, Hq]`` is added to the scaled logits inside the softmax (ToMe's
  proportional attention adds ``log(size)``; ``-inf`` masks a key). It is differentiable.
- ``key_lengths`` int32 ``[Sq]``: query segment ``i`` reads only the first ``key_lengths[i]`` keys of its
  key segment (values clamped to ``[0, nk]``); the causal alignment still uses ``nk``.
- A query row that sees no key (a segment with zero keys, a causal row above the diagonal, every key
  masked) gets ``out = 0`` and ``lse = -inf``; its gradients are 0. Segments with zero queries produce
  nothing.
- ``lse [Hq, total_q]`` (natural log of the softmax denominator) is float32, float64 for float64 inputs.

Dtypes: float16 / bfloat16 on CUDA (float32 accumulation, head dims 32, 64, 72, 80, 96, 128); on CPU also
float32 and float64 (the exact reference: float32 arithmetic for 16-bit inputs, float64 for float64, any
head dim). Under autocast the op casts its inputs itself and runs with autocast off (see "Autocast" below):
on CUDA q, k, v go to the autocast dtype; on CPU they keep their (common) dtype, so the reference stays exact.
Inputs of any alignment are taken: a view at an odd storage offset is copied once to an aligned buffer for
the CUDA kernels' 16-byte loads (decided on the host from ``data_ptr``, no sync).

Backward: ``dq``, ``dk``, ``dv`` and ``d key_bias`` (when it requires grad). With ``kv_segment``, ``dk``/``dv``
and ``d key_bias`` sum over every query segment that reads a key segment. On CUDA, when ``max_seqlen_k``
is at most 256 (head dims up to 64; 128 above), one CTA holds a whole key segment and computes dK, dV and
dQ in one pass without atomics (deterministic; an image's K/V is read once for all the text segments of
``kv_segment`` reading it). Longer keys take tiled kernels: ``dq`` by float32 atomics by default, or, with
``deterministic=True`` (or, when ``deterministic`` is left at None,
``torch.use_deterministic_algorithms(True)``), by a second pass over the key tiles that recomputes the
``Lq x Lk`` products ``QK^T`` and ``dO V^T`` (about 1.4x the backward's matmul work), bitwise reproducible.
The environment variable ``VLCORE_ATTENTION_SHORT_BACKWARD=0`` turns the short-key kernel off (the tests
reach the tiled kernels on short shapes with it). The CPU backward is always deterministic.

Value checks: the CPU kernels check every value of the index tensors. The CUDA kernels clamp what they
read so that they never go out of bounds, but checking values there would need a host sync, so pass
``validate=True`` to check on the host (a sync on GPU; use it when debugging a data pipeline).

Dispatch (``backend=``): plain self-attention on long segments runs torch's own kernels through this same
function (SDPA for the dense form, ``varlen_attn`` for packed batches where this torch has it), with their
autograd; see the "Dispatch" section below for what is eligible and where the switch point lies.
``return_lse=True``, ``key_bias``, ``key_lengths`` and ``kv_segment`` always take the vlcore kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from vlcore.ops._validate import check_cu_seqlens

__all__ = ["attention", "attention_ref", "set_attention_backend", "BACKENDS", "LIBRARY_MIN_SEQLEN"]

_OP = "vlcore.ops.attention"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor] = None,
              cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
              max_seqlen_k: Optional[int] = None, *, causal: bool = False, scale: Optional[float] = None,
              key_bias: Optional[torch.Tensor] = None, kv_segment: Optional[torch.Tensor] = None,
              return_lse: bool = False, key_lengths: Optional[torch.Tensor] = None,
              deterministic: Optional[bool] = None, validate: bool = False, backend: Optional[str] = None):
    """Softmax attention ``softmax(scale * q k^T + key_bias) v`` per segment (see the module docstring).

    Packed form: ``q [total_q, Hq, D]``, ``k``/``v`` ``[total_k, Hkv, D]`` with ``cu_seqlens_q``,
    ``cu_seqlens_k``, ``max_seqlen_q``, ``max_seqlen_k``; returns ``out [total_q, Hq, D]`` (and
    ``lse [Hq, total_q]`` with ``return_lse``).

    Dense form (``cu_seqlens_q=None``): ``q [B, Lq, Hq, D]``, ``k``/``v`` ``[B, Lk, Hkv, D]``, optional int32
    ``key_lengths [B]`` masking keys ``>= key_lengths[b]`` and ``key_bias [B, Lk]`` or ``[B, Lk, Hq]``;
    returns ``out [B, Lq, Hq, D]`` (and ``lse [B, Hq, Lq]``).

    ``scale`` defaults to ``1 / sqrt(D)``. ``deterministic=None`` follows
    ``torch.are_deterministic_algorithms_enabled()``; True or False chooses the CUDA backward explicitly.
    ``backend``: ``"auto"``, ``"vlcore"`` or ``"library"`` (see "Dispatch" in the module docstring); None
    uses the process-wide choice of :func:`set_attention_backend` (``"auto"`` unless changed).
    """
    if q.dim() == 0 or q.shape[-1] == 0:
        raise ValueError(f"{_OP}: head_dim (q's last dimension) must be >= 1, got q of shape {tuple(q.shape)}")
    backend = _backend if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend must be one of {BACKENDS}, got {backend!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    deterministic = bool(deterministic)
    if cu_seqlens_q is None:
        return _dense_attention(q, k, v, causal=causal, scale=scale, key_bias=key_bias, key_lengths=key_lengths,
                                kv_segment=kv_segment, cu_seqlens_k=cu_seqlens_k, return_lse=return_lse,
                                deterministic=deterministic, validate=validate, backend=backend)
    if cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
        raise ValueError(f"{_OP}: the packed form needs cu_seqlens_q, cu_seqlens_k, max_seqlen_q and max_seqlen_k")
    if validate:
        _validate_packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_segment)
    library = _packed_library_kernel(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, key_bias, kv_segment,
                                     key_lengths, return_lse, deterministic, backend)
    if library is not None:
        return library(q, k, v, cu_seqlens_q, int(max_seqlen_q), causal=causal, scale=float(scale))
    out, lse = torch.ops.vlcore.attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                                  int(max_seqlen_k), key_bias, kv_segment, key_lengths, causal,
                                                  float(scale), deterministic)
    return (out, lse) if return_lse else out


def _dense_attention(q, k, v, *, causal, scale, key_bias, key_lengths, kv_segment, cu_seqlens_k, return_lse,
                     deterministic, validate, backend):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{_OP}: the dense form takes q [B, Lq, Hq, D] and k, v [B, Lk, Hkv, D], got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (pass cu_seqlens_q for the "
                         "packed form)")
    if cu_seqlens_k is not None or kv_segment is not None:
        raise ValueError(f"{_OP}: cu_seqlens_k and kv_segment belong to the packed form; pass cu_seqlens_q too")
    batch, len_q, heads_q, head_dim = q.shape
    len_k = k.shape[1]
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"{_OP}: k and v must have q's batch size {batch}, got {k.shape[0]} and {v.shape[0]}")
    if key_bias is not None:
        if key_bias.shape[:2] != (batch, len_k) or key_bias.dim() not in (2, 3):
            raise ValueError(f"{_OP}: dense key_bias must have shape [B, Lk] or [B, Lk, Hq] = [{batch}, {len_k}, "
                             f"{heads_q}], got {tuple(key_bias.shape)}")
        key_bias = key_bias.flatten(0, 1)
    if key_lengths is not None and (key_lengths.dtype != torch.int32 or key_lengths.shape != (batch,)):
        raise ValueError(f"{_OP}: key_lengths must be int32 of shape [B] = [{batch}], got {key_lengths.dtype} "
                         f"{tuple(key_lengths.shape)}")
    if _dense_uses_library(q, k, v, causal, key_bias, key_lengths, return_lse, deterministic, backend):
        return _sdpa(q, k, v, causal=causal, scale=scale)
    # B = 0 is one empty segment (cu = [0, 0]): the op still checks every shape and gives empty results.
    steps = torch.arange(max(batch, 1) + 1, device=q.device, dtype=torch.int32)
    cu_q, cu_k = steps * len_q if batch else steps * 0, steps * len_k if batch else steps * 0
    out, lse = torch.ops.vlcore.attention_forward(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k,
                                                  len_q, len_k, key_bias, None, key_lengths if batch else None,
                                                  causal, float(scale), deterministic)
    out = out.unflatten(0, (batch, len_q))
    return (out, lse.unflatten(1, (batch, len_q)).transpose(0, 1)) if return_lse else out


# ---------------------------------------------------------------------------------------------------------
# Dispatch: plain self-attention on long segments goes to torch's own kernels (SDPA's cuDNN / FlashAttention
# / memory-efficient backends for the dense form, varlen_attn for packed batches), whose speed there vlcore
# does not try to beat. Eligible: no key_bias, no key_lengths, no kv_segment, no lse asked for (the library
# kernels do not return it through autograd), and a deterministic backward not asked for on CUDA; dense
# causal calls also need Lq == Lk (SDPA's causal mask is top-left aligned, vlcore's bottom-right) and packed
# calls the same cu_seqlens tensor for q and k (self-attention: every segment has as many keys as queries).
# "auto" takes the library kernel when eligible and the segments are at least LIBRARY_MIN_SEQLEN long (or
# when the vlcore kernels cannot take the input, e.g. float32 on CUDA); "library" whenever eligible;
# "vlcore" never.

BACKENDS = ("auto", "vlcore", "library")
#: Segment length from which "auto" prefers the library kernel. Not yet measured on a GPU: the switch point
#: is the shortest length where bench_attention.py's "self-attn" rows show vlcore slower than the best peer
#: (python benchmarks/bench_attention.py --check --part dense).
LIBRARY_MIN_SEQLEN = 512
_backend = "auto"


def set_attention_backend(backend: str) -> str:
    """Set the process-wide default of ``attention(..., backend=None)``; returns the previous one."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend must be one of {BACKENDS}, got {backend!r}")
    previous, _backend = _backend, backend
    return previous


def _vlcore_can_run(q) -> bool:
    return q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16)


def _plain(key_bias, key_lengths, return_lse, deterministic, device, backend) -> bool:
    # Under CPU autocast the op stays on its exact reference (SDPA would compute in the autocast dtype).
    return (backend != "vlcore" and key_bias is None and key_lengths is None and not return_lse
            and not (deterministic and device.type == "cuda")
            and not (device.type == "cpu" and torch.is_autocast_enabled("cpu")))


def _dense_uses_library(q, k, v, causal, key_bias, key_lengths, return_lse, deterministic, backend) -> bool:
    len_q, len_k = q.shape[1], k.shape[1]
    if not _plain(key_bias, key_lengths, return_lse, deterministic, q.device, backend):
        return False
    if q.shape[0] == 0 or len_q == 0 or len_k == 0 or (causal and len_q != len_k):
        return False
    if q.shape[2] % k.shape[2] != 0 or k.shape != v.shape or k.shape[3] != q.shape[3] or q.dtype != k.dtype:
        return False  # the op's own checks name the argument
    return backend == "library" or min(len_q, len_k) >= LIBRARY_MIN_SEQLEN or not _vlcore_can_run(q)


def _sdpa(q, k, v, *, causal, scale):
    import torch.nn.functional as F
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _find_varlen_attn():
    """torch's varlen_attn and the keywords this torch's version takes, or None where it has none. Looked up
    once at import, so that tracing (torch.compile) sees a constant."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect
    params = set(inspect.signature(varlen_attn).parameters)
    if "scale" not in params or ("window_size" not in params and "is_causal" not in params):
        return None  # a version this dispatch does not know how to ask for a scale or a causal mask
    return varlen_attn, params


_VARLEN_ATTN = _find_varlen_attn()


def _packed_library_kernel(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, key_bias, kv_segment, key_lengths,
                           return_lse, deterministic, backend):
    if kv_segment is not None or cu_seqlens_q is not cu_seqlens_k or q.device.type != "cuda":
        return None
    if q.dtype not in (torch.float16, torch.bfloat16) or q.dim() != 3 or k.dim() != 3:
        return None
    if not _plain(key_bias, key_lengths, return_lse, deterministic, q.device, backend):
        return None
    if not (backend == "library" or max_seqlen_q >= LIBRARY_MIN_SEQLEN):
        return None
    if _VARLEN_ATTN is None or (q.shape[1] != k.shape[1] and "enable_gqa" not in _VARLEN_ATTN[1]):
        return None
    varlen_attn, params = _VARLEN_ATTN

    def run(q, k, v, cu, max_len, *, causal, scale):
        kwargs = dict(scale=scale)
        if q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True
        if causal:  # segments have as many keys as queries: top-left and bottom-right alignment agree
            if "window_size" in params:
                kwargs["window_size"] = (-1, 0)
            else:
                kwargs["is_causal"] = True
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)
    return run


def _validate_packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_segment):
    check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, op=f"{_OP} (cu_seqlens_q)", max_len_name="max_seqlen_q")
    check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, op=f"{_OP} (cu_seqlens_k)", max_len_name="max_seqlen_k")
    if kv_segment is not None:
        seg = kv_segment.detach().to("cpu", torch.int64)
        bad = (seg < 0) | (seg >= cu_seqlens_k.numel() - 1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{_OP}: kv_segment[{i}] = {int(seg[i])} is out of range for "
                             f"{cu_seqlens_k.numel() - 1} key segments")


# ---------------------------------------------------------------------------------------------------------
# Fakes: shapes only, contiguous outputs like the kernels. The checks repeat the C++ ones.


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_meta(op, q, k, v, cu_seqlens_q, cu_seqlens_k, key_bias, kv_segment, key_lengths):
    name = f"vlcore::{op}"
    torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3,
                 lambda: f"{name}: q, k, v must have shape (total, heads, head_dim)")
    torch._check(q.dtype == k.dtype == v.dtype, lambda: f"{name}: q, k and v must have the same dtype")
    torch._check(q.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 lambda: f"{name}: q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    torch._check(k.shape == v.shape, lambda: f"{name}: v must have the shape of k")
    torch._check(k.shape[2] == q.shape[2], lambda: f"{name}: k must have q's head_dim")
    torch._check(k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0,
                 lambda: f"{name}: heads_q must be a multiple of heads_kv (GQA)")
    for t, n in ((cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        torch._check(t.dtype == torch.int32 and t.dim() == 1 and t.shape[0] >= 2,
                     lambda: f"{name}: {n} must be int32 of shape (segments + 1,) with >= 2 entries")
        torch._check(t.device == q.device, lambda: f"{name}: {n} must be on q's device")
    num_q = cu_seqlens_q.shape[0] - 1
    if kv_segment is None:
        torch._check(cu_seqlens_k.shape[0] == cu_seqlens_q.shape[0],
                     lambda: f"{name}: cu_seqlens_q and cu_seqlens_k must have the same number of entries")
    for t, n in ((kv_segment, "kv_segment"), (key_lengths, "key_lengths")):
        if t is not None:
            torch._check(t.dtype == torch.int32 and t.shape == (num_q,),
                         lambda: f"{name}: {n} must be int32 of shape (num_q_segments,)")
    if key_bias is not None:
        torch._check(key_bias.shape in ((k.shape[0],), (k.shape[0], q.shape[1])),
                     lambda: f"{name}: key_bias must have shape (total_k,) or (total_k, heads_q)")


@torch.library.register_fake("vlcore::attention_forward")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, kv_segment, key_lengths, causal,
      scale, deterministic):
    _check_meta("attention_forward", q, k, v, cu_seqlens_q, cu_seqlens_k, key_bias, kv_segment, key_lengths)
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("vlcore::attention_backward")
def _(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias,
      kv_segment, key_lengths, causal, scale, bias_requires_grad, deterministic):
    _check_meta("attention_backward", q, k, v, cu_seqlens_q, cu_seqlens_k, key_bias, kv_segment, key_lengths)
    torch._check(grad_out.shape == q.shape, lambda: "vlcore::attention_backward: grad_out must have q's shape")
    torch._check(not bias_requires_grad or key_bias is not None,
                 lambda: "vlcore::attention_backward: bias_requires_grad needs a key_bias")
    grad_bias = key_bias.new_empty(key_bias.shape) if bias_requires_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_bias


# ---------------------------------------------------------------------------------------------------------
# Autograd: the backward is an op of its own; the gradient of lse is folded into it.

_FORWARD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "key_bias",
                 "kv_segment", "key_lengths", "causal", "scale", "deterministic")
_KEY_BIAS = _FORWARD_ARGS.index("key_bias")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FORWARD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, args["cu_seqlens_q"], args["cu_seqlens_k"],
                          args["key_bias"], args["kv_segment"], args["key_lengths"])
    ctx.max_seqlen = (args["max_seqlen_q"], args["max_seqlen_k"])
    ctx.flags = (args["causal"], args["scale"], args["deterministic"])


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, key_bias, kv_segment, key_lengths = ctx.saved_tensors
    causal, scale, deterministic = ctx.flags
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    bias_requires_grad = key_bias is not None and ctx.needs_input_grad[_KEY_BIAS]
    dq, dk, dv, dbias = torch.ops.vlcore.attention_backward(
        grad_out, q, k, v, out, lse, grad_lse, cu_q, cu_k, ctx.max_seqlen[0], ctx.max_seqlen[1], key_bias,
        kv_segment, key_lengths, causal, scale, bias_requires_grad, deterministic)
    grads = [dq, dk, dv] + [None] * (len(_FORWARD_ARGS) - 3)
    grads[_KEY_BIAS] = dbias if bias_requires_grad else None
    return tuple(grads)


torch.library.register_autograd("vlcore::attention_forward", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Autocast: the op runs with autocast off inside (so the CPU reference's own matmuls stay exact) on inputs
# cast as follows. CUDA: q, k and v in the autocast dtype (the kernels are 16-bit). CPU: q, k and v in their
# common dtype (float32 inputs stay float32, exact; mixed bfloat16 / float32 inputs meet in float32).
# key_bias is read in float32 by every kernel and is left as it is. The backward op only turns autocast off.

_AUTOCAST_LIB = torch.library.Library("vlcore", "IMPL")


def _register_autocast(name, device_type, cast):
    op = getattr(torch.ops.vlcore, name).default
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def run(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*cast(args))

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key)
    op.py_impl(key)(run)  # what tracing (torch.compile) sees
    _AUTOCAST_LIB.impl(name, lambda _keys, *args: run(*args), "Autocast" + torch._C._dispatch_key_for_device(device_type),
                       with_keyset=True)


def _cast_qkv(args, dtype):
    q, k, v = args[:3]
    return (q.to(dtype), k.to(dtype), v.to(dtype), *args[3:])


def _cast_for_cuda(args):
    return _cast_qkv(args, torch.get_autocast_dtype("cuda")) if args[0].is_floating_point() else args


def _cast_for_cpu(args):
    q, k, v = args[:3]
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        return args
    return _cast_qkv(args, torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))


for _device, _cast in (("cpu", _cast_for_cpu), ("cuda", _cast_for_cuda)):
    _register_autocast("attention_forward", _device, _cast)
    _register_autocast("attention_backward", _device, lambda args: args)


# ---------------------------------------------------------------------------------------------------------
# Reference: one segment at a time, the softmax written out. Any dtype (use float64 for ground truth).


def attention_ref(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, *, causal=False, scale=None, key_bias=None,
                  kv_segment=None, key_lengths=None, return_lse=False):
    """Plain-PyTorch attention with the op's semantics (packed or dense form), differentiable. Reads the
    index tensors on the host."""
    if cu_seqlens_q is None:  # dense: the same batch viewed as equal-length segments
        batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
        steps = torch.arange(batch + 1, dtype=torch.int32)
        out, lse = attention_ref(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), steps * len_q, steps * len_k,
                                 causal=causal, scale=scale,
                                 key_bias=None if key_bias is None else key_bias.flatten(0, 1),
                                 key_lengths=key_lengths, return_lse=True)
        out = out.unflatten(0, (batch, len_q))
        return (out, lse.unflatten(1, (batch, len_q)).transpose(0, 1)) if return_lse else out
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        s = i if kv_segment is None else int(kv_segment[i])
        qi = q[cu_q[i]:cu_q[i + 1]]
        ki = k[cu_k[s]:cu_k[s + 1]].repeat_interleave(group, dim=1)
        vi = v[cu_k[s]:cu_k[s + 1]].repeat_interleave(group, dim=1)
        nq, nk = qi.shape[0], ki.shape[0]
        logits = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        if key_bias is not None:
            bias = key_bias[cu_k[s]:cu_k[s + 1]].to(logits.dtype)
            logits = logits + (bias.view(1, 1, nk) if bias.dim() == 1 else bias.t().unsqueeze(1))
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
        if key_lengths is not None:
            allowed &= torch.arange(nk, device=q.device) < int(key_lengths[i])
        if causal:
            allowed &= (torch.arange(nk, device=q.device).view(1, nk)
                        <= torch.arange(nq, device=q.device).view(nq, 1) + (nk - nq))
        allowed = allowed & (logits != float("-inf"))  # -inf biases mask too
        has_key = allowed.any(-1, keepdim=True)
        # Rows with no key: finite stand-in logits, then zeroed, so no nan reaches the values or gradients.
        stand_in = torch.where(has_key, float("-inf"), 0.0).to(logits.dtype)
        logits = torch.where(allowed, logits, stand_in)
        lse = torch.logsumexp(logits, -1, keepdim=True)
        p = torch.where(has_key, torch.exp(logits - lse), 0.0)
        outs.append(torch.einsum("hqk,khd->qhd", p, vi))
        lses.append(torch.where(has_key, lse, float("-inf")).squeeze(-1))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((q.shape[1], 0))
    return (out, lse) if return_lse else out
