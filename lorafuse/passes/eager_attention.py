"""Eager-attention pass: attention written as an eager chain → ``lorafuse::flash_attention``.

Gemma2 (``attn_implementation="eager"``: SDPA has no logit softcap) runs transformers'
``eager_attention_forward``, which Dynamo captures as::

    k = k0[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D)   # repeat_kv
    v = <the same on v0>
    s = torch.matmul(q, k.transpose(2, 3)) * scale
    s = torch.tanh(s / c) * c                                   # softcap c (optional)
    s = s + mask                                                # additive mask (optional)
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    p = F.dropout(p, p=0.0, training=...)                       # (optional)
    out = torch.matmul(p, v)
  →
    out = lorafuse::flash_attention(q, k0, v0, None, causal, scale, c, window)[0]

The op never builds the L × L scores, reads K/V once per head group (no repeat), and
computes the same function (kernels/flash_attention.py; in fp32 to rounding, in bf16 closer
to fp32 than the chain). The match anchors on the last matmul and proves each link:

- ``scale`` and ``c`` are constants (a multiplication by ``scale`` or a division by
  ``1/scale``; division, tanh, multiplication by the same ``c``);
- the softmax is over the last dim, in fp32 (``dtype=torch.float32`` or fp32 scores), and
  the cast after it returns q's dtype (V's, the matmul's other operand);
- dropout has p = 0 or ``training=False`` (the op has no dropout);
- the mask is a constant: its subgraph has no inputs and static sizes (evaluated here once,
  as the ``attention`` pass does), its values are 0 (visible) or at most the dtype's
  lowest (masked), the same for every batch and head, exactly causal (top-left, j <= i) or
  causal with a sliding window (i - w < j <= i, transformers' ``sliding_window_overlay``)
  or all visible, and every query sees at least one key;
- K and V are both repeat_kv of K/V with the same count, or both unrepeated with q's
  number of heads;
- no intermediate is used outside the chain (``output_attentions`` returns the weights).

A mask built from an ``attention_mask`` or ``position_ids`` input (what HF Trainer batches
carry) cannot be classified at compile time; such a site is decided at run time instead::

    lo, hi, ranges_ok = lorafuse::mask_key_ranges(mask)    # once per mask, a CPU bool
    out = lorafuse::eager_ranges_or_chain(q, k0, v0, mask, ranges_ok, lo, hi, n, scale, c)[0]

which is the flash op with softcap and per-query key bounds [lo, hi] (the causal, padding,
document and window structure all come from the ranges) where every query sees one
contiguous, non-empty range of keys and, on CUDA, the flash op is the faster for the
shape (both timed at its first such batch), and the chain's own math (transformers'
``eager_attention_forward``, on repeated K/V) otherwise — e.g. left padding, whose padded
queries see no key. The mask must be additive, (B or 1, 1, Lq, Lkv) against the scores.
Not measured on the GPU (the range check's cost; on the chain's branch the recomputed
forward in the backward).

Anything else unproven is left alone with the reason in the report.

Not a default pass: on the H200 the flash kernel with a softcap was 7–16 % slower than
Inductor's fused eager chain (bench/bench_softcap_attention.py, bench/RESULTS.md session 6).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from ..kernels import attention as attention_kernels  # registers the ops; the mask's rows
from ..kernels import flash_attention as flash_attention_kernels  # noqa: F401  (registers the op)
from ._graph import (
    DROPOUT_FUNCS,
    add_node,
    fake_mode_of,
    inserting_after,
    inserting_before,
    is_add,
    is_function,
    is_method,
    is_mul,
    same_sizes,
    val,
)
from .attention import NoMatch as NotConstant
from .attention import _ancestors, _erase_dead, evaluate_constant, repeat_kv_source

NAME = "eager_attention"
_MATMUL = (torch.matmul, operator.matmul)
_SOFTMAX = (F.softmax, torch.softmax, torch.nn.functional.softmax)
_TANH = (torch.tanh,)
_DIV = (operator.truediv, torch.div, torch.true_divide)
_TRANSPOSE = (torch.transpose,)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

DEPENDS_ON_INPUTS = ("mask depends on inputs (attention_mask / position_ids): not provable "
                     "causal at compile time")


class NoMatch(Exception):
    """Not the chain; ``args[0]`` says why when it was attention all the same."""


def _tensor(node):
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _call_args(node, names):
    """``node``'s arguments by name (positional ones in ``names`` order, then kwargs)."""
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _matmul_operands(node):
    if is_function(node, _MATMUL) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _scalar_factor(node):
    """``(x, f)`` for ``x * f``, ``f * x`` or ``x / (1/f)`` with f a Python number; else None."""
    if is_mul(node) and len(node.args) == 2:
        a, b = node.args
        if isinstance(a, fx.Node) and _number(b):
            return a, float(b)
        if isinstance(b, fx.Node) and _number(a):
            return b, float(a)
    if (is_function(node, _DIV) or is_method(node, ("div", "truediv"))) and \
            len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(a, fx.Node) and _number(b) and b != 0:
            return a, 1.0 / float(b)
    return None


