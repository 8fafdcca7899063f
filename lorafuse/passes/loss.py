"""Loss pass: lm_head + (softcap) + cross-entropy → one ``lorafuse::linear_cross_entropy``.

What a Hugging Face causal LM's loss looks like once Dynamo has inlined it
(transformers 5.x, ``ForCausalLMLoss``)::

    h      = hidden[:, slice(-k, None), :]         # logits_to_keep (stays as it is)
    logits = linear(h, W)                           # lm_head, no bias
    logits = mul(tanh(truediv(logits, c)), c)       # Gemma2's final_logit_softcapping
    z      = logits.float()                         # upcast (bf16 under autocast)
    labels = pad(labels, (0, 1), -100)[..., 1:].contiguous().view(-1).to(device)
    loss   = cross_entropy(z.view(-1, V), labels, ignore_index=-100, reduction="mean")
                                                    # or "sum", then truediv(loss, n_items)

The match anchors on ``cross_entropy`` and walks back through view, the upcasts and the
softcap to the linear; every intermediate must be used only inside that chain. The
label chain and the ``/ num_items_in_batch`` division stay in the graph as they are
(the op takes the final labels and returns what cross_entropy returned).

The logits as a graph output (decision). In the captured graph of a whole model the
logits are always an output next to the loss (``CausalLMOutputWithPast`` has both;
checked on Llama, Qwen2, Gemma2, GPT-2), even though a training loop rarely reads them.
Leaving every such site alone would mean the pass never fires; dropping the output, or
returning logits that no gradient flows through, would be wrong for a user who does
read them. So when the (softcapped) logits' only use outside the chain is the graph's
output, the op also writes them (``return_logits``): each chunk's logits, from the same
fp32 accumulator, rounded once to the lm_head's dtype, with no second GEMM, and
differentiable (a gradient arriving for them is honoured in the backward; autograd's
zero gradient for an unused output is detected and skipped). What is saved is then the
full logits in the model dtype (what eager returns too), not the fp32 upcast, the
log-softmax and the fp32 logits gradient. Logits used by anything else inside the graph
(a second loss term, ...) leave the site alone: "logits used outside the loss".

``drop_logits`` (the backend option, opt-in): in a graph that computes gradients through
the loss, the logits output becomes an empty (0-element) tensor instead, and the op
writes none. That is what Liger's and Unsloth's patched models return in training; it
saves the (tokens × vocab) buffer (1 GiB at the Llama-3 8B shape, batch 2 × 2048, in
bf16) and its writing. A graph without gradients (evaluation under ``torch.no_grad()``,
which Dynamo compiles apart) keeps them. Code that reads ``outputs.logits`` during
training gets the empty tensor, which fails at its first use rather than giving numbers.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from ..kernels import loss as loss_kernels  # noqa: F401  (registers the op)
from ._graph import (
    add_node,
    fake_mode_of,
    inserting_before,
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

NAME = "loss"

CROSS_ENTROPY = (F.cross_entropy,)
TANH = (torch.tanh,)
DIV_FUNCS = (operator.truediv, torch.div, torch.true_divide)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CE_DEFAULTS = {"weight": None, "size_average": None, "reduce": None, "label_smoothing": 0.0}


class NoMatch(Exception):
    """The cross_entropy is not a fusable lm_head loss; ``args[0]`` says why."""


def _number(a):
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _softcap(node):
    """``mul(tanh(truediv(x, c)), c)`` (or ``x * (1/c)`` inside) → (x, c, nodes), or None."""
    if not is_mul(node) or len(node.args) != 2:
        return None
    t, c = node.args
    if _number(t):
        t, c = c, t
    if not _number(c) or c == 0:
        return None
    if not (is_function(t, TANH) or is_method(t, ("tanh",))) or len(t.args) != 1 or t.kwargs:
        return None
    d = t.args[0]
    if is_function(d, DIV_FUNCS) and not d.kwargs and len(d.args) == 2 and d.args[1] == c:
        x = d.args[0]
    elif is_mul(d) and len(d.args) == 2 and _number(d.args[1]) and \
            abs(d.args[1] * c - 1.0) <= 1e-12:
        x = d.args[0]
    else:
        return None
    if not isinstance(x, fx.Node):
        return None
    return x, float(c), [node, t, d]


def _ce_args(ce):
    """(input, target, ignore_index, reduction) of ``F.cross_entropy`` with no other
    option set (class weights, label smoothing: not fused)."""
    if len(ce.args) > 2:
        raise NoMatch("cross_entropy options passed positionally")
    names = ("input", "target")
    a = dict(zip(names, ce.args))
    a.update(ce.kwargs)
    for k, default in _CE_DEFAULTS.items():
        if a.get(k, default) != default:
            raise NoMatch(f"cross_entropy with {k}")
    unknown = set(a) - set(names) - set(_CE_DEFAULTS) - {"ignore_index", "reduction"}
    if unknown:
        raise NoMatch(f"cross_entropy with {sorted(unknown)}")
    ignore_index, reduction = a.get("ignore_index", -100), a.get("reduction", "mean")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise NoMatch("ignore_index is not a constant")
    if reduction not in ("mean", "sum"):
        raise NoMatch(f"reduction={reduction!r}")
    if "input" not in a or "target" not in a:
        raise NoMatch("cross_entropy without input or target")
    return a["input"], a["target"], ignore_index, reduction


class Site:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def match(ce: fx.Node) -> Site:
    z2, labels, ignore_index, reduction = _ce_args(ce)
    chain = [ce]  # the nodes the op replaces, users first
    # z.view(-1, V)
    if not (is_method(z2, ("view", "reshape")) or is_function(z2, (torch.reshape,))):
        raise NoMatch("cross_entropy input is not a flattened logits tensor")
    if not only_user(z2, ce):
        raise NoMatch("an intermediate of the loss is used outside it")
    chain.append(z2)
    node = z2.args[0]
    # upcasts (logits.float())
    src = strip_upcasts(node)
    while node is not src:
        if not only_user(node, chain[-1]):
            raise NoMatch("an intermediate of the loss is used outside it")
        chain.append(node)
        node = node.args[0]
    logits_out = node  # what the model returns as logits
    extra = [u for u in logits_out.users if u is not chain[-1]]
    if any(u.op != "output" for u in extra):
        raise NoMatch("logits used outside the loss")
    if len(logits_out.users) != len(extra) + 1:
        raise NoMatch("an intermediate of the loss is used outside it")
    return_logits = bool(extra)
    softcap, head_chain = None, [logits_out]
    sc = _softcap(logits_out)
    lin = logits_out
    if sc is not None:
        lin, softcap, nodes = sc
        for user, n in zip(nodes, nodes[1:] + [lin]):
            if not only_user(n, user):
                raise NoMatch("an intermediate of the softcap is used outside the loss")
        head_chain = nodes + [lin]
    args = linear_args(lin)
    if args is None:
        raise NoMatch("the logits are not an lm_head linear's output")
    hidden, weight, bias = args
    if bias is not None:
        raise NoMatch("lm_head with a bias")
    chain += head_chain

    vh, vw, vl, vz, vlab, vce = (val(n) for n in (hidden, weight, lin, z2, labels, ce))
    vout = val(logits_out)
    if any(not isinstance(v, torch.Tensor) for v in (vh, vw, vl, vz, vlab, vce, vout)):
        raise NoMatch("no example values recorded")
    if vw.dim() != 2 or vh.dim() < 1 or vz.dim() != 2 or vlab.dim() != 1:
        raise NoMatch("unexpected ranks")
    V, H = vw.shape
    if not (same_sizes(vh.shape[-1:], (H,)) and same_sizes(vl.shape, tuple(vh.shape[:-1]) + (V,))
            and same_sizes(vout.shape, vl.shape) and same_sizes(vz.shape[1:], (V,))
            and same_sizes(vlab.shape, vz.shape[:1])):
        raise NoMatch("shapes do not line up")
    n_rows = 1
    for d in vh.shape[:-1]:
        n_rows = n_rows * d
    if not same_sizes((n_rows,), vz.shape[:1]):
        raise NoMatch("the flattened logits are not the lm_head's rows")
    if any(v.dtype not in _FLOATS for v in (vh, vw, vl, vz, vout)):
        raise NoMatch("non-float tensors")
    if vlab.dtype.is_floating_point or vlab.dtype == torch.bool or vlab.is_complex():
        raise NoMatch("labels are not class indices")
    if len({v.device for v in (vh, vw, vlab)}) != 1:
        raise NoMatch("tensors on several devices")
    grad = bool(vl.requires_grad)
    return Site(ce=ce, hidden=hidden, weight=weight, labels=labels, softcap=softcap,
                ignore_index=ignore_index, reduction=reduction, return_logits=return_logits,
                logits_out=logits_out, lin=lin, need_dh=grad and bool(vh.requires_grad),
                need_dw=grad and bool(vw.requires_grad), chain=chain, dropped_logits=False)


def rewrite(gm: fx.GraphModule, site: Site, fake_mode) -> None:
    g = gm.graph
    cdt = val(site.lin).dtype  # the lm_head's dtype (bf16 under autocast): cast as it would

    def cast(node, dtype):
        if val(node).dtype == dtype:
            return node
        return add_node(g, "call_method", "to", (node, dtype), fake_mode)

    with inserting_before(g, site.ce):
        args = (cast(site.hidden, cdt), cast(site.weight, cdt), site.labels, site.softcap,
                site.ignore_index, site.reduction, site.return_logits, site.need_dh,
                site.need_dw)
        call = add_node(g, "call_function", torch.ops.lorafuse.linear_cross_entropy.default,
                        args, fake_mode)
        loss = cast(add_node(g, "call_function", operator.getitem, (call, 0), fake_mode),
                    val(site.ce).dtype)
        logits = None
        if site.return_logits:
            logits = cast(add_node(g, "call_function", operator.getitem, (call, 1), fake_mode),
                          val(site.logits_out).dtype)
        if site.dropped_logits:  # the empty tensor in the logits' place in the output
            logits = add_node(g, "call_method", "new_empty", (site.hidden, (0,)), fake_mode)
    site.ce.replace_all_uses_with(loss)
    if logits is not None:
        site.logits_out.replace_all_uses_with(logits, delete_user_cb=lambda u: u.op == "output")
    for node in site.chain:
        if not node.users:
            g.erase_node(node)


def run(gm: fx.GraphModule, report, drop_logits: bool = False) -> None:
    graph = gm.graph
    fake_mode = fake_mode_of(graph)
    for ce in [n for n in graph.nodes if is_function(n, CROSS_ENTROPY)]:
        try:
            site = match(ce)
        except NoMatch as e:
            report.skipped.append((_name(ce), e.args[0]))
            continue
        if drop_logits and site.return_logits and (site.need_dh or site.need_dw):
            site.dropped_logits, site.return_logits = True, False
        rewrite(gm, site, fake_mode)
        report.matched.append(_weight_name(site.weight))
        if site.dropped_logits:
            report.notes.append(f"drop_logits: {_weight_name(site.weight)}'s logits are not "
                                "returned (outputs.logits is an empty tensor in this graph)")
        report.ops += 1
    graph.lint()
    gm.recompile()


def _weight_name(w: fx.Node) -> str:
    """``lm_head`` from Dynamo's ``L_self_..._modules_lm_head_parameters_weight_``."""
    if w.op != "placeholder":
        return w.name
    name = site_name(w)
    for tail in ("_parameters_weight_", "_parameters_weight"):
        if name.endswith(tail):
            return name[: -len(tail)]
    return name


def _name(ce) -> str:
    """lm_head's name when the loss reads a linear's logits, else the node's name."""
    node, seen = ce, 0
    while isinstance(node, fx.Node) and seen < 12:
        args = linear_args(node)
        if args is not None and isinstance(args[1], fx.Node):
            return _weight_name(args[1])
        node = node.args[0] if node.args else None
        seen += 1
    return ce.name
