"""Small helpers for matching torch-level FX graphs as Dynamo captures them.

At this level a call may appear as a function (``torch._C._nn.linear``,
``operator.mul``) or as a method (``x.view(...)``, ``x.to(dtype)``), so predicates
here accept both spellings.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.nn.functional as F
from torch import fx

from .._torch import statically_known_true

LINEAR = (torch._C._nn.linear, F.linear)
ADD_FUNCS = (operator.add, torch.add, operator.iadd)
MUL_FUNCS = (operator.mul, torch.mul, operator.imul)
DROPOUT_FUNCS = (F.dropout, torch.dropout)
_FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def val(node):
    """The example value (a fake tensor) Dynamo recorded for ``node``, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def is_function(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node, names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def is_add(node) -> bool:
    return (is_function(node, ADD_FUNCS) and not node.kwargs) or (
        is_method(node, ("add",)) and not node.kwargs
    )


def is_mul(node) -> bool:
    return (is_function(node, MUL_FUNCS) or is_method(node, ("mul",))) and not node.kwargs


def linear_args(node):
    """``(input, weight, bias)`` of a linear call, or None."""
    if not is_function(node, LINEAR):
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x, w, b = args[:3]
    w = node.kwargs.get("weight", w)
    b = node.kwargs.get("bias", b)
    return x, w, b


def only_user(node, user) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1 and user in node.users


def strip_upcasts(node):
    """Follow lossless float up-casts (``x.to(torch.float32)`` of a bf16 x) back to
    their source: casting the result down again gives back exactly the source."""
    while isinstance(node, fx.Node) and is_method(node, ("to", "float", "type")):
        src = node.args[0]
        s, d = val(src), val(node)
        if not (isinstance(s, torch.Tensor) and isinstance(d, torch.Tensor)):
            break
        if d.device != s.device or s.dtype not in _FLOAT_RANK or d.dtype not in _FLOAT_RANK:
            break
        if _FLOAT_RANK[d.dtype] < _FLOAT_RANK[s.dtype] or (
            _FLOAT_RANK[d.dtype] == _FLOAT_RANK[s.dtype] and d.dtype != s.dtype
        ):
            break
        node = src
    return node


def same_sizes(a, b) -> bool:
    """Sizes equal without adding guards (symbolic sizes must be provably equal)."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def fake_mode_of(graph: fx.Graph):
    for node in graph.nodes:
        v = val(node)
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


# Where a new node comes from: the module path and source line of the node it replaces.
# The partitioner's layer checkpointing (layer_checkpoint.py) reads nn_module_stack to
# tell the layers apart, so a fused op must carry its layer's.
_INHERITED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")
_meta_sources: list = []


@contextlib.contextmanager
def _inheriting_meta(insert_point, like):
    _meta_sources.append(like)
    try:
        with insert_point:
            yield
    finally:
        _meta_sources.pop()


def inserting_before(graph, node, like=None):
    """``graph.inserting_before(node)``, and the nodes ``add_node`` makes meanwhile inherit
    the module path (nn_module_stack) and source of ``like`` (default ``node``)."""
    return _inheriting_meta(graph.inserting_before(node), like if like is not None else node)


def inserting_after(graph, node, like=None):
    """``graph.inserting_after(node)``, with the meta of ``like`` (default ``node``)."""
    return _inheriting_meta(graph.inserting_after(node), like if like is not None else node)


def add_node(graph, op, target, args, fake_mode=None, kwargs=None):
    """Insert ``op(target, args, kwargs)`` at the graph's insert point with its example value
    (and, inside ``inserting_before``/``inserting_after``, the replaced node's module path)."""
    kwargs = dict(kwargs or {})
    node = graph.create_node(op, target, tuple(args), kwargs)
    if _meta_sources:
        for key in _INHERITED_META:
            if key in _meta_sources[-1].meta:
                node.meta[key] = _meta_sources[-1].meta[key]
    if fake_mode is not None:
        fargs, fkw = fx.node.map_aggregate((args, kwargs),
                                           lambda a: val(a) if isinstance(a, fx.Node) else a)
        with fake_mode:
            if op == "call_method":
                node.meta["example_value"] = getattr(fargs[0], target)(*fargs[1:], **fkw)
            else:
                node.meta["example_value"] = target(*fargs, **fkw)
    return node


def site_name(placeholder: fx.Node) -> str:
    """A readable module path from a Dynamo parameter placeholder name, e.g.
    ``L_self_..._layers_modules_0_modules_self_attn_modules_q_proj_modules_lora_A_...``
    becomes ``layers.0.self_attn.q_proj``."""
    name = str(placeholder.target if placeholder.op == "placeholder" else placeholder.name)
    parts = [p for p in name.replace("_dict_modules_", "_modules_").split("_modules_")]
    keep = []
    for p in parts[1:]:
        if p.startswith(("lora_", "base_layer")):
            break
        keep.append(p)
    path = ".".join(keep)
    for junk in ("base_model.model.", "model."):
        if path.startswith(junk):
            path = path[len(junk):]
    return path or name
