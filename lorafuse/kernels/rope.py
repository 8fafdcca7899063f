"""Fused rotary position embedding: ``lorafuse::rope`` rotates q and k in one op.

The model code it replaces (transformers' ``apply_rotary_pos_emb``; R = cos.shape[-1] is
the rotary width, h = R / 2; R < head_dim is partial rotary, Phi-style)::

    rotate_half(x) = cat((-x[..., h:], x[..., :h]), dim=-1)
    y = cat((x[..., :R] * cos + rotate_half(x[..., :R]) * sin, x[..., R:]), dim=-1)

for x = q and x = k with the same cos and sin (broadcast over heads). Per half, with
c1, c2 (s1, s2) the two halves of cos (sin):

    y1 = x1 c1 − x2 s1          y2 = x2 c2 + x1 s2          y[R:] = x[R:]

The backward is the transposed rotation (rope with −sin when the halves of sin are equal,
as in every HF model; this file does not assume it):

    dx1 = g1 c1 + g2 s2         dx2 = g2 c2 − g1 s1         dx[R:] = g[R:]

Only cos and sin are kept for the backward; the rotated halves are never materialised
(no ``cat``). Math in fp32, each output rounded once to ``out_dtype`` (eager bf16 rounds
x·cos, rotate_half(x)·sin and their sum each). q and k keep their own layout: the outputs
have the strides of q and k (HF's q is a transposed view of the projection), the
gradients those of the incoming gradients. cos and sin get no gradient (HF computes them
from a buffer); asking for one raises.

Paths: CPU runs the PyTorch reference (the model's torch calls in fp32: equal to eager
in fp32; the test oracle). CUDA runs the Triton kernel below: one program per (batch,
position) row, looping over blocks of heads of q and then of k, cos/sin read once per
row. Tensors of rank > 4, shapes where q and k differ in batch or sequence, or other
dtypes take the reference, with one warning. LORAFUSE_ROPE_IMPL=auto|torch|triton
(default auto: Triton on CUDA) overrides; =triton with TRITON_INTERPRET=1 runs the kernel
on CPU (tests). On the H200 (bench/bench_elementwise.py, 8B shape, session 32) forward +
backward take 0.052 ms on the GPU alone against Inductor's 0.110; the rope pass is a
default pass.
"""

from __future__ import annotations


import torch
from torch import Tensor

from ._dispatch import on_device, triton_or_reference
from ._ops import lorafuse_op

try:  # optional: without triton, CUDA tensors take the PyTorch path (with a warning)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

IMPL_ENV = "LORAFUSE_ROPE_IMPL"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- reference


def _check_widths(x: Tensor, cos: Tensor) -> int:
    R = cos.shape[-1]
    if R % 2 or R > x.shape[-1] or R == 0:
        raise ValueError(f"rotary width {R} must be even, > 0 and <= head_dim {x.shape[-1]}")
    return R


def rotate_reference(x: Tensor, cos: Tensor, sin: Tensor, out_dtype, backward=False):
    """One tensor rotated (or, ``backward``, its gradient rotated back) in fp32, the model
    code's own torch calls in its order; rounded once to ``out_dtype``."""
    R = _check_widths(x, cos)
    h = R // 2
    xf = x.to(torch.float32)
    c, s = cos.to(torch.float32), sin.to(torch.float32)
    x_rot, x_pass = xf[..., :R], xf[..., R:]
    x1, x2 = x_rot[..., :h], x_rot[..., h:]
    if backward:  # rotate_half transposed, applied to g * sin
        u = x_rot * s
        y = x_rot * c + torch.cat((u[..., h:], -u[..., :h]), dim=-1)
    else:
        y = x_rot * c + torch.cat((-x2, x1), dim=-1) * s
    if R < x.shape[-1]:
        y = torch.cat((y, x_pass), dim=-1)
    return y.to(out_dtype)


def rope_reference(q, k, cos, sin, out_dtype):
    """``(rope(q), rope(k))`` (see module doc)."""
    return rotate_reference(q, cos, sin, out_dtype), rotate_reference(k, cos, sin, out_dtype)


