"""Attention pass: make ``scaled_dot_product_attention`` calls cheap when the mask is causal.

What transformers hands SDPA under ``torch.compile`` (it cannot take its eager shortcut
while tracing)::

    mask = <boolean (B, 1, Lq, Lkv) causal mask built from aranges>   # no tensor inputs
    k    = k0[:, :, None, :, :].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D)  # repeat_kv
    v    = <the same on v0>
    out  = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, ...)

A kernel given an explicit mask must read it and cannot skip the masked half; K/V repeated
to every query head cost n× their memory and bandwidth. On the H200 at the 8B shape this
call (forward + backward) takes 1.83 ms against 0.73 ms for the same attention as
``is_causal=True, enable_gqa=True`` on the unrepeated K/V (``bench/bench_attention.py``).

The rewrite, per SDPA call:

1. **Causal mask → ``is_causal=True``**, only when the mask is proven causal: its whole
   producing subgraph has no inputs (no placeholder, no attribute: a function of constants
   only) and static sizes, so evaluating it once here gives its value at every call; the
   value must equal SDPA's own causal mask (top-left ``tril``) on every batch and head
   (boolean ``True`` = attend; an additive float mask 0 / -inf or the dtype's lowest).
   Masks that depend on inputs (padding, packed documents) or on symbolic sizes are left
   alone, with the reason in the report.
2. **repeat_kv → ``enable_gqa=True``**, when K and V are both the expand+reshape above with
   one repeat count and no mask remains (SDPA's fused kernels take GQA with ``is_causal``;
   with an explicit mask some fall back to the math kernel, so the repeat stays then).

The SDPA node stays an SDPA node, so Inductor still picks the kernel (cuDNN / flash /
efficient / math on CPU) and its backward.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .._torch import unset_fake_temporarily
from ..kernels._dispatch import warn_once
from ..kernels.attention import is_causal_mask
from ._graph import is_function, is_method, same_sizes, val

NAME = "attention"
SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")
# Never evaluate something random at compile time, even if it has no inputs.
_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "poisson")


class NoMatch(Exception):
    pass


def sdpa_call(node) -> dict | None:
    """The SDPA call's arguments by name, or None if ``node`` is not one."""
    if not is_function(node, SDPA):
        return None
    call = dict(zip(_SDPA_ARGS, node.args))
    call.update(node.kwargs)
    return call


def _ancestors(node: fx.Node) -> set:
    seen, stack = {node}, [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _size_only(p: fx.Node, anc: set) -> bool:
    """Whether the mask's subgraph ``anc`` reads only symbolic sizes from placeholder ``p``:
    ``p`` is a SymInt, or a tensor of symbolic sizes whose users there only ask its sizes."""
    v = val(p)
    if isinstance(v, torch.SymInt):
        return True
    if not isinstance(v, torch.Tensor) or _static_tensor(p):
        return False
    return all(u not in anc or (u.op == "call_method" and u.target in ("size", "dim"))
               or (u.op == "call_function" and u.target is getattr and u.args[1] == "shape")
               or (u.op == "call_function" and u.target is torch.ops.aten.sym_size.int)
               for u in p.users)


def _static_tensor(node) -> bool:
    v = val(node)
    if isinstance(v, torch.Tensor):
        return all(isinstance(s, int) for s in v.shape)
    return not isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool)


# A node of the mask's subgraph with more elements than this is not built whole when the
# caller takes a mask by rows (``evaluate_constant(..., by_rows=True)``): transformers'
# causal mask is (B, 1, L, L) booleans, 64 GiB at 256K tokens.
BY_ROWS_NUMEL = 2**24
TOO_LARGE = "mask subgraph too large to evaluate whole"
SYMBOLIC = "mask has symbolic sizes"
INPUTS = ("mask depends on inputs (padding or packed sequences; the masked_attention pass "
          "checks it at run time)")
# Ops that act element by element (with broadcasting): rows r0:r1 of their output are the
# op on rows r0:r1 of their inputs. Only these may produce a node built by rows.
_ELEMENTWISE = {operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
                operator.and_, operator.or_, operator.xor, operator.invert, operator.add,
                operator.sub, operator.mul, operator.neg, torch.le, torch.lt, torch.ge,
                torch.gt, torch.eq, torch.ne, torch.logical_and, torch.logical_or,
                torch.logical_not, torch.bitwise_and, torch.bitwise_or, torch.where}
_ELEMENTWISE_METHODS = {"le", "lt", "ge", "gt", "eq", "ne", "logical_and", "logical_or",
                        "logical_not", "bitwise_and", "bitwise_or", "to", "bool", "float",
                        "masked_fill", "__eq__", "__ne__", "__le__", "__lt__", "__ge__",
                        "__gt__", "__and__", "__or__", "__xor__", "__invert__", "__rand__",
                        "__ror__", "__add__", "__sub__", "__mul__", "__neg__"}