def _divided_by(node):
    """``(x, c)`` for ``x / c`` with c a Python number; else None."""
    if (is_function(node, _DIV) or is_method(node, ("div", "truediv"))) and \
            len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(a, fx.Node) and _number(b) and b != 0:
            return a, float(b)
    return None


def _softcap(node):
    """``(x, c)`` for ``tanh(x / c) * c`` (one c, either operand order); else None."""
    sf = _scalar_factor(node)
    if sf is None or not is_mul(node):
        return None
    t, c = sf
    if not ((is_function(t, _TANH) or is_method(t, ("tanh",))) and len(t.args) == 1
            and not t.kwargs):
        return None
    d = _divided_by(t.args[0])
    if d is None or d[1] != c or c <= 0:
        return None
    return d[0], c, [t, t.args[0]]  # users before their inputs


def _transposed_last_two(node):
    """``x`` for ``x.transpose(2, 3)`` (or -2, -1, either order) of a 4-D x; else None."""
    if not (is_method(node, ("transpose",)) or is_function(node, _TRANSPOSE)):
        return None
    if len(node.args) != 3 or node.kwargs:
        return None
    x, d0, d1 = node.args
    t = _tensor(x)
    if t is None or t.dim() != 4 or not (isinstance(d0, int) and isinstance(d1, int)):
        return None
    return x if {d0 % 4, d1 % 4} == {2, 3} else None


def _dropout_is_identity(node) -> bool:
    """A dropout that changes nothing: p == 0 or not training (``F.dropout(input, p,
    training, inplace)`` or ``torch.dropout(input, p, train)``)."""
    if node.target is torch.dropout:
        a = _call_args(node, ("input", "p", "train"))
        training = a.get("train")
    else:
        a = _call_args(node, ("input", "p", "training", "inplace"))
        training = a.get("training", True)
    p = a.get("p", 0.5)
    return (_number(p) and p == 0) or training is False


def _softmax_source(node):
    """The scores under ``softmax(s, dim=-1[, dtype=float32])`` computed in fp32; raises
    NoMatch (with the reason) for another dim or precision, None if ``node`` is no softmax."""
    if is_function(node, _SOFTMAX):
        a = _call_args(node, ("input", "dim", "_stacklevel", "dtype"))
    elif is_method(node, ("softmax",)):
        a = _call_args(node, ("self", "dim", "dtype"))
        a["input"] = a.pop("self", None)
    else:
        return None
    s, dim = a.get("input"), a.get("dim")
    ts, tout = _tensor(s), _tensor(node)
    if ts is None or tout is None:
        return None
    if not (isinstance(dim, int) and dim % ts.dim() == ts.dim() - 1):
        raise NoMatch("softmax is not over the last dim")
    if tout.dtype != torch.float32 and not (tout.dtype == torch.float64 == ts.dtype):
        raise NoMatch(f"softmax in {tout.dtype}, not fp32")
    return s


