"""The attention pass: SDPA with a proven-causal mask → ``is_causal=True``; repeat_kv →
``enable_gqa=True``. Checked three ways: the mask test itself (property-tested against
SDPA's own causal mask), a small attention module compiled vs eager, and tiny models
trained a few steps compiled vs eager (fp32: losses and every LoRA gradient)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from conftest import VOCAB, assert_close_fp32, lora_params, make_tiny_model
import lorafuse.kernels.attention as kernel_attention
from lorafuse.passes.attention import is_causal_mask
from lorafuse.report import Report

# ----------------------------------------------------------------- the causal-mask test


class _MaskByRows:
    """A mask seen only through its rows, as ``RowsOfMask`` gives them."""

    def __init__(self, t):
        self.t, self.shape, self.dtype, self.device = t, t.shape, t.dtype, t.device

    def rows(self, r0, r1):
        return kernel_attention.mask_rows(self.t, r0, r1)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), lq=st.integers(1, 9), extra=st.integers(0, 3),
       form=st.sampled_from(["bool4", "bool2", "float_inf", "float_min", "bool_b1"]),
       flip=st.one_of(st.none(), st.tuples(st.integers(0, 8), st.integers(0, 11))),
       block=st.sampled_from([1, 13, 2**26]), by_rows=st.booleans())
def test_is_causal_mask_agrees_with_sdpa(b, h, lq, extra, form, flip, block, by_rows):
    """``is_causal_mask`` says yes exactly when SDPA with the mask equals SDPA with
    ``is_causal=True`` on random q, k, v (never on a mask that differs anywhere), whether
    it compares all rows at once or a few at a time (``block`` elements), on a tensor or on
    a mask that gives its rows on demand (``by_rows``, as the attention pass's large
    constant masks do)."""
    lkv = lq + extra
    allowed = torch.ones(lq, lkv, dtype=torch.bool).tril()
    if flip is not None:
        i, j = flip[0] % lq, flip[1] % lkv
        allowed[i, j] = ~allowed[i, j]
    if form == "bool4":
        mask = allowed.expand(b, 1, lq, lkv)
    elif form == "bool_b1":
        mask = allowed.expand(b, h, lq, lkv).clone()
    elif form == "bool2":
        mask = allowed
    else:
        low = float("-inf") if form == "float_inf" else torch.finfo(torch.float32).min
        mask = torch.zeros(lq, lkv).masked_fill(~allowed, low)
    q = torch.randn(b, h, lq, 8, dtype=torch.float64)
    k, v = torch.randn(2, b, h, lkv, 8, dtype=torch.float64)
    same = flip is None or bool(allowed.eq(torch.ones(lq, lkv, dtype=torch.bool).tril()).all())
    real_block = kernel_attention.ROW_BLOCK_ELEMENTS
    kernel_attention.ROW_BLOCK_ELEMENTS = block
    try:
        assert is_causal_mask(_MaskByRows(mask) if by_rows else mask, q.shape, k.shape) == same
    finally:
        kernel_attention.ROW_BLOCK_ELEMENTS = real_block
    if same:  # the claim the rewrite rests on
        m = mask if mask.dtype == torch.bool else mask.double()
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(got, want)


def test_is_causal_mask_rejects_partial_masks():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    padded = causal.expand(2, 1, 4, 4).clone()
    padded[1, :, :, 0] = False  # a left-padded row
    assert not is_causal_mask(padded, (2, 2, 4, 8), (2, 2, 4, 8))
    assert not is_causal_mask(torch.zeros(4, 4).masked_fill(~causal, -1e4),  # not -inf
                              (1, 1, 4, 8), (1, 1, 4, 8))
    assert not is_causal_mask(causal.int(), (1, 1, 4, 8), (1, 1, 4, 8))
    assert not is_causal_mask(causal[:3], (1, 1, 4, 8), (1, 1, 4, 8))  # does not broadcast


# ----------------------------------------------------------------- an attention module


class GQAttention(torch.nn.Module):
    """What transformers does under tracing: mask from aranges, repeat_kv, SDPA."""

    def __init__(self, heads=4, kv_heads=2, dim=8, mask="causal"):
        super().__init__()
        self.heads, self.kv_heads, self.dim, self.mask = heads, kv_heads, dim, mask
        self.q = torch.nn.Linear(heads * dim, heads * dim)
        self.kv = torch.nn.Linear(heads * dim, 2 * kv_heads * dim)

    def forward(self, x):
        b, length, _ = x.shape
        n = self.heads // self.kv_heads
        q = self.q(x).view(b, length, self.heads, self.dim).transpose(1, 2)
        k, v = self.kv(x).view(b, length, 2, self.kv_heads, self.dim).permute(2, 0, 3, 1, 4)
        k = k[:, :, None, :, :].expand(b, self.kv_heads, n, length, self.dim)
        k = k.reshape(b, self.heads, length, self.dim)
        v = v[:, :, None, :, :].expand(b, self.kv_heads, n, length, self.dim)
        v = v.reshape(b, self.heads, length, self.dim)
        pos = torch.arange(length, device=x.device)
        mask = pos[None, :] <= pos[:, None]
        if self.mask == "window":  # a sliding window: not causal
            mask = mask & (pos[:, None] - pos[None, :] < 3)
        mask = mask[None, None].expand(b, 1, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, length, -1)


@pytest.mark.parametrize("mask,kv_heads,want", [("causal", 2, "causal+gqa"),
                                                ("causal", 4, "causal"),
                                                ("window", 2, None)])
def test_attention_module_compiled_matches_eager(fresh_dynamo, mask, kv_heads, want):
    torch.manual_seed(0)
    mod = GQAttention(kv_heads=kv_heads, mask=mask)
    x = torch.randn(2, 11, 32, requires_grad=True)
    report = Report()
    compiled = torch.compile(mod, backend=_collecting(report))
    got = compiled(x)
    want_out = mod(x)
    assert_close_fp32(got, want_out, what="output")
    gx, *gp = torch.autograd.grad(got.square().sum(), [x, *mod.parameters()])
    wx, *wp = torch.autograd.grad(want_out.square().sum(), [x, *mod.parameters()])
    for g, w in zip([gx, *gp], [wx, *wp]):
        assert_close_fp32(g, w, what="gradient")
    att = report.graphs[0].passes[[p.name for p in report.graphs[0].passes].index("attention")]
    if want is None:
        assert att.matched == [] and att.skipped == [("sdpa.0", "mask is not causal")]
    else:
        assert att.matched == [f"sdpa.0 ({want})"]
        assert counters["lorafuse"]["attention"] == 1


def _collecting(report):
    from lorafuse.backend import lorafuse_backend

    return lambda gm, ex: lorafuse_backend(gm, ex, _collect=report)


# ----------------------------------------------------------------- whole tiny models


def _train_side_by_side(model, batches):
    """Train ``model`` compiled and an eager copy on the same batches (no attention_mask:
    the case the pass rewrites); return both loss lists, the gradients of the first step
    (same parameters) and of the last, and the report."""
    eager = copy.deepcopy(model)
    report = Report()
    compiled = torch.compile(model, backend=_collecting(report))
    out = {"eager": ([], None), "lorafuse": ([], None)}
    for name, fwd, m in (("eager", eager, eager), ("lorafuse", compiled, model)):
        opt = torch.optim.AdamW(lora_params(m).values(), lr=1e-2)
        losses, grads = [], []
        for ids in batches:
            loss = fwd(input_ids=ids, labels=ids).loss
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in lora_params(m).items()})
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        out[name] = (losses, (grads[0], grads[-1]))
    return out, report


@pytest.mark.slow
@pytest.mark.parametrize("arch,overrides,want", [
    ("llama", {}, "causal+gqa"),
    ("mistral", {"sliding_window": 5}, None),  # the window makes the mask non-causal
    ("qwen3", {}, "causal+gqa"),
    ("phi3", {}, "causal+gqa"),
    ("gemma3", {}, None),  # sliding-window layers (window 8 < 12 tokens)
])
def test_tiny_model_trains_like_eager(fresh_dynamo, arch, overrides, want):
    # One layer: what is checked here (the rewrite each layer's SDPA call gets, and training
    # under Inductor equal to eager) is per layer; 2 layers compiled 40 % longer. Two layers
    # sharing one mask: tests/test_all_passes.py (every arch) and the large-mask test below.
    model = make_tiny_model(arch, layers=1, **overrides)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(3)]
    out, report = _train_side_by_side(model, batches)
    (el, eg), (cl, cg) = out["eager"], out["lorafuse"]
    for step, (a, b) in enumerate(zip(cl, el), 1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"loss at step {step}")
    # Step 1 sees the same parameters: tight. The last step compares two trajectories, where
    # AdamW's m/sqrt(v) turns ulp differences into larger ones (tests/test_models.py: 1e-3).
    for (g_comp, g_eager), rtol in zip(zip(cg, eg), (1e-4, 1e-3)):
        for n in g_eager:
            assert_close_fp32(g_comp[n], g_eager[n], rtol=rtol, what=n)
    layers = model.config.num_hidden_layers
    att = next(p for p in report.graphs[0].passes if p.name == "attention")
    if want:
        assert att.matched == [f"sdpa.{i} ({want})" for i in range(layers)]
        assert counters["lorafuse"]["attention"] == layers
    else:
        assert att.matched == [] and {r for _, r in att.skipped} == {"mask is not causal"}


@pytest.mark.parametrize("arch,overrides,want", [
    ("llama", {}, "causal+gqa"),
    ("mistral", {"sliding_window": 5}, None),
    ("gemma3", {}, None),
])
def test_large_constant_masks_evaluated_by_rows(fresh_dynamo, monkeypatch, arch, overrides,
                                                want):
    """A constant mask above ``BY_ROWS_NUMEL`` elements is never built whole (transformers'
    (B, 1, L, L) mask: 64 GiB at 256K tokens): its rows are evaluated by blocks of
    ``ROW_BLOCK_ELEMENTS`` (both made tiny here), with the same decision as whole."""
    import lorafuse.kernels.attention as kernel
    import lorafuse.passes.attention as attention

    monkeypatch.setattr(attention, "BY_ROWS_NUMEL", 30)  # above B·L = 24, below L² = 144
    monkeypatch.setattr(kernel, "ROW_BLOCK_ELEMENTS", 30)
    built, blocks = [], []
    real_run, real_rows = attention._run, attention.RowsOfMask.rows

    def run(n, args, kwargs):
        out = real_run(n, args, kwargs)
        built.append(out.numel() if isinstance(out, torch.Tensor) else 0)
        return out

    def rows(self, r0, r1):
        if self.node.name == outermost[-1]:
            blocks.append((r0, r1))
        return real_rows(self, r0, r1)

    outermost = []
    real_by_rows = attention._by_rows

    def by_rows(n, args, kwargs):
        outermost.append(n.name)
        return real_by_rows(n, args, kwargs)

    monkeypatch.setattr(attention, "_run", run)
    monkeypatch.setattr(attention.RowsOfMask, "rows", rows)
    monkeypatch.setattr(attention, "_by_rows", by_rows)
    model = make_tiny_model(arch, **overrides)
    report = Report()
    compiled = torch.compile(model, backend=_collecting(report))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    assert_close_fp32(compiled(input_ids=ids).logits, model(input_ids=ids).logits,
                      what="logits")
    assert outermost and built and max(built) <= 30, (outermost, max(built, default=0))
    # blocks of at most 30 // 12 = 2 rows, from row 0; all 12 rows when the mask is causal
    assert blocks and blocks[0][0] == 0 and all(0 < b - a <= 2 for a, b in blocks), blocks
    if want:
        assert sorted({r for a, b in blocks for r in range(a, b)}) == list(range(12)), blocks
    att = next(p for p in report.graphs[0].passes if p.name == "attention")
    layers = model.config.num_hidden_layers
    if want:
        assert att.matched == [f"sdpa.{i} ({want})" for i in range(layers)]
    else:
        assert att.matched == [] and {r for _, r in att.skipped} == {"mask is not causal"}


def test_a_large_mask_left_in_place_is_warned(fresh_dynamo, monkeypatch):
    """When the pass cannot read a large mask by rows (here: made "large" from 10
    elements, so the position ids' advanced indexing meets it), the call keeps its mask,
    the output is still right, and the user is told once: it costs L² bytes and half of
    attention's speed at every step."""
    import lorafuse.passes.attention as attention
    from lorafuse.kernels import _dispatch

    monkeypatch.setattr(attention, "BY_ROWS_NUMEL", 10)
    monkeypatch.setattr(_dispatch, "warned", set())
    model = make_tiny_model("llama")
    report = Report()
    compiled = torch.compile(model, backend=_collecting(report))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with pytest.warns(RuntimeWarning, match="attention keeps an explicit .* mask: mask "
                                            "subgraph too large to evaluate whole"):
        got = compiled(input_ids=ids).logits
    assert_close_fp32(got, model(input_ids=ids).logits, what="logits")
    att = next(p for p in report.graphs[0].passes if p.name == "attention")
    assert att.matched == [] and all(r.startswith(attention.TOO_LARGE) for _, r in att.skipped)


@pytest.mark.parametrize("masked", [False, True])
def test_a_length_change_warns_once_unless_masked_attention_takes_over(fresh_dynamo,
                                                                       monkeypatch, masked):
    """After one batch of another length Dynamo recompiles with symbolic sizes, and that graph
    then runs every later batch, the first length included: the mask cannot be proven
    causal any more, and the user is told once (not when masked_attention, which checks at
    run time, takes those sites). The outputs stay right either way."""
    import warnings

    from lorafuse.backend import lorafuse_backend
    from lorafuse.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "warned", set())
    passes = ("attention", "masked_attention") if masked else ("attention",)
    model = make_tiny_model("llama", layers=1)
    report = Report()
    compiled = torch.compile(model, backend=lambda gm, ex: lorafuse_backend(
        gm, ex, options={"passes": passes}, _collect=report))
    g = torch.Generator().manual_seed(6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for length in (12, 17, 12):
            ids = torch.randint(0, VOCAB, (1, length), generator=g)
            with torch.no_grad():
                assert_close_fp32(compiled(input_ids=ids).logits, model(input_ids=ids).logits,
                                  what=f"length {length}")
    symbolic = [w for w in seen if "its sizes are symbolic" in str(w.message)]
    assert len(report.graphs) == 2  # the second length recompiled, the third reused it
    second = {p.name: p for p in report.graphs[1].passes}
    assert second["attention"].matched == []
    if masked:
        assert symbolic == [] and second["masked_attention"].matched == ["sdpa.0"]
    else:
        assert [r for _, r in second["attention"].skipped] == ["mask has symbolic sizes"]
        assert len(symbolic) == 1 and issubclass(symbolic[0].category, RuntimeWarning)
        assert "masked_attention" in str(symbolic[0].message)


@pytest.mark.parametrize("form", ["operator", "method", "tensor_function"])
@pytest.mark.parametrize("window", [None, 3])
def test_mask_by_rows_takes_each_form_dynamo_records(monkeypatch, form, window):
    """``kv <= q`` and ``a == b`` on tensors reach the graph as ``operator.le`` (torch 2.13),
    as the method ``__le__`` (torch 2.11, seen on the GPU machine: the mask was left whole
    and the pass gave up), or as ``torch.Tensor.__le__``; all three are evaluated by rows,
    and a sliding window is still found not causal."""
    import operator

    from torch import fx

    import lorafuse.passes.attention as attention

    monkeypatch.setattr(attention, "BY_ROWS_NUMEL", 30)
    L = 12

    def binary(g, name, a, b):
        if form == "operator":
            return g.call_function(getattr(operator, name + "_" * (name == "and")), (a, b))
        if form == "method":
            return g.call_method(f"__{name}__", (a, b))
        return g.call_function(getattr(torch.Tensor, f"__{name}__"), (a, b))

    g = fx.Graph()
    ar = g.call_function(torch.arange, (L,))
    q = g.call_function(operator.getitem, (ar, (None, None, slice(None), None)))
    kv = g.call_function(operator.getitem, (ar, (None, None, None, slice(None))))
    mask = binary(g, "le", kv, q)
    doc = g.call_function(operator.mul, (ar, 0))  # one document: transformers' packed check
    doc_q = g.call_function(operator.getitem, (doc, (None, None, slice(None), None)))
    doc_kv = g.call_function(operator.getitem, (doc, (None, None, None, slice(None))))
    same = binary(g, "eq", doc_q, doc_kv)
    mask = binary(g, "and", mask, same)
    if window:
        near = binary(g, "gt", kv, g.call_function(operator.sub, (q, window)))
        mask = binary(g, "and", mask, near)
    out = g.call_method("expand", (mask, 1, -1, L, L))
    g.output(out)
    gm = fx.GraphModule(torch.nn.Module(), g)
    env = {}
    for n in g.nodes:  # example values, as Dynamo records them
        if n.op != "output":
            env[n] = attention._run(n, *fx.node.map_arg((n.args, n.kwargs), lambda a: env[a]))
            n.meta["val"] = env[n]
    value = attention.evaluate_constant(gm, out, by_rows=True)
    assert isinstance(value, attention.RowsOfMask)
    lazy = {n.target for n in g.nodes if n.op != "output" and n.meta["val"].numel() > 30}
    assert len(lazy) >= 3, lazy  # le, eq, and (of the form under test) were all made by rows
    assert torch.equal(value.rows(0, L), env[out])
    assert is_causal_mask(value, (1, 2, L, 8), (1, 2, L, 8)) == (window is None)


# ----------------------------------------------------------------- masks from the inputs


def _padded_mask(b, length, pads, side="left"):
    """transformers' SDPA mask for a batch with ``pads[i]`` padding tokens in row i."""
    keep = torch.ones(b, length, dtype=torch.bool)
    for i, p in enumerate(pads):
        if p:
            keep[i, slice(None, p) if side == "left" else slice(length - p, None)] = False
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (causal[None] & keep[:, None, :])[:, None]


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), kv_heads=st.integers(1, 2), n_rep=st.sampled_from([1, 2, 3]),
       length=st.integers(1, 9), pads=st.lists(st.integers(0, 3), min_size=3, max_size=3),
       side=st.sampled_from(["left", "right"]), additive=st.booleans())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("flash", [False, True])