def _elementwise(n: fx.Node) -> bool:
    """Whether ``n`` is one of the element-wise ops above. Dynamo records ``a == b`` on
    tensors as ``operator.eq`` (torch 2.13) or as the method ``__eq__`` (torch 2.11)."""
    if n.op == "call_method":
        return n.target in _ELEMENTWISE_METHODS
    if n.op != "call_function":
        return False
    if n.target in _ELEMENTWISE:  # torch.where(cond) alone gives indices, not a mask
        return n.target is not torch.where or len(n.args) + len(n.kwargs) == 3
    name = getattr(n.target, "__name__", None)
    return name in _ELEMENTWISE_METHODS and getattr(torch.Tensor, name, None) is n.target


class RowsOfMask:
    """A node of a constant mask's subgraph too large to build whole: its rows (dimension
    -2) are computed on demand from its inputs' rows (``rows``), for ``is_causal_mask``."""

    def __init__(self, node: fx.Node, fn, args: tuple, kwargs: dict):
        v = val(node)
        self.shape, self.dtype, self.device = v.shape, v.dtype, v.device
        self.node, self.fn, self.args, self.kwargs = node, fn, args, kwargs

    def _rows_of(self, a, r0: int, r1: int):
        if isinstance(a, RowsOfMask):
            return a.rows(r0, r1)
        if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[-2] == self.shape[-2] > 1:
            return a[..., r0:r1, :]  # right-aligned with this node: dim -2 is its rows
        return a  # a scalar, a dtype, or a tensor broadcast along the rows

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        args = fx.node.map_aggregate(self.args, lambda a: self._rows_of(a, r0, r1))
        kwargs = fx.node.map_aggregate(self.kwargs, lambda a: self._rows_of(a, r0, r1))
        if self.fn == "expand":  # its sizes name the full rows: expand to the block's
            block = list(self.shape)
            block[-2] = r1 - r0 if self.shape[-2] > 1 else 1
            return args[0].expand(block)
        with unset_fake_temporarily(), torch.no_grad():
            return self.fn(*args, **kwargs)


def _has_rows(*trees) -> bool:
    found = []
    fx.node.map_aggregate(trees, lambda a: found.append(a) if isinstance(a, RowsOfMask) else a)
    return bool(found)


def _run(n: fx.Node, args, kwargs):
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    return n.target(*args, **kwargs)


def _leading_new_dims(index) -> bool:
    """Whether ``x[index]`` only puts size-1 dimensions in front of x (``x[None, None]``,
    ``x[None, :, :]``): then its rows are x's rows, indexed the same way."""
    index = index if isinstance(index, tuple) else (index,)
    new = 0
    while new < len(index) and index[new] is None:
        new += 1
    return new > 0 and all(i is Ellipsis or i == slice(None) for i in index[new:])


def _by_rows(n: fx.Node, args, kwargs) -> RowsOfMask:
    """``n`` as a RowsOfMask, or NoMatch if its op does not work row by row."""
    v = val(n)
    if not isinstance(v, torch.Tensor) or v.dim() < 2:
        raise NoMatch(f"{TOO_LARGE} ({n.name})")
    if n.op == "call_method" and n.target == "expand":
        return RowsOfMask(n, "expand", args, kwargs)
    if is_function(n, (operator.getitem,)) and _leading_new_dims(n.args[1]):
        return RowsOfMask(n, operator.getitem, args, kwargs)
    if _elementwise(n):
        return RowsOfMask(n, lambda *a, **k: _run(n, a, k), args, kwargs)
    raise NoMatch(f"{TOO_LARGE} ({n.name}: {n.target})")


def evaluate_constant(gm: fx.GraphModule, node: fx.Node, by_rows: bool = False):
    """The value of ``node`` when its producing subgraph has no inputs and static sizes;
    raises NoMatch (with the reason) otherwise. With ``by_rows``, nodes of more than
    ``BY_ROWS_NUMEL`` elements made by element-wise ops are not built: the value may be a
    ``RowsOfMask``, whose rows ``is_causal_mask`` reads by blocks."""
    anc = _ancestors(node)
    # The reasons in this order, whatever the set's order: a mask that reads an input's
    # values is one (the Trainer's attention_mask) even where its sizes are symbolic too.
    if any(n.op == "get_attr" or (n.op == "placeholder" and not _size_only(n, anc))
           for n in anc):
        raise NoMatch(INPUTS)
    if any(any(r in str(n.target).lower() for r in _RANDOM) for n in anc):
        raise NoMatch("mask subgraph is random")
    if any(n.op == "placeholder" or not _static_tensor(n) for n in anc):
        raise NoMatch(SYMBOLIC)
    env = {}
    with unset_fake_temporarily(), torch.no_grad():
        for n in gm.graph.nodes:  # graph order is a topological order
            if n not in anc:
                continue
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            v = val(n)
            large = isinstance(v, torch.Tensor) and v.numel() > BY_ROWS_NUMEL
            env[n] = _by_rows(n, args, kwargs) if by_rows and (large or _has_rows(args, kwargs)) \
                else _run(n, args, kwargs)
    return env[node]


