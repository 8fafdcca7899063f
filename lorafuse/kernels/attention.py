"""Attention whose mask comes from the inputs: causal attention when the mask turns out
causal at run time, the masked call otherwise.

Trainers pass an ``attention_mask`` with every batch, so under tracing transformers builds
SDPA's mask from it (and from ``position_ids``): the graph cannot know whether a batch is
padded. Padded or not, the traced call is ``sdpa(q, repeat_kv(k), repeat_kv(v),
attn_mask=mask)``, which at the 8B shape costs 1.83 ms forward + backward against 0.73 ms
for ``sdpa(q, k, v, is_causal=True, enable_gqa=True)`` (bench/bench_attention.py).

Two ops, inserted by ``passes/masked_attention.py``:

- ``lorafuse::mask_is_causal(mask)`` → a 0-d bool tensor **on the CPU**: whether the mask
  selects exactly the causal (top-left ``tril``) pattern on every batch and head. One
  device→host read per mask per step (every layer shares the mask), early in the forward.
- ``lorafuse::sdpa_causal_or_masked(q, k, v, mask, use_causal, n_rep, scale)``: the
  attention of q against K/V with ``n_rep`` query heads per K/V head; ``is_causal=True``
  with ``enable_gqa`` on the unrepeated K/V where ``use_causal`` holds (reading a CPU bool:
  no sync), else exactly the traced masked call on repeated K/V.

The backward recomputes the forward (the same branch) and differentiates it: it keeps q,
k, v and the mask — not the output and its log-sum-exp as SDPA's own backward does — at
the price of one more attention forward (≈ 0.19 ms per layer at the 8B shape). Dropout is
not supported (the recompute would draw another mask): the pass leaves such calls alone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def is_causal_mask(mask, q_shape, k_shape) -> bool:
    """Whether ``mask`` (SDPA's ``attn_mask``: boolean, True = attend, or additive float)
    selects exactly what ``is_causal=True`` does for queries ``q_shape`` and keys
    ``k_shape`` (B, H, L, D): top-left ``tril`` on every batch and head. An additive mask
    must be 0 where attended and -inf (or the dtype's lowest) elsewhere."""
    if not isinstance(mask, torch.Tensor) or mask.dim() > 4:
        return False
    lq, lkv = q_shape[-2], k_shape[-2]
    full = (q_shape[0], q_shape[1], lq, lkv)
    try:
        m = torch.broadcast_to(mask, full[4 - mask.dim():] if mask.dim() else full)
    except RuntimeError:
        return False
    causal = torch.ones(lq, lkv, dtype=torch.bool, device=m.device).tril().expand_as(m)
    if m.dtype == torch.bool:
        return bool(torch.equal(m, causal))
    if not m.is_floating_point():
        return False
    lowest = torch.finfo(m.dtype).min
    return bool((m.masked_select(causal) == 0).all()) and \
        bool((m.masked_select(~causal) <= lowest).all())


def repeat_kv(t: Tensor, n_rep: int) -> Tensor:
    """(B, H, L, D) → (B, H·n, L, D), head h·n + r = head h (transformers' repeat_kv)."""
    if n_rep == 1:
        return t
    b, h, length, d = t.shape
    return t[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def attention_reference(q, k, v, mask, use_causal: bool, n_rep: int, scale):
    """The two branches, in plain SDPA calls (also the op's implementation on any device)."""
    if use_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=n_rep > 1)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                          attn_mask=mask, scale=scale)


@torch.library.custom_op("lorafuse::mask_is_causal", mutates_args=())
def mask_is_causal_op(mask: Tensor) -> Tensor:
    """0-d bool on the CPU: is ``mask`` ([B, [H,]] Lq, Lkv) the causal pattern everywhere?"""
    if not 2 <= mask.dim() <= 4:
        return torch.tensor(False)
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        # No host read inside a CUDA graph capture, and a replay would repeat whatever
        # branch was captured: take the masked call, which is right for every mask.
        return torch.tensor(False)
    b, h, lq, lkv = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return torch.tensor(is_causal_mask(mask, (b, h, lq, 1), (b, h, lkv, 1)))


@mask_is_causal_op.register_fake
def _(mask):
    return torch.empty((), dtype=torch.bool, device="cpu")


@torch.library.custom_op("lorafuse::sdpa_causal_or_masked", mutates_args=())
def sdpa_causal_or_masked_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                             use_causal: Tensor, n_rep: int,
                             scale: Optional[float]) -> Tensor:
    return attention_reference(q, k, v, mask, bool(use_causal), n_rep, scale).contiguous()


@sdpa_causal_or_masked_op.register_fake
def _(q, k, v, mask, use_causal, n_rep, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("lorafuse::sdpa_causal_or_masked_backward", mutates_args=())
def sdpa_causal_or_masked_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                      mask: Tensor, use_causal: Tensor, n_rep: int,
                                      scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) by recomputing the chosen branch; dk, dv on the unrepeated heads."""
    causal = bool(use_causal)
    # torch.func.vjp, not autograd.grad: inside a custom op's implementation the autograd
    # dispatch keys are excluded, so tensors would get no grad_fn; functorch's transform
    # levels work there.
    _, vjp = torch.func.vjp(
        lambda q_, k_, v_: attention_reference(q_, k_, v_, mask, causal, n_rep, scale),
        q, k, v)
    dq, dk, dv = vjp(dout)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@sdpa_causal_or_masked_backward_op.register_fake
def _(dout, q, k, v, mask, use_causal, n_rep, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


def _setup_context(ctx, inputs, output):
    q, k, v, mask, use_causal, n_rep, scale = inputs
    ctx.n_rep, ctx.scale = n_rep, scale
    ctx.save_for_backward(q, k, v, mask, use_causal)


def _backward(ctx, dout):
    q, k, v, mask, use_causal = ctx.saved_tensors
    dq, dk, dv = sdpa_causal_or_masked_backward_op(dout, q, k, v, mask, use_causal,
                                                   ctx.n_rep, ctx.scale)
    return dq, dk, dv, None, None, None, None


sdpa_causal_or_masked_op.register_autograd(_backward, setup_context=_setup_context)
