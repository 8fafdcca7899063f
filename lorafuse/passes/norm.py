"""Norm pass: RMSNorm as transformers writes it → one ``lorafuse::rms_norm`` op, and
``F.layer_norm`` over the last dim → one ``lorafuse::layer_norm`` op.

What Dynamo captures (torch-level graph; h is fp32 throughout)::

    h = x.to(torch.float32)          # or x.float(); absent (or a no-op) when x is fp32
    v = h.pow(2).mean(-1, keepdim=True)
    r = torch.rsqrt(v + eps)
    n = h * r
    Llama, Mistral, Qwen2/3 (also per-head q/k norms on [..., heads, head_dim] views):
        y = weight * n.to(x.dtype)               → cast_before_weight=True
    Gemma (offset 1), fp32 scaling (offset 0):
        y = (n * (1.0 + weight.float())).type_as(x)   → cast_before_weight=False
    or no weight at all: y = n.to(x.dtype), or n itself.

The match anchors on the ``rsqrt`` and walks out both ways. It needs every intermediate
of the activation chain (h when it is a cast, h², v, v + eps, r, n, the casts and
products after it) to be used only inside the match; x, weight and the output may be
used anywhere. Weight-side nodes (``weight.float()``, ``1 + ...``) are left in place if
something else uses them. Anything else is left alone with a reason. A grouped LoRA op
that reads the rstd for its norm fold (passes/lora.py) does not stop the match: the
rewrite drops that fold, and the op keeps the norm's output again.

LayerNorm: Dynamo leaves ``nn.LayerNorm`` (GPT-2's ln_1, ln_2, ln_f) as one
``F.layer_norm(x, normalized_shape, weight, bias, eps)`` call (``torch.layer_norm`` too);
it is rewritten when normalized_shape is the last dim alone (a constant provably equal to
x's), eps is a constant, weight and bias (each optional) are (N,) tensors of x's dtype or
fp32 with a half-precision x, and the call's output has x's dtype and shape (under CUDA
autocast F.layer_norm returns fp32 for a half input: left alone). Anything else is left
alone with a reason. The op saves x, mean and rstd for the backward, not the output.

Not a default pass (``passes=(..., "norm")`` asks for it). On the H200 at the 8B shapes
(bench/bench_norm.py, session 31, forward + backward on the GPU alone) the ops alone beat
Inductor's norms (1.06-1.17 × on the hidden state, 1.7-2.3 × on per-head q/k norms), but
behind a residual add Inductor folds the add into its norm: Llama's rows 0.79-0.81 ×,
LayerNorm's 0.75 ×, Gemma's ≈ 1.1 ×. In a whole Llama 8B step without CUDA graphs the
pass cost 2.3 % (bench/RESULTS.md, 2026-11-28).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..kernels import lora_group as lora_group_kernels  # noqa: F401  (registers the ops)
from ..kernels import norm as norm_kernels  # noqa: F401  (registers the ops)
from ._graph import (
    add_node,
    fake_mode_of,
    inserting_before,
    is_add,
    is_function,
    is_method,
    is_mul,
    same_sizes,
    site_name,
    val,
)

NAME = "norm"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_POW_FUNCS = (torch.pow, operator.pow)
_RSQRT_FUNCS = (torch.rsqrt,)
_MEAN_FUNCS = (torch.mean,)
_LAYER_NORM_FUNCS = (torch.nn.functional.layer_norm, torch.layer_norm)
_LORA_GROUP = torch.ops.lorafuse.lora_linear_group.default


@dataclass
class Site:
    x: fx.Node
    weight: object  # fx.Node or None
    eps: float
    offset: float
    cast_before_weight: bool
    out: fx.Node  # the node whose value the op's output replaces
    chain: list = field(default_factory=list)  # activation-chain nodes, inputs first
    weight_side: list = field(default_factory=list)  # weight.float(), offset + ...


class NoMatch(Exception):
    """Not an RMSNorm; ``reason`` says why when it looked like one."""


def _number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _tensor(node):
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def _cast(node):
    """A pure dtype cast → its source node, else None: ``t.to(dtype)``,
    ``t.to(dtype=...)``, ``t.float()``, ``t.type_as(other)`` (same device)."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or not node.args:
        return None
    src = node.args[0]
    if node.target == "to":
        if len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.dtype):
            pass
        elif len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
            pass
        else:
            return None
    elif node.target == "float":
        if len(node.args) != 1 or node.kwargs:
            return None
    elif node.target == "type_as":
        if len(node.args) != 2 or node.kwargs:
            return None
    else:
        return None
    s, d = _tensor(src), _tensor(node)
    if s is None or d is None or s.device != d.device:
        return None
    return src


