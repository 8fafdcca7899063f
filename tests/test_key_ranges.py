"""Attention on per-query key ranges: ``lorafuse::mask_key_ranges``, the key bounds of
``lorafuse::flash_attention``, the run-time branching ops of ``kernels/attention.py`` and
the two passes that insert them (``masked_attention`` for SDPA, ``eager_attention`` for
eager chains whose mask comes from the inputs).

- ``mask_key_ranges``: hypothesis draws masks whose rows are contiguous non-empty ranges
  (boolean; additive with the dtype's lowest or -inf; batch-broadcast (1, 1, Lq, Lkv)):
  ``ok`` and the exact bounds; and masks with a hole in a row, an empty row, or another
  masked value: not ok. transformers' own masks (left/right padding, packed documents, a
  sliding window) as it builds them.
- The op with key bounds against the fp64 eager chain with the equivalent mask: fp32 to
  rtol 1e-5 of the largest entry; bf16 no farther from fp64 than eager bf16 (× 1.25). The
  reference path here; the Triton kernels under TRITON_INTERPRET=1 in a subprocess (this
  file as a script) on tiny shapes.
- The branching ops against what they replace (masked SDPA, the eager chain) in each
  branch, forward and gradients; opcheck of their registrations.
- Slow: a tiny Llama with the masked_attention pass, fp32, 3 AdamW steps beside eager
  with left-padded, right-padded and packed (``position_ids`` restarting per document, no
  ``attention_mask``, as HF's flattening collator builds them) batches: same losses and
  LoRA gradients, and the branch each batch takes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CheckRecorder, assert_check_passed, run_interpreter_worker
from test_flash_attention import assert_close_to_oracle, eager64, hf_eager, rel, run_attention

MIN32 = torch.finfo(torch.float32).min
NAMES = ("out", "dq", "dk", "dv")

# --------------------------------------------------------------------------- masks


def ranges_to_mask(lo, hi, lkv):
    """Boolean (B, 1, Lq, Lkv): row i of batch b sees keys lo[b, i] <= j <= hi[b, i]."""
    j = torch.arange(lkv)
    return ((j >= lo[..., None].long()) & (j <= hi[..., None].long()))[:, None]


def additive(mask, dtype, masked_value=None):
    low = torch.finfo(dtype).min if masked_value is None else masked_value
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, low)


@st.composite
def contiguous_ranges(draw, max_len=24, min_width=1):
    """(lo, hi, Lkv): int32 (B, Lq) non-empty ranges, of realistic kinds and random ones."""
    b = draw(st.integers(1, 3))
    lq = draw(st.integers(1, max_len))
    kind = draw(st.sampled_from(["random", "causal-padded", "packed", "window"]))
    lkv = lq if kind != "random" else draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(lq)
    if kind == "random":
        lo = torch.randint(0, lkv, (b, lq), generator=g)
        width = torch.randint(min_width - 1, lkv, (b, lq), generator=g)
        hi = torch.minimum(lo + width, torch.tensor(lkv - 1))
        lo = torch.clamp(torch.minimum(lo, hi - (min_width - 1)), min=0)
    elif kind == "causal-padded":  # right padding: padded queries see the real keys
        real = torch.randint(1, lq + 1, (b,), generator=g)
        hi = torch.minimum(i[None], real[:, None] - 1)
        lo = torch.zeros_like(hi)
    elif kind == "packed":  # documents: [doc_start(i), i]
        starts = torch.rand(b, lq, generator=g) < 0.25
        starts[:, 0] = True
        doc_start = torch.where(starts, i, 0).cummax(-1).values
        lo, hi = doc_start, i[None].expand(b, lq)
    else:
        w = draw(st.integers(1, max_len))
        lo, hi = torch.clamp(i - w + 1, min=0)[None].expand(b, lq), i[None].expand(b, lq)
    return lo.int().contiguous(), hi.int().contiguous(), lkv


@settings(max_examples=60, deadline=None)
@given(r=contiguous_ranges(), form=st.sampled_from(["bool", "min", "-inf", "bf16"]),
       broadcast=st.booleans())
def test_ranges_of_contiguous_masks(r, form, broadcast):
    from lorafuse.kernels.attention import mask_key_ranges_op

    lo, hi, lkv = r
    if broadcast:
        lo, hi = lo[:1], hi[:1]
    mask = ranges_to_mask(lo, hi, lkv)
    if form != "bool":
        dtype = torch.bfloat16 if form == "bf16" else torch.float32
        mask = additive(mask, dtype, float("-inf") if form == "-inf" else None)
    got_lo, got_hi, ok = mask_key_ranges_op(mask)
    assert ok.device.type == "cpu" and ok.dim() == 0 and bool(ok)
    assert got_lo.dtype == got_hi.dtype == torch.int32
    assert torch.equal(got_lo, lo) and torch.equal(got_hi, hi)


@settings(max_examples=60, deadline=None)
@given(r=contiguous_ranges(), flaw=st.sampled_from(["hole", "empty", "value", "nan"]),
       form=st.sampled_from(["bool", "min"]), data=st.data())
def test_ranges_refuse_other_masks(r, flaw, form, data):
    """A row with a hole, a row with no key, or an additive mask with any other masked
    value: not ok (the caller keeps its masked path)."""
    from lorafuse.kernels.attention import mask_key_ranges_op

    lo, hi, lkv = r
    mask = ranges_to_mask(lo, hi, lkv)
    b = data.draw(st.integers(0, lo.shape[0] - 1))
    i = data.draw(st.integers(0, lo.shape[1] - 1))
    if flaw == "hole":
        mask[b, 0, i] = True  # a second run after a gap: needs a gap of one key at least
        gap = data.draw(st.integers(0, lkv - 1))
        mask[b, 0, i, gap] = False
        if gap in (0, lkv - 1) or lkv < 3:  # no hole inside: make the row empty instead
            mask[b, 0, i] = False
    elif flaw == "empty":
        mask[b, 0, i] = False
    if form == "bool" and flaw in ("value", "nan"):
        form = "min"
    m = mask if form == "bool" else additive(mask, torch.float32)
    if flaw in ("value", "nan"):  # one entry neither 0 nor the lowest (-1e9: not HF's)
        m[b, 0, i, 0] = -1e9 if flaw == "value" else float("nan")
    assert not bool(mask_key_ranges_op(m)[2])


def test_ranges_of_transformers_masks():
    """transformers' masks as its models build them (SDPA boolean, eager additive): left
    padding leaves padded queries no key (not ok: the fallback); right padding, packed
    documents and a sliding window are ranges."""
    from transformers.masking_utils import (and_masks, causal_mask_function, eager_mask,
                                            packed_sequence_mask_function, sdpa_mask,
                                            sliding_window_causal_mask_function)

    from lorafuse.kernels.attention import mask_key_ranges_op

    length = 9
    left = torch.ones(2, length, dtype=torch.long)
    left[1, :3] = 0
    right = torch.ones(2, length, dtype=torch.long)
    right[1, -3:] = 0
    cases = {"left": (left, causal_mask_function, False),
             "right": (right, causal_mask_function, True),
             "window": (right, sliding_window_causal_mask_function(4), True)}
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1]])
    diff = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
    docs = (diff != 1).cumsum(-1)
    packed_fn = and_masks(causal_mask_function, packed_sequence_mask_function(docs))
    cases["packed"] = (None, packed_fn, True)
    for name, (am, fn, want_ok) in cases.items():
        for build in (sdpa_mask, eager_mask):
            mask = build(batch_size=2, q_length=length, kv_length=length, mask_function=fn,
                         attention_mask=None if am is None else am.bool(),
                         allow_is_causal_skip=False)
            assert mask.dim() == 4, name
            lo, hi, ok = mask_key_ranges_op(mask)
            assert bool(ok) == want_ok, (name, build.__name__)
            if want_ok:
                vis = mask if mask.dtype == torch.bool else mask == 0
                assert torch.equal(ranges_to_mask(lo, hi, length).expand_as(vis), vis), name


def test_ranges_opcheck():
    from lorafuse.kernels.attention import mask_key_ranges_op

    lo = torch.tensor([[0, 0, 1, 1]], dtype=torch.int32)
    hi = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    m = ranges_to_mask(lo, hi, 4)
    for mask in (m, additive(m, torch.float32), m.expand(3, 1, 4, 4)):
        torch.library.opcheck(mask_key_ranges_op, (mask,))


# --------------------------------------------------------------------------- the op with bounds


def bounded_case(r, hkv, ratio, d, seed):
    lo, hi, lkv = r
    b, lq = lo.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * ratio, lq, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(b, hkv, lkv, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(b, hkv, lkv, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, hkv * ratio, lq, d, generator=g, dtype=torch.float64)
    return (q, k, v, dout), lo, hi


def check_bounded(inputs, lo, hi, causal, scale, softcap, dtype, what="", window=None,
                  key_mask=None):
    """flash_attention with key bounds (and causal, a window, a key mask) against the fp64
    eager chain under the equivalent additive mask: tight in fp32; in bf16/fp16 within
    1.25 × eager's error."""
    from lorafuse.kernels.flash_attention import flash_attention, visible_mask

    lq, lkv = inputs[0].shape[2], inputs[1].shape[2]
    vis = visible_mask(lq, lkv, causal, window, key_mask, "cpu", lo, hi)
    ref = run_attention(lambda q, k, v: eager64(q, k, v, additive(vis, torch.float64, MIN32),
                                                scale, softcap), inputs, torch.float64)
    got = run_attention(lambda q, k, v: flash_attention(
        q, k, v, causal=causal, scale=scale, softcap=softcap, window=window, key_lo=lo,
        key_hi=hi, key_mask=key_mask),
        inputs, dtype)
    if dtype != torch.float32:
        eager = run_attention(lambda q, k, v: hf_eager(q, k, v, additive(vis, dtype), scale,
                                                       softcap), inputs, dtype)
    assert_close_to_oracle(got, ref, eager if dtype != torch.float32 else None, dtype, what)


