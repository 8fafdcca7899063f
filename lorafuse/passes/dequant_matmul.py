"""Dequant-matmul pass: bitsandbytes 4-bit linears (and the LoRA adapter on top) → one op.

What Dynamo captures (bitsandbytes 0.50.2, torch 2.13, transformers 5.24, peft 0.21.2; a
tiny Llama loaded with ``BitsAndBytesConfig(load_in_4bit=True, ...)`` and wrapped by PEFT;
dumped for NF4 with double quantisation and FP4 without) — per 4-bit linear::

    x   = h.to(compute_dtype)                  # Linear4bit.forward (bf16 here)
    B   = W.view(-1, 1)                        # W: uint8 placeholder, ((N·K+1)//2, 1)
    # (a) when neither x nor the bias requires grad (layer 0's q/k/v: fed by frozen
    #     embeddings), matmul_4bit calls the op directly:
    y4  = torch.ops.bitsandbytes.gemm_4bit.default(x, B, (N, K), absmax, blocksize,
              'nf4' | 'fp4', bias=b, absmax_8bit=..., absmax_code=..., absmax_offset=...)
    # (b) otherwise MatMul4Bit.apply, a higher-order op with two subgraph attributes:
    afa = torch.ops.higher_order.autograd_function_apply(fwd_body_i, bwd_body_i, B, x,
              <quant-state tensors>, non_differentiable_idx=[], saved_for_backward_idx=[])
    y4  = afa[0]
    #     fwd_body_i: _set_grad_enabled(False); B.view(-1, 1); the same gemm_4bit call on its
    #     placeholders; returns ((output,), saved) (torch 2.13; torch 2.11 returns
    #     ((output, B, ...), saved): every other tensor or SymInt the body computed after
    #     the output, and bwd_body_i takes one unused gradient more for each); bwd_body_i:
    #     dequantize_blockwise(absmax_8bit, absmax2, code2.to(dev), 256, f32) (when nested);
    #     absmax += offset; dequantize_4bit(b, absmax, blocksize, qt, (N, K), f32);
    #     .to(grad dtype); matmul(grad_output, W) → grad of x only.
    y   = y4.to(input dtype)                   # Linear4bit.forward
    # PEFT's lora.Linear4bit.forward on top (absent for a linear without an adapter):
    r   = y.clone()
    l   = linear(linear(dropout?(h'), A), B_lora) * s      # h' = h (cast to A's dtype if not)
    out = r + l.to(r.dtype)                    # the .to is present even when it is a no-op

bitsandbytes 0.46–0.49 (dumped with 0.49.0 installed in a scratch venv): matmul_4bit
calls MatMul4Bit.apply in training; Dynamo captures it as the same
autograd_function_apply when x requires grad, its fwd_body holding the product as a
dequantise + linear (Linear4bit passes ``W.t()``, so the dequantised weight is transposed
back)::

    absmax = dequantize_blockwise(absmax_8bit, absmax2, code2.to(dev), 256, f32)  # nested
    absmax += offset
    out    = dequantize_4bit(W_t, absmax, blocksize, qt, (N, K), compute dtype)
    y4     = linear(x, out.t().to(x.dtype).t(), bias)

and, when x needs no gradient, those nodes inlined in the outer graph. Both are matched
(an even number of transposes; every intermediate used only by the product). The tests
pass with 0.49.0 too; CI runs the installed release only.

The quant state is graph placeholders (parameters' attributes, lifted like parameters):
non-nested: ``absmax`` f32[blocks]; nested (``bnb_4bit_use_double_quant``): ``absmax``
u8[blocks] (``absmax_8bit`` above), ``state2.absmax`` f32[ceil(blocks/256)] (the call's
``absmax`` argument), ``state2.code`` f32[256], ``offset`` f32[]. Shape (N, K), blocksize
and quant type are constants in the call. The 4-bit code table (``quant_state.code``) is
not in the graph: gemm_4bit takes the quant type by name.

Rewrite: a site with an adapter becomes ``lorafuse::nf4_linear`` (kernels/nf4.py) with the
adapter, anchored on the add, output in the add's dtype (the bf16 base product, the fp32
adapter term and their sum computed in fp32, rounded once); a 4-bit linear without one
becomes the op without an adapter, in place of ``y4``. The op's backward re-dequantises
W; nothing dequantised is saved. The adapter's input stays a separate operand (dropout
needs no special case: its node stays in the graph and autograd goes through it); where it
holds the base input's values in the same dtype (no dropout; casts that round alike), the
base input's node is passed for both, and the op's backward folds dx' into dx.

Several active adapters: PEFT adds them one after the other; the first is fused into
the op (its add is the anchor) and the others stay as they are, added to the op's output:
the same values.

Under autocast PEFT skips its casts (``l`` has no ``.to``, the adapter linears' values
are bf16 while A and B stay fp32): the op computes the adapter in the dtype its product
has in the graph (bf16, as autocast does; A and B are cast to it, and their gradients
flow back through the casts), so the forward is the bf16 LoRA op's one-rounding GEMM on
the dequantised weight (tested against an fp32-compute model).

Left alone, with a reason: an ``autograd_function_apply`` whose bodies are not
MatMul4Bit's; a dequantised weight used outside its linear; shapes, dtypes or quant-state
sizes that do not line up; an adapter whose intermediates are used outside the site (the
base alone is still rewritten); ``bitsandbytes.gemv_4bit``, which bitsandbytes 0.50 calls
only on CPU for a weight it repacked into another layout (``packing_format_for_cpu``) in
a forward of a Linear4bit in eval mode whose input needs no gradient, on CPUs with
AVX512-BF16 (Dynamo traces that repacking as a ``set_`` on the weight parameter, which
plain Inductor also fails on at run time with an input size assertion: train in train
mode).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .._torch import unset_fake_temporarily
from ..kernels import nf4 as nf4_kernels  # (also registers the ops)
from ._graph import (
    DROPOUT_FUNCS,
    add_node,
    fake_mode_of,
    inserting_before,
    is_add,
    is_function,
    is_method,
    linear_args,
    only_user,
    same_sizes,
    site_name,
    val,
)
from .lora import _lora_term

NAME = "dequant_matmul"
_GEMM_ARGS = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit",
              "absmax_code", "absmax_offset")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _gemm_4bit():
    ns = getattr(torch.ops, "bitsandbytes", None)
    op = getattr(ns, "gemm_4bit", None) if ns is not None else None
    return getattr(op, "default", None) if op is not None else None


def _dequantize_4bit():
    ns = getattr(torch.ops, "bitsandbytes", None)
    op = getattr(ns, "dequantize_4bit", None) if ns is not None else None
    return getattr(op, "default", None) if op is not None else None


_AFA = getattr(torch.ops.higher_order, "autograd_function_apply", None)


class NoMatch(Exception):
    """Not a rewritable 4-bit linear; ``reason`` says why."""


@dataclass
class Base:
    node: fx.Node  # the product (gemm_4bit or linear) or the autograd_function_apply
    out: fx.Node  # the base product: that node, or getitem(afa, 0)
    args: dict  # gemm_4bit's arguments, as nodes/constants of the outer graph
    erase: list = field(default_factory=list)  # users first


def _strip_views(node):
    """The packed weight behind ``view``/``reshape``/``t`` (its layout does not matter:
    the op reads it as bytes)."""
    while is_method(node, ("view", "reshape", "t")):
        node = node.args[0]
    return node


def _gemm_arguments(call: fx.Node) -> dict:
    args = dict(zip(_GEMM_ARGS, call.args))
    args.update(call.kwargs)
    for name in _GEMM_ARGS:
        args.setdefault(name, None)
    return args


def _bnb_op(name):
    ns = getattr(torch.ops, "bitsandbytes", None)
    op = getattr(ns, name, None) if ns is not None else None
    return getattr(op, "default", None) if op is not None else None


def _dequant_linear(node):
    """bitsandbytes < 0.50: ``linear(x, t(to(t(dequantize_4bit(B, absmax, ...)))), bias)``
    with, when double-quantised, ``absmax = dequantize_blockwise(absmax_8bit, absmax2,
    code2.to(device), 256, f32); absmax += offset`` → (gemm-style args, nodes users
    first), or None when ``node`` is not such a linear."""
    la = linear_args(node)
    deq = _bnb_op("dequantize_4bit")
    if la is None or deq is None:
        return None
    x, w, bias = la
    chain, n, transposes = [], w, 0
    while is_method(n, ("t", "to", "contiguous")):
        transposes += n.target == "t"
        chain.append(n)
        n = n.args[0]
    if not is_function(n, (deq,)):
        return None
    names = ("A", "absmax", "blocksize", "quant_type", "shape", "dtype")
    d = dict(zip(names, n.args))
    d.update(n.kwargs)
    if transposes % 2:
        raise NoMatch("linear on a transposed dequantised 4-bit weight")
    if any(is_method(c, ("to",)) and (len(c.args) != 2 or c.kwargs) for c in chain):
        raise NoMatch("dequantised weight moved or cast with unexpected arguments")
    nodes = [node] + chain + [n]
    am, a8 = d.get("absmax"), None
    code2 = offset = None
    if is_function(am, (operator.iadd, operator.add, torch.add)) or is_method(am, ("add", "add_")):
        blockwise, offset = am.args[0], am.args[1]
        dqb = _bnb_op("dequantize_blockwise")
        if not (is_function(blockwise, (dqb,)) and len(blockwise.args) >= 4):
            raise NoMatch("absmax computed by something else than dequantize_blockwise")
        a8, am2, code_expr, bs2 = blockwise.args[:4]
        if bs2 != nf4_kernels.NESTED_BLOCKSIZE:
            raise NoMatch(f"double-quantised absmax with blocksize {bs2} (256 supported)")
        nodes += [am, blockwise]
        code2 = code_expr
        while is_method(code2, ("to",)):
            nodes.append(code2)
            code2 = code2.args[0]
        am = am2
    args = dict(A=x, B=d.get("A"), shapeB=tuple(d.get("shape") or ()), absmax=am,
                blocksize=d.get("blocksize"), quant_type=d.get("quant_type"), bias=bias,
                absmax_8bit=a8, absmax_code=code2, absmax_offset=offset)
    return args, nodes


def _product(node):
    """``(args, nodes)`` of a 4-bit product at ``node`` (gemm_4bit, or the older
    dequantize + linear), or None."""
    gemm = _gemm_4bit()
    if gemm is not None and is_function(node, (gemm,)):
        return _gemm_arguments(node), [node]
    return _dequant_linear(node)


def _body(gm, node):
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    mod = getattr(gm, str(node.target), None)
    return mod if isinstance(mod, fx.GraphModule) else None


_SCALAR_FUNCS = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                 operator.not_, operator.and_, operator.or_, operator.getitem, operator.add,
                 operator.sub, operator.mul, operator.floordiv, operator.mod)


def _scalar_check(node) -> bool:
    """Size arithmetic with no tensor result: with dynamic shapes MatMul4Bit's forward
    keeps its shape tests as nodes (0.50: ``A.numel() == 0``; 0.49: ``A.size()[0]``),
    which nothing in the product uses."""
    if is_method(node, ("numel", "size", "dim")):
        return True
    return is_function(node, _SCALAR_FUNCS) and not isinstance(val(node), torch.Tensor) \
        and not any(isinstance(val(a), torch.Tensor) for a in node.args)


def _afa_base(gm, afa: fx.Node) -> Base:
    """MatMul4Bit.apply captured as autograd_function_apply(fwd_body, bwd_body, *ops)."""
    fwd, bwd = _body(gm, afa.args[0]), _body(gm, afa.args[1])
    if fwd is None or bwd is None:
        raise NoMatch(None)
    products = [p for p in (_product(n) for n in fwd.graph.nodes) if p is not None]
    if not products:
        raise NoMatch(None)  # some other autograd.Function
    if len(products) != 1:
        raise NoMatch("autograd_function_apply with several 4-bit products")
    args, nodes = products[0]
    inside = set(nodes)
    for n in fwd.graph.nodes:
        ok = n.op in ("placeholder", "output") or n in inside \
            or is_method(n, ("view", "reshape", "t")) or _scalar_check(n) \
            or (n.op == "call_function" and n.target is torch._C._set_grad_enabled)
        if not ok:
            raise NoMatch(f"MatMul4Bit-like forward with an unexpected node ({n.format_node()})")
    deq = _dequantize_4bit()
    if not any(n.op == "call_function" and n.target is deq for n in bwd.graph.nodes):
        raise NoMatch("autograd_function_apply around a 4-bit product whose backward does not "
                      "dequantize the weight (not bitsandbytes' MatMul4Bit)")
    # fwd_body returns ((outputs...), saved). torch 2.13: ``(product,)``. torch 2.11 also
    # returns the body's other intermediates after it (MatMul4Bit's ``B.view(-1, 1)``,
    # which it keeps on ctx; with dynamic shapes the size checks too), all nodes vetted
    # above; the outer graph reads only output 0 (checked below).
    out = next(n for n in fwd.graph.nodes if n.op == "output")
    first = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else None
    if not (isinstance(first, (tuple, list)) and first and first[0] is nodes[0]
            and all(isinstance(e, fx.Node) for e in first[1:])):
        raise NoMatch("MatMul4Bit-like forward returning something else than the product")
    users = list(afa.users)
    if len(users) != 1 or not (is_function(users[0], (operator.getitem,))
                               and users[0].args[1] == 0):
        raise NoMatch("autograd_function_apply output used other than by [0]")
    placeholders = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    outer = list(afa.args[2:])
    if len(placeholders) != len(outer):
        raise NoMatch("autograd_function_apply operands do not line up with its forward")
    to_outer = dict(zip(placeholders, outer))
    mapped = {}
    for name, a in args.items():
        if isinstance(a, fx.Node):
            src = _strip_views(a) if name == "B" else a  # only the packed weight is viewed
            if src not in to_outer:
                raise NoMatch(f"4-bit product argument {name} is computed inside the function")
            a = to_outer[src]
        mapped[name] = a
    return Base(afa, users[0], mapped, [users[0], afa])


def _base(gm, node) -> Base:
    if _AFA is not None and node.op == "call_function" and node.target is _AFA:
        b = _afa_base(gm, node)
    elif is_function(node, (_bnb_op("gemv_4bit"),)):
        raise NoMatch("bitsandbytes' inference kernel gemv_4bit, on a weight in another layout "
                      "(bitsandbytes 0.50 repacks a CPU weight when a Linear4bit in eval mode "
                      "gets an input that needs no gradient): call model.train() before the "
                      "first forward")
    else:
        found = _product(node)
        if found is None:
            raise NoMatch(None)
        args, nodes = found
        inside = set(nodes)
        if any(u not in inside for n in nodes[1:] for u in n.users):
            raise NoMatch("the dequantised weight (or its scales) is used outside the linear")
        b = Base(node, node, args, nodes)
    _check_base(b)
    return b


def _check_base(b: Base) -> None:
    a = b.args
    shape, bs, qt = a["shapeB"], a["blocksize"], a["quant_type"]
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2
            and all(isinstance(s, int) for s in shape)):
        raise NoMatch("weight shape is not two constants")
    if bs not in nf4_kernels.BLOCKSIZES or qt not in nf4_kernels.CODES:
        raise NoMatch(f"unsupported blocksize {bs!r} or quant type {qt!r}")
    N, K = shape
    vx, vq, vabs, vo = val(a["A"]), val(a["B"]), val(a["absmax"]), val(b.out)
    if any(not isinstance(v, torch.Tensor) for v in (vx, vq, vabs, vo)):
        raise NoMatch("no example values recorded")
    if vx.dim() < 1 or not same_sizes(vx.shape[-1:], (K,)) or vx.dtype not in _FLOATS:
        raise NoMatch("input does not match the weight's shape, or is not floating point")
    if vo.dtype != vx.dtype or not same_sizes(vo.shape, tuple(vx.shape[:-1]) + (N,)):
        raise NoMatch("unexpected output shape or dtype")
    if vq.numel() * vq.element_size() != (N * K + 1) // 2:
        raise NoMatch("packed weight size is not (N·K+1)/2 bytes")
    blocks = -(-N * K // bs)
    nested = a["absmax_8bit"] is not None
    if nested:
        v8, vc, voff = val(a["absmax_8bit"]), val(a["absmax_code"]), val(a["absmax_offset"])
        if any(not isinstance(v, torch.Tensor) for v in (v8, vc, voff)):
            raise NoMatch("double-quantised absmax without its code or offset")
        if v8.dtype != torch.uint8 or v8.numel() != blocks or vc.numel() != 256 \
                or vabs.dtype != torch.float32 or vabs.numel() != -(-blocks // 256) \
                or voff.numel() != 1:
            raise NoMatch("double-quantised absmax sizes do not line up")
    elif vabs.dtype != torch.float32 or vabs.numel() != blocks:
        raise NoMatch("absmax is not one fp32 scale per block")
    vb = val(a["bias"])
    if a["bias"] is not None and (not isinstance(vb, torch.Tensor) or vb.dtype != vx.dtype
                                  or not same_sizes(vb.shape, (N,))):
        raise NoMatch("bias shape or dtype does not line up")
    tensors = [val(n) for n in (a["A"], a["B"], a["absmax"], a["bias"], a["absmax_8bit"],
                                a["absmax_code"], a["absmax_offset"]) if n is not None]
    if len({t.device for t in tensors}) != 1:
        raise NoMatch("tensors on several devices")


def _cast_root(node):
    """Follow ``.to``/``.float`` casts (up or down) to the tensor they convert."""
    while is_method(node, ("to", "float", "type", "bfloat16", "half")):
        node = node.args[0]
    return node


@dataclass
class Lora:
    add: fx.Node
    lora_a: fx.Node
    lora_b: fx.Node
    scale: float
    x_lora: fx.Node  # the adapter's input (dropout output, or the cast input)
    erase: list
    dtype: torch.dtype  # the adapter product's dtype in the graph (bf16 under autocast)


def _lora_on_top(b: Base):
    """PEFT's adapter added to this base → Lora, or (None, reason-or-None)."""
    node, chain = b.out, []
    for names in (("to",), ("clone",)):  # Linear4bit's .to(input dtype), PEFT's clone
        users = list(node.users)
        if len(users) == 1 and is_method(users[0], names):
            node = users[0]
            chain.append(node)
    users = list(node.users)
    if len(users) != 1 or not is_add(users[0]) or len(users[0].args) != 2:
        return None, None
    add = users[0]
    term = add.args[1] if add.args[0] is node else add.args[0]
    if add.args[0] is add.args[1]:
        return None, None
    cast = None
    if is_method(term, ("to",)) and only_user(term, add):
        cast, term = term, term.args[0]
    lt = _lora_term(term)
    if lt is None:
        return None, None
    a_lin, b_lin, scale = lt
    if isinstance(scale, fx.Node):  # the lora pass folds it into B; this op takes a constant
        return None, "LoRA scale is a run-time value (torch.compile(dynamic=True))"
    xa, A, _ = linear_args(a_lin)
    B = linear_args(b_lin)[1]
    inner = xa
    if is_function(xa, DROPOUT_FUNCS):
        inner = xa.args[0] if xa.args else xa.kwargs.get("input")
    if _cast_root(inner) is not _cast_root(b.args["A"]):
        return None, "adapter input is not the base layer's input"
    pairs = [(term, cast or add), (b_lin, term), (a_lin, b_lin)] + \
        [(n, u) for n, u in zip([b.out] + chain, chain + [add])]
    if cast is not None:
        pairs.append((cast, add))
    if any(not only_user(n, u) for n, u in pairs):
        return None, "an intermediate of the adapter site is used outside it"
    N, K = b.args["shapeB"]
    va, vb, vxl, vadd, vterm = val(A), val(B), val(xa), val(add), val(b_lin)
    if any(not isinstance(v, torch.Tensor) for v in (va, vb, vxl, vadd, vterm)):
        return None, "no example values recorded for the adapter"
    if va.dim() != 2 or vb.dim() != 2:
        return None, "unexpected adapter ranks"
    r = va.shape[0]
    if not (same_sizes(va.shape, (r, K)) and same_sizes(vb.shape, (N, r))
            and same_sizes(vxl.shape, val(b.args["A"]).shape)
            and same_sizes(vadd.shape, val(b.out).shape)):
        return None, "adapter shapes do not line up"
    if any(v.dtype not in _FLOATS for v in (va, vb, vxl, vadd, vterm)):
        return None, "adapter tensors are not floating point"
    erase = [add] + ([cast] if cast is not None else []) + [term, b_lin, a_lin] + chain[::-1]
    return Lora(add, A, B, scale, xa, erase, vterm.dtype), None