def test_causal_or_masked_op_matches_sdpa(b, kv_heads, n_rep, length, pads, side, additive,
                                          flash, dtype):
    """The op equals the traced call (masked SDPA on repeated K/V), forward and every
    gradient, whichever branch the mask picks (with ``flash``, right-padded masks take the
    key-range branch); the branch is causal iff nothing is padded. In float32 the SDPA
    branches run aten's fused kernel (the CPU's flash: public SDPA's pick) and keep its lse,
    each row's log-sum-exp of its visible scaled scores; in float64 they run public SDPA
    (that kernel's lse would be float64) and recompute in the backward."""
    from lorafuse.kernels import attention as ka
    from lorafuse.kernels.attention import repeat_kv

    pads = [min(p, length - 1) for p in pads[:b]]
    mask = _padded_mask(b, length, pads, side)
    if additive:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    g = torch.Generator().manual_seed(length * 7 + b)
    q = torch.randn(b, kv_heads * n_rep, length, 8, dtype=torch.float64, generator=g)
    k, v = torch.randn(2, b, kv_heads, length, 8, dtype=torch.float64, generator=g)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=g)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    flag = torch.ops.lorafuse.mask_is_causal(mask)
    assert flag.device.type == "cpu" and bool(flag) == (sum(pads) == 0)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask)
    got, lse, path = torch.ops.lorafuse.sdpa_causal_ranges_or_masked(
        qs, ks, vs, mask, flag, ok, lo, hi, n_rep, None, flash)
    got_grads = torch.autograd.grad(got, (qs, ks, vs), dout)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(qr, repeat_kv(kr, n_rep), repeat_kv(vr, n_rep),
                                          attn_mask=mask)
    want_grads = torch.autograd.grad(want, (qr, kr, vr), dout)
    # Rows that attend to nothing (a fully padded query row) are NaN in both; compare the rest.
    tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, equal_nan=True, **tol)
    for a, w in zip(got_grads, want_grads):
        torch.testing.assert_close(a, w, equal_nan=True, **tol)
    code = int(path)
    if code == ka.FLASH_BOUNDS:
        return
    assert (code >= ka.FUSED) == (dtype == torch.float32), code
    visible = mask if mask.dtype == torch.bool else mask == 0
    visible = visible & torch.ones(length, length, dtype=torch.bool).tril() if bool(flag) \
        else visible
    scores = (q.double() @ repeat_kv(k, n_rep).double().transpose(-1, -2)) * 8 ** -0.5
    want_lse = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    rows = visible.any(-1).expand_as(want_lse)
    if code >= ka.FUSED:
        torch.testing.assert_close(lse.double()[rows], want_lse[rows], rtol=1e-5, atol=1e-5)
    else:
        assert not lse.any()