@st.composite
def bounded_cases(draw, max_len, head_dims, min_len=1):
    r = draw(contiguous_ranges(max_len=max_len, min_width=1))
    if r[0].shape[1] < min_len or r[2] < min_len:
        r = draw(contiguous_ranges(max_len=max_len).filter(
            lambda x: x[0].shape[1] >= min_len and x[2] >= min_len))
    hkv = draw(st.integers(1, 2))
    ratio = draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from(head_dims))
    causal = draw(st.booleans()) and r[0].shape[1] == r[2]
    window = draw(st.one_of(st.none(), st.integers(min_len, max_len))) if causal else None
    softcap = draw(st.sampled_from([None, 1.5, 20.0]))
    scale = d ** -0.5 * draw(st.sampled_from([0.5, 1.0, 2.0]))
    seed = draw(st.integers(0, 2**16))
    return bounded_case(r, hkv, ratio, d, seed), causal, scale, softcap, window


@settings(max_examples=30, deadline=None)
@given(case=bounded_cases(max_len=50, head_dims=[8, 16, 40, 64]))
def test_bounds_reference_fp32(case):
    (inputs, lo, hi), causal, scale, softcap, window = case
    check_bounded(inputs, lo, hi, causal, scale, softcap, torch.float32, window=window)


@settings(max_examples=12, deadline=None)
@given(case=bounded_cases(max_len=60, head_dims=[16, 64], min_len=16),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_bounds_reference_low_precision(case, dtype):
    (inputs, lo, hi), causal, scale, softcap, window = case
    check_bounded(inputs, lo, hi, causal, scale, softcap, dtype, window=window)


def test_bounds_with_key_mask():
    """Key bounds and a key mask together (no pass does this; the op allows it)."""
    i = torch.arange(20)
    lo = torch.stack([torch.clamp(i - 6, min=0), i // 5 * 5]).int()
    hi = torch.stack([i, torch.clamp(i + 2, max=19)]).int()
    inputs, lo, hi = bounded_case((lo, hi, 20), 1, 2, 16, 3)
    key_mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(2)) > 0.4
    for causal in (False, True):
        check_bounded(inputs, lo, hi, causal, 0.25, 5.0, torch.float32, key_mask=key_mask)


def test_bounds_contract_and_opcheck():
    from lorafuse.kernels.flash_attention import flash_attention, flash_attention_op

    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 1, 5, 8)
    lo = torch.zeros(2, 5, dtype=torch.int32)
    hi = torch.arange(5, dtype=torch.int32).expand(2, 5).contiguous()
    with pytest.raises(ValueError, match="together"):
        flash_attention(q, k, k, key_lo=lo)
    with pytest.raises(ValueError, match="int32"):
        flash_attention(q, k, k, key_lo=lo.long(), key_hi=hi.long())
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, k))
    torch.library.opcheck(flash_attention_op, (qs, ks, vs, None, False, 0.3, 5.0, None, lo, hi))
    # the eager_attention pass's positional call (no bounds) still works
    out, _ = flash_attention_op(q, k, k, None, True, 0.3, None, None)
    torch.testing.assert_close(out, flash_attention(q, k, k, scale=0.3))


