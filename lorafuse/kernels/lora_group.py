"""Several LoRA linears that read one input (q/k/v, gate/up) as one op.

For sites i = 1..n sharing x (all in one compute dtype, see ``lora.py``)::

    h      = x A_catᵀ                    A_cat = [A_1; ...; A_n]  (R × K, R = Σ r_i)
    y_i    = x W_iᵀ + b_i + s_i h_i B_iᵀ  h_i = the r_i columns of h for site i

so x is read once for all adapters. Backward, with g_i = s_i dy_i B_i, g = [g_1 ... g_n]:

    dx     = g A_cat + Σ_i dy_i W_i      (one buffer: g A_cat, then addmm_ per site)
    dA_cat = gᵀ x                        (one GEMM reads x once)
    dB_i   = s_i dy_iᵀ h_i

Precision is the single-site op's (``lora.base_plus_lowrank``): fp32 accumulation, the
low-rank term added in the base GEMM's accumulator, one rounding of y. The backward's dx
chain is cuBLAS (``addmm_``): dy W is rounded before it is added, as in eager.

Norm fold (``norm_x``, ``norm_rstd``, ``norm_weight``, ``norm_offset``): when x is an
RMSNorm's output, x = c · (w + offset) with c = x₀ · rstd per row (x₀ the norm's input,
rstd its per-row inverse RMS; transformers rounds c or the product to x's dtype), the
backward needs no x: dA_cat = ((g ⊙ rstd)ᵀ x₀) ⊙ (w + offset). The norm's own backward
keeps x₀ and rstd anyway, so x (2 bytes per element at bf16: 16 KiB per token and layer
for a Llama layer's two norms at hidden 4096) is no longer kept for the backward
(passes/lora.py decides when). dA then skips the rounding of x to its dtype, so it is
nearer the fp32 value than ``gᵀ x``. The forward is unchanged.

``fp8_dx`` (opt-in): Σ_i dy_i W_i as one e4m3 GEMM over the sites' concatenated N, one
scale per token across all of them (kernels/fp8_dx.py), then g A_cat added.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import fp8_dx as fp8
from .lora import _upcast, base_plus_lowrank, mm_fp32
from ._ops import lorafuse_op


def _split(t: Tensor, ranks) -> list:
    return list(torch.split(t, list(ranks), dim=-1))


def lora_group_reference(x, weights, biases, lora_as, lora_bs, scales):
    """fp32 reference (fp64 stays fp64), one rounding per output: ``ys + [h]``."""
    K = x.shape[-1]
    x2 = _upcast(x).reshape(-1, K)
    h = x2 @ torch.cat([_upcast(a) for a in lora_as]).t()
    ys = []
    for w, b, hi, B, s in zip(weights, biases, _split(h, [a.shape[0] for a in lora_as]), lora_bs, scales):
        y = hi @ _upcast(B).t() * s + x2 @ _upcast(w).t()
        if b is not None:
            y = y + _upcast(b)
        ys.append(y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0]))
    return ys + [h.to(x.dtype).reshape(*x.shape[:-1], h.shape[-1])]


def _group_cuda(x, weights, biases, lora_as, lora_bs, scales):
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    h = x2 @ torch.cat(lora_as).t()
    ys = [base_plus_lowrank(x2, w, b, hi, B, s).reshape(*x.shape[:-1], w.shape[0])
          for w, b, hi, B, s in zip(weights, biases, _split(h, [a.shape[0] for a in lora_as]),
                                    lora_bs, scales)]
    return ys + [h.reshape(*x.shape[:-1], h.shape[-1])]


def norm_fold_weight(norm_weight, norm_offset, K, like):
    """``w + offset`` in fp32 (ones when the norm has no weight)."""
    if norm_weight is None:
        return torch.full((K,), 1.0 + norm_offset, dtype=torch.float32, device=like.device)
    w = norm_weight.float()
    return w + norm_offset if norm_offset else w


def lora_group_backward_reference(dys, x, weights, lora_as, lora_bs, h, scales, need_dx,
                                  norm_rstd=None, norm_weight=None, norm_offset=0.0,
                                  fp8_dx=False, fp8_copies=True):
    """``x`` is the op's input, or with ``norm_rstd`` the norm's input x₀ (the norm fold).
    ``fp8_dx``: Σ dy_i W_i from e4m3 operands, as ``fp8_dx.fp8_dx`` groups them (with W's
    copy kept or made now, ``fp8_copies``: the same bytes either way)."""
    K = x.shape[-1]
    ranks = [a.shape[0] for a in lora_as]
    x2 = _upcast(x).reshape(-1, K)
    hs = _split(_upcast(h).reshape(-1, sum(ranks)), ranks)
    dy2 = [_upcast(d).reshape(-1, d.shape[-1]) for d in dys]
    g = torch.cat([d @ _upcast(B) * s for d, B, s in zip(dy2, lora_bs, scales)], dim=1)
    if norm_rstd is None:
        dA = _split((g.t() @ x2).t(), ranks)
    else:
        rstd = norm_rstd.reshape(-1, 1).to(g.dtype)
        wf = norm_fold_weight(norm_weight, norm_offset, K, x).to(g.dtype)
        dA = _split(((g * rstd).t() @ x2 * wf).t(), ranks)
    dBs = [(d.t() @ hi) * s for d, hi, s in zip(dy2, hs, scales)]
    out = []
    if need_dx:
        dx = g @ torch.cat([_upcast(a) for a in lora_as])
        if fp8_dx:
            dx = dx + fp8.fp8_dx_reference(torch.cat([d.reshape(-1, d.shape[-1]) for d in dys], 1),
                                           torch.cat(list(weights), 0))
        else:
            for d, w in zip(dy2, weights):
                dx = dx + d @ _upcast(w)
        out.append(dx.to(x.dtype).reshape(x.shape))
    return out + [a.t().to(A.dtype, copy=True) for a, A in zip(dA, lora_as)] + [
        b.to(B.dtype, copy=True) for b, B in zip(dBs, lora_bs)]


def _folded_dA(g, x0, rstd, wf):
    """``((g ⊙ rstd)ᵀ x0) ⊙ wf`` rounded once. In half precision g ⊙ rstd goes to the GEMM
    as two halves (its rounding and the rest: [hi | lo], one GEMM of 2R rows that reads x0
    once), so it adds no rounding of its own; the unfolded dA's rounding of the norm's
    output is gone, and nothing else is rounded before the end."""
    gr = torch.mul(g, rstd.reshape(-1, 1).float())  # fp32 (or fp64) by type promotion
    if g.dtype in (torch.float32, torch.float64):
        return (gr.t() @ x0).mul_(wf.to(g.dtype))  # gr has g's dtype already
    R = g.shape[1]
    both = torch.empty(g.shape[0], 2 * R, dtype=g.dtype, device=g.device)
    both[:, :R].copy_(gr)  # hi: gr rounded
    both[:, R:].copy_(gr.sub_(both[:, :R]))  # lo: the exact rest, rounded
    p = mm_fp32(both.t(), x0)
    return p[:R].add_(p[R:]).mul_(wf).to(g.dtype)


def _group_backward_cublas(dys, x, weights, lora_as, lora_bs, h, scales, need_dx,
                          norm_rstd=None, norm_weight=None, norm_offset=0.0, fp8_dx=False,
                          fp8_copies=True):
    K = x.shape[-1]
    ranks = [a.shape[0] for a in lora_as]
    x2 = x.reshape(-1, K)
    hs = _split(h.reshape(-1, sum(ranks)), ranks)
    dy2 = [d.reshape(-1, d.shape[-1]) for d in dys]
    g = torch.cat([(d @ B).mul_(s) for d, B, s in zip(dy2, lora_bs, scales)], dim=1)
    if norm_rstd is None:
        dA = torch.mm(g.t(), x2)
    else:  # the norm fold: the per-row rstd on g's (tokens, R) side, w on dA's columns
        dA = _folded_dA(g, x2, norm_rstd, norm_fold_weight(norm_weight, norm_offset, K, x))
    dBs = [torch.mm(d.t(), hi).mul_(s) for d, hi, s in zip(dy2, hs, scales)]
    out = []
    if need_dx:
        # fp8_dx: one e4m3 GEMM for Σ dy_i W_i, then g A_cat added (None: it failed, exact)
        dx = fp8.fp8_dx(dy2, list(weights), fp8_copies) if fp8_dx else None
        if dx is not None:
            dx.addmm_(g, torch.cat(lora_as))
        else:
            dx = g @ torch.cat(lora_as)
            for d, w in zip(dy2, weights):
                dx.addmm_(d, w)  # accumulate every site's dy W into one buffer
        out.append(dx.reshape(x.shape))
    return out + [a.clone() for a in torch.split(dA, ranks, dim=0)] + dBs  # no aliased outputs


@lorafuse_op("lorafuse::lora_linear_group")
def lora_linear_group_op(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Optional[Tensor]],
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    scales: list[float],
    norm_x: Optional[Tensor] = None,
    norm_rstd: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_offset: float = 0.0,
    fp8_dx: bool = False,
    fp8_copies: bool = True,
) -> list[Tensor]:
    """Returns ``[y_1, ..., y_n, h]``. ``norm_*``: the norm fold, ``fp8_dx`` and
    ``fp8_copies``: how the backward computes dx (module docstring); the forward reads
    neither."""
    impl = _group_cuda if x.is_cuda else lora_group_reference
    return [t.contiguous() for t in impl(x, weights, biases, lora_as, lora_bs, scales)]


@lora_linear_group_op.register_fake
def _(x, weights, biases, lora_as, lora_bs, scales, norm_x=None, norm_rstd=None,
      norm_weight=None, norm_offset=0.0, fp8_dx=False, fp8_copies=True):
    lead = x.shape[:-1]
    ys = [x.new_empty(*lead, w.shape[0]) for w in weights]
    return ys + [x.new_empty(*lead, sum(a.shape[0] for a in lora_as))]


@lorafuse_op("lorafuse::lora_linear_group_backward")
def lora_linear_group_backward_op(
    dys: list[Tensor],
    x: Tensor,
    weights: list[Tensor],
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    h: Tensor,
    scales: list[float],
    need_dx: bool,
    norm_rstd: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_offset: float = 0.0,
    fp8_dx: bool = False,
    fp8_copies: bool = True,
) -> list[Tensor]:
    """Returns ``[dx] (if need_dx) + [dA_1..n] + [dB_1..n]``. With ``norm_rstd``, ``x`` is
    the norm's input x₀ (the norm fold): dx has its shape and dtype. ``fp8_dx``: Σ dy_i W_i
    in e4m3 where it applies (module docstring)."""
    impl = _group_backward_cublas if x.is_cuda else lora_group_backward_reference
    fp8_dx = bool(fp8_dx and need_dx and fp8.applies(
        [d.reshape(-1, d.shape[-1]) for d in dys], list(weights)))
    return [t.contiguous() for t in impl(dys, x, weights, lora_as, lora_bs, h, scales, need_dx,
                                         norm_rstd, norm_weight, norm_offset, fp8_dx,
                                         fp8_copies)]


@lora_linear_group_backward_op.register_fake
def _(dys, x, weights, lora_as, lora_bs, h, scales, need_dx, norm_rstd=None, norm_weight=None,
      norm_offset=0.0, fp8_dx=False, fp8_copies=True):
    dx = [torch.empty_like(x)] if need_dx else []
    return dx + [torch.empty_like(a) for a in lora_as] + [torch.empty_like(b) for b in lora_bs]


def _setup_context(ctx, inputs, output):
    (x, weights, biases, lora_as, lora_bs, scales, norm_x, norm_rstd, norm_weight, norm_offset,
     fp8_dx, fp8_copies) = tuple(inputs) + (None, None, None, 0.0, False, True)[len(inputs) - 6:]
    n = len(weights)  # (trailing defaults may be absent from inputs)
    ctx.n, ctx.scales, ctx.fp8_dx, ctx.fp8_copies = n, scales, fp8_dx, fp8_copies
    ctx.has_bias = [b is not None for b in biases]
    ctx.fold = norm_rstd is not None
    ctx.norm_offset = norm_offset
    # the norm fold keeps the norm's input and rstd (which its own backward keeps) instead
    # of x; dW, for a trainable base weight, then rebuilds x (passes/lora.py folds only
    # frozen ones)
    saved = (norm_x, norm_rstd, norm_weight) if ctx.fold else (x, None, None)
    ctx.save_for_backward(*saved, output[-1], *weights, *lora_as, *lora_bs)
    ctx.mark_non_differentiable(output[-1])


def _per_site(flag, n) -> list:
    return [bool(f) for f in flag] if isinstance(flag, (list, tuple)) else [bool(flag)] * n


def _backward(ctx, grads):
    x, rstd, norm_weight, h, *rest = ctx.saved_tensors  # x: the norm's input under the fold
    n = ctx.n
    weights, lora_as, lora_bs = rest[:n], rest[n:2 * n], rest[2 * n:]
    dtype = x.dtype  # the op's compute dtype (the norm's input has it too: passes/lora.py)
    dys = [g if g is not None
           else torch.zeros(*x.shape[:-1], w.shape[0], dtype=dtype, device=x.device)
           for g, w in zip(grads[:n], weights)]
    # needs_input_grad follows the inputs' structure: a list of bools for a list of tensors,
    # one bool for a list holding None (the biases, usually).
    need_x = ctx.needs_input_grad[0]
    need_w, need_b = (_per_site(ctx.needs_input_grad[i], n) for i in (1, 2))
    out = lora_linear_group_backward_op(dys, x, list(weights), list(lora_as), list(lora_bs), h,
                                        list(ctx.scales), bool(need_x), rstd, norm_weight,
                                        ctx.norm_offset, ctx.fp8_dx, ctx.fp8_copies)
    dx, out = (out[0], out[1:]) if need_x else (None, out)
    dAs, dBs = out[:n], out[n:]
    if ctx.fold and any(need_w):
        x = (x.float() * rstd.float() * norm_fold_weight(norm_weight, ctx.norm_offset,
                                                         x.shape[-1], x)).to(dtype)
    x2 = x.reshape(-1, x.shape[-1])
    dWs = [(d.reshape(-1, d.shape[-1]).t() @ x2).to(w.dtype) if nw else None
           for d, w, nw in zip(dys, weights, need_w)]
    dbs = [d.reshape(-1, d.shape[-1]).sum(0) if nb else None for d, nb in zip(dys, need_b)]
    if not all(ctx.has_bias):  # a list holding None is one leaf: one gradient slot (None)
        dbs = None
    # one gradient per argument the call gave (trailing defaults may be absent)
    grads = (dx, dWs, dbs, list(dAs), list(dBs), None, None, None, None, None, None, None)
    return grads[:len(ctx.needs_input_grad)]


lora_linear_group_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_group(x, weights, biases, lora_as, lora_bs, scales):
    """``[x W_iᵀ + b_i + s_i (x A_iᵀ) B_iᵀ for each i]`` with x read once."""
    return lora_linear_group_op(x, list(weights), list(biases), list(lora_as), list(lora_bs),
                                [float(s) for s in scales])[:-1]
