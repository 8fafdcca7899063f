"""LoRA pass: ``base(x) + B(A(dropout(x))) * s`` → one ``lorafuse::lora_linear`` op.

What PEFT's ``lora.Linear.forward`` looks like once Dynamo has inlined it::

    result = linear(x, W, b)                      # or GPT-2's Conv1D:
                                                  #   view(addmm(b, view(x, -1, K), W_kn), size)
    h      = linear(dropout(x'), A)               # x' = x, or x.to(adapter dtype);
    l      = linear(h, B)                         #   dropout absent when p = 0
    result = result + l * s

The match anchors on the ``add`` and classifies each side by hand (a pattern
rewriter cannot bind one placeholder to ``x`` twice, see DESIGN.md). Every
intermediate must be used only inside the site. The compute dtype is the one the
base product has in the graph (bf16 under autocast): all operands are cast to it,
as autocast would, and the op's output is cast to the add's dtype if they differ.

Norm fold: when a group's input is an RMSNorm's output (passes/norm.py's match: a Llama
layer's q/k/v and gate/up), in the compute dtype, with every base weight frozen, the
op also gets the norm's input, its rstd, weight and offset, and its backward computes the
adapters' dA from those (kernels/lora_group.py) instead of keeping the norm's output:
16 KiB per token and layer less kept at hidden 4096 in bf16. The ``norm`` pass, if it runs
later, takes such a norm back (it drops the fold: its own op keeps the norm's input and
rstd); LORAFUSE_NORM_FOLD=0 turns the fold off (to measure without it).

MLP fold: when a single site's input is a gated MLP's product ``act(gate) * up``
(passes/gated_mlp.py's match, or its op), in the compute dtype, with a frozen base weight
and no dropout (a Llama layer's down projection), the op also gets gate and up and computes
its dA from them (kernels/lora_gated.py): the backward keeps gate and up for the
activation's backward anyway, and no longer keeps the product (28 KiB per token and layer at
intermediate 14336 in bf16). LORAFUSE_MLP_FOLD=0 turns it off.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field

import torch
from torch import fx

from ..kernels._dispatch import warn_once
from ..kernels import lora as lora_kernels  # noqa: F401  (registers the ops)
from ..kernels import lora_group as lora_group_kernels  # noqa: F401
from . import gated_mlp as gated_mlp_pass
from . import norm as norm_pass
from ._graph import (
    DROPOUT_FUNCS,
    add_node,
    fake_mode_of,
    inserting_before,
    is_add,
    is_function,
    is_method,
    is_mul,
    linear_args,
    only_user,
    same_sizes,
    site_name,
    strip_upcasts,
    val,
)

NAME = "lora"
# Fuse sites sharing one input into one op (x read once, one dx buffer). LORAFUSE_LORA_GROUP=0
# turns it off, to measure each alone.
GROUP_SHARED_INPUTS = os.environ.get("LORAFUSE_LORA_GROUP", "1") != "0"
NORM_FOLD_ENV = "LORAFUSE_NORM_FOLD"  # 0: groups keep the norm's output (module docstring)
MLP_FOLD_ENV = "LORAFUSE_MLP_FOLD"  # 0: a down projection keeps its gated product


@dataclass
class Site:
    add: fx.Node
    x: fx.Node
    weight: fx.Node
    weight_is_kn: bool  # GPT-2 Conv1D stores W as (K, N)
    bias: object
    lora_a: fx.Node
    lora_b: fx.Node
    scale: object  # a float, or a node: PEFT's scaling as a run-time value (dynamic=True)
    x_lora: object  # the dropout node, or None when the adapter reads x itself
    base_out: fx.Node  # the base product; its dtype is the compute dtype
    erase: list = field(default_factory=list)  # the site's nodes, users first


class NoMatch(Exception):
    """The add is not a LoRA site; ``reason`` says why when it looked like one."""


def _runtime_scale(node) -> bool:
    """``scaling.item()``: under dynamic=True Dynamo passes PEFT's float scaling as a 0-d
    tensor input and reads it with ``item()`` (a SymFloat), so its value is not a constant."""
    return is_method(node, ("item",)) and isinstance(val(node), torch.SymFloat)


def _lora_term(node):
    """``l * s`` with ``l = linear(linear(x', A), B)`` → (A-linear, B-linear, s); s is a
    float, or the ``item()`` node of a run-time scale (``_runtime_scale``)."""
    if not is_mul(node):
        return None
    a, b = node.args[0], node.args[1]
    lin, s = (a, b) if isinstance(a, fx.Node) and not _runtime_scale(a) else (b, a)
    if not (_runtime_scale(s) or isinstance(s, (int, float))) or isinstance(s, bool):
        return None
    outer = linear_args(lin)
    if outer is None or outer[2] is not None:
        return None
    inner = linear_args(outer[0])
    if inner is None or inner[2] is not None:
        return None
    return outer[0], lin, s if isinstance(s, fx.Node) else float(s)


def _base(node):
    """A base linear → (x, W, W_is_kn, bias, nodes)."""
    args = linear_args(node)
    if args is not None:
        return args[0], args[1], False, args[2], [node]
    # GPT-2 Conv1D: view(addmm(b, view(x, -1, K), W_kn), x.shape[:-1] + (N,))
    if is_method(node, ("view", "reshape")) and is_function(node.args[0], (torch.addmm,)):
        mm = node.args[0]
        if mm.kwargs or len(mm.args) != 3 or not only_user(mm, node):
            return None
        b, flat, w = mm.args
        if not (is_method(flat, ("view", "reshape")) and only_user(flat, mm)):
            return None
        x = flat.args[0]
        vx, vy = val(x), val(node)
        if vx is None or vy is None or not same_sizes(vx.shape[:-1], vy.shape[:-1]):
            return None
        return x, w, True, b, [node, mm, flat]
    return None


def match(add: fx.Node) -> Site:
    if not is_add(add) or len(add.args) != 2:
        raise NoMatch(None)
    for base_node, term in (add.args, reversed(add.args)):
        lt = _lora_term(term)
        base = _base(base_node) if lt is not None else None
        if base is not None:
            break
    else:
        raise NoMatch(None)
    a_lin, b_lin, scale = lt
    x, w, w_kn, bias, base_nodes = base
    xa, A, _ = linear_args(a_lin)
    B = linear_args(b_lin)[1]

    # The adapter's input: x itself (maybe up-cast), or dropout of it.
    x_lora, inner = None, xa
    if is_function(xa, DROPOUT_FUNCS):
        x_lora, inner = xa, xa.args[0] if xa.args else xa.kwargs.get("input")
    if strip_upcasts(inner) is not x:
        raise NoMatch("adapter input is not the base layer's input")

    for n, user in ((term, add), (b_lin, term), (a_lin, b_lin), (base_nodes[0], add)):
        if not only_user(n, user):
            raise NoMatch("an intermediate of the site is used outside it")
    if x_lora is not None and not only_user(x_lora, a_lin):
        raise NoMatch("the dropout output is used outside the site")

    vx, vw, va, vb, vo = val(x), val(w), val(A), val(B), val(add)
    if any(not isinstance(v, torch.Tensor) for v in (vx, vw, va, vb, vo)):
        raise NoMatch("no example values recorded")
    if vw.dim() != 2 or va.dim() != 2 or vb.dim() != 2 or vx.dim() < 2:
        raise NoMatch("unexpected ranks")
    n_out, k = (vw.shape[1], vw.shape[0]) if w_kn else (vw.shape[0], vw.shape[1])
    r = va.shape[0]
    if not (same_sizes((vx.shape[-1],), (k,)) and same_sizes(va.shape, (r, k))
            and same_sizes(vb.shape, (n_out, r)) and same_sizes(vo.shape[-1:], (n_out,))):
        raise NoMatch("shapes do not line up")
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if any(v.dtype not in floats for v in (vx, vw, va, vb, vo)):
        raise NoMatch("non-float tensors (a quantized base is the dequant_matmul pass's job)")
    if len({v.device for v in (vx, vw, va, vb)}) != 1:
        raise NoMatch("tensors on several devices")
    for user in add.users:  # a second adapter added on top: leave both alone
        if is_add(user) and any(_lora_term(a) is not None for a in user.args if a is not add):
            raise NoMatch("several active adapters")

    erase = [add, term, b_lin, a_lin] + base_nodes
    return Site(add, x, w, w_kn, bias, A, B, scale, x_lora, base_nodes[0], erase)


def _compute_dtype(site: Site) -> torch.dtype:
    return val(site.base_out).dtype


def _norm_feeding(x: fx.Node):
    """The RMSNorm (a passes/norm.py Site, and its rsqrt node) whose output is ``x``, or
    None. The rsqrt is at most a few nodes above the output."""
    frontier, seen = [x], set()
    for _ in range(6):
        nxt = []
        for node in frontier:
            for a in node.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                if is_function(a, (torch.rsqrt,)) or is_method(a, ("rsqrt",)):
                    try:
                        site = norm_pass.match(a)
                    except norm_pass.NoMatch:
                        continue
                    if site.out is x:
                        return site, a
                nxt.append(a)
        frontier = nxt
    return None


def _norm_fold_args(sites: list, cdt) -> tuple:
    """The group op's norm-fold arguments ``(norm_x, rstd, weight, offset)``, or ``()``
    when its input is not a foldable RMSNorm's output (module docstring)."""
    x = sites[0].x
    if os.environ.get(NORM_FOLD_ENV, "1") == "0" or val(x).dtype != cdt:
        return ()
    if any(getattr(val(s.weight), "requires_grad", True) for s in sites):
        return ()  # dW would need the norm's output: keep it
    found = _norm_feeding(x)
    if found is None:
        return ()
    site, rs = found
    tx, tr = val(site.x), val(rs)
    if tx.dtype != cdt or not same_sizes(tx.shape, val(x).shape) or tr.dtype != torch.float32 \
            or not same_sizes(tr.shape, (*tx.shape[:-1], 1)):
        return ()
    if site.weight is not None and val(site.weight).dtype not in (torch.float16, torch.bfloat16,
                                                                   torch.float32):
        return ()
    return (site.x, rs, site.weight, float(site.offset))


def _mlp_fold_args(site: Site, cdt) -> tuple:
    """The single op's MLP-fold arguments ``(gate, up, act)``, or ``()`` when its input is
    not a foldable gated product (module docstring)."""
    if os.environ.get(MLP_FOLD_ENV, "1") == "0":
        return ()
    x = site.x
    if site.x_lora is not None or val(x).dtype != cdt \
            or getattr(val(site.weight), "requires_grad", True):
        return ()
    if is_function(x, (torch.ops.lorafuse.gated_mlp.default,)):
        gate, up, act = x.args[:3]
    else:
        try:
            gate, up, act, _ = gated_mlp_pass.match(x)
        except gated_mlp_pass.NoMatch:
            return ()
    if any(val(t).dtype != cdt or not same_sizes(val(t).shape, val(x).shape) for t in (gate, up)):
        return ()
    return (gate, up, act)


def rewrite(gm: fx.GraphModule, sites: list, fake_mode, remap: dict, fp8_dx: bool = False,
            fp8_copies: bool = True):
    """Replace one site, or several sharing one input, by one fused op. ``remap`` maps
    an already-rewritten add to its replacement (a site's input may be one). ``fp8_dx``:
    the op's backward computes dy W in e4m3 (the option). Returns the fold the op took:
    "norm", "mlp" or None."""
    kwargs = {"fp8_dx": True} if fp8_dx else {}  # absent by default: graphs stay as before
    if fp8_dx and not fp8_copies:
        kwargs["fp8_copies"] = False
    g = gm.graph
    cdt = _compute_dtype(sites[0])
    first = sites[0]  # sites come in graph order: insert before the first add
    with inserting_before(g, first.add):

        def cast(node):
            node = remap.get(node, node)
            if node is None or val(node).dtype == cdt:
                return node
            return add_node(g, "call_method", "to", (node, cdt), fake_mode)

        def lora_b(site):
            """B, with a run-time scale folded in (B·s, before the cast: one rounding) so
            the op's own scale is 1: the same product, and autograd scales dB."""
            if not isinstance(site.scale, fx.Node):
                return cast(site.lora_b), site.scale
            scaled = add_node(g, "call_function", operator.mul, (site.lora_b, site.scale), fake_mode)
            return cast(scaled), 1.0

        def weight(site):
            w = site.weight
            return add_node(g, "call_method", "t", (w,), fake_mode) if site.weight_is_kn else w

        x = cast(first.x)
        bs = [lora_b(site) for site in sites]
        if len(sites) == 1:
            fold = _mlp_fold_args(first, cdt)
            args = (x, cast(weight(first)), cast(first.bias), cast(first.lora_a),
                    bs[0][0], bs[0][1], cast(first.x_lora)) + fold
            call = add_node(g, "call_function", torch.ops.lorafuse.lora_linear.default, args,
                            fake_mode, kwargs)
        else:
            fold = _norm_fold_args(sites, cdt)
            args = (x, [cast(weight(s)) for s in sites], [cast(s.bias) for s in sites],
                    [cast(s.lora_a) for s in sites], [b for b, _ in bs], [sc for _, sc in bs])
            call = add_node(g, "call_function", torch.ops.lorafuse.lora_linear_group.default,
                            args + fold, fake_mode, kwargs)
        outs = []
        for i, site in enumerate(sites):
            out = add_node(g, "call_function", operator.getitem, (call, i), fake_mode)
            if val(site.add).dtype != cdt:
                out = add_node(g, "call_method", "to", (out, val(site.add).dtype), fake_mode)
            outs.append(out)
    for site, out in zip(sites, outs):
        site.add.replace_all_uses_with(out)
        remap[site.add] = out
        for node in site.erase:
            if not node.users:
                g.erase_node(node)
    return None if not fold else "mlp" if len(sites) == 1 else "norm"


def group_sites(sites: list, graph: fx.Graph) -> list:
    """Sites that read one input, in one dtype, without dropout, become one group (q/k/v,
    gate/up) when all their operands exist before the first site's add."""
    pos = {n: i for i, n in enumerate(graph.nodes)}
    groups, by_input = [], {}
    for site in sites:
        # Biases all present or all absent: a list mixing None is one autograd leaf.
        key = (site.x, _compute_dtype(site), site.bias is None)
        if site.x_lora is not None or not GROUP_SHARED_INPUTS:
            groups.append([site])
            continue
        group = by_input.get(key)
        operands = (site.weight, site.bias, site.lora_a, site.lora_b, site.scale)
        if group is not None and all(
                not isinstance(n, fx.Node) or pos[n] < pos[group[0].add] for n in operands):
            group.append(site)
        else:
            by_input[key] = [site]
            groups.append(by_input[key])
    return groups


def _adapter_placeholders(graph):
    """Parameter placeholders of LoRA A matrices, for accounting of sites left alone."""
    found = []
    for node in graph.nodes:
        t = str(node.target) if node.op == "placeholder" else ""
        if "_lora_A_" in t or "_lora_embedding_A_" in t:
            found.append(node)
    return found


_CHECKPOINT = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
CHECKPOINT_REASON = ("inside torch.utils.checkpoint (Hugging Face gradient checkpointing, TRL's "
                     "default): set gradient_checkpointing=False and use lorafuse's memory_budget")


def _why_left_alone(graph, a_ph, reasons) -> str:
    if a_ph in reasons:
        return reasons[a_ph]
    t = str(a_ph.target)
    if "_lora_embedding_A_" in t:
        return "LoRA on an embedding"
    module = t.split("_modules_lora_A_")[0]
    names = [str(n.target) for n in graph.nodes if n.op == "placeholder"]
    # DoRA: its magnitude vector, by module path, or (after the graph break PEFT's DoRA
    # forward causes) as the frame-local ``magnitude`` of the subgraph.
    if any(n.startswith(module) and "lora_magnitude_vector" in n for n in names) or \
            "L_magnitude_" in names:
        return "DoRA (magnitude vector)"
    if any(n.startswith(module + "_modules_base_layer_") and "quant_state" in n for n in names):
        return ("4-bit base (bitsandbytes): the dequant_matmul pass's job (not a default pass; "
                "with it the adapter's term is added to the base product before rounding)")
    if len({n for n in names if n.startswith(module + "_modules_lora_A_")}) > 1:
        return "several active adapters"
    if any(u.op == "call_function" and u.target is _CHECKPOINT for u in a_ph.users):
        return CHECKPOINT_REASON
    return "adapter not in the recognised base + B(A(x)) * s form"


def run(gm: fx.GraphModule, report, fp8_dx: bool = False, fp8_copies: bool = True) -> None:
    graph = gm.graph
    fake_mode = fake_mode_of(graph)
    sites, reasons = [], {}
    for node in graph.nodes:
        try:
            sites.append(match(node))
        except NoMatch as e:
            if e.args and e.args[0]:
                lt = next((_lora_term(a) for a in node.args if _lora_term(a)), None)
                if lt is not None:
                    reasons[linear_args(lt[0])[1]] = e.args[0]
    remap, folds = {}, {"norm": [], "mlp": []}
    for group in group_sites(sites, graph):
        fold = rewrite(gm, group, fake_mode, remap, fp8_dx, fp8_copies)
        names = [site_name(site.lora_a) for site in group]
        report.matched.extend(names)
        report.ops += 1
        if fold:
            folds[fold].append(names[0])
    if folds["norm"]:
        report.notes.append(f"norm fold: {len(folds['norm'])} grouped op(s) compute dA from the "
                            "RMSNorm's input and rstd; its output is not kept for the backward")
    if fp8_dx and report.ops:
        report.notes.append(f"fp8_dx: {report.ops} op(s) compute the frozen weights' dy W in "
                            "e4m3 in the backward (the gradients change; the forward does not)"
                            + ("" if fp8_copies else "; each weight cast in every backward "
                               "(fp8_copies=False)"))
    if folds["mlp"]:
        report.notes.append(f"MLP fold: {len(folds['mlp'])} op(s) compute dA from the gated "
                            "MLP's gate and up; the product is not kept for the backward")
    done = {site.lora_a for site in sites}
    for a_ph in _adapter_placeholders(graph):
        if a_ph not in done and a_ph.users:
            report.skipped.append((site_name(a_ph), _why_left_alone(graph, a_ph, reasons)))
    if any(why == CHECKPOINT_REASON for _, why in report.skipped):
        # Users rarely read the report, and this one costs all of the speed-up.
        warn_once(f"lorafuse: LoRA sites left unfused: {CHECKPOINT_REASON}")
    graph.lint()
    gm.recompile()