# --------------------------------------------------------------------------- Triton interpreter


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__, LORAFUSE_FLASH_ATTENTION_IMPL="triton")


@pytest.mark.parametrize("check", ["bounds-fp32", "bounds-bf16", "bounds-blocks-dead-rows"])
def test_triton_interpreter(interpreter_results, check):
    assert_check_passed(interpreter_results, check)


def _worker():
    """Runs in the subprocess (TRITON_INTERPRET=1, LORAFUSE_FLASH_ATTENTION_IMPL=triton)."""
    import warnings

    from lorafuse.kernels import flash_attention as fa

    assert fa._INTERPRETED, "TRITON_INTERPRET did not take effect"
    record = CheckRecorder()

    def prop(dtype, examples, min_len):
        @settings(max_examples=examples, deadline=None, database=None)
        @given(case=bounded_cases(max_len=35, head_dims=[8, 16, 24], min_len=min_len))
        def check(case):
            (inputs, lo, hi), causal, scale, softcap, window = case
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
                check_bounded(inputs, lo, hi, causal, scale, softcap, dtype, window=window)

        return check

    record("bounds-fp32", prop(torch.float32, 10, 1))
    record("bounds-bf16", prop(torch.bfloat16, 4, 16))

    def blocks_dead_rows():
        """Several 16-blocks, GQA 4, causal + bounds with rows that see no key (lo > i):
        blocks visit everything there, the others skip; dk/dv test every query block."""
        lq = 45
        i = torch.arange(lq)
        lo = torch.stack([torch.clamp(i - 20, min=0), (i // 10) * 10]).int()
        hi = torch.stack([i, i + 3]).int()
        lo[0, 30:33] = 40  # dead: above the diagonal
        lo[1, 5] = 44
        hi[1, 5] = 44  # dead under causal
        inputs, lo, hi = bounded_case((lo, hi, lq), 2, 4, 32, 7)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            check_bounded(inputs, lo, hi, True, 0.2, 3.0, torch.float32, "blocks")
            check_bounded(inputs, lo, hi, True, 0.2, None, torch.float32, "window", window=9)
            key_mask = torch.rand(2, lq, generator=torch.Generator().manual_seed(1)) > 0.3
            check_bounded(inputs, lo, hi, False, 0.2, 3.0, torch.float32, "key mask",
                          key_mask=key_mask)
            check_bounded(inputs, lo, hi, False, 0.2, None, torch.float32, "blocks")

    record("bounds-blocks-dead-rows", blocks_dead_rows)
    record.report()


# --------------------------------------------------------------------------- branching ops


def padded_masks(b, length, kind):
    """SDPA boolean masks (B, 1, L, L) of one kind: unpadded, left/right padded, packed."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keep = torch.ones(b, length, dtype=torch.bool)
    if kind == "left":
        keep[-1, :2] = False
    if kind == "right":
        keep[-1, -2:] = False
    mask = causal[None] & keep[:, None, :]
    if kind == "packed":
        doc = (torch.arange(length) >= length // 2).long()
        mask = mask & (doc[:, None] == doc[None, :])
    return mask[:, None]


@pytest.mark.parametrize("kind,branch", [("none", "causal"), ("left", "masked"),
                                         ("right", "flash"), ("packed", "flash")])
@pytest.mark.parametrize("form", ["bool", "additive"])
def test_sdpa_branching_op(kind, branch, form):
    """``sdpa_causal_ranges_or_masked`` equals masked SDPA on repeated K/V (fp64), forward
    and gradients, in the branch the mask picks; flash=False never takes the flash branch."""
    from lorafuse.kernels import attention as ka

    b, length, n_rep = 2, 9, 2
    mask = padded_masks(b, length, kind)
    if form == "additive":
        mask = additive(mask, torch.float64, float("-inf"))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, 2 * n_rep, length, 8, dtype=torch.float64, generator=g)
    k, v = torch.randn(2, b, 2, length, 8, dtype=torch.float64, generator=g)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=g)
    flag = torch.ops.lorafuse.mask_is_causal(mask)
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask)
    assert (bool(flag), bool(ok) and not bool(flag)) == (branch == "causal", branch == "flash")
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(qr, ka.repeat_kv(kr, n_rep), ka.repeat_kv(vr, n_rep),
                                          attn_mask=mask)
    want_grads = torch.autograd.grad(want, (qr, kr, vr), dout)
    for flash in (True, False):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        got = torch.ops.lorafuse.sdpa_causal_ranges_or_masked(qs, ks, vs, mask, flag, ok, lo, hi,
                                                              n_rep, None, flash)[0]
        got_grads = torch.autograd.grad(got, (qs, ks, vs), dout)
        assert got.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(got, want, equal_nan=True)
        for a, w in zip(got_grads, want_grads):
            torch.testing.assert_close(a, w, equal_nan=True)
    torch.library.opcheck(torch.ops.lorafuse.sdpa_causal_ranges_or_masked.default,
                          (q.clone().requires_grad_(), k.clone().requires_grad_(),
                           v.clone().requires_grad_(), mask, flag, ok, lo, hi, n_rep, None,
                           True))


@pytest.mark.parametrize("kind", ["left", "right", "packed"])
def test_sdpa_branching_op_bf16_no_worse_than_masked_sdpa(kind):
    """bf16: the op's error against fp64 is within 1.25 × masked SDPA bf16's."""
    from lorafuse.kernels import attention as ka

    b, length, n_rep = 2, 40, 2
    mask = padded_masks(b, length, kind)
    g = torch.Generator().manual_seed(5)
    inputs = (torch.randn(b, 2 * n_rep, length, 32, dtype=torch.float64, generator=g),
              *torch.randn(2, b, 2, length, 32, dtype=torch.float64, generator=g),
              torch.randn(b, 2 * n_rep, length, 32, dtype=torch.float64, generator=g))
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask)
    flag = torch.ops.lorafuse.mask_is_causal(mask)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, ka.repeat_kv(k, n_rep), ka.repeat_kv(v, n_rep),
                                              attn_mask=mask)

    ref = run_attention(sdpa, inputs, torch.float64)
    base = run_attention(sdpa, inputs, torch.bfloat16)
    got = run_attention(lambda q, k, v: torch.ops.lorafuse.sdpa_causal_ranges_or_masked(
        q, k, v, mask, flag, ok, lo, hi, n_rep, None, True)[0], inputs, torch.bfloat16)
    rows = mask[:, 0].any(-1)[:, None, :, None]  # SDPA's fully masked rows: compare the rest
    for name, a, e, r in zip(NAMES, got, base, ref):
        if name == "out":
            a, e, r = (t.masked_fill(~rows, 0) for t in (a, e, r.nan_to_num()))
        assert torch.isfinite(a).all(), name
        err, err_base = rel(a, r), rel(e, r)
        assert err <= 1.25 * err_base + 1e-6, f"{kind} {name}: {err:.3g} vs {err_base:.3g}"


@pytest.mark.parametrize("kind", ["left", "right", "packed", "window"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_eager_branching_op(kind, dtype):
    """``eager_ranges_or_chain`` against transformers' eager chain (Gemma2's, softcap): fp64
    tight in both branches (left padding: the chain's own math, exactly); bf16 within
    1.25 × eager bf16's error against fp64."""
    from lorafuse.kernels.attention import eager_ranges_or_chain_op

    b, length, n_rep, d, cap = 2, 33, 2, 16, 5.0
    mask = padded_masks(b, length, "right" if kind == "window" else kind)
    if kind == "window":
        i = torch.arange(length)
        mask = mask & (i[None, :] > i[:, None] - 8)
    scale = d ** -0.5
    g = torch.Generator().manual_seed(11)
    inputs = (torch.randn(b, 2 * n_rep, length, d, dtype=torch.float64, generator=g) * 2,
              *torch.randn(2, b, 2, length, d, dtype=torch.float64, generator=g),
              torch.randn(b, 2 * n_rep, length, d, dtype=torch.float64, generator=g))
    add64 = additive(mask, torch.float64, MIN32)
    add = add64 if dtype == torch.float64 else additive(mask, dtype)  # (softmax in fp32)
    # (fp64: HF's fp32 lowest is not fp64's, which the check wants; ranges of the booleans)
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask if dtype == torch.float64 else add)
    assert bool(ok) == (kind != "left")
    ref = run_attention(lambda q, k, v: eager64(q, k, v, add64, scale, cap), inputs,
                        torch.float64)
    got = run_attention(lambda q, k, v: eager_ranges_or_chain_op(
        q, k, v, add, ok, lo, hi, n_rep, scale, cap)[0], inputs, dtype)
    if dtype == torch.float64:  # left padding: the chain (HF's softmax in fp32) itself
        if kind == "left":
            ref = run_attention(lambda q, k, v: hf_eager(q, k, v, add64, scale, cap), inputs,
                                torch.float64)
        for name, a, r in zip(NAMES, got, ref):
            torch.testing.assert_close(a, r, msg=lambda m: f"{kind} {name}: {m}")
        torch.library.opcheck(eager_ranges_or_chain_op, (
            *(t.clone().requires_grad_() for t in inputs[:3]), add, ok, lo, hi, n_rep, scale,
            cap))
        return
    base = run_attention(lambda q, k, v: hf_eager(q, k, v, add, scale, cap), inputs, dtype)
    for name, a, e, r in zip(NAMES, got, base, ref):
        err, err_base = rel(a, r), rel(e, r)
        if kind == "left":  # the chain itself
            assert err == err_base, name
        assert err <= 1.25 * err_base + 1e-6, f"{kind} {name}: {err:.3g} vs {err_base:.3g}"


# --------------------------------------------------------------------------- the passes


def llama_batches(kind, steps=3, b=2, length=12):
    """Batches of one kind: left- or right-padded attention_mask, or packed documents
    (HF's DataCollatorWithFlattening: position_ids restart at 0 per document, labels -100
    at each document's first token, no attention_mask)."""
    from conftest import VOCAB

    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (b, length), generator=g)
        if kind == "packed":
            docs = [[5, 4, 3], [7, 5]]  # document lengths per row
            pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in docs])
            labels = ids.masked_fill(pos == 0, -100)
            out.append(dict(input_ids=ids, position_ids=pos, labels=labels))
            continue
        am = torch.ones(b, length, dtype=torch.long)
        am[1, slice(None, 4) if kind == "left" else slice(-4, None)] = 0
        out.append(dict(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100)))
    return out


