"""A gated MLP with LoRA on its three projections, a chunk of tokens at a time:
``lorafuse::tiled_mlp`` (the ``tiled_mlp`` pass, passes/tiled_mlp.py).

    y = down(act(gate(x)) * up(x)),   each projection  x Wᵀ + b + s · (x Aᵀ) Bᵀ

At long context the MLP's intermediates dominate a layer's memory in the backward: gate,
up, act·up and their gradients are (tokens × intermediate) each, 28 KiB per token each at
the 8B shape (session 9: most of the 185 KiB per token that a ``checkpoint_layers`` step
holds). This op keeps none of them. Its forward runs the fused ops (grouped LoRA gate/up, the
gated product, LoRA down) one chunk of tokens at a time and keeps only x; its backward
(``tiled_mlp_backward``, opaque to the tracer like every lorafuse op) recomputes each
chunk's gate, up and product and runs those ops' own backward ops on it, summing the LoRA
gradients over the chunks in fp32. So per chunk the numbers are those of the untiled ops
(with the gated_mlp pass); only the order of the LoRA gradients' sums over tokens differs.
The price is one more MLP forward per step (the recompute), which ``checkpoint_layers``
pays anyway.

``tiled_mlp_reference`` is the plain PyTorch formula, for the tests.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .gated_mlp import activation, gated_mlp_backward_op, gated_mlp_op
from .lora import lora_linear_backward_op, lora_linear_op
from .lora_group import lora_linear_group_backward_op, lora_linear_group_op
from ._ops import lorafuse_op

def tiled_mlp_reference(x, weights, biases, lora_as, lora_bs, scales, act: str) -> Tensor:
    """``down(act(gate(x)) * up(x))`` with each projection ``x Wᵀ + b + s (x Aᵀ) Bᵀ``."""
    def proj(t, i):
        return F.linear(t, weights[i], biases[i]) + \
            scales[i] * F.linear(F.linear(t, lora_as[i]), lora_bs[i])

    return proj(activation(proj(x, 0), act) * proj(x, 1), 2)


def _gate_up(x2, weights, biases, lora_as, lora_bs, scales, act):
    """One chunk's ``(gate, up, h, act(gate) * up)`` with the ops of the untiled graph."""
    g, u, h = lora_linear_group_op(x2, weights[:2], biases[:2], lora_as[:2], lora_bs[:2],
                                   scales[:2])
    return g, u, h, gated_mlp_op(g, u, act, g.dtype)


@lorafuse_op("lorafuse::tiled_mlp")
def tiled_mlp_op(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
                 lora_as: list[Tensor], lora_bs: list[Tensor], scales: list[float], act: str,
                 chunk: int) -> Tensor:
    """``down(act(gate(x)) * up(x))`` (gate, up, down: ``weights[0..2]`` with their LoRA
    factors), computed ``chunk`` tokens at a time."""
    x2 = x.reshape(-1, x.shape[-1])
    out = x2.new_empty(x2.shape[0], weights[2].shape[0])
    for i in range(0, x2.shape[0], chunk):
        p = None  # the last chunk's product goes back before this chunk's are allocated
        p = _gate_up(x2[i:i + chunk], weights, biases, lora_as, lora_bs, scales, act)[3]
        out[i:i + chunk] = lora_linear_op(p, weights[2], biases[2], lora_as[2], lora_bs[2],
                                          scales[2], None)[0]
    return out.reshape(*x.shape[:-1], weights[2].shape[0])


@tiled_mlp_op.register_fake
def _(x, weights, biases, lora_as, lora_bs, scales, act, chunk):
    return x.new_empty(*x.shape[:-1], weights[2].shape[0])


@lorafuse_op("lorafuse::tiled_mlp_backward")
def tiled_mlp_backward_op(dy: Tensor, x: Tensor, weights: list[Tensor],
                          biases: list[Optional[Tensor]], lora_as: list[Tensor],
                          lora_bs: list[Tensor], scales: list[float], act: str,
                          chunk: int) -> list[Tensor]:
    """``[dx, dA_gate, dA_up, dA_down, dB_gate, dB_up, dB_down]``: each chunk's gate, up
    and act·up recomputed, then the backward ops of the untiled graph (LoRA down, gated
    product, grouped LoRA gate/up); the LoRA gradients summed over the chunks in fp32."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = torch.empty_like(x2)
    sums = [torch.zeros_like(t, dtype=torch.float32) for t in (*lora_as, *lora_bs)]
    for i in range(0, x2.shape[0], chunk):
        xc = x2[i:i + chunk]
        # the last chunk's (chunk × intermediate) tensors go back before this chunk's are
        # allocated: else two chunks' worth were live at once, half the point of tiling
        g = u = h = p = dp = dg = du = dx_c = None
        g, u, h, p = _gate_up(xc, weights, biases, lora_as, lora_bs, scales, act)
        dp, dA_d, dB_d = lora_linear_backward_op(dy2[i:i + chunk], p, weights[2], lora_as[2],
                                                 lora_bs[2], p @ lora_as[2].t(), scales[2])
        dg, du = gated_mlp_backward_op(dp, g, u, act, True, True)
        dx_c, dA_g, dA_u, dB_g, dB_u = lora_linear_group_backward_op(
            [dg, du], xc, weights[:2], lora_as[:2], lora_bs[:2], h, scales[:2], True)
        dx[i:i + chunk] = dx_c
        for s, d in zip(sums, (dA_g, dA_u, dA_d, dB_g, dB_u, dB_d)):
            s += d
    return [dx.reshape(x.shape)] + [s.to(t.dtype) for s, t in zip(sums, (*lora_as, *lora_bs))]


@tiled_mlp_backward_op.register_fake
def _(dy, x, weights, biases, lora_as, lora_bs, scales, act, chunk):
    return [torch.empty_like(x)] + [torch.empty_like(t) for t in (*lora_as, *lora_bs)]


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_as, lora_bs, scales, act, chunk = inputs
    ctx.scales, ctx.act, ctx.chunk = scales, act, chunk
    ctx.has_bias = [b is not None for b in biases]
    ctx.save_for_backward(x, *weights, *lora_as, *lora_bs,
                          *[b for b in biases if b is not None])


def _backward(ctx, dy):
    x, *rest = ctx.saved_tensors
    weights, lora_as, lora_bs, present = rest[:3], rest[3:6], rest[6:9], iter(rest[9:])
    biases = [next(present) if has else None for has in ctx.has_bias]
    # The pass matches frozen base weights and biases only: no gradient is computed for them.
    dx, *dfactors = tiled_mlp_backward_op(dy.contiguous(), x, list(weights), biases,
                                          list(lora_as), list(lora_bs), list(ctx.scales),
                                          ctx.act, ctx.chunk)
    no_bias_grads = None if not all(ctx.has_bias) else [None] * 3
    return (dx, [None] * 3, no_bias_grads, list(dfactors[:3]), list(dfactors[3:]), None, None,
            None)


tiled_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def tiled_mlp(x, weights, biases, lora_as, lora_bs, scales, act: str, chunk: int) -> Tensor:
    return tiled_mlp_op(x, list(weights), list(biases), list(lora_as), list(lora_bs),
                        [float(s) for s in scales], act, int(chunk))
