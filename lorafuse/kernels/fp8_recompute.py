"""A recomputed LoRA linear's base GEMM in fp8 (e4m3): the ``fp8_recompute`` option.

Why: with ``checkpoint_layers`` the backward runs each layer's forward again, and at the
8B shape the recomputed gate/up GEMMs are ≈ 32 % of the step's matmul FLOPs (the q/k/v
ones another 7 %). Session 29's profile of the 8B step with ``checkpoint_layers``,
offloading and ``fp8_dx`` (bench/RESULTS.md) ran the bf16 forward GEMM at ≈ 640 TFLOP/s
and the fp8 dx GEMM at ≈ 1,370 at the H200's power cap. The recompute's outputs are read
only by the backward (the activations' derivatives, the next LoRA factors' inputs), never
by the forward or the loss, so rounding its operands to e4m3 changes the gradients as
``fp8_dx`` does, not the losses; opt-in.

    y_i = e4m3(x / s_x) e4m3(W_i / s_w)ᵀ · s_x s_w  +  b_i  +  s_i h_i B_iᵀ,   h = x A_catᵀ

One power-of-two scale per row of x (per token) and per row of W_i (per output feature)
(``fp8_dx.quantize_dy``: one Triton launch each on CUDA), the product accumulated in fp32
by ``torch._scaled_mm`` and rounded to bf16; the low-rank term, computed exactly as the
forward op computes h, is then added by cuBLAS (``addmm_``) and the bias after it: two more
roundings of y, far below e4m3's 2⁻⁴. W is cast in every backward (≈ 3 bytes of traffic
an element; no copy is kept: the option is for configurations short of memory).

Which recomputes: partition.fp8_recomputes picks the backward's ``lora_linear`` and
``lora_linear_group`` calls whose outputs reach no attention op and no exp or softmax
before the next LoRA op: where the backward rebuilds the attention probabilities from q
and k (every flash-style attention backward does), a few per cent on q·k moves them by far
more, so q, k and v stay exact there; where it keeps the probabilities (an eager softmax
chain), q, k and v enter the backward only through matmuls, as gate and up do. The calls
must run at bf16 with ``_scaled_mm``'s sizes (``fp8_dx.supported``). Anything else, and every
call after an fp8 failure in this process (warned once), computes the exact op.
``fp8_linear_reference`` is the same arithmetic in plain PyTorch (the tests' oracle); the
op itself runs ``_scaled_mm`` on the CPU too (recent torch has a CPU kernel), so the tests
run its code path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._torch import scaled_mm
from . import fp8_dx as fp8
from ._dispatch import warn_once
from ._ops import lorafuse_op
from .lora import _forward_impl, _upcast, lora_linear_h_op
from .lora_group import lora_linear_group_op

_failed: list = []  # the first error of the fp8 path in this process, if any


def fp8_linear_reference(x2: Tensor, weight: Tensor) -> Tensor:
    """``x2 @ Wᵀ`` with both operands rounded to e4m3 as ``fp8_recompute`` rounds them
    (per row of x, per row of W), the product in fp32: the tests' oracle."""
    q, sx = fp8.quantize_rows(x2)
    wq, sw = fp8.quantize_rows(weight)
    return (q.float() * sx) @ (wq.float() * sw).t()


def applies(x2: Tensor, weights: list) -> bool:
    """Whether the fp8 base GEMM runs for x2 (M, K) and these weights (N_i, K)."""
    if _failed or not all(w.dtype == x2.dtype for w in weights):
        return False
    return all(fp8.supported(x2.shape[0], w.shape[0], x2.shape[1], x2.dtype, x2.device)
               for w in weights)


def _base_fp8(x2: Tensor, weights: list) -> list | None:
    """``[x2 W_iᵀ]`` from e4m3 operands in x2's dtype, or None after an error (warned
    once; the caller computes the exact op, and so does every later call)."""
    try:
        xq, sx = fp8.quantize_dy([x2])  # CUDA: the Triton kernel; CPU: PyTorch
        ys = []
        for w in weights:
            wq, sw = fp8.quantize_dy([w])  # one scale per output feature: (N, 1)
            ys.append(scaled_mm(xq, wq.t(), sx, sw.reshape(1, -1), x2.dtype))
        return ys
    except Exception as e:
        _failed.append(e)
        warn_once(f"lorafuse: fp8_recompute failed ({type(e).__name__}: {e}); recomputed "
                  "LoRA linears are exact from here on")
        return None


def _add_tail(y: Tensor, bias: Optional[Tensor], h: Tensor, lora_b: Tensor,
              scale: float) -> Tensor:
    """y + s h Bᵀ + b, in place."""
    y.addmm_(h, lora_b.t(), alpha=scale)
    if bias is not None:
        y += bias
    return y


@lorafuse_op("lorafuse::lora_linear_group_fp8")
def lora_linear_group_fp8_op(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Optional[Tensor]],
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    scales: list[float],
) -> list[Tensor]:
    """``lora_linear_group``'s outputs ``[y_1, ..., y_n, h]`` with the base GEMMs in e4m3
    where they apply (module docstring); h as that op computes it."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    ys = _base_fp8(x2, list(weights)) if applies(x2, list(weights)) else None
    if ys is None:
        return lora_linear_group_op(x, weights, biases, lora_as, lora_bs, scales)
    if x.is_cuda:  # _group_cuda's h
        h = x2 @ torch.cat(list(lora_as)).t()
    else:  # lora_group_reference's h
        h = (_upcast(x2) @ torch.cat([_upcast(a) for a in lora_as]).t()).to(x.dtype)
    hs = torch.split(h, [a.shape[0] for a in lora_as], dim=-1)
    lead = x.shape[:-1]
    out = [_add_tail(y, b, hi, B, s).reshape(*lead, y.shape[-1]).contiguous()
           for y, b, hi, B, s in zip(ys, biases, hs, lora_bs, scales)]
    return out + [h.reshape(*lead, h.shape[-1]).contiguous()]


@lora_linear_group_fp8_op.register_fake
def _(x, weights, biases, lora_as, lora_bs, scales):
    lead = x.shape[:-1]
    ys = [x.new_empty(*lead, w.shape[0]) for w in weights]
    return ys + [x.new_empty(*lead, sum(a.shape[0] for a in lora_as))]


@lorafuse_op("lorafuse::lora_linear_fp8")
def lora_linear_fp8_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    x_lora: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``lora_linear``'s ``(y, h)`` with the base GEMM in e4m3 where it applies; h (from
    ``x_lora``, the dropout's output, where there is one) as that op computes it."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    ys = _base_fp8(x2, [weight]) if applies(x2, [weight]) else None
    if ys is None:
        y, h = _forward_impl(x, weight, bias, lora_a, lora_b, scale, x_lora)
        return y.contiguous(), h.contiguous()
    h = lora_linear_h_op(x, lora_a, x_lora)
    y = _add_tail(ys[0], bias, h.reshape(-1, h.shape[-1]), lora_b, scale)
    return y.reshape(*x.shape[:-1], weight.shape[0]).contiguous(), h


@lora_linear_fp8_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, x_lora=None):
    lead = x.shape[:-1]
    return x.new_empty(*lead, weight.shape[0]), x.new_empty(*lead, lora_a.shape[0])