def aot_eager_after(passes, graphs):
    """Dynamo backend: lorafuse's passes on the graph (strict), then AOTAutograd without a
    compiler (as tests/test_all_passes.py does); the rewritten graphs are kept."""
    from lorafuse.passes import PASSES
    from lorafuse.report import PassReport

    aot_eager = torch._dynamo.lookup_backend("aot_eager_default_partitioner")

    def backend(gm, example_inputs):
        reports = []
        for name in passes:
            pr = PassReport(name)
            PASSES[name](gm, pr)
            reports.append(pr)
        graphs.append((gm, reports))
        return aot_eager(gm, example_inputs)

    return backend


def train_beside_eager(arch, kind, passes, monkeypatch):
    """3 AdamW steps of a tiny ``arch`` through the passes beside an eager copy: (losses,
    eager losses, grads, eager grads, graphs, branches). ``branches`` lists, per forward and
    per backward call of a branching op, the branch taken."""
    from conftest import lora_params, make_tiny_model, reset_dynamo
    from lorafuse.kernels import attention as ka

    branches = []
    for name in ("flash_with_bounds", "sdpa_forward", "eager_chain"):
        real = getattr(ka, name)
        monkeypatch.setattr(ka, name, (lambda real, name: lambda *a, **k: (
            branches.append(name), real(*a, **k))[1])(real, name))
    reset_dynamo()
    model = make_tiny_model(arch, layers=2, seed=1)
    eager = copy.deepcopy(model)
    graphs = []
    compiled = torch.compile(model, backend=aot_eager_after(passes, graphs))
    opts = {m: torch.optim.AdamW(lora_params(m).values(), lr=1e-2) for m in (model, eager)}
    rec = {m: ([], []) for m in (model, eager)}
    taken = []
    for batch in llama_batches(kind):
        for m, fwd in ((eager, eager), (model, compiled)):
            branches.clear()
            loss = fwd(**batch).loss
            loss.backward()
            rec[m][0].append(loss.detach())
            rec[m][1].append({n: p.grad.clone() for n, p in lora_params(m).items()})
            opts[m].step()
            opts[m].zero_grad(set_to_none=True)
        taken.append(sorted(set(branches)))
    reset_dynamo()
    return rec[model], rec[eager], graphs, taken


