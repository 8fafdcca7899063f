"""Gated-MLP pass: ``act(gate) * up`` → one ``lorafuse::gated_mlp`` op.

What Dynamo captures from a gated MLP (Llama, Mistral, Qwen2/3: SiLU; Gemma2/3: GELU with
the tanh approximation; the exact GELU where a config asks for it)::

    a = torch.nn.functional.silu(gate)                 # or torch._C._nn.gelu(gate,
                                                       #    approximate='tanh' | 'none')
    y = a * up                                         # Phi-3: up * a, where
                                                       #   gate, up = gate_up.chunk(2, -1)

gate and up may come from anything: a linear, a chunk of one, or (after the lora pass)
the outputs of ``lorafuse::lora_linear*`` ops. The match anchors on the product and
needs the activation's output to be used only by it, and gate, up and the product to
have one shape (no broadcasting) and kernel dtypes; anything else is left alone with a
reason. The op's output dtype is the product's in the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from ..kernels import gated_mlp as gated_mlp_kernels  # noqa: F401  (registers the ops)
from ._graph import (
    add_node,
    fake_mode_of,
    inserting_before,
    is_function,
    is_mul,
    same_sizes,
    val,
)

NAME = "gated_mlp"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_SILU_FUNCS = (F.silu,)
_GELU_FUNCS = (F.gelu,)  # torch._C._nn.gelu itself


class NoMatch(Exception):
    """Not a gated MLP; ``reason`` says why when it looked like one."""


def _activation(node):
    """``silu(g)`` / ``gelu(g, approximate=...)`` → (g, "silu" | "gelu" | "gelu_tanh"),
    else None."""
    if is_function(node, _SILU_FUNCS):
        if len(node.args) == 1 and node.kwargs in ({}, {"inplace": False}):
            return node.args[0], "silu"
        return None
    if is_function(node, _GELU_FUNCS) and len(node.args) in (1, 2):
        approx = node.args[1] if len(node.args) == 2 else node.kwargs.get("approximate", "none")
        if set(node.kwargs) - {"approximate"}:
            return None
        return node.args[0], {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    return None


def match(mul: fx.Node):
    """→ (gate, up, activation name, activation node)."""
    if not is_mul(mul) or len(mul.args) != 2:
        raise NoMatch(None)
    for a, up in (mul.args, tuple(reversed(mul.args))):
        found = _activation(a)
        if found is not None and isinstance(up, fx.Node):
            break
    else:
        raise NoMatch(None)
    gate, act = found
    if act is None:
        raise NoMatch("GELU with an unknown approximation")
    if len(a.users) != 1:
        raise NoMatch("the activation's output is used outside the product")
    tg, tu, ty = val(gate), val(up), val(mul)
    if not all(isinstance(t, torch.Tensor) for t in (tg, tu, ty)):
        raise NoMatch("no example values recorded")
    if not (same_sizes(tg.shape, tu.shape) and same_sizes(tg.shape, ty.shape)):
        raise NoMatch("gate and up differ in shape (a broadcast product)")
    dtypes = [tg.dtype, tu.dtype, ty.dtype]
    if any(d not in _FLOATS for d in dtypes):
        raise NoMatch(f"dtypes {dtypes} are not kernel dtypes")
    if tg.device != tu.device:
        raise NoMatch("gate and up on different devices")
    return gate, up, act, a


def run(gm: fx.GraphModule, report) -> None:
    graph = gm.graph
    fake_mode = fake_mode_of(graph)
    for node in list(graph.nodes):
        try:
            gate, up, act, act_node = match(node)
        except NoMatch as e:
            if e.args and e.args[0]:
                report.skipped.append((node.name, e.args[0]))
            continue
        with inserting_before(graph, node):
            args = (gate, up, act, val(node).dtype)
            y = add_node(graph, "call_function", torch.ops.lorafuse.gated_mlp.default, args,
                         fake_mode)
        report.matched.append(node.name)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        graph.erase_node(act_node)
        report.ops += 1
    graph.lint()
    gm.recompile()