def _binary(node, pred):
    """Operands of a two-operand op matched by ``pred``."""
    if not pred(node) or len(node.args) != 2:
        return None
    return node.args


def _square_of(node):
    """``h.pow(2)``, ``torch.pow(h, 2)``, ``h ** 2``, ``h * h`` → h."""
    if (is_method(node, ("pow",)) or is_function(node, _POW_FUNCS)) and not node.kwargs \
            and len(node.args) == 2 and _number(node.args[1]) and node.args[1] == 2:
        return node.args[0]
    ab = _binary(node, is_mul)
    if ab is not None and ab[0] is ab[1] and isinstance(ab[0], fx.Node):
        return ab[0]
    return None


def _mean_last(node):
    """``t.mean(-1, keepdim=True)`` (or ``torch.mean``, dim as a kwarg or a 1-tuple) → t."""
    if not (is_method(node, ("mean",)) or is_function(node, _MEAN_FUNCS)):
        return None
    args = list(node.args)
    kw = dict(node.kwargs)
    if not args:
        return None
    src = args[0]
    dim = args[1] if len(args) > 1 else kw.pop("dim", None)
    keepdim = args[2] if len(args) > 2 else kw.pop("keepdim", False)
    if len(args) > 3 or kw or keepdim is not True:
        return None
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    t = _tensor(src)
    if t is None or not isinstance(dim, int) or dim not in (-1, t.dim() - 1):
        return None
    return src


def _fold_reads_rstd(user, node) -> bool:
    """``user`` is a grouped LoRA op that reads ``node`` as its norm fold's rstd
    (passes/lora.py): such a norm is still this pass's, and ``rewrite`` drops the fold."""
    return user.op == "call_function" and user.target is _LORA_GROUP and len(user.args) > 7 \
        and user.args[7] is node


def _users_within(node, allowed) -> bool:
    return all(u in allowed or _fold_reads_rstd(u, node) for u in node.users)