def assert_same_training(got, want, what):
    from conftest import assert_close_fp32

    torch.testing.assert_close(torch.stack(got[0]), torch.stack(want[0]), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{what} losses: {m}")
    for step, (gg, wg) in enumerate(zip(got[1], want[1])):
        for n, w in wg.items():
            assert w.norm() > 0, f"{what}: eager gradient of {n} is zero"
            assert_close_fp32(gg[n], w, rtol=1e-4 if step == 0 else 1e-3,
                              what=f"{what} step {step} {n}")


@pytest.mark.slow
@pytest.mark.parametrize("kind,branch", [("left", "sdpa_forward"),
                                         ("right", "flash_with_bounds"),
                                         ("packed", "flash_with_bounds")])
def test_masked_attention_pass_llama(kind, branch, monkeypatch):
    """Tiny Llama, passes lora + attention + masked_attention, fp32: same losses and LoRA
    gradients as eager over 3 steps; the branch the batches take (left padding: padded
    queries see no key → masked SDPA; right padding and packed documents → flash on key
    ranges). Packed: the graph builds the 4-D SDPA mask from position_ids (no
    attention_mask input), and that mask feeds the ranges."""
    got, want, graphs, taken = train_beside_eager(
        "llama", kind, ("lora", "attention", "masked_attention"), monkeypatch)
    assert_same_training(got, want, f"llama {kind}")
    assert len(graphs) == 1, "a graph break or a recompile"
    gm, reports = graphs[0]
    masked = next(r for r in reports if r.name == "masked_attention")
    assert masked.matched == ["sdpa.0", "sdpa.1"], (masked.matched, masked.skipped)
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(n.target is torch.ops.lorafuse.mask_key_ranges.default for n in ops) == 1
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    if kind == "packed":  # the 4-D mask the ranges read is built from position_ids
        from lorafuse.passes.attention import _ancestors

        (ranges,) = [n for n in ops if n.target is torch.ops.lorafuse.mask_key_ranges.default]
        mask = ranges.args[0]
        assert mask.meta["example_value"].dim() == 4
        feeds = {n.name for n in _ancestors(mask) if n.op == "placeholder"}
        assert any("position_ids" in p for p in feeds), feeds
        assert not any("attention_mask" in p for p in placeholders), placeholders
    assert all(t == [branch] for t in taken), taken


@pytest.mark.slow
@pytest.mark.parametrize("kind,branch", [("left", "eager_chain"), ("right", "flash_with_bounds")])
def test_eager_attention_pass_gemma2_with_mask(kind, branch, monkeypatch):
    """Tiny Gemma2 (eager attention: softcap; layer 0 a sliding window of 8 < 12), passes
    lora + eager_attention, with an attention_mask: both layers rewritten to the run-time
    branching op, same losses and LoRA gradients as eager over 3 steps."""
    got, want, graphs, taken = train_beside_eager("gemma2", kind, ("lora", "eager_attention"),
                                                  monkeypatch)
    assert_same_training(got, want, f"gemma2 {kind}")
    assert len(graphs) == 1
    gm, reports = graphs[0]
    eager = next(r for r in reports if r.name == "eager_attention")
    assert len(eager.matched) == 2 and eager.skipped == [], eager.skipped
    assert all(t == [branch] for t in taken), taken



def _ranges_case(op):
    """A right-padded fp64 case (ranges) for either branching op: ``call(q, k, v)`` the op,
    the inputs, an output gradient, ``reference(q, k, v)`` the masked SDPA call it stands
    for, and (lo, hi, n_rep, mask)."""
    from lorafuse.kernels import attention as ka

    b, length, n_rep, d = 2, 12, 2, 8
    mask = padded_masks(b, length, "right")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, 2 * n_rep, length, d, dtype=torch.float64, generator=g)
    k, v = torch.randn(2, b, 2, length, d, dtype=torch.float64, generator=g)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=g)
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask)
    assert bool(ok)
    if op == "sdpa":
        flag = torch.ops.lorafuse.mask_is_causal(mask)
        call = lambda q_, k_, v_: torch.ops.lorafuse.sdpa_causal_ranges_or_masked(  # noqa: E731
            q_, k_, v_, mask, flag, ok, lo, hi, n_rep, None, True)
    else:
        add = additive(mask, torch.float64, MIN32)
        call = lambda q_, k_, v_: ka.eager_ranges_or_chain_op(  # noqa: E731
            q_, k_, v_, add, ok, lo, hi, n_rep, d ** -0.5, None)

    def reference(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, ka.repeat_kv(k_, n_rep),
                                              ka.repeat_kv(v_, n_rep), attn_mask=mask)

    return call, (q, k, v), dout, reference, (lo, hi, n_rep, mask)


