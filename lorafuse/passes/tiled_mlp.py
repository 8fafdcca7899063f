"""Tiled-MLP pass: a gated MLP whose three projections the lora pass fused → one
``lorafuse::tiled_mlp`` op that runs it a chunk of tokens at a time and keeps only its input
for the backward (kernels/tiled_mlp.py says why: at long context the MLP's intermediates are
most of a layer's backward memory). Opt-in, and it must run after ``lora``.

What the lora pass leaves of a Llama-style MLP (gate and up read one x, so they are one
grouped op)::

    g, u = lora_linear_group(x, [W_g, W_u], [b_g, b_u], [A_g, A_u], [B_g, B_u], [s_g, s_u])
    p    = act(g) * u                   # silu / gelu / gelu-tanh; casts to g's dtype allowed
    y, _ = lora_linear(p, W_d, b_d, A_d, B_d, s_d, None)

Matched only when every intermediate is used inside the MLP alone (dead casts aside), the
adapters read x itself (no LoRA dropout: the recompute would draw another mask), the scales
are numbers, and the graph has more tokens than one chunk (``tiled_mlp_tokens``, default
8192): below that a chunk is the whole MLP and nothing would be saved.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..kernels import tiled_mlp as tiled_mlp_kernels  # noqa: F401  (registers the ops)
from . import gated_mlp
from ._graph import add_node, fake_mode_of, inserting_before, is_function, is_method, val

NAME = "tiled_mlp"
_GROUP = torch.ops.lorafuse.lora_linear_group.default
_LINEAR = torch.ops.lorafuse.lora_linear.default


class NoMatch(Exception):
    """Not a fused gated MLP; ``args[0]`` says why when it looked like one."""


def _same_dtype_casts(node):
    """``node`` and the dtype-preserving ``.to`` casts above it: (source, [casts])."""
    casts = []
    while is_method(node, ("to",)) and isinstance(node.args[0], fx.Node) and \
            isinstance(val(node), torch.Tensor) and isinstance(val(node.args[0]), torch.Tensor) \
            and val(node).dtype == val(node.args[0]).dtype \
            and val(node).device == val(node.args[0]).device:
        casts.append(node)
        node = node.args[0]
    return node, casts


def _used_only_by(node, allowed) -> bool:
    """Every user of ``node`` is in ``allowed`` or has no users itself (a dead cast)."""
    return all(u in allowed or not u.users for u in node.users)


def match(down: fx.Node, chunk: int):
    """→ ``(x, weights, biases, lora_as, lora_bs, scales, act, chain)`` where ``chain`` is
    every node the op replaces, users first."""
    if not is_function(down, (_LINEAR,)):
        raise NoMatch(None)
    p, w_d, b_d, a_d, bb_d, s_d, x_lora = down.args[:7]  # not the MLP fold's gate and up
    try:
        gate, up, act, act_node = gated_mlp.match(p)
    except gated_mlp.NoMatch:
        raise NoMatch(None) from None
    if x_lora is not None:
        raise NoMatch("LoRA dropout on the down projection (a recompute would draw another mask)")
    (g_src, g_casts), (u_src, u_casts) = _same_dtype_casts(gate), _same_dtype_casts(up)
    if not (is_function(g_src, (operator.getitem,)) and is_function(u_src, (operator.getitem,))
            and g_src.args[0] is u_src.args[0] and is_function(g_src.args[0], (_GROUP,))):
        raise NoMatch(None)  # gate and up are not one grouped LoRA op's outputs
    group = g_src.args[0]
    x, weights, biases, lora_as, lora_bs, scales = group.args[:6]  # not the norm fold's
    if len(weights) != 2 or {g_src.args[1], u_src.args[1]} != {0, 1}:
        raise NoMatch("the grouped op is not exactly gate and up")
    if not all(isinstance(s, (int, float)) for s in (*scales, s_d)):
        raise NoMatch("LoRA scales are run-time values")
    order = (0, 1) if g_src.args[1] == 0 else (1, 0)
    users = [u for u in down.users if u.users]
    if not (len(users) == 1 and is_function(users[0], (operator.getitem,))
            and users[0].args[1] == 0):
        raise NoMatch("the down projection's LoRA intermediate is used")

    def one_user(n):  # down itself reads gate and up under the MLP fold (passes/lora.py)
        return len([u for u in n.users if u is not down]) == 1

    if not (_used_only_by(group, {g_src, u_src}) and one_user(g_src) and one_user(u_src)
            and all(one_user(c) for c in g_casts + u_casts) and _used_only_by(p, {down})):
        raise NoMatch("an MLP intermediate is used outside the MLP")
    for w in (*weights, *[b for b in biases if b is not None], w_d,
              *([b_d] if b_d is not None else [])):
        if getattr(val(w), "requires_grad", True):
            raise NoMatch("a base weight or bias is trained (the op gives no gradient for it)")
    xv = val(x)
    if not isinstance(xv, torch.Tensor) or not all(isinstance(d, int) for d in xv.shape):
        raise NoMatch("symbolic sizes")
    tokens = xv.numel() // xv.shape[-1]
    if tokens <= chunk:
        raise NoMatch(f"{tokens} tokens, not more than one chunk ({chunk})")
    def dead(n, keep=()):
        return [u for u in n.users if u not in keep and not u.users]

    chain = [users[0], *dead(down), down, *dead(p, (down,)), p, act_node, *g_casts, *u_casts,
             g_src, u_src, *dead(group, (g_src, u_src)), group]
    return (x, [weights[order[0]], weights[order[1]], w_d],
            [biases[order[0]], biases[order[1]], b_d],
            [lora_as[order[0]], lora_as[order[1]], a_d],
            [lora_bs[order[0]], lora_bs[order[1]], bb_d],
            [float(scales[order[0]]), float(scales[order[1]]), float(s_d)], act, chain)


def run(gm: fx.GraphModule, report, tiled_mlp_tokens: int = 8192) -> None:
    graph = gm.graph
    fake_mode = fake_mode_of(graph)
    for node in list(graph.nodes):
        if node._erased:  # part of an earlier match
            continue
        try:
            x, weights, biases, lora_as, lora_bs, scales, act, chain = match(
                node, tiled_mlp_tokens)
        except NoMatch as e:
            if e.args and e.args[0]:
                report.skipped.append((node.name, e.args[0]))
            continue
        out = chain[0]
        with inserting_before(graph, out, like=node):
            y = add_node(graph, "call_function", torch.ops.lorafuse.tiled_mlp.default,
                         (x, weights, biases, lora_as, lora_bs, scales, act,
                          int(tiled_mlp_tokens)), fake_mode)
        out.replace_all_uses_with(y)
        for n in dict.fromkeys(chain):  # users first; a node listed twice is erased once
            graph.erase_node(n)
        report.matched.append(node.name)
        report.ops += 1
    graph.lint()
    gm.recompile()