_CASTS = ("to", "float", "type", "bfloat16", "half")
# dtype -> the dtypes that hold each of its values exactly
_EXACT_IN = {torch.bfloat16: (torch.bfloat16, torch.float32, torch.float64),
             torch.float16: (torch.float16, torch.float32, torch.float64),
             torch.float32: (torch.float32, torch.float64), torch.float64: (torch.float64,)}


def _cast_chain(node):
    """``(root, roundings)``: ``node`` holds ``root``'s values rounded to each dtype of
    ``roundings`` in turn; casts that lose nothing (bf16 → fp32, and back) add none."""
    v = val(node)
    if not (is_method(node, _CASTS) and isinstance(node.args[0], fx.Node)
            and isinstance(v, torch.Tensor)):
        return node, (), getattr(v, "dtype", None)
    root, rounds, held = _cast_chain(node.args[0])
    vs = val(node.args[0])
    if held is None or not isinstance(vs, torch.Tensor) or vs.device != v.device:
        return node, (), v.dtype
    if v.dtype in _EXACT_IN.get(held, ()):
        return root, rounds, held  # exact: the values do not change
    return root, rounds + (v.dtype,), v.dtype


def _same_values(x_lora, x) -> bool:
    """Whether the adapter's input holds the base input's values, in the same dtype: the
    same node, or casts of one tensor that round the same way (bitsandbytes'
    ``x.to(compute dtype)`` beside PEFT's cast to the adapter dtype and ours; casts that
    lose nothing are ignored; no dropout in between)."""
    if x_lora is x:
        return True
    vl, vx = val(x_lora), val(x)
    return (isinstance(vl, torch.Tensor) and isinstance(vx, torch.Tensor)
            and vl.dtype == vx.dtype and vl.device == vx.device
            and same_sizes(vl.shape, vx.shape)
            and _cast_chain(x_lora)[:2] == _cast_chain(x)[:2])