@pytest.mark.parametrize("op", ["sdpa", "eager"])
def test_flash_branch_backward_uses_the_saved_forward(op, monkeypatch):
    """On the flash branch both branching ops return (out, lse, path) and their
    backward runs the flash backward from those: the flash forward runs once per step, not
    again in the backward; the gradients still match the masked reference (fp64)."""
    from lorafuse.kernels import attention as ka

    calls = []
    real = ka.flash_with_bounds
    monkeypatch.setattr(ka, "flash_with_bounds", lambda *a, **k: calls.append(1) or real(*a, **k))
    call, (q, k, v), dout, reference, _ = _ranges_case(op)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, path = call(qs, ks, vs)
    assert int(path) == ka.FLASH_BOUNDS and path.device.type == "cpu"
    assert calls == [1] and lse.shape == q.shape[:3] and torch.isfinite(lse).all()
    grads = torch.autograd.grad(out, (qs, ks, vs), dout)
    assert calls == [1], "the backward ran the flash forward again"
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    want = reference(qr, kr, vr)
    torch.testing.assert_close(out, want)
    for a, w in zip(grads, torch.autograd.grad(want, (qr, kr, vr), dout)):
        torch.testing.assert_close(a, w)


@pytest.mark.parametrize("op", ["sdpa", "eager"])
def test_ranges_batch_takes_the_other_path_when_flash_is_slower(op, monkeypatch):
    """Where the flash kernel loses for the shape (on CUDA, timed; here forced), a ranges
    batch takes the op's other path, forward and backward: no flash call, path RECOMPUTED,
    the masked reference's output and gradients (fp64)."""
    from lorafuse.kernels import attention as ka

    calls = []
    for name in ("flash_with_bounds", "flash_with_bounds_backward"):
        monkeypatch.setattr(ka, name, lambda *a, _n=name, **kw: calls.append(_n))
    monkeypatch.setattr(ka, "_ranges_take_flash", lambda *a, **kw: False)
    call, (q, k, v), dout, _, _ = _ranges_case(op)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, path = call(qs, ks, vs)
    assert int(path) == ka.RECOMPUTED and not lse.any()  # fp64: both ops recompute
    grads = torch.autograd.grad(out, (qs, ks, vs), dout)
    assert calls == []
    monkeypatch.undo()
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    out_f, _, path_f = call(qf, kf, vf)  # the flash branch: the same numbers
    assert int(path_f) == ka.FLASH_BOUNDS
    # (the eager chain's softmax runs in fp32, as transformers' does: fp32-tight there)
    tol = {} if op == "sdpa" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, out_f, **tol)
    for a, w in zip(grads, torch.autograd.grad(out_f, (qf, kf, vf), dout)):
        torch.testing.assert_close(a, w, **tol)