@pytest.mark.parametrize("fails", ["forward", "backward"])
def test_a_failing_aten_kernel_falls_back_to_public_sdpa(fails, monkeypatch):
    """Where aten's fused kernel refuses (a private op: its constraints may move between
    torch versions) the op warns once and runs public SDPA, recomputed in the backward:
    the same output and gradients, never a failed step."""
    from lorafuse import _torch
    from lorafuse.kernels import _dispatch
    from lorafuse.kernels import attention as ka

    def refuse(*a, **kw):
        raise RuntimeError("refused")

    monkeypatch.setattr(_torch, f"fused_sdpa_{fails}", refuse)
    monkeypatch.setattr(_dispatch, "warned", set())
    mask = _padded_mask(2, 7, [0, 3])
    g = torch.Generator().manual_seed(5)
    q, dout = torch.randn(2, 2, 4, 7, 8, generator=g)
    k, v = torch.randn(2, 2, 2, 7, 8, generator=g)
    flag = torch.ops.lorafuse.mask_is_causal(mask)
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    with pytest.warns(RuntimeWarning, match="aten's flash attention"):
        out, lse, path = torch.ops.lorafuse.sdpa_causal_ranges_or_masked(
            *ins, mask, flag, ok, lo, hi, 2, None, False)
        grads = torch.autograd.grad(out, ins, dout)
    assert (int(path) == ka.RECOMPUTED) == (fails == "forward")
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    want = ka.attention_reference(*refs, mask, False, 2, None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for a, w in zip(grads, torch.autograd.grad(want, refs, dout)):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


def test_fused_kernel_choice_is_none_where_no_kernel_is_allowed():
    """Under a user's ``sdpa_kernel`` restriction that no kernel meets (efficient attention
    alone refuses ``enable_gqa``: session 14's GPU run), asking which kernel public SDPA
    would pick raises in torch; ``fused_sdpa_kernel`` answers None instead, so the op tries
    the repeated K/V and then public SDPA rather than failing the step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lorafuse._torch import fused_sdpa_kernel

    q, k = torch.randn(2, 4, 8, 8), torch.randn(2, 2, 8, 8)
    assert fused_sdpa_kernel(q, k, k, None, True, None, True) == "flash"
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        with pytest.raises(RuntimeError):  # what torch does, unwrapped
            torch._fused_sdp_choice(q, k, k, None, 0.0, True, scale=None, enable_gqa=True)
        assert fused_sdpa_kernel(q, k, k, None, True, None, True) is None


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=4, max_size=4),
       t_order=st.permutations(range(4)), ref_order=st.permutations(range(4)))
def test_laid_out_like_takes_the_reference_memory_order(sizes, t_order, ref_order):
    """``_torch.laid_out_like`` (the cuDNN backward's out and dout, made to follow q's
    layout): the same values, dense, in the reference's stride order (aten's rule, ties in
    dimension order), and ``t`` itself, not a copy, where it already is laid out so."""
    from lorafuse._torch import laid_out_like

    def laid(order):  # a (sizes) tensor whose memory runs through dims in ``order``
        base = torch.randn([sizes[d] for d in order], dtype=torch.float64)
        return base.permute([order.index(d) for d in range(4)])

    t, ref = laid(t_order), laid(ref_order)
    got = laid_out_like(t, ref)
    assert torch.equal(got, t)
    order = sorted(range(4), key=ref.stride)
    step = 1
    for d in order:
        assert got.stride(d) == step
        step *= sizes[d]
    again = laid_out_like(got, ref)
    assert again.data_ptr() == got.data_ptr()


@pytest.mark.parametrize("layout", ["contiguous", "transformers"])
def test_causal_or_masked_opcheck(layout):
    """The op's fake and real outputs and gradients agree, layouts included: with q, k, v
    as transformers hands them (views of (B, L, H, D)) the gradients keep that layout."""
    mask = _padded_mask(2, 5, [0, 2])
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    if layout == "transformers":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    for m in (mask, _padded_mask(2, 5, [0, 0])):
        flag = torch.ops.lorafuse.mask_is_causal(m)
        lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(m)
        torch.library.opcheck(torch.ops.lorafuse.sdpa_causal_ranges_or_masked.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), m,
                               flag, ok, lo, hi, 2, None, True))
        torch.library.opcheck(torch.ops.lorafuse.mask_is_causal.default, (m,))


@pytest.mark.slow
def test_masked_attention_pass_padded_and_unpadded_batches(fresh_dynamo, monkeypatch):
    """Tiny Llama trained with an attention_mask on every batch (as a Trainer does),
    unpadded and padded batches through one compiled graph: losses and LoRA gradients as
    eager at every step, the causal branch taken exactly for the unpadded batches, and
    neither branch's forward run again in the backward."""
    import lorafuse.kernels.attention as kernels

    branches = []
    real = kernels.sdpa_forward

    def spy(q, k, v, mask, causal, n_rep, scale):
        out = real(q, k, v, mask, causal, n_rep, scale)
        branches.append((causal, out[2] >= kernels.FUSED))
        return out

    monkeypatch.setattr(kernels, "sdpa_forward", spy)
    model = make_tiny_model("llama")
    eager = copy.deepcopy(model)
    report = Report()
    from lorafuse.backend import lorafuse_backend

    compiled = torch.compile(model, backend=lambda gm, ex: lorafuse_backend(
        gm, ex, options={"passes": ("lora", "attention", "masked_attention")}, _collect=report))
    opts = {m: torch.optim.AdamW(lora_params(m).values(), lr=1e-2) for m in (model, eager)}
    g = torch.Generator().manual_seed(2)
    layers = model.config.num_hidden_layers
    for step, pad in enumerate((0, 4, 0)):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        am = torch.ones(2, 12, dtype=torch.long)
        am[1, :pad] = 0
        batch = dict(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100))
        losses, grads = {}, {}
        for m, fwd in ((eager, eager), (model, compiled)):
            branches.clear()
            loss = fwd(**batch).loss
            loss.backward()
            losses[m], grads[m] = loss.detach(), {n: p.grad.clone()
                                                 for n, p in lora_params(m).items()}
            opts[m].step()
            opts[m].zero_grad(set_to_none=True)
        # the forward only (one per layer), through the fused kernel (the CPU's flash):
        # the backward uses its kept lse, no recompute
        assert branches == [(pad == 0, True)] * layers, (step, branches)
        torch.testing.assert_close(losses[model], losses[eager], rtol=1e-5, atol=1e-6)
        for n in grads[eager]:
            assert_close_fp32(grads[model][n], grads[eager][n], rtol=1e-4, what=n)
    (graph,) = report.graphs
    masked = next(p for p in graph.passes if p.name == "masked_attention")
    assert masked.matched == [f"sdpa.{i}" for i in range(layers)]
    assert counters["lorafuse"]["masked_attention"] == layers