def _cast_to(node):
    """The source of ``x.to(dtype)`` (dtype positional or keyword, nothing else); else None."""
    if not is_method(node, ("to",)) or not node.args:
        return None
    if len(node.args) == 2 and isinstance(node.args[1], torch.dtype) and not node.kwargs:
        return node.args[0]
    if len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
        return node.args[0]
    return None


def _blocks(mask, scores_shape):
    """``(i, j, a)`` per block of query rows of an additive ``mask`` (a tensor or a mask read
    by rows): the block's row and column indices and which keys each of its rows attends
    (``m == 0``) in the first batch and head; raises NoMatch when a value is neither 0 nor
    the dtype's lowest, or a batch or head differs from the first. A block holds at most
    ``ROW_BLOCK_ELEMENTS`` booleans per comparison, in the mask's own leading sizes (never
    broadcast over the batch and heads)."""
    lead, lkv = tuple(mask.shape)[:-2], scores_shape[-1]
    lowest = torch.finfo(mask.dtype).min
    step = attention_kernels.rows_per_block(mask, lkv)
    j = torch.arange(lkv, device=mask.device)[None, :]
    for r0 in range(0, scores_shape[-2], step):
        r1 = min(scores_shape[-2], r0 + step)
        m = torch.broadcast_to(attention_kernels.mask_rows(mask, r0, r1), (*lead, r1 - r0, lkv))
        visible = m == 0
        if not bool((visible | (m <= lowest)).all()):
            raise NoMatch("mask has values other than 0 and the dtype's lowest")
        flat = visible.reshape(-1, r1 - r0, lkv)
        if not bool((flat == flat[0]).all()):
            raise NoMatch("mask differs across batch or heads")
        yield torch.arange(r0, r1, device=mask.device)[:, None], j, flat[0]


def classify_mask(mask, scores_shape) -> tuple:
    """``(causal, window)`` that an additive ``mask`` (broadcast to ``scores_shape``)
    selects exactly; raises NoMatch with the reason otherwise. ``mask`` is a tensor or a
    mask read by rows (the attention pass's ``RowsOfMask``); it is read a block of query
    rows at a time (``_blocks``), twice when it is a sliding window."""
    if not mask.dtype.is_floating_point:
        raise NoMatch("mask is not additive (float)")
    try:
        if torch.broadcast_shapes(tuple(mask.shape), tuple(scores_shape)) != \
                torch.Size(scores_shape):
            raise RuntimeError
    except RuntimeError:
        raise NoMatch("mask does not broadcast to the scores") from None
    sees_a_key = everything = causal = True
    widest = 0  # the most keys any query sees
    for i, j, a in _blocks(mask, scores_shape):
        sees_a_key = sees_a_key and bool(a.any(-1).all())
        everything = everything and bool(a.all())
        causal = causal and torch.equal(a, j <= i)
        widest = max(widest, int(a.sum(-1).max()))
    if not sees_a_key:
        raise NoMatch("a query sees no key")
    if everything:
        return False, None
    if causal:
        return True, None
    window = (torch.equal(a, (j <= i) & (j > i - widest))
              for i, j, a in _blocks(mask, scores_shape))
    if all(window):
        return True, widest
    raise NoMatch("mask is neither causal nor a causal sliding window")


class Site:
    def __init__(self, out):
        self.out = out  # the final matmul: its value is replaced
        self.chain = []  # the match's other nodes, which only the chain uses
        self.q = self.k = self.v = None
        self.scale = self.softcap = None
        self.mask = self.scores_shape = None