@pytest.mark.parametrize("flash_ms, want", [(2.0, False), (0.5, True)])
def test_faster_is_flash_times_both_paths_once_per_shape(flash_ms, want, monkeypatch):
    """The choice times each path forward and backward (both run here, on fp64 CPU tensors)
    at a shape's first use, in interleaved rounds, keeps the faster, and does not time
    that shape again, nor a shape whose batch and lengths fall in the same power-of-two
    buckets (lengths that vary from batch to batch are timed per bucket)."""
    from lorafuse.kernels._dispatch import ROUNDS
    from lorafuse.kernels import attention as ka

    monkeypatch.setattr(ka, "RANGES_PATHS", {})
    ran = []

    def timer(fn):
        fn()
        ran.append(fn.__name__)
        return flash_ms if fn.__name__ == "flash" else 1.0

    _, (q, k, v), _, _, (lo, hi, n_rep, mask) = _ranges_case("sdpa")
    def other(dout):  # the masked branch forward and backward, as the op times it
        out, lse, code = ka.sdpa_forward(q, k, v, mask, False, n_rep, None)
        ka.sdpa_backward(code, dout, q, k, v, out, lse, mask, False, n_rep, None)

    args = ("masked attention", q, k, v, lo, hi, 8 ** -0.5, None, other)
    assert ka.faster_is_flash(*args, timer=timer) is want
    assert ran == ["flash", "masked"] * ROUNDS
    assert ka.faster_is_flash(*args, timer=timer) is want and len(ran) == 2 * ROUNDS
    shorter = [t[:, :, :-3] for t in (q, k, v)]  # length 12 -> 9: the same bucket (16)
    assert ka.faster_is_flash(args[0], *shorter, *args[4:], timer=timer) is want
    assert len(ran) == 2 * ROUNDS and len(ka.RANGES_PATHS) == 1
    assert ka._ranges_take_flash(*args)  # off CUDA: always the flash kernel (tests run it)


if __name__ == "__main__":
    _worker()