def rope_backward_reference(dq, dk, cos, sin, dq_dtype, dk_dtype):
    """Gradients of q and k from those of rope(q) and rope(k)."""
    return (rotate_reference(dq, cos, sin, dq_dtype, backward=True),
            rotate_reference(dk, cos, sin, dk_dtype, backward=True))


# --------------------------------------------------------------------------- Triton
#
# Under the Triton interpreter fp32 -> bf16 casts truncate; the GPU rounds to nearest
# even. HAND_ROUND rounds on the bits there, so the interpreter computes what the GPU does.

_MAX_TILE = 4096  # elements of one (heads × half) tile
_INTERPRETER_BLOCK_H = 2  # several head blocks per row even for small tests

if triton is not None:
    from .norm import _rne_bf16

    @triton.jit
    def _rotate_heads(
        x_ptr, y_ptr, cos_ptr, sin_ptr,
        a, s, H, sx_a, sx_h, sx_s, sy_a, sy_h, sy_s, sc_a, sc_h, sc_s,
        HALF, PASS,
        BACKWARD: tl.constexpr, COS_PER_HEAD: tl.constexpr, HAND_ROUND: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    ):
        """Rotates row (a, ·, s, :) of x into y, all H heads, BLOCK_H heads at a time."""
        j = tl.arange(0, BLOCK_HALF)
        jmask = j < HALF
        hh = tl.arange(0, BLOCK_H)
        a64 = a.to(tl.int64)
        s64 = s.to(tl.int64)
        x_row = x_ptr + a64 * sx_a + s64 * sx_s
        y_row = y_ptr + a64 * sy_a + s64 * sy_s
        c_row = a64 * sc_a + s64 * sc_s
        if not COS_PER_HEAD:  # cos/sin broadcast over heads: one row, read once
            c1 = tl.load(cos_ptr + c_row + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
            c2 = tl.load(cos_ptr + c_row + HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
            s1 = tl.load(sin_ptr + c_row + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
            s2 = tl.load(sin_ptr + c_row + HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        for h0 in range(0, H, BLOCK_H):
            heads = (h0 + hh).to(tl.int64)
            hmask = (h0 + hh) < H
            mask = hmask[:, None] & jmask[None, :]
            xo = x_row + heads[:, None] * sx_h + j[None, :]
            yo = y_row + heads[:, None] * sy_h + j[None, :]
            if COS_PER_HEAD:
                co = c_row + heads[:, None] * sc_h + j[None, :]
                c1 = tl.load(cos_ptr + co, mask=mask, other=0.0).to(tl.float32)
                c2 = tl.load(cos_ptr + co + HALF, mask=mask, other=0.0).to(tl.float32)
                s1 = tl.load(sin_ptr + co, mask=mask, other=0.0).to(tl.float32)
                s2 = tl.load(sin_ptr + co + HALF, mask=mask, other=0.0).to(tl.float32)
            x1 = tl.load(xo, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(xo + HALF, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:
                y1 = x1 * c1 + x2 * s2
                y2 = x2 * c2 - x1 * s1
            else:
                y1 = x1 * c1 - x2 * s1
                y2 = x2 * c2 + x1 * s2
            if HAND_ROUND:
                y1 = _rne_bf16(y1)
                y2 = _rne_bf16(y2)
            tl.store(yo, y1.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(yo + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)
            if BLOCK_PASS > 0:  # partial rotary: the rest of the head passes through
                p = tl.arange(0, BLOCK_PASS)
                pmask = hmask[:, None] & (p < PASS)[None, :]
                v = tl.load(x_row + heads[:, None] * sx_h + 2 * HALF + p[None, :], mask=pmask)
                tl.store(y_row + heads[:, None] * sy_h + 2 * HALF + p[None, :],
                         v.to(y_ptr.dtype.element_ty), mask=pmask)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
        S, HQ, HK,
        sq_a, sq_h, sq_s, sk_a, sk_h, sk_s,
        sqo_a, sqo_h, sqo_s, sko_a, sko_h, sko_s,
        sc_a, sc_h, sc_s,
        HALF, PASS,
        BACKWARD: tl.constexpr, COS_PER_HEAD: tl.constexpr,
        HAND_ROUND_Q: tl.constexpr, HAND_ROUND_K: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    ):
        row = tl.program_id(0)
        a = row // S
        s = row % S
        _rotate_heads(q_ptr, qo_ptr, cos_ptr, sin_ptr, a, s, HQ, sq_a, sq_h, sq_s,
                      sqo_a, sqo_h, sqo_s, sc_a, sc_h, sc_s, HALF, PASS,
                      BACKWARD, COS_PER_HEAD, HAND_ROUND_Q, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
        _rotate_heads(k_ptr, ko_ptr, cos_ptr, sin_ptr, a, s, HK, sk_a, sk_h, sk_s,
                      sko_a, sko_h, sko_s, sc_a, sc_h, sc_s, HALF, PASS,
                      BACKWARD, COS_PER_HEAD, HAND_ROUND_K, BLOCK_H, BLOCK_HALF, BLOCK_PASS)

    _INTERPRETED = type(_rope_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    _INTERPRETED = False


def _as_4d(t: Tensor) -> Tensor:
    """[A, H, S, D] view of a rank <= 4 tensor (leading size-1 dims added)."""
    if t.dim() > 4:
        raise ValueError(f"rank {t.dim()} > 4")
    return t[(None,) * (4 - t.dim())]


def _rope_triton(q, k, cos, sin, q_out_dtype, k_out_dtype, backward):
    """Rotates q and k (or their gradients, ``backward``) into new tensors laid out like
    q and k."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if not _INTERPRETED and not q.is_cuda:
        raise ValueError("needs CUDA tensors (or TRITON_INTERPRET=1)")
    dtypes = [q.dtype, k.dtype, cos.dtype, sin.dtype, q_out_dtype, k_out_dtype]
    if any(d not in FLOAT_DTYPES for d in dtypes):
        raise TypeError(f"unsupported dtypes {dtypes}")
    R = _check_widths(q, cos)
    D = q.shape[-1]
    if k.shape[-1] != D or q.dim() != k.dim():
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in head_dim or rank")
    # [A, H, S, D] views with the heads (the dim cos/sin broadcast over, or where q and k
    # differ: GQA) at dim 1; HF's unsqueeze_dim=2 layout [B, S, H, D] is permuted.
    qo = torch.empty_like(q, dtype=q_out_dtype)
    ko = torch.empty_like(k, dtype=k_out_dtype)
    c4 = _as_4d(torch.broadcast_to(cos, q.shape[:-1] + (R,)))
    s4 = _as_4d(torch.broadcast_to(sin, q.shape[:-1] + (R,)))
    views = [_as_4d(t) for t in (q, k, qo, ko)] + [c4, s4]
    q4, k4 = views[0], views[1]
    if q4.shape[2] != k4.shape[2] or (q4.shape[1] == k4.shape[1] and c4.stride(2) == 0
                                      and c4.stride(1) != 0):
        views = [t.transpose(1, 2) for t in views]
    q4, k4, qo4, ko4, c4, s4 = views
    if q4.shape[0] != k4.shape[0] or q4.shape[2] != k4.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in more than "
                         "their number of heads")
    if q4.stride(-1) != 1 or k4.stride(-1) != 1:
        raise ValueError("head_dim is not contiguous")
    if c4.stride() != s4.stride() or c4.stride(-1) != 1:
        c4, s4 = c4.contiguous(), s4.contiguous()
    per_head = c4.stride(1) != 0 and max(q4.shape[1], k4.shape[1]) > 1
    if per_head and k4.shape[1] != q4.shape[1]:
        raise ValueError("cos/sin vary over heads but q and k have different head counts")
    A, _, S, _ = q4.shape
    if A * S and q.numel() + k.numel():
        half = R // 2
        block_half = triton.next_power_of_2(half)
        block_pass = triton.next_power_of_2(D - R) if D > R else 0
        heads = triton.next_power_of_2(max(q4.shape[1], k4.shape[1]))
        block_h = max(1, min(heads, _MAX_TILE // block_half))
        if _INTERPRETED:
            block_h = min(block_h, _INTERPRETER_BLOCK_H)
        bf16 = torch.bfloat16
        with on_device(q):
            _rope_kernel[(A * S,)](
                q4, k4, qo4, ko4, c4, s4,
                S, q4.shape[1], k4.shape[1],
                q4.stride(0), q4.stride(1), q4.stride(2),
                k4.stride(0), k4.stride(1), k4.stride(2),
                qo4.stride(0), qo4.stride(1), qo4.stride(2),
                ko4.stride(0), ko4.stride(1), ko4.stride(2),
                c4.stride(0), c4.stride(1), c4.stride(2),
                half, D - R,
                BACKWARD=backward, COS_PER_HEAD=per_head,
                HAND_ROUND_Q=_INTERPRETED and q_out_dtype == bf16,
                HAND_ROUND_K=_INTERPRETED and k_out_dtype == bf16,
                BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
                num_warps=1 if _INTERPRETED else 4,
            )
    return qo, ko


def rope_forward_triton(q, k, cos, sin, out_dtype):
    """Same contract as ``rope_reference``; outputs laid out like q and k."""
    return _rope_triton(q, k, cos, sin, out_dtype, out_dtype, backward=False)


def rope_backward_triton(dq, dk, cos, sin, dq_dtype, dk_dtype):
    """Same contract as ``rope_backward_reference``; laid out like dq and dk."""
    return _rope_triton(dq, dk, cos, sin, dq_dtype, dk_dtype, backward=True)


# --------------------------------------------------------------------------- dispatch


def _like(src: Tensor, values: Tensor, dtype) -> Tensor:
    """``values`` in a new tensor laid out like ``src`` (what the fake implementation
    promises; the reference's own layout may differ)."""
    return torch.empty_like(src, dtype=dtype).copy_(values)


def _forward_impl(q, k, cos, sin, out_dtype):
    def reference():
        qo, ko = rope_reference(q, k, cos, sin, out_dtype)
        return _like(q, qo, out_dtype), _like(k, ko, out_dtype)

    return triton_or_reference(q, IMPL_ENV, "rope forward",
                               lambda: rope_forward_triton(q, k, cos, sin, out_dtype), reference)


def _backward_impl(dq, dk, cos, sin, dq_dtype, dk_dtype):
    def reference():
        gq, gk = rope_backward_reference(dq, dk, cos, sin, dq_dtype, dk_dtype)
        return _like(dq, gq, dq_dtype), _like(dk, gk, dk_dtype)

    return triton_or_reference(
        dq, IMPL_ENV, "rope backward",
        lambda: rope_backward_triton(dq, dk, cos, sin, dq_dtype, dk_dtype), reference)


# --------------------------------------------------------------------------- ops


@lorafuse_op("lorafuse::rope")
def rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
            out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(rope(q), rope(k))`` in ``out_dtype``, laid out like q and k. cos and sin
    broadcast to ``q[..., :R]`` and ``k[..., :R]``, R = cos.shape[-1]."""
    return _forward_impl(q, k, cos, sin, out_dtype)


@rope_op.register_fake
def _(q, k, cos, sin, out_dtype):
    return torch.empty_like(q, dtype=out_dtype), torch.empty_like(k, dtype=out_dtype)


@lorafuse_op("lorafuse::rope_backward")
def rope_backward_op(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor,
                     dq_dtype: torch.dtype, dk_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Gradients of q and k, in their dtypes, laid out like dq and dk."""
    return _backward_impl(dq, dk, cos, sin, dq_dtype, dk_dtype)


@rope_backward_op.register_fake
def _(dq, dk, cos, sin, dq_dtype, dk_dtype):
    return torch.empty_like(dq, dtype=dq_dtype), torch.empty_like(dk, dtype=dk_dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, out_dtype = inputs
    ctx.dtypes = (q.dtype, k.dtype)
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise NotImplementedError("lorafuse::rope computes no gradient for cos and sin "
                                  "(the rope pass leaves such sites alone)")
    cos, sin = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_q or need_k):
        return None, None, None, None, None
    dq_in, dk_in = rope_backward_op(dq, dk, cos, sin, *ctx.dtypes)
    return (dq_in if need_q else None), (dk_in if need_k else None), None, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope(q, k, cos, sin, out_dtype=None):
    """q and k rotated by cos/sin (already broadcastable to them, as after HF's
    ``cos.unsqueeze(1)``), forward and backward fused; see the module doc."""
    if out_dtype is None:
        out_dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
    return rope_op(q, k, cos, sin, out_dtype)