def match(out: fx.Node) -> Site:
    """The eager chain ending at ``out`` (see the module doc); NoMatch(None) when ``out``
    is no ``matmul(softmax(...), v)``, NoMatch(reason) when the rest is not proven."""
    ops = _matmul_operands(out)
    if ops is None:
        raise NoMatch(None)
    probs, v_rep = ops
    site = Site(out)
    node = probs
    if is_function(node, DROPOUT_FUNCS):
        if not _dropout_is_identity(node):
            raise NoMatch("attention dropout in training (the op has no dropout)")
        site.chain.append(node)
        node = node.args[0] if node.args else node.kwargs.get("input")
    cast = _cast_to(node)
    if cast is not None:
        site.chain.append(node)
        node = cast
    scores = _softmax_source(node)
    if scores is None:
        raise NoMatch(None)
    site.chain.append(node)
    # From here on it is attention: failures carry a reason.
    tp, tv = _tensor(probs), _tensor(v_rep)
    if tp is None or tv is None or tp.dim() != 4 or tv.dim() != 4:
        raise NoMatch("not 4-D (batch, heads, length, dim) attention")
    if tp.dtype != tv.dtype:
        raise NoMatch("probabilities and V differ in dtype")
    node = scores
    if is_add(node) and len(node.args) == 2:
        a, b = node.args
        ta, tb, tn = _tensor(a), _tensor(b), _tensor(node)
        if ta is None or tb is None or tn is None:
            raise NoMatch("mask addition of non-tensors")
        # The scores: the operand with the result's shape (the mask may broadcast) that
        # is a softcap or a scaling (both operands may have the full shape).
        fits = [same_sizes(t.shape, tn.shape) for t in (ta, tb)]
        chainy = [_softcap(x) is not None or _scalar_factor(x) is not None for x in (a, b)]
        if not any(fits):
            raise NoMatch("mask broadcasts the scores to a larger shape")
        s, m = (b, a) if fits[1] and (chainy[1] or not fits[0]) and not chainy[0] else (a, b)
        site.mask, site.scores_shape = m, tuple(tn.shape)
        site.chain.append(node)
        node = s
    sc = _softcap(node)
    if sc is not None:
        site.chain += [node, *sc[2]]
        node, site.softcap = sc[0], sc[1]
    sf = _scalar_factor(node)
    if sf is None:
        raise NoMatch("scores are not scaled by a constant")
    qk, site.scale = sf
    site.chain.append(node)
    ops = _matmul_operands(qk)
    if ops is None:
        raise NoMatch("scaled scores are not a matmul")
    site.chain.append(qk)
    q, kt = ops
    k_rep = _transposed_last_two(kt)
    if k_rep is None:
        raise NoMatch("scores are not q @ k.transpose(2, 3)")
    site.chain.append(kt)
    tq, tk = _tensor(q), _tensor(k_rep)
    if tq is None or tq.dim() != 4 or tq.dtype != tv.dtype or tk.dtype != tv.dtype:
        raise NoMatch("q, k, v are not 4-D of one dtype")
    if tq.dtype not in _FLOATS:
        raise NoMatch(f"dtype {tq.dtype}")
    rk, rv = repeat_kv_source(k_rep), repeat_kv_source(v_rep)
    if rk and rv and rk[1] == rv[1]:
        site.k, site.v = rk[0], rv[0]
    elif rk or rv:
        raise NoMatch("K and V repeated differently")
    else:
        site.k, site.v = k_rep, v_rep
    site.q = q
    tk0, tv0 = _tensor(site.k), _tensor(site.v)
    heads, kv_heads = tq.shape[1], tk0.shape[1]
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0
            and heads % kv_heads == 0):
        raise NoMatch("head counts not known to divide")
    if not (same_sizes(tk0.shape, tv0.shape) and same_sizes(tk0.shape[-1:], tq.shape[-1:])
            and same_sizes(tk0.shape[:1], tq.shape[:1])):
        raise NoMatch("q, k, v shapes do not fit one attention")
    inside = set(site.chain) | {out}
    for n in site.chain:
        if not all(u in inside for u in n.users):
            raise NoMatch(f"intermediate '{n.name}' is used outside the chain "
                          "(output_attentions?)")
    return site


RUN_TIME = "run-time"  # _mask_kind: the mask depends on the inputs; its ranges decide


def _fits_run_time_check(site) -> bool:
    """An additive mask (B or 1, 1, Lq, Lkv) of static sizes against the scores."""
    m, shape = _tensor(site.mask), site.scores_shape
    if m is None or not m.is_floating_point() or m.dim() != 4:
        return False
    if not all(isinstance(x, int) for x in tuple(m.shape) + tuple(shape)):
        return False
    return m.shape[0] in (1, shape[0]) and m.shape[1] == 1 and tuple(m.shape[2:]) == shape[2:]


