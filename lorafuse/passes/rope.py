"""Rope pass: the rotary embedding of q and k → one ``lorafuse::rope`` op per q/k pair.

What Dynamo captures from transformers' ``apply_rotary_pos_emb`` (Llama, Mistral,
Qwen2/3, Gemma2/3 alike; cos/sin are [batch, seq, R] unsqueezed at dim 1 once per layer,
q is [batch, heads, seq, head_dim], a transposed view of the projection)::

    cos_u = cos.unsqueeze(1); sin_u = sin.unsqueeze(1)
    a  = q * cos_u
    x1 = q[..., :R/2]; x2 = q[..., R/2:]
    r  = torch.cat((-x2, x1), dim=-1)               # rotate_half
    q_embed = a + r * sin_u
    ... the same for k (fewer heads with GQA), with the same cos_u and sin_u

Phi-3 rotates the first R = cos.shape[-1] entries of each head and passes the rest
through (in HF's Phi-3 code this form is there even when R = head_dim)::

    q_rot = q[..., :R]; q_pass = q[..., R:]
    q_embed = torch.cat([q_rot * cos_u + rotate_half(q_rot) * sin_u, q_pass], dim=-1)

The match anchors on the add and checks the computation, never a module name: x * c +
rotate_half(x) * s, the operands of either product in either order, rotate_half as two
last-dim slices, a negation and a last-dim cat. Around it, the pass also takes in a
lossless up-cast of the input (``q.float()``), the partial-rotary slices and cat, and one
float cast of the result (``.to(dtype)``), where nothing else uses them. Two rotations
with the same cos/sin nodes (q and k of one layer, in graph order) become one op; its
output dtype is the one the graph had. Left alone with a reason: cos/sin that need a
gradient, an intermediate used outside the match, widths that are odd or symbolic, a
rotation with no partner, or a pair whose shapes or dtypes differ or whose results are
used before both inputs exist.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..kernels import rope as rope_kernels  # noqa: F401  (registers the ops)
from ._graph import (
    add_node,
    fake_mode_of,
    inserting_before,
    is_add,
    is_function,
    is_method,
    is_mul,
    same_sizes,
    strip_upcasts,
    val,
)

NAME = "rope"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_CAT_FUNCS = (torch.cat, torch.concat, torch.concatenate)
_NEG_FUNCS = (operator.neg, torch.neg)


@dataclass
class Rotation:
    x: fx.Node  # the tensor rotated (q or k), after any up-cast is stripped
    cos: fx.Node
    sin: fx.Node
    out: fx.Node  # the node whose value the op's output replaces
    chain: list = field(default_factory=list)  # the match's other nodes, inputs first


class NoMatch(Exception):
    """Not a rotation; ``reason`` says why when it looked like one."""


def _tensor(node):
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def _last_dim(node, dim) -> bool:
    t = _tensor(node)
    return t is not None and isinstance(dim, int) and dim in (-1, t.dim() - 1)


def _slice_last(node):
    """``src[..., a:b]`` (or with a full slice for each leading dim) → (src, a, b), the
    bounds as ints; else None."""
    if not is_function(node, (operator.getitem,)) or len(node.args) != 2:
        return None
    src, idx = node.args
    t = _tensor(src)
    if t is None or not isinstance(idx, tuple) or not idx or t.dim() < 1:
        return None
    *lead, last = idx
    full = slice(None, None, None)
    if not (lead == [Ellipsis] or (len(lead) == t.dim() - 1 and all(i == full for i in lead))):
        return None
    size = t.shape[-1]
    if not isinstance(last, slice) or last.step not in (None, 1) or not isinstance(size, int):
        return None
    start = 0 if last.start is None else last.start
    stop = size if last.stop is None else last.stop
    if not (isinstance(start, int) and isinstance(stop, int)) or not 0 <= start <= stop <= size:
        return None
    return src, start, stop


def _cat_last(node):
    """``torch.cat(parts, dim=-1)`` → parts; else None."""
    if not is_function(node, _CAT_FUNCS) or not node.args:
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or not _last_dim(node, dim):
        return None
    return list(parts)


def _rotate_half(node):
    """``cat((-x[..., h:], x[..., :h]), -1)`` over all of x's 2h last-dim entries →
    (x, [the slices, the negation, the cat]); else None."""
    parts = _cat_last(node)
    if parts is None or len(parts) != 2:
        return None
    neg, first = parts
    if not ((is_function(neg, _NEG_FUNCS) or is_method(neg, ("neg",))) and len(neg.args) == 1
            and not neg.kwargs):
        return None
    hi, lo = _slice_last(neg.args[0]), _slice_last(first)
    if hi is None or lo is None or hi[0] is not lo[0]:
        return None
    x, size = hi[0], _tensor(hi[0]).shape[-1]
    if size % 2 or lo[1:] != (0, size // 2) or hi[1:] != (size // 2, size):
        return None
    return x, [neg.args[0], first, neg, node]


def _mul_operands(node):
    """The (tensor, factor) readings of a two-operand product."""
    if not is_mul(node) or len(node.args) != 2:
        return []
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return []
    return [(a, b), (b, a)]


def _float_cast(node):
    """A float-dtype cast on the same device → its source, else None."""
    if not is_method(node, ("to", "float", "half", "bfloat16", "type_as")) or not node.args:
        return None
    if node.target == "to":
        ok = (len(node.args) == 2 and isinstance(node.args[1], torch.dtype) and not node.kwargs) \
            or (len(node.args) == 1 and set(node.kwargs) == {"dtype"})
        if not ok:
            return None
    elif len(node.args) != (2 if node.target == "type_as" else 1) or node.kwargs:
        return None
    s, d = _tensor(node.args[0]), _tensor(node)
    if s is None or d is None or s.device != d.device or d.dtype not in _FLOATS:
        return None
    return node.args[0]


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def match(add: fx.Node) -> Rotation:
    if not is_add(add) or len(add.args) != 2:
        raise NoMatch(None)
    found = None
    for m1, m2 in (add.args, tuple(reversed(add.args))):
        for x, c in _mul_operands(m1):
            for r, s in _mul_operands(m2):
                rh = _rotate_half(r)
                if rh is not None and rh[0] is x:
                    found = (x, c, s, [*rh[1], m1, m2])
    if found is None:
        raise NoMatch(None)
    # From here on it is a rotation: failures carry a reason.
    x, cos, sin, chain = found
    tx, tc, ts, ta = _tensor(x), _tensor(cos), _tensor(sin), _tensor(add)
    if tc is None or ts is None or ta is None:
        raise NoMatch("no example values recorded")
    if tc.requires_grad or ts.requires_grad:
        raise NoMatch("cos/sin need a gradient")
    R = tx.shape[-1]
    if tc.shape[-1] != R or not same_sizes(tc.shape, ts.shape):
        raise NoMatch("cos/sin do not span the rotated width")
    if not same_sizes(ta.shape, tx.shape):
        raise NoMatch("cos/sin broadcast the rotated tensor to a larger shape")
    out, inp = add, x
    # Partial rotary: x = q[..., :R], and the result is cat([rotated, q[..., R:]], -1).
    sl, cat = _slice_last(x), _only_user(add)
    parts = _cat_last(cat) if cat is not None else None
    if sl is not None and sl[1] == 0 and parts is not None and len(parts) == 2 and \
            parts[0] is add:
        rest = _slice_last(parts[1])
        if rest is not None and rest[0] is sl[0] and rest[1:] == (R, _tensor(sl[0]).shape[-1]):
            chain += [x, parts[1], add]
            inp, out = sl[0], cat
    # A lossless up-cast of the input (q.float()) used only here.
    inside = set(chain) | {out}
    while True:
        src = strip_upcasts(inp) if is_method(inp, ("to", "float", "type")) else inp
        if src is inp or not all(u in inside for u in inp.users):
            break
        chain.insert(0, inp)
        inside.add(inp)
        inp = inp.args[0]
    # One float cast of the result (.to(dtype)) is rounded by the op instead.
    u = _only_user(out)
    if u is not None and _float_cast(u) is out:
        chain.append(out)
        out = u
    chain = list(dict.fromkeys(chain))
    inside = set(chain) | {out}
    for node in chain:
        if not all(u in inside for u in node.users):
            raise NoMatch(f"intermediate '{node.name}' of the rotation is used outside it")
    dtypes = [_tensor(n).dtype for n in (inp, cos, sin, out)]
    if any(d not in _FLOATS for d in dtypes):
        raise NoMatch(f"dtypes {dtypes} are not kernel dtypes")
    return Rotation(inp, cos, sin, out, chain)


def _pair_problem(q: Rotation, k: Rotation, pos: dict):
    """Why q and k cannot be one op, or None."""
    tq, tk = _tensor(q.x), _tensor(k.x)
    if tq.dim() != tk.dim() or tq.dim() > 4:
        return "q and k have different ranks, or rank > 4"
    rank = tq.dim()
    differ = [d for d in range(rank) if not same_sizes(tq.shape[d:d + 1], tk.shape[d:d + 1])]
    if len(differ) > 1 or (differ and differ[0] not in (rank - 3, rank - 2)):
        return "q and k differ in more than their number of heads"
    if _tensor(q.out).dtype != _tensor(k.out).dtype:
        return "q and k results have different dtypes"
    start = max(pos[n] for n in (q.x, k.x, q.cos, q.sin))
    if any(pos[u] <= start for r in (q, k) for u in r.out.users):
        return "a result is used before both inputs exist"
    return None


def rewrite(gm: fx.GraphModule, q: Rotation, k: Rotation, fake_mode, pos: dict) -> None:
    g = gm.graph
    last = max((q.x, k.x, q.cos, q.sin), key=pos.__getitem__)
    args = (q.x, k.x, q.cos, q.sin, _tensor(q.out).dtype)
    with inserting_before(g, last.next, like=last):
        call = add_node(g, "call_function", torch.ops.lorafuse.rope.default, args, fake_mode)
        outs = [add_node(g, "call_function", operator.getitem, (call, i), fake_mode)
                for i in (0, 1)]
    for r, y in zip((q, k), outs):
        r.out.replace_all_uses_with(y)
        for node in [r.out] + list(reversed(r.chain)):
            if not node.users:
                g.erase_node(node)


def run(gm: fx.GraphModule, report) -> None:
    graph = gm.graph
    fake_mode = fake_mode_of(graph)
    by_cos_sin = {}
    for node in graph.nodes:
        try:
            r = match(node)
        except NoMatch as e:
            if e.args and e.args[0]:
                report.skipped.append((node.name, e.args[0]))
            continue
        by_cos_sin.setdefault((r.cos, r.sin), []).append(r)
    pos = {n: i for i, n in enumerate(graph.nodes)}
    outs = {r.out for rotations in by_cos_sin.values() for r in rotations}
    pairs = []
    for rotations in by_cos_sin.values():
        for r in [r for r in rotations if r.x in outs]:  # rope of a rope: rare, left alone
            report.skipped.append((r.out.name, "its input is another rotation's result"))
            rotations.remove(r)
        for i in range(0, len(rotations) - 1, 2):
            q, k = rotations[i], rotations[i + 1]
            why = _pair_problem(q, k, pos)
            if why is None:
                pairs.append((q, k))
            else:
                report.skipped.append((f"{q.out.name}+{k.out.name}", why))
        if len(rotations) % 2:
            report.skipped.append((rotations[-1].out.name,
                                   "no second rotation with the same cos/sin to pair with"))
    for q, k in pairs:
        name = f"{q.out.name}+{k.out.name}"
        rewrite(gm, q, k, fake_mode, pos)
        report.matched.append(name)
        report.ops += 1
    graph.lint()
    gm.recompile()