def _weight_of(node, N, device):
    """A (N,) float tensor node on ``device``, or None."""
    t = _tensor(node)
    if t is None or t.dtype not in _FLOATS or t.device != device or t.dim() != 1:
        return None
    return node if same_sizes(t.shape, (N,)) else None


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def match(rs: fx.Node) -> Site:
    if not (is_function(rs, _RSQRT_FUNCS) or is_method(rs, ("rsqrt",))) or \
            len(rs.args) != 1 or rs.kwargs:
        raise NoMatch(None)
    add = rs.args[0]
    ab = _binary(add, is_add)
    if ab is None:
        raise NoMatch(None)
    var, eps = ab
    if _mean_last(var) is None:
        var, eps = eps, var
    sq = _mean_last(var)
    h = _square_of(sq) if sq is not None else None
    th = _tensor(h)
    if th is None or th.dtype != torch.float32:
        raise NoMatch(None)
    if not _number(eps):
        if isinstance(eps, fx.Node) and _tensor(eps) is None:
            # torch.compile(dynamic=True) turns float attributes into graph inputs
            raise NoMatch("eps is a symbolic graph input, not a constant (dynamic=True)")
        raise NoMatch(None)
    # From here on it looks like an RMSNorm: failures carry a reason.
    users = [u for u in rs.users if not _fold_reads_rstd(u, rs)]
    mul_r = users[0] if len(users) == 1 else None
    ab = _binary(mul_r, is_mul) if mul_r is not None else None
    if ab is None or set(ab) != {h, rs} or len(set(ab)) != 2:
        raise NoMatch("rsqrt(mean(h²) + eps) is not only multiplied by h")
    src = _cast(h)
    x = src if src is not None and _tensor(src).dtype in _FLOATS else h
    tx = _tensor(x)
    if tx.dtype not in _FLOATS or tx.dim() < 1:
        raise NoMatch(f"input dtype {tx.dtype} is not a kernel dtype")
    N = tx.shape[-1]
    device = tx.device

    chain = ([h] if x is not h else []) + [sq, var, add, rs, mul_r]
    weight, offset, cast_before, weight_side = None, 0.0, True, []
    out = mul_r
    u = _only_user(mul_r)
    if u is not None and _cast(u) is mul_r and _tensor(u).dtype == tx.dtype:
        # Llama: n.to(input dtype), then maybe weight * that. (A cast to another dtype
        # stays outside: the op then ends at n.)
        out = u
        m = _only_user(u)
        ab = _binary(m, is_mul) if m is not None else None
        if ab is not None and u in ab and len(set(ab)) == 2:
            w = _weight_of(ab[1] if ab[0] is u else ab[0], N, device)
            if w is not None:
                weight, out = w, m
                chain.append(u)
    elif u is not None and _binary(u, is_mul) is not None and mul_r in u.args \
            and len(set(u.args)) == 2:
        # Gemma / fp32 scaling: n * (offset + weight.float()), then maybe a cast
        wt = u.args[1] if u.args[0] is mul_r else u.args[0]
        ab = _binary(wt, is_add)
        if ab is not None and any(_number(a) for a in ab):
            off, wf = ab if _number(ab[0]) else (ab[1], ab[0])
            offset = float(off)
            weight_side.append(wt)
        else:
            wf = wt
        tw = _tensor(wf)
        if tw is not None and tw.dtype == torch.float32:
            base = _cast(wf)
            if base is not None and _tensor(base).dtype in _FLOATS:
                weight_side.append(wf)
                wf = base
            w = _weight_of(wf, N, device)
        else:
            w = None
        if w is not None and _tensor(u).dtype == torch.float32:
            weight, cast_before, out = w, False, u
            chain.append(mul_r)
            c = _only_user(u)
            if c is not None and _cast(c) is u and _tensor(c).dtype in _FLOATS:
                chain.append(u)
                out = c
        elif offset:
            raise NoMatch("n * (offset + w) with w not a (hidden,) float weight")
    if out is mul_r:  # no weight and no cast: n itself (fp32) is the output
        cast_before = False
    chain = list(dict.fromkeys(chain))  # keep order, drop repeats
    if out in chain:
        chain.remove(out)

    inside = set(chain) | {out}
    for node in chain:
        if not _users_within(node, inside):
            raise NoMatch(f"intermediate '{node.name}' of the norm is used outside it")
    ty = _tensor(out)
    if ty is None or ty.dtype not in _FLOATS or not same_sizes(ty.shape, tx.shape):
        raise NoMatch("the output's dtype or shape is not the norm's")
    if weight is not None and cast_before and \
            ty.dtype != torch.promote_types(_tensor(weight).dtype, tx.dtype):
        raise NoMatch("weight * n has an unexpected dtype")
    return Site(x, weight, float(eps), offset, cast_before, out, chain, weight_side)


@dataclass
class LayerNormSite:
    x: fx.Node
    weight: object  # fx.Node or None
    bias: object  # fx.Node or None
    eps: float
    out: fx.Node  # the layer_norm call


_LN_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")