def _mask_kind(gm, site, cache: dict) -> tuple:
    """``(causal, window)`` of the site's mask (None: no mask), cached per mask and shape;
    ``(RUN_TIME, None)`` for a mask from the inputs that the run-time check can take."""
    if site.mask is None:
        return False, None
    shape = site.scores_shape
    key = (site.mask, str(shape))
    if key not in cache:
        try:
            value = evaluate_constant(gm, site.mask, by_rows=True)
            cache[key] = ("ok", classify_mask(value, shape))
        except NotConstant as e:
            reason = e.args[0]
            if "depends on inputs" in reason and _fits_run_time_check(site):
                cache[key] = ("ok", (RUN_TIME, None))
            else:
                cache[key] = ("no", DEPENDS_ON_INPUTS if "depends on inputs" in reason
                              else reason)
        except NoMatch as e:
            cache[key] = ("no", e.args[0])
    status, detail = cache[key]
    if status == "no":
        raise NoMatch(detail)
    return detail


def _ranges_of(graph, mask, ranges: dict, fake_mode):
    """(lo, hi, ok) nodes of ``lorafuse::mask_key_ranges(mask)``, one call per mask."""
    if mask not in ranges:
        with inserting_after(graph, mask):
            r = add_node(graph, "call_function", torch.ops.lorafuse.mask_key_ranges.default,
                         (mask,), fake_mode)
        with inserting_after(graph, r):
            ranges[mask] = [add_node(graph, "call_function", operator.getitem, (r, i),
                                     fake_mode) for i in range(3)]
    return ranges[mask]


def rewrite(gm, site, causal, window, fake_mode, ranges=None) -> None:
    g = gm.graph
    softcap = site.softcap
    if causal == RUN_TIME:
        lo, hi, ok = _ranges_of(g, site.mask, ranges, fake_mode)
        n_rep = _tensor(site.q).shape[1] // _tensor(site.k).shape[1]
        with inserting_before(g, site.out):
            both = add_node(g, "call_function",
                            torch.ops.lorafuse.eager_ranges_or_chain.default,
                            (site.q, site.k, site.v, site.mask, ok, lo, hi, n_rep, site.scale,
                             softcap), fake_mode)
            new = add_node(g, "call_function", operator.getitem, (both, 0), fake_mode)
    else:
        args = (site.q, site.k, site.v, None, causal, site.scale, softcap, window)
        with inserting_before(g, site.out):
            call = add_node(g, "call_function", torch.ops.lorafuse.flash_attention.default,
                            args, fake_mode)
            new = add_node(g, "call_function", operator.getitem, (call, 0), fake_mode)
    site.out.replace_all_uses_with(new)
    for n in [site.out] + site.chain:  # the chain lists users before their inputs
        if not n.users:
            g.erase_node(n)


def run(gm: fx.GraphModule, report) -> None:
    graph = gm.graph
    fake_mode = fake_mode_of(graph)
    masks, ranges, dropped, i = {}, {}, set(), 0
    for node in list(graph.nodes):
        try:
            site = match(node)
        except NoMatch as e:
            if e.args and e.args[0]:
                report.skipped.append((f"eager_attention.{i}", e.args[0]))
                i += 1
            continue
        name = f"eager_attention.{i}"
        i += 1
        try:
            causal, window = _mask_kind(gm, site, masks)
        except NoMatch as e:
            report.skipped.append((name, e.args[0]))
            continue
        replaced = set(site.chain) | {site.out}
        for n in replaced:  # what fed the chain (repeat_kv, the mask) may die with it
            dropped |= {a for inp in n.all_input_nodes if inp not in replaced
                        for a in _ancestors(inp)}
        rewrite(gm, site, causal, window, fake_mode, ranges)
        report.matched.append(name)
        report.ops += 1
    _erase_dead(graph, dropped)  # repeat_kv and mask nodes nothing reads any more
    graph.lint()
    gm.recompile()
