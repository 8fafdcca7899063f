"""Masked-attention pass: an SDPA call whose mask comes from the inputs → causal attention
on the unrepeated K/V when, at run time, the mask is causal, else flash attention on the
mask's per-query key ranges when those describe it (``kernels/attention.py``).

It takes the SDPA calls the ``attention`` pass could not prove causal at compile time —
in practice masks built from an ``attention_mask`` or ``position_ids`` input, which every
HF Trainer batch carries, padded or not::

    out = scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask)
  →
    use_causal = lorafuse::mask_is_causal(mask)          # once per mask, a CPU bool
    lo, hi, ranges_ok = lorafuse::mask_key_ranges(mask)  # once per mask, a CPU bool
    out = lorafuse::sdpa_causal_ranges_or_masked(q, k, v, mask, use_causal, ranges_ok,
                                                 lo, hi, n_rep, scale, flash)[0]

An unpadded batch gets ``is_causal=True, enable_gqa=True``. A batch whose mask shows each
query one contiguous, non-empty range of keys — right padding, packed documents
(``position_ids`` restarting at 0, no ``attention_mask``), a sliding window — gets
``lorafuse::flash_attention`` with those key bounds (causal=False, SDPA's scale), which
reads K/V once per head group and skips the K/V blocks outside each query block's ranges.
Anything else — notably left padding, whose padded queries see no key under transformers
5.x's masks — gets exactly the traced masked call. ``flash`` is False (that branch never
taken) where the head dim exceeds 256 or V's head dim differs from q's. Left alone: attention
dropout (where the op falls back to public SDPA its backward recomputes the forward, which
would draw another dropout mask), masks not shaped (…, Lq, Lkv), K/V
repeated in a form the pass does not recognise, and masks the compile can evaluate that
are not causal (a sliding window shorter than the sequence).

A default pass since session 14: on the 8B shape (H200, bench/RESULTS.md) it is 1.13 × the
passes without it on unpadded batches with an attention_mask (the causal kernel instead of
the masked one), 1.00 × on right-padded ones and 0.99 × on left-padded ones (session 15:
equal GPU time, the same cuDNN kernel as the traced masked call; session 13's 2-4 % loss
on padded batches was mostly two repeat copies a layer, since removed). Other GPUs are not
measured: where public SDPA would run neither cuDNN nor flash for the masked call (the
efficient kernel, e.g.), the masked branch recomputes its forward in the backward.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..kernels import attention as attention_kernels  # noqa: F401  (registers the ops)
from ._graph import (
    add_node,
    fake_mode_of,
    inserting_after,
    inserting_before,
    same_sizes,
    val,
)
from ..kernels.attention import is_causal_mask
from .attention import NoMatch as NotConstant
from .attention import _ancestors, _erase_dead, evaluate_constant, repeat_kv_source, sdpa_call

NAME = "masked_attention"


class NoMatch(Exception):
    pass


def _plan(call) -> tuple:
    """``(k, v, n_rep)`` to hand the op, or NoMatch with the reason."""
    q, k, v, mask = (val(call.get(a)) for a in ("query", "key", "value", "attn_mask"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        raise NoMatch("not 4-D (batch, heads, length, dim) attention")
    p = call.get("dropout_p", 0.0)
    if not (isinstance(p, (int, float)) and p == 0):
        raise NoMatch("attention dropout (the backward recomputes the forward)")
    if call.get("is_causal"):
        raise NoMatch("both a mask and is_causal")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or not (
            mask.dtype == torch.bool or mask.is_floating_point()):
        raise NoMatch("mask is not a 4-D boolean or additive mask")
    if not same_sizes(mask.shape[-2:], (q.shape[-2], k.shape[-2])):
        raise NoMatch("mask is not (…, query length, key length)")
    if call.get("enable_gqa"):
        heads, kv_heads = q.shape[1], k.shape[1]
        if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
            raise NoMatch("enable_gqa with head counts not known to divide")
        return call["key"], call["value"], heads // kv_heads
    rk, rv = repeat_kv_source(call["key"]), repeat_kv_source(call["value"])
    if rk and rv and rk[1] == rv[1]:
        return rk[0], rv[0], rk[1]
    if rk or rv:
        raise NoMatch("K and V repeated differently")
    if not same_sizes(q.shape[:2], k.shape[:2]):
        raise NoMatch("K/V heads differ from the query heads without repeat_kv")
    return call["key"], call["value"], 1


def _flash_fits(call) -> bool:
    """Whether the flash branch may run: q, k, v of one head dim up to 256."""
    from ..kernels.flash_attention import MAX_HEAD_DIM

    q, k, v = (val(call.get(a)) for a in ("query", "key", "value"))
    d = q.shape[-1]
    return isinstance(d, int) and d <= MAX_HEAD_DIM and same_sizes(k.shape[-1:], (d,)) \
        and same_sizes(v.shape[-1:], (d,))


def _constant_and_not_causal(gm, call) -> bool:
    """A mask the compile can evaluate (no inputs, static sizes) that is not causal — a
    sliding window, say: a run-time check would fail at every step, so leave it alone."""
    try:
        mask = evaluate_constant(gm, call["attn_mask"], by_rows=True)
    except NotConstant:
        return False
    return not is_causal_mask(mask, val(call["query"]).shape, val(call["key"]).shape)


def run(gm: fx.GraphModule, report) -> None:
    graph = gm.graph
    fake_mode = fake_mode_of(graph)
    flags, ranges, dropped = {}, {}, set()
    calls = [n for n in graph.nodes if sdpa_call(n) is not None]
    for i, node in enumerate(calls):
        call = sdpa_call(node)
        mask = call.get("attn_mask")
        if mask is None:
            continue
        site = f"sdpa.{i}"
        try:
            k, v, n_rep = _plan(call)
            if _constant_and_not_causal(gm, call):
                raise NoMatch("mask is constant and not causal (a run-time check would "
                              "always fail)")
        except NoMatch as e:
            report.skipped.append((site, e.args[0]))
            continue
        if mask not in flags:
            with inserting_after(graph, mask):
                flags[mask] = add_node(graph, "call_function",
                                       torch.ops.lorafuse.mask_is_causal.default, (mask,),
                                       fake_mode)
            with inserting_after(graph, flags[mask]):
                r = add_node(graph, "call_function",
                             torch.ops.lorafuse.mask_key_ranges.default, (mask,), fake_mode)
            with inserting_after(graph, r):
                ranges[mask] = [add_node(graph, "call_function", operator.getitem, (r, i),
                                         fake_mode) for i in range(3)]
        lo, hi, ok = ranges[mask]
        before = set(node.all_input_nodes)
        with inserting_before(graph, node):
            both = add_node(graph, "call_function",
                            torch.ops.lorafuse.sdpa_causal_ranges_or_masked.default,
                            (call["query"], k, v, mask, flags[mask], ok, lo, hi, n_rep,
                             call.get("scale"), _flash_fits(call)),
                            fake_mode)
            new = add_node(graph, "call_function", operator.getitem, (both, 0), fake_mode)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for n in before - set(new.all_input_nodes):
            dropped |= _ancestors(n)
        report.matched.append(site)
        report.ops += 1
    _erase_dead(graph, dropped)  # repeat_kv nodes nothing reads any more
    graph.lint()
    gm.recompile()
