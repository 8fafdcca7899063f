"""Fused LoRA linear: ``y = x Wᵀ + b + s · (x' Aᵀ) Bᵀ`` as one op with one backward.

Shapes: ``x`` (..., K); ``weight`` W (N, K), any strides (GPT-2 passes a transposed
view); ``bias`` (N,) or None; ``lora_a`` A (r, K); ``lora_b`` B (N, r); ``x_lora``
x' = dropout(x) or None (then x' = x). All floating inputs share one dtype, the
compute dtype (the LoRA pass casts to it, as autocast would); the output has it too.

Precision: every product accumulates in fp32. The low-rank term
``l = s · h Bᵀ + b`` (h = x' Aᵀ) is rounded once to the compute dtype, then added to
the base product inside the base GEMM's fp32 accumulator (cuBLAS ``beta = 1``
epilogue, or the Triton kernel's tail), and the sum is rounded once. Eager PEFT
rounds the base product, then the sum, so its error is relative to |x Wᵀ|; ours
adds only a rounding relative to the much smaller |l|.

Gradients (dy = ∂L/∂y, flattened to 2-D; g = s · dy B):
    dx  = dy W + g A          (one GEMM chain: ``(g A).addmm_(dy, W)``)
    dA  = gᵀ x'
    dB  = s · dyᵀ h
    db  = Σ dy, dW = dyᵀ x    (only when those require grad: frozen in LoRA)
With dropout, x' is a separate input: dx = dy W and dx' = g A.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# --------------------------------------------------------------------------- reference


def _upcast(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, x_lora=None):
    """Plain PyTorch in fp32 (fp64 stays fp64), rounded once: the CPU path and the
    test oracle. Returns ``(y, h)``."""
    dtype = x.dtype
    xl = x if x_lora is None else x_lora
    x2, xl2 = _upcast(x).reshape(-1, x.shape[-1]), _upcast(xl).reshape(-1, x.shape[-1])
    h = xl2 @ _upcast(lora_a).t()
    y = h @ _upcast(lora_b).t() * scale + x2 @ _upcast(weight).t()
    if bias is not None:
        y = y + _upcast(bias)
    lead = x.shape[:-1]
    return y.to(dtype).reshape(*lead, weight.shape[0]), h.to(dtype).reshape(*lead, lora_a.shape[0])


def lora_linear_backward_reference(dy, x_lora, weight, lora_a, lora_b, h, scale):
    """fp32 reference of ``(dx, dA, dB)``; dx omits ``dy W`` when weight is None."""
    dtype = dy.dtype
    K, N, r = lora_a.shape[1], lora_b.shape[0], lora_a.shape[0]
    dy2 = _upcast(dy).reshape(-1, N)
    xl2 = _upcast(x_lora).reshape(-1, K)
    h2 = _upcast(h).reshape(-1, r)
    g = (dy2 @ _upcast(lora_b)) * scale
    dx = g @ _upcast(lora_a)
    if weight is not None:
        dx = dx + dy2 @ _upcast(weight)
    dA = g.t() @ xl2
    dB = (dy2.t() @ h2) * scale
    return dx.to(dtype).reshape(x_lora.shape), dA.to(lora_a.dtype), dB.to(lora_b.dtype)


# --------------------------------------------------------------------------- cuBLAS path


def _lora_linear_cublas(x, weight, bias, lora_a, lora_b, scale, x_lora):
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    xl2 = x2 if x_lora is None else x_lora.reshape(-1, K)
    h = xl2 @ lora_a.t()
    # l = b + s·h Bᵀ, then y = l + x Wᵀ in the GEMM's fp32 epilogue (beta = 1, in place:
    # out-of-place addmm would first copy l into a new buffer).
    if bias is not None:
        low = torch.addmm(bias, h, lora_b.t(), alpha=scale)
    else:
        low = torch.mm(h, lora_b.t())
        if scale != 1.0:
            low.mul_(scale)
    y = low.addmm_(x2, weight.t())
    lead = x.shape[:-1]
    return y.reshape(*lead, N), h.reshape(*lead, lora_a.shape[0])


def _lora_linear_backward_cublas(dy, x_lora, weight, lora_a, lora_b, h, scale):
    K, N, r = lora_a.shape[1], lora_b.shape[0], lora_a.shape[0]
    dy2 = dy.reshape(-1, N)
    g = dy2 @ lora_b
    if scale != 1.0:
        g.mul_(scale)
    dx = g @ lora_a
    if weight is not None:
        dx.addmm_(dy2, weight)
    dA = g.t() @ x_lora.reshape(-1, K)
    dB = dy2.t() @ h.reshape(-1, r)
    if scale != 1.0:
        dB.mul_(scale)
    return dx.reshape(x_lora.shape), dA, dB


# --------------------------------------------------------------------------- dispatch


def _forward_impl(x, weight, bias, lora_a, lora_b, scale, x_lora):
    if x.is_cuda:
        return _lora_linear_cublas(x, weight, bias, lora_a, lora_b, scale, x_lora)
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, x_lora)


def _backward_impl(dy, x_lora, weight, lora_a, lora_b, h, scale):
    if dy.is_cuda:
        return _lora_linear_backward_cublas(dy, x_lora, weight, lora_a, lora_b, h, scale)
    return lora_linear_backward_reference(dy, x_lora, weight, lora_a, lora_b, h, scale)


# --------------------------------------------------------------------------- ops


@torch.library.custom_op("lorafuse::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    x_lora: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, h)``; h = x' Aᵀ is kept for the backward (r columns, small)."""
    y, h = _forward_impl(x, weight, bias, lora_a, lora_b, scale, x_lora)
    return y.contiguous(), h.contiguous()


@lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, x_lora):
    lead = x.shape[:-1]
    return x.new_empty(*lead, weight.shape[0]), x.new_empty(*lead, lora_a.shape[0])


@torch.library.custom_op("lorafuse::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    dy: Tensor,
    x_lora: Tensor,
    weight: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    h: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dA, dB)``; dx = dy W + g A, or g A alone when weight is None."""
    dx, dA, dB = _backward_impl(dy, x_lora, weight, lora_a, lora_b, h, scale)
    return dx.contiguous(), dA.contiguous(), dB.contiguous()


@lora_linear_backward_op.register_fake
def _(dy, x_lora, weight, lora_a, lora_b, h, scale):
    return x_lora.new_empty(x_lora.shape), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, x_lora = inputs
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.has_dropout = x_lora is not None
    ctx.save_for_backward(x, weight, lora_a, lora_b, x_lora, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dh):
    x, weight, lora_a, lora_b, x_lora, h = ctx.saved_tensors
    need = ctx.needs_input_grad  # x, weight, bias, A, B, scale, x_lora
    dx = dW = db = dxl = None
    if ctx.has_dropout:
        dxl, dA, dB = lora_linear_backward_op(dy, x_lora, None, lora_a, lora_b, h, ctx.scale)
        if need[0]:
            dx = dy @ weight
    else:
        dx, dA, dB = lora_linear_backward_op(dy, x, weight, lora_a, lora_b, h, ctx.scale)
    if need[1]:
        dW = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        dW = dW.to(weight.dtype)
    if ctx.has_bias and need[2]:
        db = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, dW, db, dA, dB, None, dxl


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x, weight, bias, lora_a, lora_b, scale, x_lora=None):
    """``x Wᵀ + b + s · (x' Aᵀ) Bᵀ`` with the fused forward and backward."""
    return lora_linear_op(x, weight, bias, lora_a, lora_b, float(scale), x_lora)[0]