def _rewrite(gm, b: Base, lora, fake_mode) -> None:
    g = gm.graph
    a = b.args
    anchor = lora.add if lora is not None else b.out
    with inserting_before(g, anchor):
        nested = a["absmax_8bit"] is not None
        absmax = a["absmax_8bit"] if nested else a["absmax"]
        absmax2 = a["absmax"] if nested else None
        code2 = a["absmax_code"] if nested else None
        offset = a["absmax_offset"] if nested else None
        lora_a = lora_b = x_lora = None
        scale = 1.0
        out_dtype = val(b.out).dtype
        if lora is not None:
            adt = lora.dtype  # autocast runs the adapter in bf16: so does the op

            def cast(node):
                if val(node).dtype == adt:
                    return node
                return add_node(g, "call_method", "to", (node, adt), fake_mode)

            lora_a, lora_b, x_lora = cast(lora.lora_a), cast(lora.lora_b), cast(lora.x_lora)
            if _same_values(x_lora, a["A"]):
                x_lora = a["A"]  # one node twice: the op folds dx' into dx (one GEMM chain)
            scale, out_dtype = lora.scale, val(lora.add).dtype
        args = (a["A"], a["B"], absmax, absmax2, code2, offset, [int(s) for s in a["shapeB"]],
                int(a["blocksize"]), a["quant_type"], a["bias"], lora_a, lora_b, float(scale),
                x_lora, out_dtype)
        call = add_node(g, "call_function", torch.ops.lorafuse.nf4_linear.default, args, fake_mode)
        # The op's 16-entry code table is cached per device at its first use. Made here, at
        # compile time: made at the first run, it would sit in the CUDA-graph pool of
        # Inductor's cudagraph trees, which refuse memory they do not track as an output.
        with unset_fake_temporarily():
            nf4_kernels.code_table(a["quant_type"], val(a["A"]).device)
        y = add_node(g, "call_function", operator.getitem, (call, 0), fake_mode)
    (lora.add if lora is not None else b.out).replace_all_uses_with(y)
    erase = (lora.erase if lora is not None else []) + b.erase
    bodies = list(b.node.args[:2]) if b.node is not b.out else []
    for node in erase + bodies:
        if not node.users:
            g.erase_node(node)


def _qweight_name(b: Base) -> str:
    return site_name(_strip_views(b.args["B"]))


def run(gm: fx.GraphModule, report) -> None:
    graph = gm.graph
    if _gemm_4bit() is None and _dequantize_4bit() is None:
        return  # bitsandbytes not loaded: no 4-bit linear can be in the graph
    fake_mode = fake_mode_of(graph)
    sites = []
    for node in list(graph.nodes):
        try:
            b = _base(gm, node)
        except NoMatch as e:
            if e.args and e.args[0]:
                report.skipped.append((node.name, e.args[0]))
            continue
        lora, why = _lora_on_top(b)
        sites.append((b, lora, why))
    for b, lora, why in sites:
        _rewrite(gm, b, lora, fake_mode)
        name = _qweight_name(b)
        report.matched.append(name if lora is not None else name + " (no adapter)")
        report.ops += 1
        if why:
            report.skipped.append((name + " adapter", why + " (4-bit base rewritten alone)"))
    graph.lint()
    gm.recompile()