def test_symbolic_sizes_left_alone_without_failing(fresh_dynamo):
    """dynamic=True: the mask's sizes are symbolic, so it cannot be evaluated once; the
    pass leaves the call alone with a reason (and does not fail: no fallback warning)."""
    import warnings

    torch.manual_seed(0)
    mod = GQAttention()
    report = Report()
    compiled = torch.compile(mod, backend=_collecting(report), dynamic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for length in (7, 11):
            x = torch.randn(2, length, 32)
            assert_close_fp32(compiled(x), mod(x), what=f"length {length}")
    att = [p for g in report.graphs for p in g.passes if p.name == "attention"]
    assert att and all(p.error is None and not p.matched for p in att)
    assert {r for p in att for _, r in p.skipped} <= {
        "mask has symbolic sizes",
        "mask depends on inputs (padding or packed sequences; the masked_attention pass "
        "checks it at run time)"}


def test_masked_attention_leaves_constant_non_causal_masks_alone(fresh_dynamo):
    """A sliding window the compile can evaluate is never causal: no run-time check."""
    from lorafuse.backend import lorafuse_backend

    torch.manual_seed(0)
    mod = GQAttention(mask="window")
    report = Report()
    compiled = torch.compile(mod, backend=lambda gm, ex: lorafuse_backend(
        gm, ex, options={"passes": ("attention", "masked_attention")}, _collect=report))
    x = torch.randn(2, 9, 32)
    assert_close_fp32(compiled(x), mod(x), what="output")
    masked = next(p for p in report.graphs[0].passes if p.name == "masked_attention")
    assert masked.matched == []
    assert [r for _, r in masked.skipped] == [
        "mask is constant and not causal (a run-time check would always fail)"]