def repeat_kv_source(node):
    """``(k0, n)`` when ``node`` is ``k0[:, :, None].expand(B, H, n, L, D).reshape(B, H*n, L,
    D)``, with its intermediates used only there; else None."""
    if not is_method(node, ("reshape", "view")):
        return None
    exp = node.args[0]
    if not is_method(exp, ("expand",)) or len(exp.users) != 1:
        return None
    idx = exp.args[0]
    if not (isinstance(idx, fx.Node) and len(idx.users) == 1):
        return None
    if is_function(idx, (operator.getitem,)):
        full = slice(None)
        if idx.args[1] not in ((full, full, None, full, full), (full, full, None)):
            return None
    elif not (is_method(idx, ("unsqueeze",)) and idx.args[1:] == (2,)):
        return None
    k0 = idx.args[0]
    src, rep, out = val(k0), val(exp), val(node)
    if not all(isinstance(t, torch.Tensor) for t in (src, rep, out)) or src.dim() != 4:
        return None
    b, h, length, d = src.shape
    n = rep.shape[2]
    if not (same_sizes(rep.shape, (b, h, n, length, d))
            and same_sizes(out.shape, (b, h * n, length, d))):
        return None
    return k0, n


def rewrite_call(gm, node, call, masks: dict, warn_symbolic: bool = True) -> str:
    """Rewrite one SDPA call in place; returns what was done, raises NoMatch(reason).
    ``warn_symbolic``: warn (once) when a mask is left because its sizes are symbolic (not
    when the masked_attention pass runs next and takes such masks)."""
    q, k, v = val(call["query"]), val(call["key"]), val(call["value"])
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        raise NoMatch("not 4-D (batch, heads, length, dim) attention")
    mask = call.get("attn_mask")
    done = []
    if mask is not None:
        if call.get("is_causal"):
            raise NoMatch("both a mask and is_causal")
        # one evaluation per mask and shape (str: symbolic sizes do not hash)
        key = (mask, str(tuple(q.shape)), str(tuple(k.shape)))
        if key not in masks:
            try:
                masks[key] = ("ok", is_causal_mask(evaluate_constant(gm, mask, by_rows=True),
                                                   q.shape, k.shape))
            except NoMatch as e:
                masks[key] = ("no", e.args[0])
                if e.args[0].startswith(TOO_LARGE):
                    # Users rarely read the report, and this one costs L² bytes and half
                    # of attention's speed at every step (session 9: 1.8× slower at 16K).
                    warn_once(f"lorafuse: attention keeps an explicit {tuple(val(mask).shape)} "
                              f"mask: {e.args[0]}")
                elif e.args[0] == SYMBOLIC and warn_symbolic:
                    # The same cost, and easy to hit without knowing: once one batch has
                    # another length or batch size (an epoch's last batch), Dynamo recompiles
                    # with symbolic sizes and that graph then serves every later batch, the
                    # original shape included (checked on torch 2.13).
                    warn_once("lorafuse: attention keeps an explicit mask: its sizes are "
                              "symbolic (Dynamo recompiled for another sequence length or "
                              "batch size, and that graph now runs every batch), so it cannot "
                              "be proven causal at compile time; that costs L² bytes and up to "
                              "half of attention's speed at every step. Keep every batch the "
                              "same shape, compile with dynamic=False, or add the "
                              "\"masked_attention\" pass, which checks the mask at run time")
        status, detail = masks[key]
        if status == "no":
            raise NoMatch(detail)
        if not detail:
            raise NoMatch("mask is not causal")
        call["attn_mask"], call["is_causal"] = None, True
        done.append("causal")
    if call.get("is_causal") and not call.get("enable_gqa"):
        rk, rv = repeat_kv_source(call["key"]), repeat_kv_source(call["value"])
        if rk and rv and rk[1] == rv[1] and rk[1] > 1:
            call["key"], call["value"], call["enable_gqa"] = rk[0], rv[0], True
            done.append("gqa")
    if not done:
        raise NoMatch("")  # nothing to improve: not reported
    node.args = (call.pop("query"), call.pop("key"), call.pop("value"))
    node.kwargs = call
    return "+".join(done)


def _erase_dead(graph: fx.Graph, candidates) -> None:
    for n in reversed(list(graph.nodes)):
        if (n in candidates and not n.users and n.op in ("call_function", "call_method")
                and not n.is_impure() and not str(n.target).endswith("_")):
            graph.erase_node(n)


def run(gm: fx.GraphModule, report, passes=("attention",)) -> None:
    """``passes``: the backend's pass list (whether masked_attention follows)."""
    graph = gm.graph
    masks, dropped = {}, set()
    for i, node in enumerate(n for n in graph.nodes if sdpa_call(n) is not None):
        call = sdpa_call(node)
        before = set(node.all_input_nodes)
        site = f"sdpa.{i}"
        try:
            what = rewrite_call(gm, node, call, masks, "masked_attention" not in passes)
        except NoMatch as e:
            if e.args and e.args[0]:
                report.skipped.append((site, e.args[0]))
            continue
        report.matched.append(f"{site} ({what})")
        report.ops += 1
        for n in before - set(node.all_input_nodes):
            dropped |= _ancestors(n)
    _erase_dead(graph, dropped)  # the mask and repeat_kv nodes nothing reads any more
    graph.lint()
    gm.recompile()