def match_layer_norm(node: fx.Node) -> LayerNormSite:
    """``F.layer_norm(x, (N,), weight, bias, eps)`` over x's last dim."""
    if not is_function(node, _LAYER_NORM_FUNCS):
        raise NoMatch(None)
    names = _LN_ARGS + (("cudnn_enable",) if node.target is torch.layer_norm else ())
    if len(node.args) > len(names) or set(node.kwargs) - set(names[len(node.args):]):
        raise NoMatch("layer_norm call with arguments it does not take")
    a = dict(zip(names, node.args), **node.kwargs)
    a.setdefault("weight", None)
    a.setdefault("bias", None)
    a.setdefault("eps", 1e-5)
    x, shape, eps = a.get("input"), a.get("normalized_shape"), a["eps"]
    tx = _tensor(x)
    if tx is None or tx.dtype not in _FLOATS or tx.dim() < 1:
        raise NoMatch(f"layer_norm input is not a {_FLOATS} tensor")
    if isinstance(shape, fx.Node):
        raise NoMatch("normalized_shape is computed in the graph (a symbolic size)")
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        raise NoMatch(f"normalized_shape {shape} is not the last dim alone")
    if not isinstance(shape[0], int) or not same_sizes(shape, tx.shape[-1:]):
        raise NoMatch("normalized_shape is not provably x's last dim (symbolic size)")
    if not _number(eps):
        raise NoMatch("eps is not a constant (a symbolic graph input under dynamic=True?)")
    N = tx.shape[-1]
    params = []
    for key in ("weight", "bias"):
        p = a[key]
        if p is None:
            params.append(None)
            continue
        tp = _tensor(p)
        if _weight_of(p, N, tx.device) is None:
            raise NoMatch(f"layer_norm {key} is not a ({N},) float tensor on x's device")
        if tp.dtype != tx.dtype and not (tp.dtype == torch.float32 and
                                          tx.dtype != torch.float32):
            raise NoMatch(f"layer_norm {key} dtype {tp.dtype} with input {tx.dtype}")
        params.append(p)
    if all(p is not None for p in params) and \
            _tensor(params[0]).dtype != _tensor(params[1]).dtype:
        raise NoMatch("layer_norm weight and bias of different dtypes")
    ty = _tensor(node)
    if ty is None or ty.dtype != tx.dtype or not same_sizes(ty.shape, tx.shape):
        raise NoMatch("layer_norm output dtype or shape is not the input's (autocast?)")
    return LayerNormSite(x, params[0], params[1], float(eps), node)


def rewrite_layer_norm(gm: fx.GraphModule, site: LayerNormSite, fake_mode, remap: dict) -> None:
    g = gm.graph
    with inserting_before(g, site.out):
        args = (remap.get(site.x, site.x), remap.get(site.weight, site.weight),
                remap.get(site.bias, site.bias), site.eps)
        call = add_node(g, "call_function", torch.ops.lorafuse.layer_norm.default, args,
                        fake_mode)
        y = add_node(g, "call_function", operator.getitem, (call, 0), fake_mode)
    site.out.replace_all_uses_with(y)
    remap[site.out] = y
    g.erase_node(site.out)


def rewrite(gm: fx.GraphModule, site: Site, fake_mode, remap: dict) -> int:
    """Replace one site; ``remap`` maps an already-replaced output to its replacement (a
    norm's input may be another norm's output). Returns how many norm folds it dropped."""
    g = gm.graph
    dropped = 0
    for node in site.chain:  # the norm fold's grouped ops read the op's numbers now
        for u in list(node.users):
            if _fold_reads_rstd(u, node):
                u.args = u.args[:6]
                dropped += 1
    with inserting_before(g, site.out):
        args = (remap.get(site.x, site.x), remap.get(site.weight, site.weight), site.eps, site.offset, site.cast_before_weight,
                _tensor(site.out).dtype)
        call = add_node(g, "call_function", torch.ops.lorafuse.rms_norm.default, args, fake_mode)
        y = add_node(g, "call_function", operator.getitem, (call, 0), fake_mode)
    site.out.replace_all_uses_with(y)
    remap[site.out] = y
    for node in [site.out] + list(reversed(site.chain)) + list(reversed(site.weight_side)):
        if not node.users:
            g.erase_node(node)
    return dropped


def _name(site) -> str:
    if site.weight is not None and site.weight.op == "placeholder":
        return site_name(site.weight).split("_parameters_")[0]
    return site.out.name


def run(gm: fx.GraphModule, report) -> None:
    graph = gm.graph
    fake_mode = fake_mode_of(graph)
    sites, remap, dropped = [], {}, 0
    for node in list(graph.nodes):
        for matcher in (match, match_layer_norm):
            try:
                sites.append(matcher(node))
                break
            except NoMatch as e:
                if e.args and e.args[0]:
                    report.skipped.append((node.name, e.args[0]))
                    break
    for site in sites:
        if isinstance(site, LayerNormSite):
            rewrite_layer_norm(gm, site, fake_mode, remap)
        else:
            dropped += rewrite(gm, site, fake_mode, remap)
        report.matched.append(_name(site))
        report.ops += 1
    if dropped:
        report.notes.append(f"took back the norm fold of {dropped} grouped LoRA op(s): they "
                            "keep the norm's output again")
    graph.lint()
    gm.recompile()
